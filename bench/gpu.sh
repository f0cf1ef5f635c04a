#!/usr/bin/env bash
# Every GPU measurement and the GPU tests, in one prepared run of at most ~8 minutes (issue 15): run it on a
# machine with a CUDA GPU, from the repository root, with the project's environment set up (make setup).
#
#   bash bench/gpu.sh [OUT]        # OUT: folder for the results (default bench/results/gpu-<date>); $OUT on
#                                  # the lent device machine
#
# Each part has its own time limit so one slow part cannot eat the others' time; a part that times out or
# fails is recorded in summary.txt and the next one runs. Results: one .log (and .json where the benchmark
# writes one) per part, then summary.txt with each part's exit status and wall time.
set -u
OUT="${1:-${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M)}}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
SUMMARY="$OUT/summary.txt"
{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1; "$PY" -c \
  "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  > "$SUMMARY" 2>&1

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, log to NAME.log, record the outcome
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  echo "$name: exit $status in $((SECONDS - start)) s (limit $limit s)" >> "$SUMMARY"
}

# 1. The GPU tests: exact fast paths against the reference, reduced precisions, CUDA graphs, GPU sharing.
part tests 110 "$PY" -m pytest tests/test_gpu.py tests/test_gpu_sharing.py -q -p no:cacheprovider
# 2. Our step against the official-style step at 100 classes (RN50 text tower), fp32 and the GPU rule's
#    precisions, with the scaling table up to 3,200 classes.
part step_100 75 "$PY" bench/step.py --device cuda --out "$OUT/step_100.json"
# 3. The 1,000-class (ImageNet) step, per precision: the issue's >= 8x target.
part step_1000 75 "$PY" bench/step.py --device cuda --classes 1000 --scaling 1000 --repeats 5 \
  --out "$OUT/step_1000.json"
# 4. Fused trial bundles: B = 1, 4, 16, 64 configurations of 100 classes, bundled against one at a time.
part bundle_fp32 60 "$PY" bench/bundle.py --device cuda --archs RN50 --out "$OUT/bundle_fp32.json"
part bundle_bf16 60 "$PY" bench/bundle.py --device cuda --archs RN50 --precision bf16 --out "$OUT/bundle_bf16.json"
# 5. CoCoOp's and KgCoOp's steps (batch 1 and 4 against the official loop), for the cost model.
part methods 30 "$PY" bench/methods.py --device cuda --out "$OUT/methods.json"
# 6. A bundled sweep end to end: 256 one-epoch configurations (10 classes), 4 trials sharing the GPU, one per
#    trial against bundles of 64 (what auto picks at 10 classes), in turn.
part sweep_bundles 80 "$PY" bench/sweep.py --scale 256 --bundle-sizes 1,64 --gpus-per-trial 0.25 --max-concurrent 4 \
  --workdir "$OUT/sweep-work"
rm -rf "$OUT/sweep-work"
cat "$SUMMARY"
