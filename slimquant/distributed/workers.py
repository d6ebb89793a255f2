"""The ranks an engine starts itself (vLLM's multiprocessing executor): one spawned process per rank on each node,
in one gloo group whose rank 0 is the engine's own process on node 0. Rank 0 schedules and samples; the others run
each step's forward (ModelRunner.serve_steps). Node k > 0 runs `serve --headless`: its ranks only (run_headless).
At start-up the ranks compare a fingerprint of the checkpoint and settings, and refuse to run mismatched. A rank
that fails is named in the error rank 0 raises, and every other rank is stopped: nothing is left waiting. A node
that stops answering is found by its heartbeats (nodes.py) and stops every rank too."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import platform
import socket
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from slimquant.distributed.cpu_binding import bind, core_groups
from slimquant.distributed.nodes import NodeBeat, NodeWatch, tell_node_0
from slimquant.distributed.shared_memory import SharedMemoryExchange, room_for, segment_bytes
from slimquant.distributed.tensor_parallel import MidStepFailure, TensorParallel
from slimquant.errors import RankFailure
from slimquant.format.safetensors_io import read_header

if TYPE_CHECKING:
    from slimquant.config import EngineConfig
    from slimquant.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)
_SPAWN_HINT = (
    "It died before joining the group. Ranks are spawned processes that import your script's main module: start "
    "the engine under `if __name__ == '__main__':`."
)
# How long the default group's waits last (start-up's agreements after loading, which may take long), and those of
# ranks without a step timeout (_links): as long as it takes, in practice (ten years stays far from overflowing
# gloo's nanosecond deadlines). A dead peer ends a wait at once (its socket closes, or in shared memory its process
# is gone), and a worker whose parent died exits (_watch_parent).
_WAIT = timedelta(days=3650)


class WorkerGroup:
    """Ranks 1..N-1 of an engine's tensor-parallel group, started by WorkerGroup.start."""

    def __init__(self, procs: list, errors: Any, tp: TensorParallel, ranks: list[int]):
        self.procs, self.errors, self.tp, self.ranks = procs, errors, tp, ranks  # ranks: each proc's global rank
        self._stopping = threading.Event()  # set: the engine stops the ranks (the keepalive thread ends)
        self._killed = threading.Event()  # set: the ranks are gone (the watch thread ends)
        self._aborted = threading.Event()  # set: a rank died or a node is lost (watch); the step's waits end
        self._keepalive_failure: BaseException | None = None
        self._nodes: NodeWatch | None = None  # the other nodes' notes and beats (node 0's store)
        self._lost: str | None = None  # a node whose beats stopped (watch)
        self._watcher: threading.Thread | None = None  # the watch's thread (kill waits for it)
        self.threads = torch.get_num_threads()  # this process's, given back by kill()
        self.affinity = os.sched_getaffinity(0)  # its cores, given back by kill()

    @classmethod
    def start(cls, config: EngineConfig) -> WorkerGroup:
        """On node 0: spawn this node's ranks after 0 (each on its share of the cores), join them (and the other
        nodes' ranks) as rank 0, and check that every rank has the same checkpoint and settings."""
        if config.nnodes == 1 and config.master_port is None:
            config = dataclasses.replace(config, master_port=free_port())
        cores = _local_cores(config)
        group = cls._spawn(config, _node_ranks(config)[1:], cores[1:])  # it keeps this process's threads and cores
        _bind(config, cores[0])
        group._join_as_rank0(config)
        try:
            if config.nnodes > 1:
                group._nodes = NodeWatch.of(config)
            group.guard(_check_fingerprints, config, group.tp)
            group.tp = group.guard(_links, group.tp, config, config.nnodes == 1, lambda: not group._dead())
        except BaseException:
            group.kill()
            raise
        group._start_watch(config)
        return group

    @classmethod
    def attach(cls, config: EngineConfig) -> WorkerGroup:
        """Drive the ranks of the default group someone else started (torchrun; the others run run_rank): this
        process must be its rank 0."""
        if dist.get_rank() != 0 or dist.get_world_size() != config.tensor_parallel_size:
            raise ValueError(
                f"distributed_executor_backend='mp' in a torch.distributed group drives it from rank 0 of "
                f"tensor_parallel_size={config.tensor_parallel_size} ranks; this is rank {dist.get_rank()} of "
                f"{dist.get_world_size()}"
            )
        group = cls([], None, TensorParallel(0, config.tensor_parallel_size), [])
        if config.nnodes > 1:  # the nodes beat to node 0's torchrun agent's store (run_follower)
            group._nodes = NodeWatch.of(config)
        _check_fingerprints(config, group.tp)
        # shared memory where torchrun's ranks share this machine; its waits end too when the watch finds a node lost
        group.tp = _links(group.tp, config, True, lambda: not group._aborted.is_set())
        group._start_watch(config)
        return group

    def _start_watch(self, config: EngineConfig) -> None:
        """Watch the ranks (watch) where a step could otherwise wait for a lost one until execute_model_timeout: on
        GPUs (NCCL), and with several nodes, whose waits in host collectives then end (TensorParallel.abandon)."""
        if config.nnodes > 1:
            self.tp = dataclasses.replace(self.tp, abandon=self._aborted)
        if (device := self.tp.device_group) is not None or config.nnodes > 1:
            self.watch(partial(dist.distributed_c10d._abort_process_group, device) if device is not None else None)

    @classmethod
    def _spawn(cls, config: EngineConfig, ranks: list[int], cores: list[list[int] | None]) -> WorkerGroup:
        ctx = mp.get_context("spawn")
        errors = ctx.Queue()
        config = dataclasses.replace(config, local_rank=None)  # each places itself by its rank
        procs = [
            ctx.Process(target=_worker_main, args=(config, rank, mine, errors), daemon=True)
            for rank, mine in zip(ranks, cores, strict=True)
        ]
        for p in procs:
            p.start()
        return cls(procs, errors, TensorParallel(0, config.tensor_parallel_size), ranks)

    def _join_as_rank0(self, config: EngineConfig) -> None:
        """init_process_group for rank 0, failing as soon as a local rank dies before joining, or when the other
        ranks have not joined in config.join_timeout."""
        done, failure = threading.Event(), []

        def init() -> None:
            try:
                _init_group(0, config)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                failure.append(e)
            finally:
                done.set()

        threading.Thread(target=init, daemon=True).start()
        while not done.wait(0.2):
            if self._dead():
                self.fail(None, _SPAWN_HINT)
        error = failure[0] if failure else None
        if isinstance(error, ValueError):  # the ranks did not meet: said as it is
            self.kill()
            raise error
        if error is not None:
            self.fail(error)

    def guard(self, fn: Callable, *args: Any) -> Any:
        """fn(*args) on rank 0; if it fails because a rank died, or in the middle of a step the ranks run with it
        (MidStepFailure), RankFailure naming what failed."""
        return self._guard(fn, args, own=())

    def guard_load(self, fn: Callable, *args: Any) -> Any:
        """guard(fn, *args) for loading the model, where a ValueError of rank 0's (its input is at fault: a model
        that does not split so) stops the ranks, which say the same, and is raised as it is."""
        return self._guard(fn, args, own=(ValueError,))

    def _guard(self, fn: Callable, args: tuple, own: tuple[type[Exception], ...]) -> Any:
        try:
            result = fn(*args)
        except own:
            self.kill()
            raise
        except Exception as e:
            self._settle()  # a rank that broke the collective is exiting: let it be seen dead, or its node say so
            if self._dead():
                self.fail(e)
            if isinstance(e, MidStepFailure) or self._aborted.is_set():  # a rank on another node died or hangs (or
                # its node is lost), or rank 0's step failed: which one, its node may have said
                said = f"rank 0 failed inside a step the ranks run together ({e}); they cannot go on"
                self.fail(e, self._node_failure() or said)
            raise
        if self._aborted.is_set():  # the step ended because a rank died or a node is lost: its results are void
            self.fail(None, self._node_failure() or "")
        return result

    def check(self) -> None:
        """RankFailure if a rank has died (say, while the engine was idle), another node said one did or is lost, or
        a keepalive to the ranks failed."""
        if self._dead():
            self.fail(None)
        if (failure := self._keepalive_failure) is not None:
            self.fail(failure, self._node_failure() or f"rank 0's keepalive to the other ranks failed ({failure})")
        if (note := self._node_failure()) is not None:
            self.fail(None, note)

    def keep_alive(self, runner: ModelRunner) -> None:
        """Send the other ranks runner.keepalive()s from a thread while the engine idles (until stop or kill): the
        ranks on other machines wait for rank 0 execute_model_timeout at most (ModelRunner._next_step)."""

        def beat() -> None:
            while not self._stopping.wait(runner.keepalive_period / 2):
                try:
                    runner.keepalive()
                except Exception as e:  # noqa: BLE001 - the engine's next check() raises it
                    self._keepalive_failure = e
                    return

        threading.Thread(target=beat, name="slimquant-keepalive", daemon=True).start()

    def watch(self, abort: Callable[[], None] | None) -> None:
        """From a thread: as soon as one of this node's ranks dies, another node says one of its ranks did, or a node
        stops beating, say so, set _aborted (rank 0's waits in host collectives end: TensorParallel.abandon) and
        call abort (of the NCCL group: NCCL waits for a dead peer until its timeout, execute_model_timeout; torch's
        abort of a group is experimental, and works for NCCL only). So a step ends in seconds and guard raises
        RankFailure."""

        def watch() -> None:
            if (failure := self._first_failure()) is None:
                return
            self._aborted.set()
            logger.error("tensor parallel: %s; abandoning the step's collectives", failure)
            try:
                if abort is not None:
                    abort()
            except Exception as e:  # noqa: BLE001 - the step then ends at NCCL's timeout, and guard says why
                logger.error("tensor parallel: aborting the NCCL group failed (%s: %s)", type(e).__name__, e)

        self._watcher = threading.Thread(target=watch, name="slimquant-watch-ranks", daemon=True)
        self._watcher.start()

    def _first_failure(self) -> str | None:
        """Wait until a rank of this node dies, another node says one of its ranks did, or a node stops beating,
        and say which; None when the engine stops the ranks (they exit 0, or it kills them)."""
        sentinels = [p.sentinel for p in self.procs]
        while True:
            exited = mp.connection.wait(sentinels, timeout=0.5)
            if self._killed.is_set():
                return None
            # a sentinel closes a moment before its exit code is there: read sooner, a death would look like a stop
            for p in self.procs:
                if p.sentinel in exited:
                    p.join(5)
            if dead := self._dead():
                return f"rank(s) {dead} died"
            if exited:  # with code 0: told to stop
                return None
            if (note := self._node_failure()) is not None:
                return note
            if self._nodes is not None and (lost := self._nodes.lost()) is not None:
                self._lost = lost
                return lost

    def fail(self, cause: BaseException | None, hint: str = "") -> None:
        """Stop every rank and raise RuntimeError with what the failed ranks said."""
        dead, said = self._dead(), self._errors() or hint
        how = self._exit_codes(dead) if dead else "its node is lost" if self._lost else "a collective with it failed"
        self.kill()
        who = f"rank(s) {dead}" if dead else "a rank"
        raise RankFailure(
            f"tensor parallel: {who} of {self.tp.size} failed ({how}); every rank is stopped. {said}"
        ) from cause

    def stop(self, runner: ModelRunner) -> None:
        """Let the ranks finish (they leave serve_steps) and reap them."""
        self._stopping.set()
        with contextlib.suppress(Exception):  # a rank is already gone: killed below
            runner.stop_serving()
        for p in self.procs:
            p.join(timeout=10)
        self.kill()

    def _exit_codes(self, dead: list[int]) -> str:
        """How the dead ranks ended, said for people."""
        codes = ", ".join(f"rank {r} exited with code {self.procs[self.ranks.index(r)].exitcode}" for r in dead)
        return f"{codes}; a negative code is the signal that ended it, -9: killed, e.g. out of memory"

    def _settle(self) -> None:
        """Wait for a failure's cause to show: 0.5 s for local ranks' exits; with other nodes, up to 2 s for their
        note (a node that lost a rank tells node 0 within its 0.5 s poll, and only then stops the others)."""
        time.sleep(0.5)
        end = time.monotonic() + 1.5
        while self._nodes is not None and not self._dead() and self._node_failure() is None and time.monotonic() < end:
            time.sleep(0.05)

    def _node_failure(self) -> str | None:
        """What another node said of its failed ranks (tell_node_0), or which node is lost, or None."""
        if self._nodes is None:
            return None
        return self._nodes.note() or self._lost

    def _dead(self) -> list[int]:
        return [rank for rank, p in zip(self.ranks, self.procs, strict=True) if p.exitcode not in (None, 0)]

    def _errors(self) -> str:
        said = []
        if self.errors is None:  # ranks this group did not start: their own logs say why
            return ""
        while True:
            try:
                said.append(self.errors.get(timeout=0.5 if not said else 0.05))
            except Exception:  # noqa: BLE001 - queue.Empty: nothing more
                break
        by_text: dict[str, list[int]] = {}
        for rank, text in sorted(said):
            by_text.setdefault(text, []).append(rank)
        return " ".join(f"rank{'s' * (len(r) > 1)} {', '.join(map(str, r))}: {text}" for text, r in by_text.items())

    def kill(self) -> None:
        """End every rank now, leave the process group, and give this process its threads back."""
        self._stopping.set()
        self._killed.set()
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)  # it ends at its next look (0.5 s); not inside a store call as we exit
        if dist.is_initialized():
            dist.destroy_process_group()
        close_exchange(self.tp)  # this is rank 0: it removes the segment
        self.tp = dataclasses.replace(self.tp, local=None)
        os.sched_setaffinity(0, self.affinity)
        torch.set_num_threads(self.threads)


