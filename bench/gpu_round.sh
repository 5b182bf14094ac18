#!/usr/bin/env bash
# The GPU measurements of bench/RESULTS.md in one go, each step under its own time limit so that a
# slow step leaves the others' figures: the checks on the device, where the decoding step's time
# goes (bench/decode_profile.py, with the sampler's speed choices each way), the engine at its
# defaults (CUDA-graph decoding, one torch thread per process, candidates first, the LM head padded:
# none of this confirmed on a GPU as defaults yet) against the reference-style pipeline, with a
# sweep of the settings still open, then the defaults again with captions that end early, against
# the growing loop.
#
#   bash bench/gpu_round.sh [OUT_DIR] [IMAGES]      (defaults: gpu_round_out, 8192; under 9 minutes)
#
# On the device machine of a GPU session: what it lacks is prepared here by bench/device_carry.sh,
# whose header gives the one run call that installs it and runs this script.
#
# Each step's output goes to OUT_DIR/<step>.txt and to the terminal. Sweep items are
# BATCH[xDECODING[xTEXT]] processes, then flags: g CUDA graphs (without it: the growing loop),
# c resize in the decoding processes, i batches moved and prepared on a CUDA stream of their own,
# T a torch thread per core in the scoring process, b one text-encoder forward per batch
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
step gpu_check 100 "$py" bench/gpu_check.py
step decode_profile 120 "$py" bench/decode_profile.py --batches 256,512,1024 --variants
step score_speed 240 "$py" bench/score_speed.py --device cuda --model base --images "$images" \
    --samples_per_shard "$images" --reference_images $((images < 64 ? images : 64)) \
    --sweep 256,256gi,256gb,384g,512g,512gb
step sep_bias 90 "$py" bench/score_speed.py --device cuda --model base --images "$images" \
    --samples_per_shard "$images" --reference_images $((images < 64 ? images : 64)) --sep_bias 3 --sweep 256
