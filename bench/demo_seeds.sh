#!/usr/bin/env bash
# The demo's comparison over several student seeds (each: own initialization and data order), reusing
# the teacher that `kubedistill demo` trained. Prints per-seed exact match, the medians and the win count.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then set -- 0 1 2 3 4; fi
exec .venv/bin/kubedistill demo --reuse-teacher --student-seeds "$@"
