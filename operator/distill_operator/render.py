"""Pure builders: a DistillJob in, plain manifest dicts out (ConfigMap with the trainer YAML, KubeRay RayJob).

Nothing here talks to the API server; ``handlers.py`` only calls these and creates what they return, so every
field of every child object is unit-tested without a cluster (the dask-kubernetes split).
Names are deterministic (``<job>-config``, ``<job>-<attempt>``): creating the same child twice is a 409, never a
second object, which is what makes reconcile idempotent across operator restarts.
"""

from __future__ import annotations

import hashlib
import posixpath
import shlex
from dataclasses import dataclass
from typing import Any

import yaml

from distill_operator import resources
from distill_operator.resources import DistillJobSpec
from distill_trainer import shared_names
from distill_trainer.config import dump_config

CONFIG_DIR = "/etc/kubedistill"
CONFIG_FILE = "distill.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
# The trainer's environment: names the trainer reads (distill_trainer.shared_names).
ENV_JOB_NAME, ENV_JOB_NAMESPACE, ENV_JOB_UID = (
    shared_names.ENV_JOB_NAME, shared_names.ENV_JOB_NAMESPACE, shared_names.ENV_JOB_UID
)
ENV_PROGRESS_CONFIGMAP = shared_names.ENV_PROGRESS_CONFIGMAP
LABEL_JOB = f"{shared_names.GROUP}/distilljob"
LABEL_ATTEMPT = f"{shared_names.GROUP}/attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = shared_names.OPERATOR_FIELD_MANAGER
# KubeRay derives RayCluster, pod and service names from the RayJob's name; it refuses names over 47 chars.
RAYJOB_NAME_LIMIT = 47
LABEL_VALUE_LIMIT = 63
# Ray's ports that the NetworkPolicy (network.py) opens beyond the job's own pods.
DASHBOARD_PORT = 8265  # dashboard and Ray Jobs API: KubeRay's submitter and controller call it
METRICS_PORT = 8080  # Ray's Prometheus exporter (metrics-export-port) on every Ray pod
# The trainer's own metrics (distill_trainer.prometheus_sink: kubedistill_trainer_*), served by the driver on the
# head, under this container port name (a PodMonitor scrapes it by name).
TRAINER_METRICS_PORT = 9108
TRAINER_METRICS_PORT_NAME = "trainer-metrics"
# How long the driver keeps serving its final metrics after the run, unless spec.distill sets it: about one
# scrape interval, so that the last values (the final eval, a NaN that stopped the run) are scraped.
TRAINER_METRICS_LINGER_SECONDS = 30.0
# The read-only root filesystem leaves these writable, each an emptyDir: /tmp holds Ray's session directory
# (/tmp/ray: sockets, logs, runtime_env working_dir) and tempfile's files; HOME holds ~/.cache (Hugging Face,
# torch, triton) and ~/.config. KubeRay adds /dev/shm (the object store, and our shared-memory logits channel).
TMP_DIR = "/tmp"
HOME_DIR = "/home/kubedistill"
ENV_POD_IP = "KUBEDISTILL_POD_IP"
# Ray's failure detection: the GCS (on the head) probes every raylet once per period and declares a node dead
# after `failure_threshold` probes in a row failed or took longer than the timeout; only then do the actors there
# fail and the driver stop (distill_trainer.rank_failures). A probe that times out is followed by the next one a
# period later, so a lost node is declared dead after about threshold x (timeout + period): with Ray's defaults
# (10 s, 3 s, 5) about 65 s, with these about 15 s, still 5 missed probes in a row, so one slow answer of a busy
# raylet never takes a node down. Set on every Ray pod (the GCS on the head reads them; one environment for all).
RAY_HEALTH_CHECK_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "5",
}
# Before this Ray version KubeRay's head probes call the dashboard on localhost:8265, so it cannot be bound to
# the pod IP alone; from it on the probes are HTTP GETs of the dashboard agent through the pod IP.
RAY_VERSION_UNIFIED_HEALTH_CHECK = (2, 53)
# Kueue's RayJob integration (kueue.x-k8s.io): the LocalQueue and WorkloadPriorityClass labels it reads from the
# RayJob at creation. Kueue admits a RayJob by flipping its spec.suspend to false and preempts it by setting it back.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"


