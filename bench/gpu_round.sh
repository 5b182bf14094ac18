#!/usr/bin/env bash
# The GPU measurements of bench/RESULTS.md in one go, each step under its own time limit so that a
# slow step leaves the others' figures: the checks on the device, the engine at its defaults and
# at the settings of the sweep against the reference-style pipeline, then the best-known setting
# again with captions that end early.
#
#   bash bench/gpu_round.sh [OUT_DIR] [IMAGES]      (defaults: gpu_round_out, 8192)
#
# Each step's output goes to OUT_DIR/<step>.txt and to the terminal. Sweep items are
# BATCH[xDECODING[xTEXT]] processes, then flags: g CUDA graphs, c resize in the decoding
# processes, m text encoder in the text processes, s no captioning thread, t one torch thread,
# i batches moved and prepared on a CUDA stream of their own
# (score_speed.py --help).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_round_out}
images=${2:-8192}
mkdir -p "$out"
py=${PYTHON:-python}
export PYTHONUNBUFFERED=1  # what a step printed before its time limit is kept

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $* (at most ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
df -h /dev/shm 2>&1 | tee -a "$out/gpu.txt"
step gpu_check 150 "$py" bench/gpu_check.py
step score_speed 320 "$py" bench/score_speed.py --device cuda --model base --images "$images" \
    --samples_per_shard "$images" --reference_images $((images < 256 ? images : 256)) \
    --sweep 256g,256x11x3gi,256x11x3gm,256x11x3gs,256x11x0g,256x11x3gt,256x6x3g,256x11x3gc,512x11x3g
step sep_bias 90 "$py" bench/score_speed.py --device cuda --model base --images "$images" \
    --samples_per_shard "$images" --reference_images $((images < 64 ? images : 64)) --sep_bias 3 --sweep 256g
