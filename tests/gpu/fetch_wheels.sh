#!/usr/bin/env bash
# Download the wheels tests/gpu/gpu_check.py needs on the GPU machine (Python 3.12, no network there) into
# tests/gpu/wheels/ (git-ignored; carry it with the working tree). Run on a machine with network access.
# usage: tests/gpu/fetch_wheels.sh [DIR]        DIR defaults to tests/gpu/wheels next to this script
# Measured: 8 wheels, 5.0 MB (du -sh); a run unpacks them into DIR/site (about 25 MB in all, within the device
# tool's 64 MiB carry).
set -euo pipefail
dir=${1:-$(cd "$(dirname "$0")" && pwd)/wheels}
mkdir -p "$dir"
# Start clean: two versions of one package would be unpacked over each other into DIR/site.
rm -rf "$dir"/*.whl "$dir/site"
# Versions: megatron-core/mbridge as pinned in pyproject.toml's megatron extra; pydantic (+ its dependencies) for
# distill_trainer.config, which models.py (the shared padded vocabulary) imports. pydantic 2.11 (the trainer needs
# >= 2.6) because it asks the least of the machine's typing-extensions (>= 4.12.2; pydantic 2.14 wants 4.16):
# the wheels go on sys.path after the machine's packages, so the machine's typing-extensions is the one imported;
# the carried one only fills in where the machine has none. gpu_check.py checks at start that what Python finds
# meets every carried wheel's requirements. torch, transformers, safetensors, numpy, packaging and PyYAML are on
# the GPU machine already.
python3 -m pip download --dest "$dir" --python-version 3.12 --only-binary=:all: --no-deps \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "megatron-core==0.16.1" "mbridge==0.15.1" "einops==0.8.2" \
  "pydantic==2.11.9" "pydantic-core==2.33.2" "annotated-types==0.8.0" "typing-inspection==0.4.2" \
  "typing-extensions==4.16.0"
du -sh "$dir"
echo "carry it: run(carry=[\"tests/gpu/wheels\"], command=\"python tests/gpu/gpu_check.py\")"
