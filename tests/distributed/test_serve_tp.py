"""`slimquant serve -tp 2` (its own ranks, two nodes, or torchrun's): the same answers as one process; a rank killed
mid-generation fails the request and the server exits with an error instead of hanging, and so does a rank that
hangs (stopped), after --execute-model-timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil

from tests.server.conftest import auth, free_port, start_server, stop_server

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


def _kill_mid_stream(base: str, rank: psutil.Process, how=psutil.Process.kill) -> str:
    """Stream a long completion, end rank (how: kill, or suspend: SIGSTOP) after its first token, and return the
    rest of the stream."""
    body = {"prompt": "Hello", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=auth(), timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        how(rank)
        return " ".join(lines)


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
        (rank,) = _ranks(proc)
        rest = _kill_mid_stream(base, rank)
        assert '"error"' in rest and "rank" in rest, rest[-500:]
        start = time.perf_counter()
        assert proc.wait(timeout=30) == 1
        assert time.perf_counter() - start < 30
        assert "rank(s) [1] of 2 failed" in proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            stop_server(proc)


def test_a_rank_that_hangs_mid_generation_stops_the_server_after_the_timeout(checkpoints):
    proc, base = start_server(checkpoints["llama-W8A8"], "-tp", "2", "--execute-model-timeout", "3")
    (rank,) = _ranks(proc)
    try:
        start = time.perf_counter()
        rest = _kill_mid_stream(base, rank, psutil.Process.suspend)  # stopped: its process is still there
        assert "rank(s) [1] of the tensor-parallel group did not answer in execute_model_timeout=3 s" in rest, rest
        assert proc.wait(timeout=30) == 1
        assert time.perf_counter() - start < 30
        assert not rank.is_running()  # killed with the others
    finally:
        if proc.poll() is None:
            stop_server(proc)
        with contextlib.suppress(psutil.NoSuchProcess):
            rank.kill()


def _headless(path: str, port: int, *extra: str) -> subprocess.Popen:
    """Node 1 of 2 on this machine: its rank only (its threads' stacks dumped on SIGABRT: _exit_code)."""
    cmd = [sys.executable, "-m", "slimquant.entrypoints.cli", "serve", path, "-tp", "2", "--nnodes", "2"]
    cmd += ["--node-rank", "1", "--headless", "--master-port", str(port), "--backend", "torch-reference", *extra]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, preexec_fn=_like_a_terminal)


