"""run_ranks: every rank's result in rank order; a rank that raises, or dies without a result, is a RuntimeError
at once, and no process is left behind."""

from __future__ import annotations

import os
import time

import pytest

from slimquant.distributed.launch import run_ranks


def _rank_and_size(rank: int, size: int, word: str) -> str:
    return f"{word} {rank}/{size}"


def _rank1_raises(rank: int, size: int) -> int:
    if rank == 1:
        raise ValueError("bad input on rank 1")
    return rank


def _rank1_dies(rank: int, size: int) -> int:
    if rank == 1:
        os._exit(3)
    time.sleep(120)  # rank 0 outlives the check: it is killed, not waited for
    return rank


def test_results_come_in_rank_order():
    assert run_ranks(_rank_and_size, 3, "rank") == ["rank 0/3", "rank 1/3", "rank 2/3"]


def test_a_rank_that_raises_is_reported_with_its_traceback():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 failed:.*ValueError: bad input on rank 1"):
        run_ranks(_rank1_raises, 2)


def test_a_rank_that_dies_is_reported_at_once():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] died before giving a result \(exit codes \{1: 3\}\)"):
        run_ranks(_rank1_dies, 2, timeout=60)
    assert time.monotonic() - start < 30
