#!/usr/bin/env bash
# The main job on local defaults: set up, train the `fast` config on the shared UCM-Captions
# data, evaluate on its test split, print the table. Usage: bash cluster/demo.sh [BITS]
set -euo pipefail
cd "$(dirname "$0")/.."
BITS=${1:-64}
DATA=${TERRAHASH_DATA:-../shared/data/ucm_captions}
bash cluster/setup.sh
.venv/bin/terrahash train --config fast --bits "$BITS" --data "$DATA" --out "runs/fast-$BITS"
.venv/bin/terrahash eval --model "runs/fast-$BITS" --data "$DATA" --split test --json "runs/fast-$BITS/eval_test.json"
