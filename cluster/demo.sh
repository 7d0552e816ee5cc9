#!/usr/bin/env bash
# The main job on local defaults (local Ray, ./mlruns.db, folders under runs/, the shared data):
#   1. set up the environment;
#   2. train the `fast_split` teacher (checkpoint chosen on val) and evaluate it on the test split;
#   3. distil it into ONNX students (fp32 + int8), check parity, register them in MLflow;
#   4. build a 4-shard index of the dataset's image (and caption) codes with the image student;
#   5. serve it with Ray Serve, answer two real text queries over HTTP, and keep serving (Ctrl-C stops).
# Usage: bash cluster/demo.sh [BITS]    (DEMO_EXIT=1: stop after the query, for scripts)
set -euo pipefail
cd "$(dirname "$0")/.."
BITS=${1:-64}
DATA=${TERRAHASH_DATA:-../shared/data/ucm_captions}
RUN="runs/fast_split-$BITS"
QUERY=${DEMO_QUERY:-"many planes parked next to a long building"}
QUERY2=${DEMO_QUERY2:-"several planes are parked at the airport"}
# Each phase's wall time goes to $RUN/demo_phases.tsv (and is printed when it ends).
PHASES=$(mktemp)
phase() {  # phase NAME COMMAND...: run it and record how long it took
  local name=$1 began=$SECONDS
  shift
  "$@"
  printf '%s\t%d\n' "$name" $((SECONDS - began)) | tee -a "$PHASES"
}
phase setup bash cluster/setup.sh main
# checkpoint.pt, config.yaml, metrics.json and eval_test.json in $RUN
phase train .venv/bin/terrahash train --config fast_split --bits "$BITS" --data "$DATA" --out "$RUN" --eval-split test
# $RUN/students: student checkpoints, onnx/ (models + specs), metrics.json with the parity report
phase distill .venv/bin/terrahash distill --teacher "$RUN" --data "$DATA" --out "$RUN/students"
rm -rf "$RUN/index"
phase index .venv/bin/terrahash index build --model "$RUN/students/onnx" --data "$DATA" --shards 4 --out "$RUN/index"
phase verify .venv/bin/terrahash index verify "$RUN/index"
cp "$PHASES" "$RUN/demo_phases.tsv"
.venv/bin/terrahash serve --index "$RUN/index" --data "$DATA" --query "$QUERY" --query "$QUERY2" ${DEMO_EXIT:+--exit}