def run_headless(config: EngineConfig) -> int:
    """Node node_rank > 0: run this node's ranks until rank 0 stops them; 0, or 1 when one failed or node 0 is lost
    (said). The process should then leave with os._exit (NodeBeat)."""
    if config.node_rank == 0:
        raise ValueError("--headless is for nodes 1..nnodes-1: node 0 serves")
    logger.info("node %d: running its ranks headless (node 0 serves)", config.node_rank)
    group = WorkerGroup._spawn(config, _node_ranks(config), _local_cores(config))
    beat = NodeBeat(config)
    try:
        while any(p.is_alive() for p in group.procs) and not group._dead() and beat.lost() is None:
            time.sleep(0.5)
        dead, lost = group._dead(), beat.lost()
    except BaseException:  # Ctrl-C
        group.kill()
        raise
    finally:
        beat.stop()
    if not dead and lost is None:
        group.kill()
        return 0
    if dead:
        what = f"rank(s) {dead} on node {config.node_rank} failed ({group._exit_codes(dead)}). {group._errors()}"
        tell_node_0(config, what)  # before the others are stopped: rank 0 waits for it when their links break
    else:
        what = f"{lost}; this node's ranks are stopped"
    group.kill()
    print(f"tensor parallel: {what}", flush=True)
    return 1


