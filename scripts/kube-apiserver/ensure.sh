#!/usr/bin/env bash
# ensure.sh - make a real Kubernetes API server available to the test suite.
#
# Builds kube-apiserver (and kube-controller-manager, for garbage collection of
# owned objects and namespace deletion) v1.20.2 from Debian bookworm's
# `kubernetes` source package, in GOPATH mode, with Debian's Go, and installs
# etcd from Debian. The binaries are cached under
#     ${KUBEDISTILL_CACHE:-$HOME/.cache/kubedistill}/kube-1.20.2/bin/
# and the build is skipped when they are present. The Go build cache is kept
# next to them, so a forced rebuild takes well under a minute.
#
# Nothing here needs the internet beyond the Debian package archive.
#
# Usage: scripts/kube-apiserver/ensure.sh [--force] [--no-controller-manager]
#                                         [--no-kubectl] [--clean-source]
#   --force                   rebuild even if the cached binaries are present
#   --no-controller-manager   build only kube-apiserver (saves ~2 min cold)
#   --no-kubectl              do not install Debian's kubernetes-client when no
#                             kubectl is on PATH
#   --clean-source            delete the unpacked source tree after the build
#                             (saves ~300 MB; the Go cache and binaries stay)
#
# Environment:
#   KUBEDISTILL_CACHE    cache root (default: $HOME/.cache/kubedistill)
#   KUBEBUILDER_ASSETS   envtest assets directory with kube-apiserver and etcd:
#                        when set, the test harness uses it and this script
#                        does nothing.
#   KUBEDISTILL_BUILD_NICE  nice level for the Go build (default 10)
#
# Exit status: 0 when the binaries are ready, non-zero (with a message) otherwise.
set -Eeuo pipefail

KUBE_VERSION=1.20.2
# Bump when the build recipe below changes, so cached binaries get rebuilt.
RECIPE_VERSION=1
DEB_SOURCE_PACKAGE=kubernetes
DEB_ORIG_TARBALL="kubernetes_1.20.5+really1.20.2.orig.tar.gz"
DEB_ORIG_SHA256="b83c0780efb182d928dc63d46488a847f161f04e40a94b96bf5247dd671ecdfc"

CACHE_ROOT="${KUBEDISTILL_CACHE:-$HOME/.cache/kubedistill}"
KUBE_DIR="${CACHE_ROOT}/kube-${KUBE_VERSION}"
BIN_DIR="${KUBE_DIR}/bin"
WORK_DIR="${KUBE_DIR}/work"
SRC_PARENT="${WORK_DIR}/src"
SRC_DIR="${SRC_PARENT}/kubernetes-${KUBE_VERSION}"
GOPATH_DIR="${WORK_DIR}/gopath"
GOCACHE_DIR="${KUBE_DIR}/gocache"
TOOLS_DIR="${WORK_DIR}/tools"
BUILD_LOG="${KUBE_DIR}/build.log"
STAMP="${BIN_DIR}/.kubedistill-build"
NICE_LEVEL="${KUBEDISTILL_BUILD_NICE:-10}"

FORCE=0
WITH_KCM=1
WITH_KUBECTL=1
CLEAN_SOURCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        --no-controller-manager) WITH_KCM=0 ;;
        --no-kubectl) WITH_KUBECTL=0 ;;
        --clean-source) CLEAN_SOURCE=1 ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) echo "ensure.sh: unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

START_TS=$(date +%s)
log() { echo "[kube-ensure +$(( $(date +%s) - START_TS ))s] $*" >&2; }
die() {
    echo "" >&2
    echo "kube-ensure: ERROR: $*" >&2
    # The tail of what this run wrote to the build log, if anything.
    if [[ -n "${LOG_START:-}" && -f "$BUILD_LOG" && $(stat -c %s "$BUILD_LOG") -gt $LOG_START ]]; then
        echo "kube-ensure: last lines of $BUILD_LOG:" >&2
        tail -c +$(( LOG_START + 1 )) "$BUILD_LOG" | tail -n 40 | sed 's/^/    /' >&2
    fi
    exit 1
}
trap 'die "command failed (line $LINENO, exit $?): $BASH_COMMAND"' ERR

# ---------------------------------------------------------------- envtest
if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
    for b in kube-apiserver etcd; do
        [[ -x "${KUBEBUILDER_ASSETS}/$b" ]] \
            || die "KUBEBUILDER_ASSETS=${KUBEBUILDER_ASSETS} has no executable '$b'"
    done
    log "KUBEBUILDER_ASSETS is set (${KUBEBUILDER_ASSETS}); the tests use those binaries, nothing to do."
    exit 0