@dataclass(frozen=True)
class JobRef:
    """The identity of a DistillJob, as the builders need it (owner references, names, env)."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: Any) -> "JobRef":
        meta = body["metadata"]
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta.get("uid", ""))


def _bounded(name: str, limit: int) -> str:
    """``name`` if it fits in ``limit`` characters, else a truncated prefix plus a stable 8-char hash."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-.')}-{digest}"


def configmap_name(job: JobRef) -> str:
    return _bounded(f"{job.name}-config", 253)


def progress_configmap_name(job: JobRef) -> str:
    """The ConfigMap the trainer reports progress to (the only object its account may patch; see access.py)."""
    return _bounded(f"{job.name}-progress", 253)


def rayjob_name(job: JobRef, attempt: int) -> str:
    """The RayJob of one attempt: ``<job>-<attempt>``, hashed down to KubeRay's name limit when long."""
    suffix = f"-{attempt}"
    return _bounded(job.name, RAYJOB_NAME_LIMIT - len(suffix)) + suffix


def submission_id(job: JobRef, attempt: int) -> str:
    """Ray Jobs API submission id of one attempt; the uid keeps a re-created job of the same name apart."""
    return f"kubedistill-{job.namespace}-{job.name}-{job.uid[:8]}-{attempt}"


def labels(job: JobRef, attempt: int | None = None) -> dict[str, str]:
    out = {LABEL_JOB: _bounded(job.name, LABEL_VALUE_LIMIT), LABEL_MANAGED_BY: MANAGER}
    if attempt is not None:
        out[LABEL_ATTEMPT] = str(attempt)
    return out


def owner_reference(job: JobRef) -> dict[str, Any]:
    """Children are garbage-collected with their DistillJob."""
    return {
        "apiVersion": resources.API_VERSION,
        "kind": resources.KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


# Fields of the trainer config that hold paths (dotted), resolved against launcher.workingDir when relative.
PATH_FIELDS = (
    "output_dir",
    "logging_dir",
    "student_pretrain",
    "teacher_pretrain",
    "teacher_cache_dir",
    "student.data_args.file_name",
    "student.data_args.eval_file_name",
    "teacher.data_args.file_name",
    "teacher.data_args.eval_file_name",
)


def trainer_config(spec: DistillJobSpec, job: JobRef) -> dict[str, Any]:
    """The trainer YAML as data: ``spec.distill`` with relative output/logging dirs moved onto the storage (and a
    relative ``teacher_cache_dir`` too: under the directory of the job named by ``spec.teacherCacheFrom``, which
    wrote it, else of this job), for the RayAddress launcher with a workingDir every relative path resolved against
    it, and for KubeRay the metrics endpoint on TRAINER_METRICS_PORT of the head pod."""
    config = dump_config(spec.distill)
    working_dir = spec.launcher.working_dir if spec.launcher.type == "RayAddress" else None
    if working_dir:
        for dotted in PATH_FIELDS:
            *parents, leaf = dotted.split(".")
            node = config
            for key in parents:
                node = node[key]
            if isinstance(node.get(leaf), str) and not posixpath.isabs(node[leaf]):
                node[leaf] = posixpath.normpath(posixpath.join(working_dir, node[leaf]))
    if spec.storage is not None:
        base = posixpath.join(spec.storage.mount_path, job.namespace, job.name)
        for key in ("output_dir", "logging_dir"):
            if not posixpath.isabs(config[key]):
                config[key] = posixpath.normpath(posixpath.join(base, config[key]))
        cache_dir = config.get("teacher_cache_dir")
        if isinstance(cache_dir, str) and not posixpath.isabs(cache_dir):
            owner = spec.teacher_cache_from or job.name  # the cache job's directory: where it wrote the cache
            config["teacher_cache_dir"] = posixpath.normpath(
                posixpath.join(spec.storage.mount_path, job.namespace, owner, cache_dir))
    if spec.launcher.type == "KubeRay":
        # The driver runs on the head pod we render: serve its metrics on the pod's network (the container port
        # and the NetworkPolicy's metrics rule name this port). A RayAddress cluster is not ours: as written.
        config["metrics_port"] = TRAINER_METRICS_PORT
        config["metrics_bind_address"] = "0.0.0.0"
        if "metrics_linger_seconds" not in spec.distill.model_fields_set:
            config["metrics_linger_seconds"] = TRAINER_METRICS_LINGER_SECONDS
    return config


def teacher_cache_path(spec: DistillJobSpec, job: JobRef) -> str | None:
    """The teacher cache directory as the trainer sees it (``trainer_config``), or None when the job names none."""
    return trainer_config(spec, job).get("teacher_cache_dir")


def teacher_cache_location(spec: DistillJobSpec, job: JobRef) -> tuple[str | None, str | None]:
    """Where the teacher cache of a job is, independent of where the claim is mounted: (claimName, path below the
    mount) with storage, else (None, the path as the trainer sees it). Two jobs share a cache when these are equal."""
    path = teacher_cache_path(spec, job)
    if path is None or spec.storage is None:
        return None, path
    inside = resources.storage_relative(path, spec.storage)
    return spec.storage.claim_name, inside if inside is not None else path


def trainer_config_yaml(spec: DistillJobSpec, job: JobRef) -> str:
    return yaml.safe_dump(trainer_config(spec, job), sort_keys=False)


def render_configmap(spec: DistillJobSpec, job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(job),
            "namespace": job.namespace,
            "labels": labels(job),
            "ownerReferences": [owner_reference(job)],
        },
        "data": {CONFIG_FILE: trainer_config_yaml(spec, job)},
    }


