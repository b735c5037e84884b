#!/usr/bin/env bash
# ensure.sh - make a real Prometheus server and promtool available to the test suite.
#
# Installs Debian bookworm's `prometheus` package (Prometheus 2.42: /usr/bin/prometheus and
# /usr/bin/promtool) when either binary is missing; does nothing when both are on PATH.
# The tests start their own server on 127.0.0.1 with a temporary config and data directory;
# the package's own service is not needed (in containers policy-rc.d keeps it from starting).
#
# Usage: scripts/prometheus/ensure.sh
# Exit status: 0 when both binaries are ready, non-zero (with a message) otherwise.
set -Eeuo pipefail

log() { echo "[prometheus-ensure] $*" >&2; }
die() { echo "prometheus-ensure: ERROR: $*" >&2; exit 1; }

ready() { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; }

if ready; then
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || die "prometheus/promtool missing and no apt-get: install Prometheus >= 2.42 by hand"
if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
else
    die "prometheus/promtool missing: installing the Debian package needs root or passwordless sudo"
fi
apt_get() { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=900 "$@"; }

LOG=$(mktemp /tmp/prometheus-ensure.XXXXXX.log)
log "apt-get install prometheus (log: $LOG)"
if ! apt_get install -y --no-install-recommends prometheus >>"$LOG" 2>&1; then
    log "apt-get update"
    apt_get update >>"$LOG" 2>&1 || { tail -n 20 "$LOG" >&2; die "apt-get update failed"; }
    apt_get install -y --no-install-recommends prometheus >>"$LOG" 2>&1 \
        || { tail -n 20 "$LOG" >&2; die "apt-get install prometheus failed"; }
fi
ready || die "the prometheus package is installed but prometheus/promtool are not on PATH"
log "ready: $(prometheus --version 2>&1 | head -1)"
rm -f "$LOG"
