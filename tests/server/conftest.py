"""A real `slimquant serve` subprocess on a loopback port, shared by the server tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

API_KEY = "test-key"
MODEL = "tiny"


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth() -> dict:
    """The Authorization header of the test server's key."""
    return {"Authorization": f"Bearer {API_KEY}"}


def start_server(model, *extra: str, timeout: float = 120, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`slimquant serve model` with the test key and name on a free port (env: more environment), healthy;
    (process, base URL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "slimquant.entrypoints.cli", "serve", str(model), "--port", str(port)]
    cmd += ["--api-key", API_KEY, "--served-model-name", MODEL, "--max-model-len", "128", "--max-n", "4", *extra]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "CI": "1", **(env or {})}
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read().decode()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"server did not become healthy in {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """Terminate and reap it."""
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="package")
def server(tiny_model):
    """`slimquant serve` on a tiny llama; yields its base URL."""
    proc, base = start_server(tiny_model("llama"))
    yield base
    stop_server(proc)


@pytest.fixture(scope="package")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