fi

# ---------------------------------------------------------------- helpers
if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
else
    SUDO=()
fi

apt_get() {
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get -q -o DPkg::Lock::Timeout=900 "$@"
}

pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

APT_UPDATED=0
apt_update_once() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        apt_get update >>"$BUILD_LOG" 2>&1 || die "apt-get update failed"
        APT_UPDATED=1
    fi
}

ensure_packages() {
    local missing=()
    local p
    for p in "$@"; do
        pkg_installed "$p" || missing+=("$p")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        command -v apt-get >/dev/null 2>&1 \
            || die "packages missing (${missing[*]}) and no apt-get: this script expects Debian bookworm"
        log "apt-get install ${missing[*]}"
        if ! apt_get install -y --no-install-recommends "${missing[@]}" >>"$BUILD_LOG" 2>&1; then
            apt_update_once
            apt_get install -y --no-install-recommends "${missing[@]}" >>"$BUILD_LOG" 2>&1 \
                || die "apt-get install ${missing[*]} failed (root or passwordless sudo is needed)"
        fi
    fi
}

binaries_ready() {
    [[ -x "${BIN_DIR}/kube-apiserver" ]] || return 1
    [[ $WITH_KCM -eq 0 || -x "${BIN_DIR}/kube-controller-manager" ]] || return 1
    [[ -f "$STAMP" && "$(cat "$STAMP")" == "recipe=${RECIPE_VERSION}" ]] || return 1
    "${BIN_DIR}/kube-apiserver" --version 2>/dev/null | grep -q "v${KUBE_VERSION}" || return 1
}

ensure_runtime_packages() {
    # etcd is needed at run time; kubectl only for tests about `kubectl apply`.
    local pkgs=(etcd-server etcd-client)
    if [[ $WITH_KUBECTL -eq 1 ]] && ! command -v kubectl >/dev/null 2>&1; then
        pkgs+=(kubernetes-client)
    fi
    ensure_packages "${pkgs[@]}"
    command -v etcd >/dev/null 2>&1 || [[ -x /usr/bin/etcd ]] \
        || die "etcd is not installed (apt-get install etcd-server)"
}

mkdir -p "$KUBE_DIR"
: >>"$BUILD_LOG"
LOG_START=$(stat -c %s "$BUILD_LOG")

# One ensure.sh at a time per cache directory.
exec 9>"${KUBE_DIR}/.lock"
if ! flock -n 9; then
    log "another ensure.sh holds ${KUBE_DIR}/.lock; waiting for it"
    flock 9
fi

# ---------------------------------------------------------------- fast path
if [[ $FORCE -eq 0 ]] && binaries_ready; then
    ensure_runtime_packages
    log "cached: ${BIN_DIR} ($(ls "$BIN_DIR" | tr '\n' ' '))"
    exit 0
fi

log "building Kubernetes v${KUBE_VERSION} server binaries into ${BIN_DIR}"
log "full log: ${BUILD_LOG}"
{
    echo "===== kube-ensure build $(date -u +%FT%TZ) ====="
} >>"$BUILD_LOG"

# ---------------------------------------------------------------- packages
ensure_runtime_packages
ensure_packages golang-go golang-github-modern-go-reflect2-dev \
    golang-github-json-iterator-go-dev ca-certificates

# Debian's Go first, as debian/rules does (a newer Go on PATH is not needed).
export PATH="/usr/lib/go/bin:${PATH}"
command -v go >/dev/null 2>&1 || die "go not found after installing golang-go"
log "using $(go version)"

REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2
JSONITER_SRC=/usr/share/gocode/src/github.com/json-iterator/go
[[ -f "$REFLECT2_SRC/reflect2.go" ]] || die "missing $REFLECT2_SRC (golang-github-modern-go-reflect2-dev)"
[[ -f "$JSONITER_SRC/jsoniter.go" ]] || die "missing $JSONITER_SRC (golang-github-json-iterator-go-dev)"

# ---------------------------------------------------------------- source
have_deb_src() {
    grep -rqsE '^[[:space:]]*(Types:.*deb-src|deb-src[[:space:]])' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}