def entrypoint_args(
    config_path: str = CONFIG_PATH, resume: bool = False, mode: resources.Mode = "train"
) -> list[str]:
    """The trainer command as an argument list: ``kubedistill train`` (a retry or resume adds
    ``resume_from_checkpoint=true``) or, for spec.mode cacheTeacher, ``kubedistill cache-teacher`` (its rerun
    continues an interrupted cache write by itself: no override)."""
    if mode == "cacheTeacher":
        return ["kubedistill", "cache-teacher", config_path]
    args = ["kubedistill", "train", config_path]
    if resume:
        args.append("resume_from_checkpoint=true")
    return args


def trainer_env(job: JobRef) -> dict[str, str]:
    """Tells the trainer which DistillJob it runs under (its run identity) and where to report progress."""
    return {
        ENV_JOB_NAME: job.name,
        ENV_JOB_NAMESPACE: job.namespace,
        ENV_JOB_UID: job.uid,
        ENV_PROGRESS_CONFIGMAP: progress_configmap_name(job),
    }


def _resources(cpu: int | str, memory: int | str, gpus: int = 0, gpu_name: str = "") -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": str(cpu), "memory": str(memory)}
    limits = dict(amounts)
    if gpus:
        limits[gpu_name] = str(gpus)
    return {"requests": amounts, "limits": limits}


def trainer_service_account(job: JobRef) -> str:
    """The per-job ServiceAccount the operator creates for the trainer (used when spec.serviceAccountName is unset)."""
    return _bounded(f"{job.name}-trainer", 253)


def service_account(spec: DistillJobSpec, job: JobRef) -> str:
    return spec.service_account_name or trainer_service_account(job)


