#!/usr/bin/env bash
# Install (if needed), then quantize SmolLM2-135M-Instruct to W8A8_DYNAMIC and W8A8 and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/slimquant demo "$@"
