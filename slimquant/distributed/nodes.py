"""What the nodes of a multi-node engine tell each other through node 0's TCPStore (where their ranks met).

- A node > 0 whose rank failed leaves node 0 a note naming it (tell_node_0), so that rank 0 says which rank failed.
- A node > 0 beats: it adds to its counter there every BEAT_PERIOD seconds (NodeBeat). Node 0 counts a node whose
  counter has not moved for config.node_timeout seconds as lost (NodeWatch), and a node > 0 counts node 0 as lost
  when it has taken no beat for as long: a machine that is gone without closing its connections (powered off, cut
  off, or stopped) then stops every rank within seconds instead of after execute_model_timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING

import torch.distributed as dist

if TYPE_CHECKING:
    from slimquant.config import EngineConfig

logger = logging.getLogger(__name__)
BEAT_PERIOD = 1.0  # seconds between a node's beats
_FAILED = "slimquant_failed_ranks"  # the key of a node's note (raw: the groups' keys are prefixed)
_SILENT = "its machine is down or cut off from this one, or its processes are stopped"  # what a node's silence means


def _beat_key(node: int) -> str:
    return f"slimquant_beat_{node}"


def store_client(config: EngineConfig, wait: float = 5.0) -> dist.TCPStore:
    """A client of node 0's TCPStore; its calls fail after wait seconds without an answer."""
    return dist.TCPStore(config.master_addr, config.master_port, is_master=False, timeout=timedelta(seconds=wait))


def tell_node_0(config: EngineConfig, what: str, wait: float = 2.0) -> None:
    """Leave rank 0 a note of this node's failure, so that it names the ranks (and on GPUs aborts the step's NCCL
    collectives, which would wait for them until their timeout); nothing where node 0 does not take it within a few
    seconds (it may be what failed: gone, or stopped, where a call to its store may never return)."""

    def post() -> None:
        try:
            store_client(config, wait).set(_FAILED, what)
        except Exception as e:  # noqa: BLE001 - said below
            logger.warning("node %d: could not tell node 0 that its ranks failed (%s)", config.node_rank, e)

    poster = threading.Thread(target=post, name="slimquant-tell-node-0", daemon=True)
    poster.start()
    poster.join(2 * wait + 1)  # connecting, then setting


class NodeWatch:
    """Rank 0's view of the other nodes: their notes, and whose beats stopped."""

    def __init__(self, store: dist.TCPStore, config: EngineConfig):
        self.store, self.nodes, self.timeout = store, config.nnodes, config.node_timeout
        self._seen: dict[int, tuple[int, float]] = {}  # node -> (its counter, when rank 0 saw it move)

    @classmethod
    def of(cls, config: EngineConfig) -> NodeWatch | None:
        """Rank 0's watch of config's other nodes, None where it cannot reach its own store (said: a failure is then
        said less precisely, and a lost node found only by execute_model_timeout)."""
        try:
            return cls(store_client(config), config)
        except Exception as e:  # noqa: BLE001 - said
            address = config.master_addr
            logger.warning("tensor parallel: rank 0 cannot read the other nodes' notes at %s (%s)", address, e)
            return None

    def note(self) -> str | None:
        """What another node said of its failed ranks (tell_node_0), or None."""
        try:
            return self.store.get(_FAILED).decode() if self.store.check([_FAILED]) else None
        except Exception:  # noqa: BLE001 - node 0's store is gone with this process: nothing to say
            return None

    def lost(self) -> str | None:
        """Which node has not beaten for the timeout, said for people, or None. Called from one thread, often (a
        node is lost timeout seconds after the first call that sees its counter stop at most)."""
        now = time.monotonic()
        for node in range(1, self.nodes):
            try:
                count = self.store.add(_beat_key(node), 0)
            except Exception:  # noqa: BLE001 - node 0's store is gone with this process: nothing to say
                return None
            if self._seen.get(node, (None,))[0] != count:
                self._seen[node] = (count, now)
            elif now - self._seen[node][1] > self.timeout:
                return f"node {node} stopped answering: no heartbeat in node_timeout={self.timeout:g} s ({_SILENT})"
        return None


class NodeBeat:
    """A node > 0's beats to node 0, from a thread (a call to a stopped node 0's store may never return), and
    whether node 0 still takes them. The thread may be inside the store's C++ when the process exits, which aborts
    it (SIGABRT): a process that beats leaves with os._exit (serve sets exit_at_once for the CLI)."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self._taken: float | None = None  # when node 0 last took a beat (None: not yet, it may not be up)
        self._stop = threading.Event()
        threading.Thread(target=self._beat, name="slimquant-node-beat", daemon=True).start()

    def _beat(self) -> None:
        store, key = None, _beat_key(self.config.node_rank)
        while not self._stop.is_set():
            try:
                store = store or store_client(self.config, wait=BEAT_PERIOD * 2)
                store.add(key, 1)
                self._taken = time.monotonic()
            except Exception:  # noqa: BLE001 - node 0 not up yet, or gone: lost() says when that lasts
                store = None
            self._stop.wait(BEAT_PERIOD)

    def stop(self) -> None:
        """End the beats (the thread leaves at its next beat)."""
        self._stop.set()

    def lost(self) -> str | None:
        """That node 0 has taken no beat for node_timeout seconds since it took one, said for people, or None."""
        wait = self.config.node_timeout
        if self._taken is None or time.monotonic() - self._taken <= wait:
            return None
        return f"node 0 stopped answering: it took no heartbeat in node_timeout={wait:g} s ({_SILENT})"
