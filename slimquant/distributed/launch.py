"""run_ranks: a function on N local gloo ranks (spawned processes on loopback), what each returns collected; the
way tests and benchmarks run torchrun-style ranks (each its own engine) without torchrun."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

from slimquant.distributed.workers import free_port


def run_ranks(fn: Callable, size: int, *args, timeout: float = 300, threads: int = 1) -> list:
    """[fn(rank, size, *args) for each rank], each in its own process (of threads threads) in one gloo group; fn
    must be importable (a module-level function). A rank's exception, death or timeout is a RuntimeError (with its
    traceback where it raised), and every process is killed (nothing is left hanging)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, rank, size, port, threads, results, args)) for rank in range(size)
    ]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < size:
            try:
                rank, ok, value = results.get(timeout=0.5)
            except queue.Empty:
                _check_waiting(procs, out, deadline, timeout)
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = value
    except BaseException:
        for p in procs:  # the others may wait in a collective for the failed one
            p.kill()
        raise
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(size)]


def _check_waiting(procs: list, out: dict, deadline: float, timeout: float) -> None:
    """RuntimeError if a rank without a result has died (a crash, a signal) or the time is up."""
    missing = [r for r in range(len(procs)) if r not in out]
    dead = {r: procs[r].exitcode for r in missing if procs[r].exitcode not in (None, 0)}
    if dead:
        raise RuntimeError(f"rank(s) {sorted(dead)} died before giving a result (exit codes {dead})")
    if time.monotonic() > deadline:
        raise RuntimeError(f"ranks {missing} gave no result in {timeout:.0f} s")


def _rank_main(fn: Callable, rank: int, size: int, port: int, threads: int, results, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, timeout=timedelta(seconds=60)
        )
        results.put((rank, True, fn(rank, size, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