def pod_security_context(spec: DistillJobSpec) -> dict[str, Any]:
    """Pod level: a numeric non-root user (so runAsNonRoot holds for images whose USER is a name), an fsGroup
    that makes the checkpoint volume writable for it (changed only when the volume root does not match it
    already: no recursive chown of a large checkpoint volume on every start), the runtime's seccomp profile."""
    run_as = spec.pod_security
    return {
        "runAsNonRoot": True,
        "runAsUser": run_as.run_as_user,
        "runAsGroup": run_as.run_as_group,
        "fsGroup": run_as.fs_group,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """Container level: nothing writable but the mounted volumes, no capabilities, no setuid gains."""
    return {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _writable_volumes() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """emptyDir volumes for what Ray and Python write under a read-only root filesystem (see TMP_DIR)."""
    volumes = [{"name": "tmp", "emptyDir": {}}, {"name": "home", "emptyDir": {}}]
    mounts = [{"name": "tmp", "mountPath": TMP_DIR}, {"name": "home", "mountPath": HOME_DIR}]
    return volumes, mounts


def _writable_env() -> list[dict[str, Any]]:
    return [
        {"name": "HOME", "value": HOME_DIR},
        {"name": "XDG_CACHE_HOME", "value": f"{HOME_DIR}/.cache"},
        {"name": "TMPDIR", "value": TMP_DIR},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},  # site-packages is read-only: do not try
    ]


def _pod_template(
    spec: DistillJobSpec,
    job: JobRef,
    attempt: int,
    container_name: str,
    resources_: dict[str, Any],
    node_selector: dict[str, str],
    tolerations: list[resources.Toleration],
    ports: list[dict[str, Any]],
    api_token: bool = False,
) -> dict[str, Any]:
    """A Ray pod: non-root, read-only root filesystem with emptyDirs for /tmp and HOME, the trainer config and
    the checkpoint volume. Only ``api_token`` pods (the head: the trainer's driver reports progress from there)
    get the service account's token mounted."""
    mounts = [{"name": "kubedistill-config", "mountPath": CONFIG_DIR, "readOnly": True}]
    volumes: list[dict[str, Any]] = [{"name": "kubedistill-config", "configMap": {"name": configmap_name(job)}}]
    if spec.storage is not None:
        mounts.append({"name": "checkpoints", "mountPath": spec.storage.mount_path})
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": spec.storage.claim_name}})
    scratch_volumes, scratch_mounts = _writable_volumes()
    volumes += scratch_volumes
    mounts += scratch_mounts
    env = [{"name": key, "value": value} for key, value in trainer_env(job).items()]
    env += [{"name": key, "value": value} for key, value in RAY_HEALTH_CHECK_ENV.items()]
    env += _writable_env()
    env.append({"name": ENV_POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    container: dict[str, Any] = {
        "name": container_name,
        "image": spec.image,
        "resources": resources_,
        "env": env,
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    if ports:
        container["ports"] = ports
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        # The same account on every pod (its imagePullSecrets pull the image), its token only where it is used.
        "serviceAccountName": service_account(spec, job),
        "automountServiceAccountToken": api_token,
        "securityContext": pod_security_context(spec),
    }
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in tolerations]
    return {"metadata": {"labels": labels(job, attempt)}, "spec": pod_spec}


def submitter_pod_template(spec: DistillJobSpec, job: JobRef, attempt: int) -> dict[str, Any]:
    """KubeRay's submitter (K8sJobMode): a Job whose pod runs ``ray job submit`` against the head's dashboard
    (KubeRay fills in the command). Ours only to give it the job's labels (the NetworkPolicy admits it by them),
    the same security context and no API token: the trainer's driver runs on the head, not here."""
    resources_ = {"requests": {"cpu": "500m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
    volumes, mounts = _writable_volumes()
    container: dict[str, Any] = {
        "name": "ray-job-submitter",
        "image": spec.image,
        "resources": resources_,
        "env": _writable_env(),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    pod_spec = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": volumes,
        "serviceAccountName": service_account(spec, job),
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(spec),
    }
    return {"metadata": {"labels": labels(job, attempt)}, "spec": pod_spec}


def dashboard_host(ray_version: str) -> str:
    """Where the head's dashboard (and Ray Jobs API) listens. It must be reachable from other pods (KubeRay's
    submitter and controller), so not loopback; the pod IP rather than every interface where KubeRay's probes
    allow it (Ray >= 2.53), else 0.0.0.0. Who may connect is the NetworkPolicy's business (network.py)."""
    try:
        version = tuple(int(part) for part in ray_version.split(".")[:2])
    except ValueError:
        return "0.0.0.0"
    # $(VAR) in a container's args is expanded by the kubelet from the container's env (ENV_POD_IP: status.podIP).
    return f"$({ENV_POD_IP})" if version >= RAY_VERSION_UNIFIED_HEALTH_CHECK else "0.0.0.0"


def render_rayjob(
    spec: DistillJobSpec,
    job: JobRef,
    attempt: int,
    resume: bool,
    active_deadline_seconds: int | None = None,
) -> dict[str, Any]:
    """The KubeRay RayJob of one attempt: a head (driver) and the GPU worker group, torn down when done.

    ``active_deadline_seconds`` is what is left of the DistillJob's deadline; KubeRay enforces it as a backstop
    (the operator enforces the real one). KubeRay's own retries are off (backoffLimit 0): each retry of ours is a
    new RayJob that resumes from the checkpoint.

    With ``runPolicy.queueName`` the RayJob is what Kueue's RayJob integration expects: the queue (and priority
    class) labels, created with ``suspend: true`` (Kueue admits it by setting false), ``shutdownAfterJobFinishes``
    and no ``clusterSelector``. The operator only ever creates and deletes RayJobs, never patches one, so it never
    writes ``suspend`` after creation (a controller that does races Kueue) and the labels stay as created.
    """
    workers = spec.workers
    head_ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": DASHBOARD_PORT, "name": "dashboard"},
        {"containerPort": METRICS_PORT, "name": "metrics"},
        {"containerPort": TRAINER_METRICS_PORT, "name": TRAINER_METRICS_PORT_NAME},
    ]
    ray_spec: dict[str, Any] = {
        "entrypoint": shlex.join(entrypoint_args(CONFIG_PATH, resume, spec.mode)),
        "runtimeEnvYAML": yaml.safe_dump({"env_vars": trainer_env(job)}, sort_keys=True),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 60,
        "backoffLimit": 0,
        "submissionMode": "K8sJobMode",
        "rayClusterSpec": {
            "rayVersion": spec.ray_version,
            "headGroupSpec": {
                "rayStartParams": {
                    "dashboard-host": dashboard_host(spec.ray_version),
                    "metrics-export-port": str(METRICS_PORT),
                },
                "template": _pod_template(
                    spec,
                    job,
                    attempt,
                    "ray-head",
                    _resources(spec.head.cpu, spec.head.memory),
                    spec.head.node_selector,
                    spec.head.tolerations,
                    head_ports,
                    api_token=True,
                ),
            },
            "workerGroupSpecs": [
                {
                    "groupName": "gpu",
                    "replicas": workers.replicas,
                    "minReplicas": workers.replicas,
                    "maxReplicas": workers.replicas,
                    "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
                    "template": _pod_template(
                        spec,
                        job,
                        attempt,
                        "ray-worker",
                        _resources(workers.cpu, workers.memory, workers.gpus_per_worker, workers.gpu_resource_name),
                        workers.node_selector,
                        workers.tolerations,
                        [{"containerPort": METRICS_PORT, "name": "metrics"}],
                    ),
                }
            ],
        },
        "submitterPodTemplate": submitter_pod_template(spec, job, attempt),
    }
    if active_deadline_seconds is not None:
        ray_spec["activeDeadlineSeconds"] = max(1, int(active_deadline_seconds))
    metadata_labels = labels(job, attempt)
    if spec.run_policy.queue_name:
        metadata_labels[KUEUE_QUEUE_LABEL] = spec.run_policy.queue_name
        if spec.run_policy.priority_class_name:
            metadata_labels[KUEUE_PRIORITY_LABEL] = spec.run_policy.priority_class_name
        ray_spec["suspend"] = True
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": rayjob_name(job, attempt),
            "namespace": job.namespace,
            "labels": metadata_labels,
            "ownerReferences": [owner_reference(job)],
        },
        "spec": ray_spec,
    }


def render_submission(spec: DistillJobSpec, job: JobRef, attempt: int, resume: bool) -> dict[str, Any]:
    """Arguments of ``JobSubmissionClient.submit_job`` for the RayAddress launcher.

    The config travels as ``distill.yaml`` in the runtime_env working_dir (uploaded by the client), so the
    entrypoint names it relatively; paths inside the config should be absolute on the Ray cluster.
    """
    return {
        "submission_id": submission_id(job, attempt),
        "entrypoint": shlex.join(entrypoint_args(CONFIG_FILE, resume, spec.mode)),
        "runtime_env": {"env_vars": trainer_env(job)},
        "metadata": {"distilljob": f"{job.namespace}/{job.name}", "attempt": str(attempt)},
        "config_yaml": trainer_config_yaml(spec, job),
    }

