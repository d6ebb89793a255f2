"""`slimquant serve -tp 2`: the same answers as one process; a rank killed mid-generation fails the request and the
server exits with an error instead of hanging."""

from __future__ import annotations

import time

import httpx
import psutil

from tests.server.conftest import auth, start_server, stop_server

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # as each of 2 ranks on 2 cores: the same float rounding
CHAT = {"messages": [{"role": "user", "content": "The capital of France is"}], "max_tokens": 12, "temperature": 0}


def _chat(base: str) -> str:
    r = httpx.post(f"{base}/v1/chat/completions", json=CHAT, headers=auth(), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _ranks(proc) -> list[psutil.Process]:
    """The server's rank processes (its spawned children, not multiprocessing's resource tracker)."""
    children = psutil.Process(proc.pid).children()
    return [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]


def test_serve_tp_answers_as_one_process(checkpoints):
    path = checkpoints["qwen2-W8A8_DYNAMIC"]
    answers = []
    for extra in ((), ("-tp", "2")):
        proc, base = start_server(path, "--backend", "torch-reference", *extra, env=ONE_THREAD)
        try:
            assert len(_ranks(proc)) == len(extra) // 2
            answers.append(_chat(base))
        finally:
            stop_server(proc)
    assert answers[0] == answers[1] and answers[0]


def test_a_rank_killed_mid_generation_stops_the_server(checkpoints):
    proc, base = start_server(checkpoints["llama-W8A8"], "-tp", "2")
    try:
        body = {"prompt": "Hello", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=auth(), timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            (rank,) = _ranks(proc)
            rank.kill()
            rest = list(lines)
        assert '"error"' in " ".join(rest) and "rank" in " ".join(rest), rest[-3:]
        start = time.perf_counter()
        assert proc.wait(timeout=30) == 1
        assert time.perf_counter() - start < 30
        assert "rank(s) [1] of 2 failed" in proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            stop_server(proc)
