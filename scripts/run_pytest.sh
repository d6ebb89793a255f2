#!/usr/bin/env bash
# pytest under the given Python, quiet; fails when it collects no tests (pytest's exit code 5).
#   bash scripts/run_pytest.sh PYTHON [PYTEST_ARGS ...]
set -uo pipefail
python=$1
shift
"$python" -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
