"""The DistillJob resource as pydantic models: the one source of the CRD schema and of the operator's view.

``DistillJobSpec`` is what users write under ``spec``; ``DistillJobStatus`` is what the operator (and, for
``status.progress``, the trainer) write back. ``crdgen.py`` turns these models into ``crds/distilljob.yaml``,
so every field's ``description`` here is what ``kubectl explain distilljob.spec...`` shows.

Kubernetes-facing fields are camelCase (``runPolicy.backoffLimit``); ``spec.distill`` is the trainer's own
``DistillConfig`` and keeps the trainer YAML's snake_case field names, so a trainer config pastes in unchanged.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from distill_trainer import shared_names
from distill_trainer.config import DistillConfig

# The API names the trainer uses too (distill_trainer.shared_names).
GROUP = shared_names.GROUP
VERSION = shared_names.VERSION
KIND = shared_names.KIND
PLURAL = shared_names.PLURAL
SINGULAR = "distilljob"
SHORT_NAMES = list(shared_names.SHORT_NAMES)
API_VERSION = shared_names.API_VERSION

# Condition types, in the order they usually appear. Each is True/False with a CamelCase reason.
# SpecChangeIgnored: an immutable spec field (IMMUTABLE_SPEC_FIELDS) was edited; the job keeps its original.
# Conflict: a child's name is taken by an object this DistillJob does not own; nothing is launched until it is gone.
# Queued: runPolicy.queueName is set and Kueue holds the attempt's RayJob suspended (waiting for quota, or preempted).
ConditionType = Literal[
    "Created", "Queued", "Running", "Suspended", "Restarting", "Succeeded", "Failed", "SpecChangeIgnored", "Conflict"
]
CONDITION_TYPES: tuple[str, ...] = get_args(ConditionType)
# The one-word summary in status.state (a printer column); terminal states never change again.
State = Literal["Pending", "Queued", "Running", "Suspended", "Restarting", "Succeeded", "Failed"]
TERMINAL_STATES = ("Succeeded", "Failed")

QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
# spec.launcher.rayAddress: scheme, host and optional port, nothing else (no userinfo, path, query or fragment).
# The host is a DNS name, an IPv4 address or a bracketed IPv6 address.
RAY_ADDRESS_PATTERN = r"^https?://([A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?/?$"


def check_ray_address(address: str, field: str = "spec.launcher.rayAddress") -> str:
    """``address`` as ``scheme://host[:port]`` (a trailing '/' dropped), or ValueError naming ``field``.

    The operator sends HTTP requests to it with its own network position; anything but the dashboard's base URL
    (a path, query, fragment, user:password@) is refused rather than passed on.
    """
    import re
    from urllib.parse import urlsplit

    hint = (
        f"{field} must be the Ray dashboard's base URL: http:// or https://, a host and an optional port, "
        "e.g. http://raycluster-head-svc.ray:8265 (no user, path, query or fragment)"
    )
    if not isinstance(address, str) or not re.fullmatch(RAY_ADDRESS_PATTERN, address):
        raise ValueError(f"{hint}; got {address!r}")
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or not parts.hostname:
        raise ValueError(f"{hint}; got {address!r} (the port must be 1-65535)")
    return f"{parts.scheme}://{parts.netloc}"


class _K8sModel(BaseModel):
    # camelCase on the wire like every Kubernetes API; unknown fields are errors (the API server prunes them
    # anyway, so an unknown key reaching the operator means a client bypassed the schema).
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class Toleration(_K8sModel):
    """A pod toleration, as in core/v1 (so GPU nodes with taints can be used)."""

    key: str | None = Field(None, description="Taint key the toleration applies to; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal. Default: Equal.")
    value: str | None = Field(None, description="Taint value to match with operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, description="For NoExecute: how long the pod stays bound after the taint appears."
    )


class HeadSpec(_K8sModel):
    """The Ray head pod. The trainer's driver runs here; it needs no GPU."""

    cpu: int | str = Field("4", description="CPU request and limit of the head pod (a quantity). Default: 4.")
    memory: int | str = Field("16Gi", description="Memory request and limit of the head pod (a quantity). Default: 16Gi.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the head pod must match.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations of the head pod.")


class WorkersSpec(_K8sModel):
    """The GPU worker group of the Ray cluster: where TeacherWorker and StudentWorker actors are placed."""

    replicas: int = Field(1, ge=1, le=1024, description="Number of Ray worker pods. Default: 1.")
    gpus_per_worker: int = Field(1, ge=0, le=64, description="GPUs requested by each worker pod. Default: 1.")
    gpu_resource_name: str = Field(
        "nvidia.com/gpu", min_length=1, description="Extended resource name of the GPUs. Default: nvidia.com/gpu."
    )
    cpu: int | str = Field("8", description="CPU request and limit of each worker pod (a quantity). Default: 8.")
    memory: int | str = Field(
        "64Gi", description="Memory request and limit of each worker pod (a quantity). Default: 64Gi."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the worker pods must match, e.g. a GPU product label."
    )
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations of the worker pods.")


