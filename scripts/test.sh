#!/usr/bin/env bash
# Install (if needed) and run the test suite; fails if pytest collects no tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev  # tests, ruff and the other dev tools
.venv/bin/ruff check .
exec bash scripts/run_pytest.sh .venv/bin/python "$@"