def run_follower(config: EngineConfig) -> None:
    """A rank > 0 of torchrun's group under serve: run_rank. With several nodes, the first rank of each node > 0
    also beats to node 0 (to its torchrun agent's store) and, when node 0 takes no beat for node_timeout, says so
    and exits 1 (torchrun's agent then stops the node's other ranks). The process should leave with os._exit
    (NodeBeat)."""
    if config.nnodes > 1 and config.node_rank > 0 and config.local_rank == 0:
        _exit_when_lost(NodeBeat(config))
    run_rank(config)


def _exit_when_lost(beat: NodeBeat) -> None:
    """From a thread: exit this process (1) as soon as beat finds node 0 lost, saying so."""

    def watch() -> None:
        while (lost := beat.lost()) is None:
            time.sleep(0.5)
        print(f"tensor parallel: {lost}; this node's ranks are stopped", flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="slimquant-watch-node-0", daemon=True).start()


def _node_ranks(config: EngineConfig) -> list[int]:
    """The global ranks that run on this node."""
    per_node = config.ranks_per_node
    return list(range(config.node_rank * per_node, (config.node_rank + 1) * per_node))


def _local_cores(config: EngineConfig) -> list[list[int] | None]:
    """Each of this node's ranks' cores (config.cpu_threads_bind), None for each where nothing is bound."""
    return core_groups(config.cpu_threads_bind, config.ranks_per_node) or [None] * config.ranks_per_node


