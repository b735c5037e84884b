"""A pod's container, as the kubelet would run it, translated to ``podman run`` arguments (pure: no podman here).

Everything comes from the pod spec the project renders (the operator's RayJob head template, the Helm chart's
Deployment), so a test that runs an image this way runs it with the settings a cluster would use:

- the user: ``runAsUser``/``runAsGroup`` (container level over pod level) as ``--user uid:gid``, ``fsGroup`` and
  ``supplementalGroups`` as ``--group-add`` (the kubelet adds them to the process's groups); ``runAsNonRoot`` with
  uid 0 is refused, as the kubelet refuses it;
- ``readOnlyRootFilesystem`` as ``--read-only --read-only-tmpfs=false`` (podman's --read-only alone mounts writable
  tmpfs on /tmp, /var/tmp and /run, which a pod does not have: without the second flag a write that fails in a cluster
  would succeed here);
- ``capabilities``, ``allowPrivilegeEscalation: false`` (``no-new-privileges``), ``privileged``;
- every volumeMount: an ``emptyDir`` as a host directory (mode 0777, like the kubelet's; ``medium: Memory`` as a tmpfs,
  sized by ``sizeLimit``), a ``configMap``/``secret``/``projected`` volume read-only, a ``persistentVolumeClaim`` from a
  host directory the caller gives for the claim;
- ``env`` in order, with ``$(VAR)`` references expanded from the variables before it (``$$`` escapes, an unknown
  reference stays as written: the kubelet's rules) and ``valueFrom.fieldRef`` from the caller's pod fields
  (``status.podIP``, ``metadata.name`` ...); ``command``/``args`` expanded the same way;
- ``workingDir``; and ``automountServiceAccountToken`` as the token directory at
  /var/run/secrets/kubernetes.io/serviceaccount plus KUBERNETES_SERVICE_HOST/PORT, when the caller provides them.

What it does not translate: resource limits (this host's cgroups v1 under podman cannot enforce them; KubeRay reads
them for ``--num-cpus``/``--memory``, see ``kuberay_pod``), probes, ports (the tests use the host network).

``kuberay_pod`` applies what KubeRay's BuildPod adds to a Ray node's pod template before it runs.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD = re.compile(r"metadata\.(labels|annotations)\['([^']+)'\]")


class PodTranslationError(ValueError):
    """The pod spec asks for something the translation cannot give (or a kubelet would refuse)."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's $(VAR) expansion: defined names replaced, ``$$`` -> ``$``, unknown references kept."""
    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)
    return _REF.sub(sub, text)


def field_value(path: str, fields: Mapping[str, str], pod_metadata: Mapping[str, Any]) -> str:
    """A downward-API ``fieldRef``: labels/annotations from the pod's metadata, anything else from ``fields``."""
    match = _FIELD.fullmatch(path)
    if match:
        values = pod_metadata.get(match.group(1)) or {}
        return str(values.get(match.group(2), ""))
    if path == "metadata.namespace" and "metadata.namespace" not in fields and pod_metadata.get("namespace"):
        return str(pod_metadata["namespace"])
    if path not in fields:
        raise PodTranslationError(f"fieldRef {path!r}: no value given for it (pass fields={{{path!r}: ...}})")
    return str(fields[path])


