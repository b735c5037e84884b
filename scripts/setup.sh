#!/usr/bin/env bash
# Create .venv and install kubedistill with everything the demo and the tests need.
# torch==2.13.0 goes first: it is the CPU build; an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$python" -m venv .venv
fi
stamp=.venv/.kubedistill-installed
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "==> .venv is up to date"
  exit 0
fi
echo "==> installing torch==2.13.0 (CPU) and kubedistill[trainer,megatron,operator,dev]"
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[trainer,megatron,operator,dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -W ignore -c "import torch, transformers, ray, kopf, megatron.core, mbridge, distill_trainer, distill_operator" \
  || { echo "setup failed: the packages above did not import" >&2; exit 1; }
echo "$want" > "$stamp"
