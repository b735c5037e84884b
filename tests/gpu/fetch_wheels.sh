#!/usr/bin/env bash
# Download the wheels tests/gpu/gpu_check.py needs on the GPU machine (Python 3.12, no network there) into
# tests/gpu/wheels/ (git-ignored; carry it with the working tree). Run on a machine with network access.
# usage: tests/gpu/fetch_wheels.sh [DIR]        DIR defaults to tests/gpu/wheels next to this script
set -euo pipefail
dir=${1:-$(cd "$(dirname "$0")" && pwd)/wheels}
mkdir -p "$dir"
# Versions: megatron-core/mbridge as pinned in pyproject.toml's megatron extra; pydantic (+ its dependencies) for
# distill_trainer.config, which models.py (the shared padded vocabulary) imports. torch, transformers, safetensors,
# numpy, packaging and PyYAML are on the GPU machine already.
python3 -m pip download --dest "$dir" --python-version 3.12 --only-binary=:all: --no-deps \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "megatron-core==0.16.1" "mbridge==0.15.1" "einops==0.8.2" \
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" \
  "typing-extensions==4.16.0"
du -sh "$dir"
echo "carry it: run(carry=[\"tests/gpu/wheels\"], command=\"python tests/gpu/gpu_check.py\")"