class StorageSpec(_K8sModel):
    """Where checkpoints live. It must outlive Ray clusters: suspend, retries and resume read from it."""

    claim_name: str = Field(
        ..., min_length=1, max_length=253, description="PersistentVolumeClaim mounted into the head and worker pods."
    )
    mount_path: str = Field(
        "/checkpoints",
        pattern=r"^/",
        description="Where the claim is mounted. A relative spec.distill.output_dir/logging_dir is placed "
        "under <mountPath>/<namespace>/<name>/. Default: /checkpoints.",
    )


# A Kubernetes label value naming a Kueue object (LocalQueue, WorkloadPriorityClass: DNS subdomain names <= 63).
KUEUE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class RunPolicy(_K8sModel):
    """When the job runs, how long it may take, how often it is retried and when it is cleaned up."""

    suspend: bool = Field(
        False,
        description="true deletes the Ray cluster and keeps the checkpoints; setting it back to false resumes "
        "from the newest checkpoint. Default: false.",
    )
    active_deadline_seconds: int | None = Field(
        None,
        ge=1,
        description="Fail the job (DeadlineExceeded) when it has run this long since it started or last resumed. "
        "Time queued in Kueue (runPolicy.queueName: before admission, or after a preemption) does not count. "
        "Default: no deadline.",
    )
    pre_running_deadline_seconds: int | None = Field(
        None,
        ge=1,
        description="Fail the job (PreRunningDeadlineExceeded) when an attempt has not reached Running this long "
        "after its RayJob was created (with runPolicy.queueName: after Kueue admitted it; time queued does not "
        "count), e.g. pods unschedulable or images not pullable. Default: no deadline.",
    )
    backoff_limit: int = Field(
        3,
        ge=0,
        le=100,
        description="Retries after a failed attempt; each retry is a new RayJob resuming from the newest "
        "checkpoint. Default: 3.",
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        description="Delete the DistillJob (and, through owner references, its ConfigMap and RayJobs) this "
        "long after it succeeded or failed. Default: keep it.",
    )
    queue_name: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        pattern=KUEUE_NAME_PATTERN,
        description="Kueue LocalQueue (in the job's namespace) to admit the job through: each RayJob is created "
        "suspended with the label kueue.x-k8s.io/queue-name and Kueue starts it when the queue has quota "
        "(gang admission of head and workers). Applies from the next attempt. Default: no queue, start at once.",
    )
    priority_class_name: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        pattern=KUEUE_NAME_PATTERN,
        description="Kueue WorkloadPriorityClass of the job's RayJobs (the label kueue.x-k8s.io/priority-class), "
        "for ordering and preemption within the queue; only with queueName. Applies from the next attempt. "
        "Default: Kueue's default priority.",
    )


class PodSecuritySpec(_K8sModel):
    """The numeric user and groups of every Ray pod (they run as non-root with a read-only root filesystem)."""

    run_as_user: int = Field(
        1000, ge=1, le=2147483647, description="UID of the Ray containers; not 0 (runAsNonRoot). Default: 1000."
    )
    run_as_group: int = Field(1000, ge=1, le=2147483647, description="Primary GID of the Ray containers. Default: 1000.")
    fs_group: int = Field(
        1000,
        ge=1,
        le=2147483647,
        description="Group that owns the checkpoint volume (and may write it), applied when the volume's root "
        "does not match already. Default: 1000.",
    )


class LauncherSpec(_K8sModel):
    """How the trainer is started."""

    type: Literal["KubeRay", "RayAddress"] = Field(
        "KubeRay",
        description="KubeRay: create a ray.io/v1 RayJob (a Ray cluster per attempt). RayAddress: submit to an "
        "existing Ray cluster through the Ray Jobs API at rayAddress. Default: KubeRay.",
    )
    ray_address: str | None = Field(
        None,
        description="Ray dashboard address for type RayAddress: http(s)://host[:port] only (no path, query, "
        "fragment or user), e.g. http://raycluster-head-svc.ray:8265. The operator calls it with its own network "
        "access.",
        json_schema_extra={"pattern": RAY_ADDRESS_PATTERN},
    )
    working_dir: str | None = Field(
        None,
        pattern=r"^/",
        description="For type RayAddress: an absolute directory on the Ray cluster; relative paths in "
        "spec.distill (models, data, output) are resolved against it. Default: paths are used as written.",
    )

    @field_validator("ray_address")
    @classmethod
    def _ray_address_is_a_base_url(cls, value: str | None) -> str | None:
        return None if value is None else check_ray_address(value)


