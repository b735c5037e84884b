#!/usr/bin/env bash
# The CPU demo: builds a tokenizer, a teacher (by SFT) and a student offline, then distills.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kubedistill demo "$@"