def _bind(config: EngineConfig, cores: list[int] | None) -> None:
    """Run this process on cores, or where nothing is bound on its share of the cores' count."""
    if cores is None:
        torch.set_num_threads(_threads(config))
    else:
        bind(cores)


def _threads(config: EngineConfig) -> int:
    """Each rank's share of this machine's cores."""
    return max(1, (os.cpu_count() or 1) // config.ranks_per_node)


def _init_group(rank: int, config: EngineConfig) -> None:
    """Join the gloo group at master_addr:master_port (rank 0 listens there); ValueError where the ranks do not all
    meet in join_timeout."""
    where, size = (config.master_addr, config.master_port), config.tensor_parallel_size
    try:
        store = dist.TCPStore(*where, size, is_master=rank == 0, timeout=timedelta(seconds=config.join_timeout))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=_WAIT)
    except dist.DistError as e:
        if rank == 0 and "EADDRINUSE" in str(e):
            raise ValueError(
                f"master_port {where[1]} (--master-port) is in use on node 0 ({where[0]}): rank 0 listens there for "
                "the ranks to meet; pick a free port"
            ) from e
        nodes = f"and nodes 1..{config.nnodes - 1} (--node-rank K --headless) " if config.nnodes > 1 else ""
        raise ValueError(
            f"the {size} tensor-parallel ranks did not all meet at {where[0]}:{where[1]} in join_timeout="
            f"{config.join_timeout:g} s ({type(e).__name__}: {e}): start node 0 {nodes}with the same -tp, check "
            "that --master-addr / --master-port reach node 0 from every node, or raise --join-timeout"
        ) from e


