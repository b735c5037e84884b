#!/usr/bin/env bash
# Builds the Dockerfile's two images, `operator` and `trainer`, with buildah (or podman) and no Docker daemon,
# FROM local stand-ins for the bases the Dockerfile names:
#   PYTHON_IMAGE  python:3.11-slim-bookworm      -> Debian bookworm (debootstrap --variant=minbase) + python3, pip
#   TORCH_IMAGE   pytorch/pytorch:2.13.0-cuda... -> that Python base + torch==2.13.0 (CPU build), installed by pip
# The Dockerfile itself runs unchanged: its build arguments PYTHON_IMAGE and TORCH_IMAGE name the stand-ins.
#
#   sudo bash scripts/images/build.sh            # both images (root: debootstrap, buildah)
#   sudo bash scripts/images/build.sh operator   # one of them
#
# Storage, the bases and the debootstrap'd root filesystem are cached under $KUBEDISTILL_IMAGES_CACHE
# (~/.cache/kubedistill/images); the bases are rebuilt only when their Containerfile changes. The host's container
# configuration is not touched: podman/buildah read this project's containers.conf and storage.conf (written
# under the cache) through CONTAINERS_CONF / CONTAINERS_STORAGE_CONF; `source scripts/images/env.sh` gives a
# shell the same settings (e.g. to `podman run` the images).
#
# Prints each step's wall time and each image's size, and writes them to $KUBEDISTILL_IMAGES_CACHE/build-report.json.
# Environment: IMAGE_TAG (default dev): the images are localhost/kubedistill/{operator,trainer}:$IMAGE_TAG;
# BUILD_LAYERS (default true): reuse the Dockerfile's cached layers (false: build every step again, bases kept).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# shellcheck source=scripts/images/env.sh
source "$HERE/env.sh"

TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(operator trainer)
IMAGE_TAG=${IMAGE_TAG:-dev}
BUILD_LAYERS=${BUILD_LAYERS:-true}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [ "$(id -u)" != 0 ]; then echo "build.sh: needs root (debootstrap, buildah with chroot isolation)" >&2; exit 2; fi
if command -v buildah >/dev/null; then BUILD=(buildah bud --isolation chroot);
elif command -v podman >/dev/null; then BUILD=(podman build --isolation chroot);
else echo "build.sh: needs buildah or podman" >&2; exit 2; fi
command -v podman >/dev/null || { echo "build.sh: needs podman (image import and inspection)" >&2; exit 2; }

REPORT_LINES=()
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
size_of() { podman image inspect --format '{{.Size}}' "$1"; }
report() {  # name, image, seconds, how
  local size; size=$(size_of "$2")
  printf 'build.sh: %-14s %-52s %7s s  %6s MB  (%s)\n' "$1" "$2" "$3" "$((size / 1000000))" "$4"
  REPORT_LINES+=("{\"step\": \"$1\", \"image\": \"$2\", \"seconds\": $3, \"bytes\": $size, \"how\": \"$4\"}")
}
content_hash() { cat "$@" | sha256sum | cut -c1-12; }

# ---- Debian bookworm, debootstrap'd (minbase) and imported
DEBIAN_IMAGE=localhost/kubedistill-base/debian:$SUITE-minbase
if podman image exists "$DEBIAN_IMAGE"; then
  report debian "$DEBIAN_IMAGE" 0 cached
else
  t0=$(now)
  TARBALL="$KUBEDISTILL_IMAGES_CACHE/debian-$SUITE-minbase.tar"
  if [ ! -s "$TARBALL" ]; then
    ROOTFS="$KUBEDISTILL_IMAGES_CACHE/rootfs-$SUITE"
    rm -rf "$ROOTFS"
    debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$KUBEDISTILL_IMAGES_CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$KUBEDISTILL_IMAGES_CACHE/debootstrap.log" >&2; exit 1; }
    # What a container base does not need: apt's downloaded packages and lists.
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    tar -C "$ROOTFS" --numeric-owner -cf "$TARBALL.part" . && mv "$TARBALL.part" "$TARBALL"
    rm -rf "$ROOTFS"
  fi
  podman import --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$TARBALL" "$DEBIAN_IMAGE" >/dev/null
  report debian "$DEBIAN_IMAGE" "$(elapsed "$t0")" "debootstrap --variant=minbase + import"
