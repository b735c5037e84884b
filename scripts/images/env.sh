# Source me: podman and buildah with this project's own configuration, not the host's.
#   source scripts/images/env.sh && podman images
# Storage (overlay, or STORAGE_DRIVER=vfs where overlay cannot mount) and the bases live under
# $KUBEDISTILL_IMAGES_CACHE (~/.cache/kubedistill/images), so they survive between runs. Containers run with runc
# (crun fails on this host's hybrid cgroups) and with ulimits root can grant here (it lacks CAP_SYS_RESOURCE to
# raise nofile to the default 1048576).
export KUBEDISTILL_IMAGES_CACHE=${KUBEDISTILL_IMAGES_CACHE:-${HOME:-/root}/.cache/kubedistill/images}
_kd_run=/run/kubedistill-images
mkdir -p "$KUBEDISTILL_IMAGES_CACHE/conf" "$KUBEDISTILL_IMAGES_CACHE/storage" "$_kd_run"
cat >"$KUBEDISTILL_IMAGES_CACHE/conf/storage.conf" <<EOF
[storage]
driver = "${STORAGE_DRIVER:-overlay}"
graphroot = "$KUBEDISTILL_IMAGES_CACHE/storage"
runroot = "$_kd_run/storage"
EOF
cat >"$KUBEDISTILL_IMAGES_CACHE/conf/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$_kd_run/libpod"
EOF
export CONTAINERS_CONF="$KUBEDISTILL_IMAGES_CACHE/conf/containers.conf"
export CONTAINERS_STORAGE_CONF="$KUBEDISTILL_IMAGES_CACHE/conf/storage.conf"
unset _kd_run
