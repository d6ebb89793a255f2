"""Which CPU cores each rank on this machine runs on: EngineConfig.cpu_threads_bind, vLLM's
VLLM_CPU_OMP_THREADS_BIND. "auto" splits the cores this process may use into one contiguous group per local rank,
"0-3|4-7" names each local rank's cores, "all" binds nothing (each rank then runs cores / ranks threads)."""

from __future__ import annotations

import os
import re


def parse_core_list(text: str) -> list[int]:
    """ "0-3,8" -> [0, 1, 2, 3, 8]; ValueError on anything else."""
    cores: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if m is None or int(m[2] or m[1]) < int(m[1]):
            raise ValueError(f"cpu_threads_bind: {text!r} is not a core list such as '0-3,8'")
        cores += range(int(m[1]), int(m[2] or m[1]) + 1)
    return cores


def check_spec(spec: str, local_ranks: int) -> list[list[int]] | None:
    """The core sets spec names (None for "auto" and "all"); ValueError unless it is one of those or one core list
    per local rank separated by '|'."""
    if spec in ("auto", "all"):
        return None
    groups = [parse_core_list(part) for part in spec.split("|")]
    if len(groups) != local_ranks:
        raise ValueError(
            f"cpu_threads_bind {spec!r} names {len(groups)} core sets for {local_ranks} ranks on this machine: "
            "give one per rank, separated by '|' (e.g. '0-3|4-7'), or 'auto' or 'all'"
        )
    return groups


def core_groups(spec: str, local_ranks: int, allowed: list[int] | None = None) -> list[list[int]] | None:
    """Each local rank's cores in local rank order, or None: no binding ("all", or "auto" with fewer allowed cores
    than ranks). allowed: the cores this process may run on (default: its affinity)."""
    named = check_spec(spec, local_ranks)
    allowed = sorted(os.sched_getaffinity(0)) if allowed is None else allowed
    if spec == "all" or (spec == "auto" and len(allowed) < local_ranks):
        return None
    if spec == "auto":
        per, extra = divmod(len(allowed), local_ranks)
        starts = [r * per + min(r, extra) for r in range(local_ranks + 1)]
        return [allowed[starts[r] : starts[r + 1]] for r in range(local_ranks)]
    if missing := sorted({c for g in named for c in g} - set(allowed)):
        raise ValueError(f"cpu_threads_bind {spec!r}: cores {missing} are not available here (allowed: {allowed})")
    return named


def bind(cores: list[int]) -> None:
    """Run this process on cores, one torch thread per core."""
    import torch

    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
