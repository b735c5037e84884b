#!/bin/bash
# Distill with the tiny CPU config; extra arguments are Hydra overrides (e.g. max_steps=100).
# Run `kubedistill demo` (or scripts/demo.sh) once first: it builds the data and models this config uses.
set -euo pipefail
CONFIG_PATH="examples/tiny"
CONFIG_NAME="distill"
python examples/start_distill_pipeline.py --config_path "$CONFIG_PATH" --config_name "$CONFIG_NAME" "$@"