# Fields of spec fixed at creation: what the run computes (and whether it trains or writes a teacher cache, and
# whose cache it reads), where its checkpoints live, where it runs. Edits are
# rejected by the API server (CEL, Kubernetes >= 1.25; crdgen generates the rule from this tuple) and ignored by
# the operator on every server (a SpecChangeIgnored condition names the field; the job keeps its original).
# Everything else (runPolicy at once; image, head, workers, serviceAccountName from the next attempt) may change.
IMMUTABLE_SPEC_FIELDS = ("distill", "storage", "launcher", "mode", "teacherCacheFrom")

# spec.mode: what the job's RayJob runs. train: `kubedistill train` (a teacher cache is read when
# spec.distill.teacher_cache_dir names one); cacheTeacher: `kubedistill cache-teacher`, the teacher alone over the
# training data, writing the cache to spec.distill.teacher_cache_dir for later train jobs (spec.teacherCacheFrom).
Mode = Literal["train", "cacheTeacher"]
# A DistillJob's name (metadata.name of a custom resource: a DNS subdomain).
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


def _field_error(path: str, message: str, got: Any = None) -> PydanticCustomError:
    """A cross-field error of DistillJobSpec's model validator, reported at ``path`` (the trainer's convention:
    distill_trainer.config.format_validation_error prints ``spec.<path>: message (got ...)``)."""
    context: dict[str, Any] = {"field": path, "message": message}
    if got is not None:
        context["got"] = got
    return PydanticCustomError("cross_field", "{message}", context)


def storage_relative(path: str, storage: "StorageSpec") -> str | None:
    """Where ``path`` (a spec.distill path as the trainer will see it) lies inside the storage claim: the part below
    ``storage.mount_path`` ("." for the mount itself), or None when it is not on the claim. A relative path is placed
    under ``<mountPath>/<namespace>/<name>/`` (render.trainer_config), so it is on the claim unless '..' leaves it."""
    import posixpath

    mount = posixpath.normpath(storage.mount_path)
    if not posixpath.isabs(path):
        path = posixpath.join(mount, "namespace", "name", path)  # names hold no '/': any namespace/name alike
    path = posixpath.normpath(path)
    if path == mount:
        return "."
    if mount == "/" or path.startswith(mount.rstrip("/") + "/"):
        return posixpath.relpath(path, mount)
    return None


class DistillJobSpec(_K8sModel):
    """What to distill, on which image and hardware, and the run policy."""

    distill: DistillConfig = Field(
        ...,
        description="The trainer configuration: the same fields as the trainer's YAML file (snake_case).",
    )
    image: str = Field(..., min_length=1, description="Container image with kubedistill and Ray installed.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Image pull policy of all pods. Default: the cluster's default."
    )
    service_account_name: str | None = Field(
        None,
        description="Service account of the Ray pods. Default: <name>-trainer, created by the operator for this "
        "job, which may only read and patch the job's progress ConfigMap <name>-progress (the operator binds the "
        "same per-job Role to an account named here).",
    )
    ray_version: str = Field("2.60.0", min_length=1, description="Ray version in the image (KubeRay rayVersion).")
    pod_security: PodSecuritySpec = Field(
        default_factory=PodSecuritySpec, description="User and groups of the Ray pods (non-root, numeric)."
    )
    head: HeadSpec = Field(default_factory=HeadSpec, description="The Ray head pod (runs the trainer driver).")
    workers: WorkersSpec = Field(default_factory=WorkersSpec, description="The GPU worker group.")
    storage: StorageSpec | None = Field(
        None, description="Checkpoint storage (a PVC). Without it, checkpoints die with the Ray cluster."
    )
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Suspend, deadlines, retries, TTL.")
    launcher: LauncherSpec = Field(default_factory=LauncherSpec, description="How the trainer is started.")
    mode: Mode = Field(
        "train",
        description="train: distill (`kubedistill train`). cacheTeacher: run only the teacher over the training "
        "data and write its targets to spec.distill.teacher_cache_dir (`kubedistill cache-teacher`; required "
        "there, on spec.storage), for train jobs that name this job in spec.teacherCacheFrom. A retry continues an "
        "interrupted cache write. Default: train.",
    )
    teacher_cache_from: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="Name of a DistillJob with mode cacheTeacher in this namespace whose teacher cache this (train) "
        "job reads: it is not started (state Pending, reason WaitingForTeacherCache) until that job has "
        "Succeeded. Both must use the same spec.storage.claimName and teacher cache directory "
        "(spec.distill.teacher_cache_dir; a relative one is placed under <mountPath>/<namespace>/<that job's "
        "name>/), else this job fails with reason TeacherCacheMismatch. Default: none.",
    )

    @model_validator(mode="after")
    def _teacher_cache_fields(self) -> "DistillJobSpec":
        cache_dir = self.distill.teacher_cache_dir
        if self.mode == "cacheTeacher":
            if self.teacher_cache_from:
                raise _field_error("teacherCacheFrom", "is for train jobs that read a cache; a cacheTeacher job "
                                   "writes one", self.teacher_cache_from)
            if not cache_dir:
                raise _field_error("distill.teacher_cache_dir", "is required with spec.mode cacheTeacher: the "
                                   "directory the teacher cache is written to (on spec.storage)")
        elif self.teacher_cache_from and not cache_dir:
            raise _field_error("distill.teacher_cache_dir", "is required with spec.teacherCacheFrom: the teacher "
                               f"cache directory of DistillJob {self.teacher_cache_from} (the same value)")
        if self.mode != "cacheTeacher" and not self.teacher_cache_from:
            return self
        if self.storage is None:
            if self.launcher.type == "KubeRay":
                what = "spec.mode cacheTeacher" if self.mode == "cacheTeacher" else "spec.teacherCacheFrom"
                raise _field_error("storage", f"is required with {what}: the teacher cache lives on a "
                                   "PersistentVolumeClaim shared by the cache job and the train jobs that read it "
                                   "(a Ray cluster's own disks go with it)")
            return self
        if storage_relative(cache_dir, self.storage) is None:
            raise _field_error("distill.teacher_cache_dir", f"must lie on spec.storage: a relative path, or one "
                               f"under its mountPath {self.storage.mount_path}", cache_dir)
        return self


