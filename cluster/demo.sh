#!/usr/bin/env bash
# The main job on local defaults: set up, train the `fast` config on the shared UCM-Captions
# data (checkpoint chosen on val), evaluate it on the test split and print the table; tracked in
# ./mlruns.db. Usage: bash cluster/demo.sh [BITS]
set -euo pipefail
cd "$(dirname "$0")/.."
BITS=${1:-64}
DATA=${TERRAHASH_DATA:-../shared/data/ucm_captions}
bash cluster/setup.sh
# Writes checkpoint.pt, config.yaml, metrics.json and eval_test.json to runs/fast-$BITS.
.venv/bin/terrahash train --config fast --bits "$BITS" --data "$DATA" --out "runs/fast-$BITS" --eval-split test
