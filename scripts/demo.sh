#!/usr/bin/env bash
# Install into .venv and run the main job: GenHancer end to end in the miniature world (offline, CPU, minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh  # genhancer and its dependencies only, no test extras
. .venv/bin/activate
genhancer miniworld demo --out "${OUT:-runs/demo}" "$@"
