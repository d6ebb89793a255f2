"""The ranks an engine starts itself (vLLM's multiprocessing executor): one spawned process per rank > 0 on this
machine, in one gloo group whose rank 0 is the engine's own process. Rank 0 schedules and samples; the others run
each step's forward (ModelRunner.serve_steps). A rank that fails is named in the error rank 0 raises, and every
other rank is stopped: nothing is left waiting."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from slimquant.distributed.tensor_parallel import TensorParallel

if TYPE_CHECKING:
    from slimquant.config import EngineConfig
    from slimquant.engine.model_runner import ModelRunner

_SPAWN_HINT = (
    "It died before joining the group. Ranks are spawned processes that import your script's main module: start "
    "the engine under `if __name__ == '__main__':`."
)
# Ranks wait for rank 0's next step as long as it takes (a server may idle for days); a dead peer ends the wait at
# once (its socket closes), and a worker whose parent died exits (_watch_parent).
_WAIT = timedelta(days=30)


class RankFailure(RuntimeError):
    """A tensor-parallel rank died or failed: the engine cannot go on (every rank has been stopped)."""


class WorkerGroup:
    """Ranks 1..N-1 of an engine's tensor-parallel group, started by WorkerGroup.start."""

    def __init__(self, procs: list, errors: Any, tp: TensorParallel):
        self.procs, self.errors, self.tp = procs, errors, tp
        self.threads = torch.get_num_threads()  # this process's, given back by kill()

    @classmethod
    def start(cls, config: EngineConfig) -> WorkerGroup:
        """Spawn ranks 1..N-1 (each on its share of the cores) and join them as rank 0."""
        size = config.tensor_parallel_size
        threads = max(1, (os.cpu_count() or 1) // size)
        port, ctx = free_port(), mp.get_context("spawn")
        errors = ctx.Queue()
        procs = [
            ctx.Process(target=_worker_main, args=(config, rank, size, port, threads, errors), daemon=True)
            for rank in range(1, size)
        ]
        for p in procs:
            p.start()
        group = cls(procs, errors, TensorParallel(0, size))
        torch.set_num_threads(threads)
        group._join_as_rank0(port)
        return group

    def _join_as_rank0(self, port: int) -> None:
        """init_process_group for rank 0, failing as soon as a worker dies before joining."""
        done, failure = threading.Event(), []

        def init() -> None:
            try:
                _init_group(0, self.tp.size, port)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                failure.append(e)
            finally:
                done.set()

        threading.Thread(target=init, daemon=True).start()
        while not done.wait(0.2):
            if self._dead():
                self.fail(None, _SPAWN_HINT)
        if failure:
            self.fail(failure[0])

    def guard(self, fn: Callable, *args: Any) -> Any:
        """fn(*args) on rank 0; if it fails because a rank died, a RuntimeError naming the rank and its error."""
        try:
            return fn(*args)
        except Exception as e:
            time.sleep(0.5)  # a rank that broke the collective is exiting: let it be seen dead
            if self._dead():
                self.fail(e)
            raise

    def check(self) -> None:
        """RankFailure if a rank has died (say, while the engine was idle)."""
        if self._dead():
            self.fail(None)

    def fail(self, cause: BaseException | None, hint: str = "") -> None:
        """Stop every rank and raise RuntimeError with what the failed ranks said."""
        dead, said = self._dead(), self._errors() or hint
        codes = ", ".join(f"rank {r} exited with code {self.procs[r - 1].exitcode}" for r in dead)
        self.kill()
        who = f"rank(s) {dead}" if dead else "a rank"
        raise RankFailure(
            f"tensor parallel: {who} of {self.tp.size} failed ({codes or 'a collective failed'}; a negative code is "
            f"the signal that ended it, -9: killed, e.g. out of memory); every rank is stopped. {said}"
        ) from cause

    def stop(self, runner: ModelRunner) -> None:
        """Let the ranks finish (they leave serve_steps) and reap them."""
        with contextlib.suppress(Exception):  # a rank is already gone: killed below
            runner.stop_serving()
        for p in self.procs:
            p.join(timeout=10)
        self.kill()

    def _dead(self) -> list[int]:
        return [rank for rank, p in enumerate(self.procs, start=1) if p.exitcode is not None and p.exitcode != 0]

    def _errors(self) -> str:
        said = []
        while True:
            try:
                said.append(self.errors.get(timeout=0.5 if not said else 0.05))
            except Exception:  # noqa: BLE001 - queue.Empty: nothing more
                break
        return " ".join(f"rank {rank}: {text}" for rank, text in sorted(said))

    def kill(self) -> None:
        """End every rank now, leave the process group, and give this process its threads back."""
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self.threads)


def _init_group(rank: int, size: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, timeout=_WAIT)


def _worker_main(config: EngineConfig, rank: int, size: int, port: int, threads: int, errors: Any) -> None:
    """A rank > 0: join the group, load this rank's part of the model, run steps until rank 0 says stop."""
    from slimquant.engine.llm_engine import load_runner

    torch.set_num_threads(threads)
    _watch_parent()
    try:
        _init_group(rank, size, port)
        runner, _ = load_runner(config, TensorParallel(rank, size), broadcast=False)
        runner.serve_steps()
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, then this process exits
        errors.put((rank, f"{type(e).__name__}: {e}" if isinstance(e, ValueError) else traceback.format_exc(-3)))
        time.sleep(0.2)  # let the queue's feeder thread send it
        os._exit(1)
    dist.destroy_process_group()


def _watch_parent() -> None:
    """Exit when the process that started this rank is gone (rank 0 killed: nobody would stop this one)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
