#!/usr/bin/env bash
# Install into .venv and run the whole test suite (offline, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
python -m pytest "$@"