def container_env(container: Mapping[str, Any], fields: Mapping[str, str],
                  pod_metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The container's environment as the kubelet builds it (in order; later entries see earlier ones)."""
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" in item:
            source = item["valueFrom"]
            if "fieldRef" in source:
                env[name] = field_value(source["fieldRef"]["fieldPath"], fields, pod_metadata or {})
            else:
                raise PodTranslationError(f"env {name}: only valueFrom.fieldRef is supported, not {sorted(source)}")
        else:
            env[name] = expand(str(item.get("value", "")), env)
    if container.get("envFrom"):
        raise PodTranslationError("envFrom is not supported")
    return env


@dataclass
class PodmanRun:
    """``podman run`` arguments for one container: ``options`` (before the image), ``image``, then ``command``
    (what follows the image: the container's args, or its command+args with ``--entrypoint`` among the options).
    ``host_dirs``: the host directory behind each bind-mounted volume, by volume name (the caller may read what
    the container wrote there). ``env``: the environment given (also in ``options``, as ``-e``)."""

    options: list[str]
    image: str
    command: list[str]
    env: dict[str, str]
    host_dirs: dict[str, Path] = field(default_factory=dict)

    def argv(self, podman: str = "podman") -> list[str]:
        return [podman, "run", *self.options, self.image, *self.command]

    def __str__(self) -> str:
        return shlex.join(self.argv())


def _user(pod_sc: Mapping[str, Any], sc: Mapping[str, Any]) -> tuple[list[str], int | None]:
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    if non_root and uid == 0:
        raise PodTranslationError("runAsNonRoot with runAsUser 0: the kubelet refuses to start this container")
    if non_root and uid is None:
        # The kubelet then checks the image's USER is numeric and not 0: the caller must say which uid that is.
        raise PodTranslationError("runAsNonRoot without runAsUser: give the pod a numeric runAsUser")
    options: list[str] = []
    if uid is not None:
        options += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
    groups = [pod_sc.get("fsGroup"), *(pod_sc.get("supplementalGroups") or [])]
    for group in groups:
        if group is not None:
            options += ["--group-add", str(group)]
    return options, uid


def _security(sc: Mapping[str, Any]) -> list[str]:
    options: list[str] = []
    if sc.get("privileged"):
        options.append("--privileged")
    if sc.get("readOnlyRootFilesystem"):
        options += ["--read-only", "--read-only-tmpfs=false"]
    capabilities = sc.get("capabilities") or {}
    for cap in capabilities.get("drop") or []:
        options.append(f"--cap-drop={cap}")
    for cap in capabilities.get("add") or []:
        options.append(f"--cap-add={cap}")
    if sc.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    seccomp = (sc.get("seccompProfile") or {}).get("type")
    if seccomp == "Unconfined":
        options += ["--security-opt", "seccomp=unconfined"]
    # RuntimeDefault: the runtime's default profile, which podman applies anyway.
    return options


def _quantity_bytes(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "k": 10**3, "M": 10**6, "G": 10**9,
             "T": 10**12}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    if not match or (match.group(2) and match.group(2) not in units):
        raise PodTranslationError(f"unsupported quantity {text!r}")
    return int(float(match.group(1)) * units.get(match.group(2), 1))


def translate(pod_template: Mapping[str, Any], image: str, *, workdir: Path, container: str | None = None,
              fields: Mapping[str, str] | None = None, claims: Mapping[str, Path] | None = None,
              config_maps: Mapping[str, Path] | None = None,
              service_account: tuple[Path, str, int] | None = None) -> PodmanRun:
    """``podman run`` arguments for ``container`` (default: the first) of ``pod_template`` ({metadata, spec}).

    ``workdir``: where each emptyDir's host directory is made (``workdir/<volume name>``). ``claims``: the host
    directory of each persistentVolumeClaim, by claim name; ``config_maps``: a directory holding each ConfigMap's
    files, by ConfigMap name. ``fields``: downward-API values (``status.podIP``, ``metadata.name``, ...).
    ``service_account``: (directory holding token, ca.crt and namespace; API server host; port), used when the pod
    mounts its token (automountServiceAccountToken is not false)."""
    spec = pod_template["spec"]
    metadata = pod_template.get("metadata") or {}
    containers = spec["containers"]
    matching = [c for c in containers if container is None or c["name"] == container]
    if not matching:
        raise PodTranslationError(f"no container {container!r} in the pod (has {[c['name'] for c in containers]})")
    c = matching[0]
    pod_sc, sc = spec.get("securityContext") or {}, c.get("securityContext") or {}
    options, _ = _user(pod_sc, sc)
    options += _security(sc)

    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    host_dirs: dict[str, Path] = {}
    mounted: set[str] = set()
    for mount in c.get("volumeMounts") or []:
        path = mount["mountPath"]
        if path in mounted:
            raise PodTranslationError(f"two volumes mounted at {path}")
        mounted.add(path)
        volume = volumes.get(mount["name"])
        if volume is None:
            raise PodTranslationError(f"volumeMount {mount['name']!r}: no such volume in the pod")
        if mount.get("subPath"):
            raise PodTranslationError(f"volumeMount {mount['name']!r}: subPath is not supported")
        read_only = bool(mount.get("readOnly"))
        if "emptyDir" in volume:
            empty_dir = volume["emptyDir"] or {}
            if empty_dir.get("medium") == "Memory":
                size = f",size={_quantity_bytes(empty_dir['sizeLimit'])}" if empty_dir.get("sizeLimit") else ""
                options += ["--tmpfs", f"{path}:{'ro' if read_only else 'rw'},exec,mode=1777{size}"]
                continue
            source = workdir / "emptydir" / mount["name"]
            source.mkdir(parents=True, exist_ok=True)
            source.chmod(0o777)  # the kubelet's emptyDir: world-writable (no chown to the pod's user)
        elif "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            if not claims or claim not in claims:
                raise PodTranslationError(f"volume {mount['name']!r}: no host directory given for claim {claim!r}")
            source = Path(claims[claim])
            read_only = read_only or bool(volume["persistentVolumeClaim"].get("readOnly"))
        elif "configMap" in volume:
            name = volume["configMap"]["name"]
            if not config_maps or name not in config_maps:
                raise PodTranslationError(f"volume {mount['name']!r}: no directory given for ConfigMap {name!r}")
            source, read_only = Path(config_maps[name]), True  # the kubelet mounts configMap volumes read-only
        else:
            raise PodTranslationError(f"volume {mount['name']!r}: unsupported kind {sorted(set(volume) - {'name'})}")
        host_dirs[mount["name"]] = source
        options += ["--mount", f"type=bind,src={source},dst={path}" + (",ro=true" if read_only else "")]

    env = container_env(c, fields or {}, metadata)
    if spec.get("automountServiceAccountToken", True) is not False and service_account is not None:
        token_dir, host, port = service_account
        if SERVICE_ACCOUNT_DIR in mounted:
            raise PodTranslationError(f"{SERVICE_ACCOUNT_DIR} is mounted twice")
        options += ["--mount", f"type=bind,src={token_dir},dst={SERVICE_ACCOUNT_DIR},ro=true"]
        # What the kubelet adds for the `kubernetes` Service (before the container's own env, which may override).
        env = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": str(port), **env}
    for name, value in env.items():
        options += ["-e", f"{name}={value}"]
    if c.get("workingDir"):
        options += ["--workdir", c["workingDir"]]

    command = [expand(part, env) for part in c.get("command") or []]
    args = [expand(part, env) for part in c.get("args") or []]
    if command:  # the image's ENTRYPOINT and CMD are both replaced
        options += ["--entrypoint", json.dumps(command)]
    return PodmanRun(options=options, image=image, command=args, env=env, host_dirs=host_dirs)


# --------------------------------------------------------------------------------------------- KubeRay's part
# What KubeRay (ray-operator/controllers/ray/common/pod.go, BuildPod, DefaultHeadPodTemplate, setMissingRayStartParams,
# generateRayStartCommand, convertParamMap, setContainerEnvVars; utils.GetContainerCommand) does to a Ray node's pod
# template, for the head:
#  - rayStartParams completed: dashboard-host defaults to 0.0.0.0, metrics-export-port to 8080, block=true,
#    dashboard-agent-listen-port=52365; num-cpus from the container's cpu limit (else request), memory from its
#    memory limit (bytes), num-gpus from a *gpu limit;
#  - the command: ["/bin/bash", "-lc", "--"] with one arg, "ulimit -n 65536; ray start --head" + the parameters in
#    sorted order, each " --key=value " (a "true" value as " --key ", "false" dropped);
#  - a /dev/shm emptyDir (medium Memory, sizeLimit = the memory limit, else request) unless something is mounted
#    there;
#  - env appended: RAY_CLUSTER_NAME (fieldRef metadata.labels['ray.io/cluster']), RAY_CLOUD_INSTANCE_ID
#    (metadata.name), RAY_NODE_TYPE_NAME (metadata.labels['ray.io/group']), KUBERAY_GEN_RAY_START_CMD, RAY_PORT,
#    RAY_ADDRESS=127.0.0.1:<port> (head), RAY_USAGE_STATS_KUBERAY_IN_USE=1, RAY_USAGE_STATS_EXTRA_TAGS (head),
#    RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE=1, each unless the template sets it;
#  - labels ray.io/node-type, ray.io/cluster, ray.io/group ("headgroup" for the head).
# Probes are not reproduced (exec probes of the dashboard agent; not what these tests check).
DEFAULT_GCS_PORT = 6379
DEFAULT_METRICS_PORT = 8080
DEFAULT_DASHBOARD_AGENT_LISTEN_PORT = 52365
KUBERAY_LOGIN_SHELL = ["/bin/bash", "-lc", "--"]


def _cpu_count(text: str) -> int:
    """resource.Quantity.Value() for cpu: whole cores, rounded up."""
    text = str(text)
    if text.endswith("m"):
        return -(-int(text[:-1]) // 1000)
    value = float(text)
    return int(value) if value == int(value) else int(value) + 1


def ray_start_params(params: Mapping[str, str], resources: Mapping[str, Any], head: bool) -> dict[str, str]:
    complete = dict(params)
    if head:
        complete.setdefault("dashboard-host", "0.0.0.0")
    complete.setdefault("metrics-export-port", str(DEFAULT_METRICS_PORT))
    complete["block"] = "true"
    complete.setdefault("dashboard-agent-listen-port", str(DEFAULT_DASHBOARD_AGENT_LISTEN_PORT))
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    if "num-cpus" not in complete:
        cpu = limits.get("cpu") or requests.get("cpu")
        if cpu and _cpu_count(cpu):
            complete["num-cpus"] = str(_cpu_count(cpu))
    if "memory" not in complete and limits.get("memory"):
        complete["memory"] = str(_quantity_bytes(limits["memory"]))
    if "num-gpus" not in complete:
        for key in sorted(limits):
            if key.endswith("gpu") and str(limits[key]) not in ("0", ""):
                complete["num-gpus"] = str(int(limits[key]))
                break
    return complete


def ray_start_command(params: Mapping[str, str], head: bool) -> str:
    flags = ""
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false") and key not in ("log-color", "include-dashboard"):
            if value.lower() == "true":
                flags += f" --{key} "
        else:
            flags += f" --{key}={value} "
    return ("ray start --head " if head else "ray start ") + flags


def kuberay_pod(group_spec: Mapping[str, Any], cluster_name: str, head: bool = True,
                group_name: str = "headgroup") -> dict[str, Any]:
    """The pod KubeRay makes from a RayCluster head (or worker) group spec ({rayStartParams, template})."""
    if not head:
        raise NotImplementedError("worker pods: the address and init container are not reproduced")
    template = copy.deepcopy(dict(group_spec["template"]))
    spec = template["spec"]
    c = spec["containers"][0]
    metadata = template.setdefault("metadata", {})
    metadata["labels"] = {**(metadata.get("labels") or {}), "ray.io/node-type": "head", "ray.io/cluster": cluster_name,
                          "ray.io/group": group_name}
    resources = c.get("resources") or {}
    params = ray_start_params(group_spec.get("rayStartParams") or {}, resources, head)
    start = ray_start_command(params, head)
    if not c.get("command") and not c.get("args"):
        c["command"] = list(KUBERAY_LOGIN_SHELL)
        c["args"] = [f"ulimit -n 65536; {start}"]
    mounts = c.setdefault("volumeMounts", [])
    if not any(m["mountPath"] == "/dev/shm" for m in mounts):
        memory = (resources.get("limits") or {}).get("memory") or (resources.get("requests") or {}).get("memory")
        empty_dir: dict[str, Any] = {"medium": "Memory"}
        if memory:
            empty_dir["sizeLimit"] = memory
        spec.setdefault("volumes", []).append({"name": "shared-mem", "emptyDir": empty_dir})
        mounts.append({"name": "shared-mem", "mountPath": "/dev/shm"})
    env = c.setdefault("env", [])
    names = {e["name"] for e in env}
    env += [
        {"name": "RAY_CLUSTER_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['ray.io/cluster']"}}},
        {"name": "RAY_CLOUD_INSTANCE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "RAY_NODE_TYPE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['ray.io/group']"}}},
        {"name": "KUBERAY_GEN_RAY_START_CMD", "value": start},
    ]
    port = params.get("port", str(DEFAULT_GCS_PORT))
    for name, value in [("RAY_PORT", port), ("RAY_ADDRESS", f"127.0.0.1:{port}"),
                        ("RAY_USAGE_STATS_KUBERAY_IN_USE", "1")]:
        if name not in names:
            env.append({"name": name, "value": value})
    env.append({"name": "RAY_USAGE_STATS_EXTRA_TAGS", "value": "kuberay_version=v1.x;kuberay_crd=RayJob"})
    if "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE" not in names:
        env.append({"name": "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE", "value": "1"})
    return template


# ------------------------------------------------------------------------------------------- the kubelet's part
def apply_fs_group(path: Path, gid: int) -> None:
    """What the kubelet does to a volume for the pod's ``fsGroup``: group ``gid`` on every file, group read/write
    (and search on directories), set-gid directories so new files keep the group."""
    import os

    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            _fs_group_one(Path(root) / name, gid)
    _fs_group_one(Path(path), gid)


def _fs_group_one(path: Path, gid: int) -> None:
    import os
    import stat

    os.chown(path, -1, gid, follow_symlinks=False)
    if path.is_symlink():
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    mode |= stat.S_IRGRP | stat.S_IWGRP
    if path.is_dir():
        mode |= stat.S_IXGRP | stat.S_ISGID
    path.chmod(mode)


# A write outside the writable mounts: the read-only root filesystem answers EROFS (errno 30); some libraries catch
# it and fall back with a message of their own (matplotlib, Hugging Face, torch's caches).
_WRITE_FAILURE = re.compile(
    r"Read-only file system|EROFS|\[Errno 30\]|not a writable directory|is not writable|"
    r"Permission denied|\[Errno 13\]|cannot create (?:a )?(?:cache|temporary) director",
    re.IGNORECASE)
_PATH = re.compile(r"""['"]?(/[^\s'":,)]+)""")


def write_failures(texts: Mapping[str, str]) -> list[str]:
    """Lines of the given outputs (name -> text) that tell of a failed write, each as ``name: path: line`` (the
    path the line names, else ``?``). Empty when nothing tried to write where it may not."""
    found = []
    for name, text in texts.items():
        for line in text.splitlines():
            if _WRITE_FAILURE.search(line):
                paths = _PATH.findall(line)
                found.append(f"{name}: {paths[-1] if paths else '?'}: {line.strip()[:300]}")
    return found