def _like_a_terminal() -> None:
    """Ctrl-C's default in the child, as at a terminal: a suite run as a background job of a script (no job
    control) has SIGINT ignored, which its children inherit (Python then raises no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _exit_code(proc: subprocess.Popen, within: float) -> int:
    """proc's exit status once it exits, within `within` seconds; else the test fails with its output and where
    its threads are (SIGABRT: faulthandler's dump)."""
    try:
        return proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        _end(proc)
        raise AssertionError(f"still running after {within:g} s:\n{proc.stdout.read().decode()[-6000:]}") from None


def _two_nodes(path: str, *extra: str) -> tuple[subprocess.Popen, subprocess.Popen, str]:
    """Node 1 (headless) and node 0 (serving) of -tp 2 on this machine, both with extra: (node 1, node 0, URL)."""
    port = free_port()
    node1 = _headless(path, port, "--max-model-len", "128", *extra)
    head, base = start_server(path, "--backend", "torch-reference", "-tp", "2", "--nnodes", "2", "--master-port",
                              str(port), *extra)  # fmt: skip
    return node1, head, base


def _end(*procs: subprocess.Popen) -> None:
    """Kill procs and their children where still running (stopped ones too)."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                p.kill()
        proc.wait(timeout=30)


def _node_1_after_node_0_stops(node1: subprocess.Popen, head: subprocess.Popen, within: float) -> str:
    """Stop node 0 (as if its machine were gone without closing its connections); node 1's output, once it exited 1
    within `within` seconds."""
    psutil.Process(head.pid).suspend()
    start = time.perf_counter()
    assert node1.wait(timeout=60) == 1
    assert time.perf_counter() - start < within
    return node1.stdout.read().decode()


def test_two_nodes_on_one_machine_answer_as_one_process(checkpoints):
    path = checkpoints["qwen2-W8A8_DYNAMIC"]
    (one, base) = start_server(path, "--backend", "torch-reference")
    try:
        want = _chat(base)
    finally:
        stop_server(one)
    port = free_port()
    node1 = _headless(path, port, "--max-model-len", "128")
    nodes = ("-tp", "2", "--nnodes", "2", "--master-port", str(port))
    head, base = start_server(path, "--backend", "torch-reference", *nodes)
    try:
        assert _chat(base) == want
    finally:
        stop_server(head)
    assert node1.wait(timeout=30) == 0, node1.stdout.read().decode()[-2000:]


def test_a_rank_killed_on_another_node_stops_the_server_naming_it(checkpoints):
    """Rank 0 sees a remote rank's death as its step's collective failing (gloo), and that node's note names the
    rank and how it ended: every rank stops."""
    node1, head, base = _two_nodes(checkpoints["llama-W8A8"])
    try:
        (rank1,) = _ranks(node1)
        rest = _kill_mid_stream(base, rank1)
        assert "rank(s) [1] on node 1 failed (rank 1 exited with code -9" in rest, rest[-500:]
        assert head.wait(timeout=30) == 1
        assert node1.wait(timeout=30) == 1
    finally:
        _end(head, node1)


def test_a_rank_that_hangs_on_another_node_stops_the_server_after_the_timeout(checkpoints):
    """A rank stopped on the other node (as if its machine were gone without closing its connections): rank 0's
    step times out in gloo, and that stops every rank."""
    node1, head, base = _two_nodes(checkpoints["llama-W8A8"], "--execute-model-timeout", "3")
    try:
        (rank1,) = _ranks(node1)
        rest = _kill_mid_stream(base, rank1, psutil.Process.suspend)
        assert "a rank did not answer in execute_model_timeout=3 s" in rest, rest[-500:]
        assert head.wait(timeout=30) == 1
        rank1.resume()  # back: it finds the group gone, and its node exits
        assert node1.wait(timeout=30) == 1
    finally:
        _end(head, node1)


def test_an_idle_server_keeps_its_nodes_and_they_exit_when_node_0_hangs(checkpoints):
    """Node 0 sends the other node's ranks a keepalive while it idles: an idle server outlives
    --execute-model-timeout. When node 0 stops answering (stopped, as if its machine were gone without closing its
    connections), the other node's ranks give up after that timeout instead of waiting for ever."""
    node1, head, base = _two_nodes(checkpoints["llama-W8A8"], "--execute-model-timeout", "2")
    try:
        time.sleep(6)  # idle for three timeouts
        assert _chat(base)
        out = _node_1_after_node_0_stops(node1, head, within=30)
        assert "rank 0 sent nothing in execute_model_timeout=2 s" in out, out[-2000:]
    finally:
        _end(head, node1)


def test_an_idle_server_exits_within_seconds_of_losing_a_node(checkpoints):
    """The other node stopped with Ctrl-C while node 0 idles (no request comes to find out): node 0's keepalive,
    every 5 s at most, finds its ranks gone, and the server exits 1 saying so (before: at the next request, a 500)."""
    node1, head, base = _two_nodes(checkpoints["llama-W8A8"])
    try:
        assert _chat(base)
        node1.send_signal(signal.SIGINT)
        assert _exit_code(node1, within=30) == 130
        start = time.perf_counter()
        assert head.wait(timeout=30) == 1
        assert time.perf_counter() - start < 10
        out = head.stdout.read().decode()
        assert "a rank of 2 failed (a collective with it failed); every rank is stopped. rank 0's keepalive" in out
    finally:
        _end(head, node1)


def test_a_node_that_stops_answering_mid_generation_stops_the_server_within_node_timeout(checkpoints):
    """Node 1 stopped whole (its process and its rank's: as if its machine were gone without closing its
    connections): its heartbeat stops, and node 0 fails the request and exits a few seconds after --node-timeout,
    though its step would wait for the rank execute_model_timeout (300 s)."""
    node1, head, base = _two_nodes(checkpoints["llama-W8A8"], "--node-timeout", "3")
    frozen = [psutil.Process(node1.pid), *_ranks(node1)]
    try:
        start = time.perf_counter()
        rest = _kill_mid_stream(base, frozen, lambda procs: [p.suspend() for p in procs])
        assert "node 1 stopped answering: no heartbeat in node_timeout=3 s" in rest, rest[-500:]
        assert head.wait(timeout=60) == 1
        assert time.perf_counter() - start < 20
    finally:
        _end(head, node1)


def test_a_node_whose_node_0_stops_answering_exits_within_node_timeout(checkpoints):
    """Node 0 stopped while it idles: node 1 stops its ranks and exits a few seconds after --node-timeout, though
    they would wait for node 0's next step execute_model_timeout (300 s)."""
    node1, head, base = _two_nodes(checkpoints["llama-W8A8"], "--node-timeout", "3")
    try:
        assert _chat(base)
        out = _node_1_after_node_0_stops(node1, head, within=15)
        assert "node 0 stopped answering: it took no heartbeat in node_timeout=3 s" in out, out[-2000:]
    finally:
        _end(head, node1)


def test_nodes_with_different_settings_are_refused_at_start(checkpoints):
    path, port = checkpoints["llama-W8A8"], free_port()
    node1 = _headless(path, port, "--max-model-len", "96")  # the head runs 128
    cmd = [sys.executable, "-m", "slimquant.entrypoints.cli", "serve", path, "-tp", "2", "--nnodes", "2"]
    cmd += ["--master-port", str(port), "--max-model-len", "128", "--port", str(free_port())]
    head = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert head.returncode != 0
    assert "rank(s) [1] have another checkpoint or settings than rank 0" in head.stdout + head.stderr
    assert node1.wait(timeout=30) == 1


def _torchrun(path: str, *launch: str, serve: tuple[str, ...] = ()) -> subprocess.Popen:
    """`torchrun *launch -m slimquant.entrypoints.cli serve path *serve`, in its own session."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "slimquant.entrypoints.cli", "serve", path]
    cmd += ["--max-model-len", "128", *serve]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _torchrun_serve(path: str, *launch: str, serve: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """`torchrun --nproc-per-node 2 -m slimquant.entrypoints.cli serve path` (or *launch, serve's extra options),
    up (its /health answers): (the torchrun process, in its own session, and the server's base URL)."""
    port = free_port()
    launch = launch or ("--nproc-per-node", "2", "--master-port", str(free_port()))
    run = _torchrun(path, *launch, serve=("--port", str(port), "--api-key", "test-key", *serve))
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline and run.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    assert run.poll() is None, run.stdout.read().decode()[-3000:]
    return run, base


def _torchrun_two_nodes(path: str, *serve: str) -> tuple[subprocess.Popen, subprocess.Popen, str]:
    """Two torchrun "nodes" of one rank each on this machine: (node 1, node 0 serving, its URL)."""
    nodes = ("--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(free_port()))
    node1 = _torchrun(path, *nodes, "--node-rank", "1", serve=serve)
    head, base = _torchrun_serve(path, *nodes, "--node-rank", "0", serve=serve)
    return node1, head, base


def test_nodes_that_do_not_meet_fail_after_join_timeout_naming_the_address(checkpoints):
    """A headless node whose node 0 never comes, and a node 0 whose other node never comes: each exits with a
    clear error after --join-timeout instead of waiting forever."""
    path, port = checkpoints["llama-W8A8"], free_port()
    node1 = _headless(path, port, "--join-timeout", "3")
    out = node1.communicate(timeout=120)[0].decode()
    assert node1.returncode == 1
    assert f"did not all meet at 127.0.0.1:{port} in join_timeout=3 s" in out, out[-2000:]
    cmd = [sys.executable, "-m", "slimquant.entrypoints.cli", "serve", path, "-tp", "2", "--nnodes", "2"]
    cmd += ["--master-port", str(port), "--join-timeout", "3", "--port", str(free_port())]
    head = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert head.returncode != 0
    assert "start node 0 and nodes 1..1 (--node-rank K --headless)" in head.stdout + head.stderr


def test_node_0_whose_master_port_is_taken_says_so_at_once(checkpoints):
    """Not 'the ranks did not meet' after --join-timeout: the port is in use where rank 0 must listen."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "slimquant.entrypoints.cli", "serve", checkpoints["llama-W8A8"], "-tp", "2"]
        cmd += ["--nnodes", "2", "--master-port", str(port), "--join-timeout", "60", "--port", str(free_port())]
        start = time.monotonic()
        head = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert head.returncode == 1 and time.monotonic() - start < 30
    assert head.stderr.endswith(
        f"error: master_port {port} (--master-port) is in use on node 0 (127.0.0.1): rank 0 "
        "listens there for the ranks to meet; pick a free port\n"
    ), head.stderr[-2000:]


def test_serve_under_torchrun_answers_as_one_process(checkpoints):
    """`torchrun --nproc-per-node 2 -m slimquant.entrypoints.cli serve ...`: rank 0 serves, rank 1 runs steps."""
    path = checkpoints["llama-W8A8_DYNAMIC"]
    one, base = start_server(path, "--backend", "torch-reference", env=ONE_THREAD)  # torchrun's OMP_NUM_THREADS=1
    try:
        want = _chat(base)
    finally:
        stop_server(one)
    run, base = _torchrun_serve(path)
    try:
        assert _chat(base) == want
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        run.wait(timeout=60)


def test_a_rank_killed_under_torchrun_fails_the_request_at_once(checkpoints):
    """Rank 0 sees rank 1's process gone from inside the step's shared-memory wait: the stream ends with that error
    and torchrun stops the group."""
    run, base = _torchrun_serve(checkpoints["llama-W8A8"])
    try:
        (rank1,) = [p for p in psutil.Process(run.pid).children() if p.environ().get("RANK") == "1"]
        rest = _kill_mid_stream(base, rank1)
        assert "rank(s) [1] of the tensor-parallel group stopped answering" in rest, rest[-500:]
        assert run.wait(timeout=30) != 0
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGTERM)
            run.wait(timeout=60)


def test_a_torchrun_node_that_stops_answering_mid_generation_stops_the_server_within_node_timeout(checkpoints):
    """Under torchrun too, each node > 0 beats to node 0 (to its torchrun agent's store): node 1 stopped whole (its
    agent and its rank) fails the request, and node 0 exits a few seconds after --node-timeout, though its step
    would wait for the rank execute_model_timeout (300 s)."""
    node1, head, base = _torchrun_two_nodes(checkpoints["llama-W8A8"], "--node-timeout", "3")
    frozen = [psutil.Process(node1.pid), *psutil.Process(node1.pid).children(recursive=True)]
    try:
        start = time.perf_counter()
        rest = _kill_mid_stream(base, frozen, lambda procs: [p.suspend() for p in procs])
        assert "node 1 stopped answering: no heartbeat in node_timeout=3 s" in rest, rest[-500:]
        assert head.wait(timeout=60) != 0
        assert time.perf_counter() - start < 20
    finally:
        _end(head, node1)


def test_a_torchrun_node_whose_node_0_stops_answering_exits_within_node_timeout(checkpoints):
    """Node 0 stopped whole (its agent and its rank) while it idles: node 1's rank says so and exits a few seconds
    after --node-timeout, and its torchrun with it."""
    node1, head, base = _torchrun_two_nodes(checkpoints["llama-W8A8"], "--node-timeout", "3")
    try:
        assert _chat(base)
        for p in [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]:
            p.suspend()
        start = time.perf_counter()
        assert node1.wait(timeout=60) != 0
        assert time.perf_counter() - start < 15
        out = node1.stdout.read().decode()
        assert "node 0 stopped answering: it took no heartbeat in node_timeout=3 s" in out, out[-2000:]
    finally:
        _end(head, node1)