fi

# ---- The stand-in for python:3.11-slim-bookworm
HOST_CA=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PYTHON_BASE=localhost/kubedistill-base/python:3.11-$SUITE-$(content_hash "$HERE/python-base.Containerfile" "$HOST_CA")
if podman image exists "$PYTHON_BASE"; then
  report python-base "$PYTHON_BASE" 0 cached
else
  t0=$(now)
  CONTEXT="$KUBEDISTILL_IMAGES_CACHE/python-context"
  rm -rf "$CONTEXT" && mkdir -p "$CONTEXT"
  cp "$HERE/python-base.Containerfile" "$CONTEXT/Containerfile"
  cp "$HOST_CA" "$CONTEXT/host-ca-certificates.crt"
  "${BUILD[@]}" --pull=never --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" -f "$CONTEXT/Containerfile" -t "$PYTHON_BASE" "$CONTEXT"
  rm -rf "$CONTEXT"
  report python-base "$PYTHON_BASE" "$(elapsed "$t0")" "apt-get python3 python3-pip"
fi

# ---- The stand-in for the CUDA PyTorch base: torch 2.13.0, CPU build
need_torch=false
for target in "${TARGETS[@]}"; do [ "$target" = trainer ] && need_torch=true; done
if $need_torch; then
  TORCH_BASE=localhost/kubedistill-base/torch:2.13.0-cpu-$(content_hash "$HERE/python-base.Containerfile" "$HOST_CA" "$HERE/torch-base.Containerfile")
  if podman image exists "$TORCH_BASE"; then
    report torch-base "$TORCH_BASE" 0 cached
  else
    t0=$(now)
    CONTEXT="$KUBEDISTILL_IMAGES_CACHE/torch-context"
    rm -rf "$CONTEXT" && mkdir -p "$CONTEXT/wheels"
    # A torch 2.13.0 CPU wheel the host already has (pip's find-links, e.g. /opt/wheels), else pip downloads it.
    for dir in ${PIP_FIND_LINKS:-} $(pip3 config get global.find-links 2>/dev/null || true); do
      for wheel in "$dir"/torch-2.13.0+cpu-cp311-*linux*x86_64.whl; do [ -f "$wheel" ] && cp "$wheel" "$CONTEXT/wheels/"; done
    done
    cp "$HERE/torch-base.Containerfile" "$CONTEXT/Containerfile"
    "${BUILD[@]}" --pull=never --build-arg PYTHON_BASE="$PYTHON_BASE" -f "$CONTEXT/Containerfile" -t "$TORCH_BASE" "$CONTEXT"
    rm -rf "$CONTEXT"
    report torch-base "$TORCH_BASE" "$(elapsed "$t0")" "pip install torch==2.13.0 (CPU)"
  fi
fi

# ---- The Dockerfile's targets, unchanged
for target in "${TARGETS[@]}"; do
  image=localhost/kubedistill/$target:$IMAGE_TAG
  t0=$(now)
  "${BUILD[@]}" --pull=never --layers="$BUILD_LAYERS" --target "$target" \
    --build-arg PYTHON_IMAGE="$PYTHON_BASE" ${TORCH_BASE:+--build-arg TORCH_IMAGE="$TORCH_BASE"} \
    -f "$REPO/Dockerfile" -t "$image" "$REPO"
  report "$target" "$image" "$(elapsed "$t0")" "Dockerfile --target $target, layers=$BUILD_LAYERS"
done

{
  echo "["
  for i in "${!REPORT_LINES[@]}"; do
    sep=,; [ "$i" -eq $((${#REPORT_LINES[@]} - 1)) ] && sep=
    echo "  ${REPORT_LINES[$i]}$sep"
  done
  echo "]"
} >"$KUBEDISTILL_IMAGES_CACHE/build-report.json"
echo "build.sh: report in $KUBEDISTILL_IMAGES_CACHE/build-report.json"