enable_deb_src() {
    if have_deb_src; then
        return 0
    fi
    local d=/etc/apt/sources.list.d
    if [[ -f "$d/debian.sources" ]]; then
        log "enabling deb-src: $d/kubedistill-deb-src.sources"
        sed -E 's/^Types:.*$/Types: deb-src/' "$d/debian.sources" \
            | "${SUDO[@]}" tee "$d/kubedistill-deb-src.sources" >/dev/null
    elif grep -qsE '^deb[[:space:]]' /etc/apt/sources.list; then
        log "enabling deb-src: $d/kubedistill-deb-src.list"
        grep -E '^deb[[:space:]]' /etc/apt/sources.list | sed -E 's/^deb /deb-src /' \
            | "${SUDO[@]}" tee "$d/kubedistill-deb-src.list" >/dev/null
    else
        log "no Debian apt source found to derive deb-src from"
        return 1
    fi
    APT_UPDATED=0
}

verify_tarball() {
    [[ -f "$1" ]] && echo "${DEB_ORIG_SHA256}  $1" | sha256sum -c --quiet - >/dev/null 2>&1
}

fetch_source() {
    local dl="${WORK_DIR}/download"
    mkdir -p "$dl"
    local tarball="${dl}/${DEB_ORIG_TARBALL}"
    if verify_tarball "$tarball"; then
        log "source tarball already downloaded"
    else
        rm -f "$tarball"
        log "downloading Debian source package '${DEB_SOURCE_PACKAGE}' (apt-get source --download-only, ~35 MB)"
        if enable_deb_src; then
            # Try with the current package lists first; update them only if needed.
            if ! (cd "$dl" && apt_get source --download-only "$DEB_SOURCE_PACKAGE") >>"$BUILD_LOG" 2>&1; then
                apt_update_once
                (cd "$dl" && apt_get source --download-only "$DEB_SOURCE_PACKAGE") >>"$BUILD_LOG" 2>&1 \
                    || log "apt-get source failed (see ${BUILD_LOG})"
            fi
        fi
        verify_tarball "$tarball" \
            || die "could not get ${DEB_ORIG_TARBALL} with sha256 ${DEB_ORIG_SHA256} (apt-get source kubernetes needs Debian bookworm deb-src)"
    fi
    log "unpacking ${DEB_ORIG_TARBALL}"
    rm -rf "$SRC_DIR"
    mkdir -p "$SRC_PARENT"
    tar -xzf "$tarball" -C "$SRC_PARENT"
    [[ -d "$SRC_DIR/cmd/kube-apiserver" ]] || die "unexpected tarball layout: no $SRC_DIR/cmd/kube-apiserver"
}

# Go environment: GOPATH mode, offline, static, as debian/rules builds it.
export GOPATH="$GOPATH_DIR"
export GOCACHE="$GOCACHE_DIR"
export GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=0 GOTOOLCHAIN=local
export GOTMPDIR="${WORK_DIR}/tmp"
mkdir -p "$GOPATH/src/k8s.io" "$GOCACHE" "$TOOLS_DIR" "$GOTMPDIR" "$BIN_DIR"
PKG_DIR="$GOPATH/src/k8s.io/kubernetes"

run_nice() { nice -n "$NICE_LEVEL" "$@"; }

# Print a heartbeat while a long step runs, so CI logs show progress.
with_heartbeat() {
    local what="$1"; shift
    local t0=$SECONDS
    ( while sleep 60; do log "  ... still ${what} ($(( SECONDS - t0 ))s)"; done ) &
    local hb=$!
    local rc=0
    "$@" >>"$BUILD_LOG" 2>&1 || rc=$?
    kill "$hb" 2>/dev/null || true
    wait "$hb" 2>/dev/null || true
    return $rc
}

# Go packages tagged for OpenAPI generation, as Makefile.generated_files finds
# them: files with a `// +k8s:` tag that mention `+k8s:openapi-gen=`, with
# ./staging/src/* named vendor/*, minus code-generator and sample-apiserver.
openapi_dirs() {
    set +o pipefail
    find -H . \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune -o \
            -type f -name '*.go' -print \
        | { xargs grep -l '^// *+k8s:' || true; } \
        | { xargs grep -l '+k8s:openapi-gen=' || true; } \
        | sed -e 's|^\./staging/src|vendor|' -e 's|^\./||' \
        | xargs -n1 dirname \
        | { grep -vE '^vendor/k8s\.io/(code-generator|sample-apiserver)/' || true; } \
        | LC_ALL=C sort -u \
        | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -
}

