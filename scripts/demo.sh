#!/usr/bin/env bash
# The main job: set up on a fresh machine, then run `cag-node demo`
# (builds the demo model bundle once, starts a node, sends a study, prints the SR).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/cag-node demo "$@"
