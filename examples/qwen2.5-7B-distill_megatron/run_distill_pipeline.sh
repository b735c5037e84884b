#!/bin/bash
# Run the example from the repository root; extra arguments are Hydra overrides (key=value).
set -euo pipefail
CONFIG_PATH=$(dirname "$0")
python examples/start_distill_pipeline.py --config_path "$CONFIG_PATH" --config_name distill_megatron "$@"