prepare_tree() {
    if [[ -f "$SRC_DIR/.kubedistill-prepared" && "$(cat "$SRC_DIR/.kubedistill-prepared")" == "recipe=${RECIPE_VERSION}" ]]; then
        log "source tree already prepared: $SRC_DIR"
        ln -sfn "$SRC_DIR" "$PKG_DIR"
        return 0
    fi
    fetch_source
    ln -sfn "$SRC_DIR" "$PKG_DIR"

    # The vendored reflect2 (and the json-iterator built on it) crash under
    # Go >= 1.18 as soon as a custom resource is decoded: use Debian's copies.
    log "replacing vendored modern-go/reflect2 and json-iterator/go with Debian's"
    local pair src dst f
    for pair in "$REFLECT2_SRC:$SRC_DIR/vendor/github.com/modern-go/reflect2" \
                "$JSONITER_SRC:$SRC_DIR/vendor/github.com/json-iterator/go"; do
        src="${pair%%:*}"; dst="${pair#*:}"
        [[ -d "$dst" ]] || die "vendored package not found: $dst"
        find "$dst" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) -delete
        for f in "$src"/*.go "$src"/*.s; do
            [[ -f "$f" ]] || continue
            [[ "$f" == *_test.go ]] && continue
            cp "$f" "$dst/"
        done
    done

    # pkg/generated/openapi/zz_generated.openapi.go is not in the tarball:
    # generate it with the vendored openapi-gen, over the same package set as
    # Makefile.generated_files (staging/src/* named as vendor/*).
    cd "$PKG_DIR"
    log "building openapi-gen"
    with_heartbeat "building openapi-gen" \
        run_nice go build -o "$TOOLS_DIR/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen \
        || die "building openapi-gen failed"

    local dirs
    dirs=$(openapi_dirs)
    [[ -n "$dirs" ]] || die "found no packages tagged +k8s:openapi-gen"
    log "generating pkg/generated/openapi/zz_generated.openapi.go ($(tr ',' '\n' <<<"$dirs" | wc -l) packages)"
    with_heartbeat "generating OpenAPI definitions" \
        run_nice "$TOOLS_DIR/openapi-gen" --logtostderr \
            -i "$dirs" \
            -p k8s.io/kubernetes/pkg/generated/openapi \
            -O zz_generated.openapi \
            -o "$GOPATH/src" \
            -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
            -r "$WORK_DIR/openapi_violations.report" \
        || die "openapi-gen failed"
    [[ -s pkg/generated/openapi/zz_generated.openapi.go ]] \
        || die "openapi-gen did not write pkg/generated/openapi/zz_generated.openapi.go"
    echo "recipe=${RECIPE_VERSION}" >"$SRC_DIR/.kubedistill-prepared"
}

prepare_tree
cd "$PKG_DIR"

VERSION_PKG=k8s.io/kubernetes/vendor/k8s.io/component-base/version
CLIENT_VERSION_PKG=k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version
BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
LDFLAGS="-s -w"
for p in "$VERSION_PKG" "$CLIENT_VERSION_PKG"; do
    LDFLAGS+=" -X ${p}.gitVersion=v${KUBE_VERSION}"
    LDFLAGS+=" -X ${p}.gitMajor=1 -X ${p}.gitMinor=20"
    LDFLAGS+=" -X ${p}.gitTreeState=archive -X ${p}.buildDate=${BUILD_DATE}"
done

build_cmd() {
    local name="$1" cold="$2" t0=$SECONDS
    log "go build ./cmd/${name} (cold: ${cold} on 2 idle cores; with a warm Go cache: <1 min)"
    with_heartbeat "building ${name}" \
        run_nice go build -ldflags "$LDFLAGS" -o "${BIN_DIR}/.${name}.tmp" "./cmd/${name}" \
        || die "go build ./cmd/${name} failed"
    mv -f "${BIN_DIR}/.${name}.tmp" "${BIN_DIR}/${name}"
    log "built ${BIN_DIR}/${name} in $(( SECONDS - t0 ))s: $("${BIN_DIR}/${name}" --version 2>&1 | head -1)"
}

rm -f "$STAMP"
build_cmd kube-apiserver "~10 min"
if [[ $WITH_KCM -eq 1 ]]; then
    build_cmd kube-controller-manager "~2 min more"
fi
echo "recipe=${RECIPE_VERSION}" >"$STAMP"

if [[ $CLEAN_SOURCE -eq 1 ]]; then
    log "removing the source tree (Go cache kept in ${GOCACHE_DIR})"
    rm -rf "$SRC_DIR" "$PKG_DIR" "$GOTMPDIR"
fi

binaries_ready || die "build finished but ${BIN_DIR} does not hold working binaries"
log "done in $(( $(date +%s) - START_TS ))s: $(ls "$BIN_DIR" | tr '\n' ' ')"