def fingerprint(config: EngineConfig) -> str:
    """What every rank must agree on: config.json, the quant description, the safetensors headers and the engine
    settings that shape the model (not where it is, nor how many threads)."""
    folder = Path(config.model)
    h = hashlib.sha256()
    for path in sorted([*folder.glob("*.json"), *folder.glob("*.safetensors")]):
        if path.name.startswith("tokenizer"):
            continue
        h.update(path.name.encode())
        h.update(path.read_bytes() if path.suffix == ".json" else json.dumps(read_header(path)[1]).encode())
    names = ("dtype", "kv_cache_dtype", "quantization", "max_model_len", "block_size", "tensor_parallel_size")
    for name in (*names, "enable_expert_parallel", "tensor_parallel_order"):
        h.update(f"{name}={getattr(config, name)}".encode())
    return h.hexdigest()[:16]


def launched_group(config: EngineConfig) -> TensorParallel:
    """This process's place in the group torchrun (or the caller) made, where every rank runs its own engine
    (distributed_executor_backend='external_launcher')."""
    tp = TensorParallel.from_default_group(config.tensor_parallel_size)
    if tp.size > 1 and dist.get_backend() == "nccl":
        raise ValueError(
            "the torch.distributed group is NCCL only: slimquant's ranks also exchange host values; initialize it "
            "with init_process_group('gloo') (slimquant adds an NCCL group for GPU tensors itself)"
        )
    return _links(tp, config, True)


def close_exchange(tp: TensorParallel) -> None:
    """Detach tp's shared-memory exchange, if any (rank 0 removes the segment; the others keep their mapping)."""
    if tp.local is not None:
        tp.local.close(unlink=tp.rank == 0)


def _links(
    tp: TensorParallel,
    config: EngineConfig,
    offer: bool,
    alive: Callable[[], bool] = lambda: True,
    follows: bool = False,
) -> TensorParallel:
    """tp with what a step's collectives go through: a gloo group for its inputs and host tensors, and on GPUs this
    rank's GPU made current and an NCCL group (every rank makes each group: a collective); on CPUs a shared-memory
    exchange where rank 0 offers one and every rank is on its machine (offer False: never, e.g. the engine's own
    ranks on several nodes, whose deaths rank 0 sees only through gloo). A rank waits config.execute_model_timeout
    at most for a rank that does not answer, except where it follows rank 0's steps (follows: ModelRunner.
    serve_steps) in shared memory: there it waits for the next step as long as it takes, since rank 0 shares its
    machine and a wait ends when rank 0's process does (in gloo, rank 0 keeps it alive while idle)."""
    if tp.size == 1:
        return tp
    step_wait = timedelta(seconds=config.execute_model_timeout)
    group = dist.new_group(backend="gloo", timeout=step_wait)
    tp = dataclasses.replace(tp, step_group=group)
    if config.device.startswith("cuda"):
        torch.cuda.set_device(config.rank_device(tp.rank))
        return dataclasses.replace(tp, device_group=dist.new_group(backend="nccl", timeout=step_wait))
    return _share_memory(tp, offer, alive, None if follows else config.execute_model_timeout)