class Condition(_K8sModel):
    """A Kubernetes condition: lastTransitionTime changes only when status flips."""

    type: ConditionType = Field(..., description="Condition type.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field(..., description="CamelCase reason of the last transition.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str = Field(..., description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="metadata.generation the condition was computed for.")


class Progress(_K8sModel):
    """The trainer's report, mirrored by the operator from the ConfigMap <name>-progress (checked types and bounds)."""

    step: int | None = Field(None, description="Last completed optimizer step.")
    max_steps: int | None = Field(None, description="Optimizer steps of the whole run.")
    loss: float | None = Field(None, description="Training loss at step.")
    tokens_per_second: float | None = Field(None, description="Training throughput (tokens/s).")
    last_checkpoint: str | None = Field(None, description="Path of the newest saved checkpoint.")
    updated_at: str | None = Field(None, description="When the trainer last reported (RFC 3339).")


class DistillJobStatus(_K8sModel):
    """Observed state, written by the operator only (progress is mirrored from the trainer's progress ConfigMap)."""

    state: State | None = Field(
        None,
        description="Summary: Pending, Queued, Running, Suspended, Restarting, Succeeded, Failed. A train job with "
        "spec.teacherCacheFrom is Pending (reason WaitingForTeacherCache, or TeacherCacheFailed) until that job has "
        "Succeeded.",
    )
    reason: str | None = Field(
        None, description="CamelCase reason of the condition that set the state (a printer column)."
    )
    message: str | None = Field(None, description="Why the job is in this state, and what to do next if anything.")
    observed_generation: int | None = Field(None, description="metadata.generation the operator last acted on.")
    start_time: str | None = Field(None, description="When the current run started or last resumed (RFC 3339).")
    completion_time: str | None = Field(None, description="When the job succeeded or failed (RFC 3339).")
    ray_job_name: str | None = Field(None, description="The RayJob (or Ray Jobs submission id) of the current attempt.")
    attempt: int | None = Field(None, description="Index of the current attempt; every retry or resume adds one.")
    attempt_start_time: str | None = Field(None, description="When the current attempt was launched (RFC 3339).")
    restarts: int | None = Field(None, description="Retries after failures so far (compared with backoffLimit).")
    spec_hashes: dict[str, str] | None = Field(
        None,
        description="sha256 of each immutable spec field (distill, storage, launcher, mode, teacherCacheFrom) as "
        "first seen: the "
        "operator's record of the original; a differing hash is an ignored edit (condition SpecChangeIgnored).",
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Created, Queued, Running, Suspended, Restarting, Succeeded, Failed, SpecChangeIgnored, "
        "Conflict.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    progress: Progress | None = Field(None, description="Training progress reported by the trainer.")


def parse_spec(spec: dict[str, Any]) -> DistillJobSpec:
    """Validate a DistillJob's spec (raises pydantic.ValidationError naming the field path)."""
    return DistillJobSpec.model_validate(spec)