def _share_memory(
    tp: TensorParallel, offer: bool, alive: Callable[[], bool] = lambda: True, timeout: float | None = None
) -> TensorParallel:
    """tp with a shared-memory exchange where rank 0 offers one (on x86) and every rank can attach to it (all on
    rank 0's machine, in one process namespace), else tp; rank 0 creates the segment and broadcasts its name, the
    others attach. timeout: how long this rank's waits there last (None: no limit)."""
    if tp.rank == 0:
        local = (
            SharedMemoryExchange(0, tp.size, alive=alive, timeout=timeout) if offer and _can_offer(tp.size) else None
        )
        tp.broadcast(None if local is None else local.name)
    else:
        local = _attach(tp, tp.broadcast(), timeout)
    # every rank attached, and then sees every other's process (a wait's checks need it): else gloo for all
    if tp.min_int(int(local is not None)) and tp.min_int(int(local.sees_peers())):
        return dataclasses.replace(tp, local=local)
    if local is not None:
        local.close(unlink=tp.rank == 0)
    return tp


def _attach(tp: TensorParallel, name: str | None, timeout: float | None) -> SharedMemoryExchange | None:
    """This rank's view of rank 0's segment, or None where rank 0 offers none or it is not on this machine."""
    if name is None:
        return None
    try:
        return SharedMemoryExchange(tp.rank, tp.size, name, timeout=timeout)
    except FileNotFoundError:
        return None


_X86 = ("x86_64", "AMD64")  # stores stay in order: what the exchange's publish relies on


def _can_offer(size: int) -> bool:
    """Whether rank 0 can offer a shared-memory exchange: on x86, where /dev/shm has room (else it says why)."""
    if platform.machine() not in _X86:
        return False
    if not room_for(size):
        logger.warning(
            "tensor parallel: /dev/shm has less than the %.0f MiB free that %d ranks' shared-memory exchange takes; "
            "they exchange through gloo instead (slower). Give the container more (docker run --shm-size=1g, or "
            "--ipc=host)",
            segment_bytes(size) / 2**20,
            size,
        )
        return False
    return True


def _check_fingerprints(config: EngineConfig, tp: TensorParallel) -> None:
    """Every rank's fingerprint against rank 0's; ValueError on rank 0 naming the ranks that differ."""
    prints: list[str | None] = [None] * tp.size
    dist.all_gather_object(prints, fingerprint(config), group=tp.group)
    differ = [r for r, f in enumerate(prints) if f != prints[0]]
    if differ and tp.rank == 0:
        raise ValueError(
            f"rank(s) {differ} have another checkpoint or settings than rank 0 (fingerprints {prints}): every node "
            "must run the same model folder contents with the same --dtype, --kv-cache-dtype, --quantization, "
            "--max-model-len, -tp, --enable-expert-parallel and --tensor-parallel-order"
        )
    if differ:
        raise ValueError("this rank's checkpoint or settings differ from rank 0's (rank 0 says which)")


def run_rank(config: EngineConfig) -> None:
    """A rank > 0 of the default group: check it runs what rank 0 runs, load its part of the model, run steps
    until rank 0 says stop."""
    from slimquant.engine.llm_engine import load_runner

    tp = TensorParallel(dist.get_rank(), config.tensor_parallel_size)
    _check_fingerprints(config, tp)
    tp = _links(tp, config, False, follows=True)
    try:
        runner, _ = load_runner(config, tp, broadcast=False)
        runner.serve_steps()
    finally:
        close_exchange(tp)


def _worker_main(config: EngineConfig, rank: int, cores: list[int] | None, errors: Any) -> None:
    """A rank > 0 this node started: bind it, join the group, then run_rank."""
    _bind(config, cores)
    _watch_parent()
    try:
        _init_group(rank, config)
        run_rank(config)
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
