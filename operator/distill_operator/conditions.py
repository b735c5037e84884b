"""Pure status logic: (what the launcher reports, progress, old status, run policy, now) -> new status + action.

Two steps, both without a cluster:
1. ``observe_rayjob`` / ``observe_submission`` reduce a KubeRay RayJob status or a Ray Jobs API status to one
   ``Observation`` (Missing, Pending, Running, Succeeded, Failed), so both launchers map to conditions the same way.
2. ``decide`` applies the run policy (suspend, deadlines, backoffLimit, TTL) and returns the status the operator
   should write, the one action to take (launch an attempt, delete the attempt, delete the job) and the events.

Conditions follow the Kubernetes conventions: CamelCase reasons, human messages, ``lastTransitionTime`` changes
only when ``status`` flips, ``observedGeneration`` on each. ``status.progress`` is the trainer's report (mirrored
and checked by the operator): ``decide`` reads it for messages only and never returns it. State, conditions,
restarts and completion come from the launcher's observation and the operator's own status keys.

A train job with ``spec.teacherCacheFrom`` is launched only once the DistillJob it names (``spec.mode:
cacheTeacher``) has Succeeded: ``teacher_cache_gate`` decides from the two jobs, ``decide`` keeps it Pending (condition
``Created`` False, reason WaitingForTeacherCache or TeacherCacheFailed) or fails it (TeacherCacheMismatch).

Immutable spec fields (``resources.IMMUTABLE_SPEC_FIELDS``): ``spec_hashes`` records a hash of each at the first
reconcile (``status.specHashes``); ``changed_fields`` names the ones edited since, which the job ignores (it keeps
its original, see handlers.py) with a ``SpecChangeIgnored`` condition.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, Mapping

from distill_operator import render
from distill_operator.resources import IMMUTABLE_SPEC_FIELDS, TERMINAL_STATES, DistillJobSpec, parse_spec

Phase = Literal["Missing", "Queued", "Preempted", "Pending", "Running", "Succeeded", "Failed"]
Action = Literal["none", "launch", "stop", "delete_job"]

# Keys of status the operator owns; everything else (progress) belongs to someone else.
OPERATOR_STATUS_KEYS = (
    "state",
    "reason",
    "message",
    "observedGeneration",
    "startTime",
    "completionTime",
    "rayJobName",
    "attempt",
    "attemptStartTime",
    "restarts",
    "specHashes",
    "conditions",
)


def spec_hashes(spec: Mapping[str, Any]) -> dict[str, str]:
    """sha256 (16 hex) of each immutable field of a raw spec as stored (canonical JSON; "-" when absent)."""
    out = {}
    for name in IMMUTABLE_SPEC_FIELDS:
        value = json.dumps(spec.get(name), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        out[name] = hashlib.sha256(value.encode()).hexdigest()[:16] if name in spec else "-"
    return out


def changed_fields(spec: Mapping[str, Any], recorded: Mapping[str, str]) -> list[str]:
    """The immutable fields (``spec.<name>``) whose hash differs from the one recorded at the first reconcile."""
    now = spec_hashes(spec)
    return [f"spec.{name}" for name in IMMUTABLE_SPEC_FIELDS if name in recorded and recorded[name] != now[name]]


def format_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Observation:
    """One attempt's state as a launcher sees it."""

    phase: Phase
    reason: str
    message: str = ""
    # Queued only: False while KubeRay is still tearing down a RayJob that was just suspended (not yet at rest).
    settled: bool = True


MISSING = Observation("Missing", "RayJobDeleted", "the attempt's RayJob no longer exists")


def observe_rayjob(rayjob: Mapping[str, Any] | None, workload: Mapping[str, Any] | None = None) -> Observation:
    """Map a KubeRay ray.io/v1 RayJob's ``jobDeploymentStatus``/``jobStatus`` to an Observation.

    A RayJob with ``spec.suspend: true`` (created so for a Kueue queue) is Queued, or Preempted when Kueue
    evicted it after admission; ``workload`` is the Kueue Workload it owns, whose conditions say why."""
    if rayjob is None:
        return MISSING
    status = rayjob.get("status") or {}
    deployment = status.get("jobDeploymentStatus") or ""
    job = status.get("jobStatus") or ""
    # KubeRay copies the Ray Jobs API's message, log tail included.
    detail = ray_failure_summary(status.get("message") or status.get("reason") or "")
    name = (rayjob.get("metadata") or {}).get("name", "RayJob")
    if job == "SUCCEEDED":
        return Observation("Succeeded", "RayJobSucceeded", f"RayJob {name} succeeded")
    if job in ("FAILED", "STOPPED") or deployment in ("Failed", "ValidationFailed"):
        what = f"jobStatus={job or '-'}, jobDeploymentStatus={deployment or '-'}"
        return Observation("Failed", "RayJobFailed", f"RayJob {name} failed ({what}){': ' + detail if detail else ''}")
    if deployment == "Complete":  # complete without a SUCCEEDED jobStatus: treat as a failure
        return Observation("Failed", "RayJobFailed", f"RayJob {name} completed with jobStatus={job or '-'}")
    if (rayjob.get("spec") or {}).get("suspend"):
        return observe_queued(rayjob, workload)
    if job == "RUNNING" and deployment in ("Running", ""):
        return Observation("Running", "RayJobRunning", f"RayJob {name} is running")
    return Observation(
        "Pending", "RayJobPending", f"RayJob {name} is starting (jobDeploymentStatus={deployment or '-'})"
    )


KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # render.KUEUE_QUEUE_LABEL (render imports this module's users)
# jobDeploymentStatus of a RayJob at rest while suspended: KubeRay has deleted its cluster (or never made one).
SUSPENDED_AT_REST = ("", "New", "Suspended")


def observe_queued(rayjob: Mapping[str, Any], workload: Mapping[str, Any] | None) -> Observation:
    """A suspended RayJob, from its Kueue Workload's conditions (QuotaReserved, Admitted, Evicted): Queued with
    Kueue's reason and what to do, or Preempted (evicted after admission and at rest: KubeRay deleted its cluster,
    so the run continues in a new attempt from the newest checkpoint)."""
    meta = rayjob.get("metadata") or {}
    name, namespace = meta.get("name", "RayJob"), meta.get("namespace", "")
    queue = (meta.get("labels") or {}).get(KUEUE_QUEUE_LABEL)
    where = f"Kueue LocalQueue {namespace}/{queue}" if queue else "Kueue"
    at_rest = ((rayjob.get("status") or {}).get("jobDeploymentStatus") or "") in SUSPENDED_AT_REST
    if workload is None:
        return Observation(
            "Queued", "WaitingForWorkload",
            f"RayJob {name} is suspended until {where} admits it; Kueue has made no Workload for it yet. If this "
            "lasts, check that Kueue runs with its RayJob integration (integrations.frameworks: ray.io/rayjob) and "
            f"that the LocalQueue exists: kubectl get localqueue -n {namespace} {queue or ''}".rstrip(),
            settled=at_rest,
        )
    workload_name = (workload.get("metadata") or {}).get("name", "")
    conditions = (workload.get("status") or {}).get("conditions") or []
    see = f"kubectl describe workload -n {namespace} {workload_name}"

    def detail(condition: Mapping[str, Any] | None) -> str:
        return (condition or {}).get("message") or (condition or {}).get("reason") or "no detail"

    evicted, reserved = get_condition(conditions, "Evicted"), get_condition(conditions, "QuotaReserved")
    admitted = get_condition(conditions, "Admitted")
    if (workload.get("spec") or {}).get("active") is False:
        return Observation(
            "Queued", "WorkloadInactive",
            f"Kueue deactivated Workload {workload_name} of RayJob {name} ({detail(evicted)}): it is not admitted "
            f"again until reactivated: kubectl patch workload -n {namespace} {workload_name} --type merge -p "
            "'{\"spec\":{\"active\":true}}', or delete and re-create the DistillJob",
            settled=at_rest,
        )
    if evicted is not None and evicted.get("status") == "True" and not is_true(conditions, "QuotaReserved"):
        reason = evicted.get("reason") or "Evicted"
        if not at_rest:
            return Observation("Queued", reason, f"Kueue evicted RayJob {name} ({reason}: {detail(evicted)}); "
                               "KubeRay is deleting its Ray cluster", settled=False)
        return Observation("Preempted", reason, f"Kueue evicted RayJob {name} from {where} ({reason}: "
                           f"{detail(evicted)}) and KubeRay deleted its Ray cluster")
    if is_true(conditions, "Admitted"):
        return Observation("Queued", "Admitted", f"{where} admitted RayJob {name}; Kueue is starting it",
                           settled=at_rest)
    if is_true(conditions, "QuotaReserved"):
        return Observation(
            "Queued", "QuotaReserved",
            f"Kueue reserved quota for RayJob {name} in {where}; waiting for its admission checks "
            f"({detail(admitted)}). See {see}", settled=at_rest,
        )
    if reserved is not None:
        return Observation(
            "Queued", reserved.get("reason") or "Pending",
            f"RayJob {name} waits in {where}: {detail(reserved)}. It starts when Kueue admits it (quota frees up, "
            f"or a higher runPolicy.priorityClassName); see {see}", settled=at_rest,
        )
    return Observation("Queued", "WorkloadCreated",
                       f"RayJob {name} waits in {where}; Kueue has not evaluated its Workload {workload_name} yet",
                       settled=at_rest)


def ray_failure_summary(message: str) -> str:
    """A Ray Jobs API failure message without the log tail it carries ("Job entrypoint command failed with exit
    code 3, last available logs (truncated to 20,000 chars): ..."): its first clause, and the trainer's last
    ``error:`` line from that tail (``kubedistill train`` prints one for every failure it understands: a lost node,
    a bad config, a diverged run). Without this, conditions and Events, cut at 1,024 characters, held log noise."""
    head, _, logs = message.partition(", last available logs")
    errors = [line.strip() for line in logs.splitlines() if line.strip().startswith("error: ")]
    return head.strip() + (f" ({errors[-1]})" if errors else "")


def observe_submission(job_status: str | None, submission: str, message: str = "") -> Observation:
    """Map a Ray Jobs API status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED; None = unknown id)."""
    if job_status is None:
        return Observation("Missing", "RayJobDeleted", f"Ray job {submission} is not known to the Ray cluster")
    status = job_status.upper()
    if status == "SUCCEEDED":
        return Observation("Succeeded", "RayJobSucceeded", f"Ray job {submission} succeeded")
    if status in ("FAILED", "STOPPED"):
        return Observation("Failed", "RayJobFailed",
                           f"Ray job {submission} {status.lower()}: {ray_failure_summary(message)}".rstrip(": "))
    if status == "RUNNING":
        return Observation("Running", "RayJobRunning", f"Ray job {submission} is running")
    return Observation("Pending", "RayJobPending", f"Ray job {submission} is {status.lower()}")


def get_condition(conditions: list[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(conditions: list[Mapping[str, Any]], type_: str) -> bool:
    condition = get_condition(conditions, type_)
    return condition is not None and condition.get("status") == "True"


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Return a new list with ``type_`` set; ``lastTransitionTime`` moves only when the status flips."""
    value = "True" if status else "False"
    out = [dict(c) for c in conditions]
    current = next((c for c in out if c.get("type") == type_), None)
    if current is None:
        current = {"type": type_}
        out.append(current)
    if current.get("status") != value or not current.get("lastTransitionTime"):
        current["lastTransitionTime"] = format_time(now)
    current.update(status=value, reason=reason, message=message, observedGeneration=generation)
    return out


@dataclass
class Decision:
    """What the operator should do now. ``status`` is complete for the operator's keys, to write after the action."""

    status: dict[str, Any]
    action: Action = "none"
    attempt: int | None = None  # the attempt to launch or stop
    resume: bool = False  # launch with resume_from_checkpoint=true
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (Normal|Warning, Reason, message)
    remaining_deadline: int | None = None  # seconds left of activeDeadlineSeconds, for the launched RayJob
    replaces: int | None = None  # with a launch: the attempt to stop once the new one exists (Kueue preempted it)


class _Status:
    """A mutable working copy of the operator's status keys, recording events on condition flips."""

    def __init__(self, old: Mapping[str, Any], now: datetime, generation: int | None):
        self.data = {k: copy.deepcopy(old[k]) for k in OPERATOR_STATUS_KEYS if k in old}
        self.data.setdefault("conditions", [])
        self.now, self.generation = now, generation
        self.events: list[tuple[str, str, str]] = []

    @property
    def conditions(self) -> list[dict[str, Any]]:
        return self.data["conditions"]

    def set(self, type_: str, status: bool, reason: str, message: str, event: str | None = None) -> None:
        was = is_true(self.conditions, type_)
        self.data["conditions"] = set_condition(
            self.conditions, type_, status, reason, message, self.now, self.generation
        )
        if event and status and not was:
            self.events.append((event, reason, message))

    def clear(self, type_: str, reason: str, message: str = "") -> None:
        """Set a condition False only if it exists (conditions appear when they first become relevant)."""
        if get_condition(self.conditions, type_) is not None:
            self.set(type_, False, reason, message)

    def state(self, state: str, reason: str, message: str) -> None:
        """``status.state`` with the reason of the condition that set it (``kubectl get dj`` shows both)."""
        self.data.update(state=state, reason=reason, message=message)

    def finish(self, succeeded: bool, reason: str, message: str) -> None:
        self.set("Running", False, reason, message)
        self.clear("Restarting", reason, message)
        self.clear("Queued", reason, message)
        self.set("Succeeded" if succeeded else "Failed", True, reason, message, "Normal" if succeeded else "Warning")
        self.state("Succeeded" if succeeded else "Failed", reason, message)
        self.data["completionTime"] = format_time(self.now)


def _elapsed(since: str | None, now: datetime) -> float | None:
    start = parse_time(since)
    return None if start is None else (now - start).total_seconds()


def decide(
    *,
    spec: DistillJobSpec | None,
    spec_error: str | None,
    status: Mapping[str, Any],
    generation: int | None,
    observation: Observation | None,
    now: datetime,
    run_name: Any = None,
    hashes: Mapping[str, str] | None = None,
    ignored_changes: list[str] | tuple[str, ...] = (),
    cache_gate: CacheGate | None = None,
    teacher_cache_path: str | None = None,
) -> Decision:
    """The run policy. ``observation`` is the current attempt's (None when no attempt was launched yet).

    ``cache_gate``: for a train job with spec.teacherCacheFrom that has not launched yet, whether the cache job lets
    it (``teacher_cache_gate``); ``teacher_cache_path``: the cache directory as the trainer sees it (for messages).

    ``run_name(attempt) -> str`` names an attempt's RayJob/submission (for status.rayJobName and messages).
    ``hashes``: the immutable fields' hashes to record when status has none yet; ``ignored_changes``: the
    immutable fields edited since (``changed_fields``): the job keeps its original and says so in a condition.
    """
    st = _Status(status, now, generation)
    st.data["observedGeneration"] = generation
    if hashes and not st.data.get("specHashes"):
        st.data["specHashes"] = dict(hashes)
    progress = status.get("progress") or {}
    attempt = status.get("attempt")
    name_of = run_name or (lambda a: f"attempt-{a}")

    def decision(action: Action = "none", **kwargs: Any) -> Decision:
        return Decision(status=st.data, action=action, events=st.events, **kwargs)

    running = observation is not None and observation.phase in ("Queued", "Preempted", "Pending", "Running")

    # Terminal states stay terminal; only the TTL is left to act on, and an attempt still running is stopped.
    if status.get("state") in TERMINAL_STATES:
        ttl = spec.run_policy.ttl_seconds_after_finished if spec is not None else None
        done = _elapsed(status.get("completionTime"), now)
        if ttl is not None and done is not None and done >= ttl:
            return decision("delete_job")
        return decision("stop", attempt=attempt) if running else decision()

    if spec is None:
        error = spec_error or "invalid spec"
        if "re-create" not in error:
            error += ". Fix the spec, then delete and re-create the DistillJob"
        st.finish(False, "InvalidSpec", error)
        # Never a running RayJob behind a terminal DistillJob.
        return decision("stop", attempt=attempt) if attempt is not None else decision()

    if ignored_changes:
        fields = ", ".join(ignored_changes)
        st.set(
            "SpecChangeIgnored",
            True,
            "ImmutableFieldChanged",
            f"{fields} changed after creation and is ignored: the job keeps running its original configuration "
            f"({', '.join('spec.' + f for f in IMMUTABLE_SPEC_FIELDS)} are immutable). Revert the edit, or delete "
            "and re-create the DistillJob to run the new configuration",
            "Warning",
        )
    else:
        st.clear("SpecChangeIgnored", "SpecMatches", "the immutable fields match the original")

    policy = spec.run_policy
    if policy.suspend:
        already = is_true(st.conditions, "Suspended")
        message = "suspended: the Ray cluster is deleted, checkpoints are kept"
        if attempt is None:
            message = "suspended before the first launch"
        message += "; set spec.runPolicy.suspend to false to resume"
        st.set("Suspended", True, "Suspended", message, "Normal")
        st.clear("Running", "Suspended", message)
        st.clear("Restarting", "Suspended", message)
        st.clear("Queued", "Suspended", message)
        st.state("Suspended", "Suspended", message)
        if attempt is not None and (running or not already):
            return decision("stop", attempt=attempt)
        return decision()

    def launch(next_attempt: int, resume: bool, replaces: int | None = None) -> Decision:
        st.clear("Conflict", "NoConflict", "the children's names are free or owned by this DistillJob")
        st.data.update(attempt=next_attempt, rayJobName=name_of(next_attempt), attemptStartTime=format_time(now))
        remaining = None
        if policy.active_deadline_seconds is not None:
            elapsed = _elapsed(st.data.get("startTime"), now) or 0.0
            remaining = int(policy.active_deadline_seconds - elapsed)
        if policy.queue_name and spec.launcher.type == "KubeRay" and not is_true(st.conditions, "Queued"):
            # Created suspended: queued from now on (the clocks of the deadlines stop until Kueue admits it).
            message = (f"{name_of(next_attempt)} created suspended in Kueue LocalQueue {policy.queue_name}; it starts "
                       "when Kueue admits it")
            st.set("Queued", True, "WaitingForWorkload", message, "Normal")
            st.state("Queued", "WaitingForWorkload", message)
        return decision("launch", attempt=next_attempt, resume=resume, remaining_deadline=remaining,
                        replaces=replaces)

    if attempt is None and cache_gate is not None and not cache_gate.start:
        # spec.teacherCacheFrom: nothing is launched until the cache job has Succeeded (deadlines not started yet).
        reason, message = cache_gate.reason, cache_gate.message
        was = get_condition(st.conditions, "Created") or {}
        st.set("Created", False, reason, message)
        if cache_gate.refused:
            st.finish(False, reason, message)
            return decision()
        if is_true(st.conditions, "Suspended"):
            resumed = "resumed before the first launch; " + message
            st.set("Suspended", False, "Resumed", resumed)
            st.events.append(("Normal", "Resumed", resumed))
        if was.get("reason") != reason:
            st.events.append(("Warning" if reason == TEACHER_CACHE_FAILED else "Normal", reason, message))
        st.state("Pending", reason, message)
        return decision()

    if is_true(st.conditions, "Suspended"):
        # Resume: a new attempt continues from the newest checkpoint; the deadline clock restarts, as for Jobs.
        next_attempt = 0 if attempt is None else attempt + 1
        message = f"resumed: {name_of(next_attempt)} continues from the newest checkpoint"
        st.set("Suspended", False, "Resumed", message)
        st.events.append(("Normal", "Resumed", message))
        st.state("Pending", "Resumed", message)
        st.data.update(startTime=format_time(now))
        st.set("Created", True, "RayJobCreated", f"{name_of(next_attempt)} created", None)
        st.set("Running", False, "RayJobPending", f"waiting for {name_of(next_attempt)} to start")
        return launch(next_attempt, resume=attempt is not None)

    if attempt is None:
        message = f"{name_of(0)} created"
        st.set("Created", True, "RayJobCreated", message, "Normal")
        st.set("Running", False, "RayJobPending", f"waiting for {name_of(0)} to start")
        st.state("Pending", "RayJobCreated", message)
        st.data.update(startTime=format_time(now), restarts=0)
        return launch(0, resume=False)

    observed = observation or MISSING
    queued = observed.phase == "Queued"
    # Evicted by Kueue after admission, or suspended at rest after this attempt ran: its Ray cluster is gone.
    preempted = observed.phase == "Preempted" or (queued and observed.settled and is_true(st.conditions, "Running"))
    if is_true(st.conditions, "Queued") and observed.phase == "Missing":
        st.set("Queued", False, observed.reason, observed.message)  # gone while queued: a failure, below
    elif is_true(st.conditions, "Queued") and not (queued or preempted):
        # Admitted by Kueue: the deadlines' clocks exclude the time queued (they stopped when queuing began).
        waited = _elapsed((get_condition(st.conditions, "Queued") or {}).get("lastTransitionTime"), now) or 0.0
        start = parse_time(st.data.get("startTime"))
        if start is not None:
            st.data["startTime"] = format_time(start + timedelta(seconds=waited))
        st.data["attemptStartTime"] = format_time(now)
        message = f"{name_of(attempt)} admitted by Kueue after {int(waited)} s queued"
        st.set("Queued", False, "Admitted", message)
        st.events.append(("Normal", "Admitted", message))

    # Deadlines (not while queued: time in Kueue's queue does not count).
    if policy.active_deadline_seconds is not None and not (queued or preempted):
        elapsed = _elapsed(st.data.get("startTime"), now)
        if elapsed is not None and elapsed >= policy.active_deadline_seconds:
            st.finish(
                False,
                "DeadlineExceeded",
                f"ran longer than activeDeadlineSeconds={policy.active_deadline_seconds}. To train longer, delete "
                "and re-create the DistillJob with a larger spec.runPolicy.activeDeadlineSeconds",
            )
            return decision("stop", attempt=attempt)
    if policy.pre_running_deadline_seconds is not None and observed.phase == "Pending":
        waited = _elapsed(st.data.get("attemptStartTime"), now)
        if waited is not None and waited >= policy.pre_running_deadline_seconds:
            st.finish(
                False,
                "PreRunningDeadlineExceeded",
                f"{name_of(attempt)} did not reach Running within preRunningDeadlineSeconds="
                f"{policy.pre_running_deadline_seconds} ({observed.message}). Check why its pods do not start "
                "(unschedulable: no room for the GPUs asked; an image that does not pull), then delete and re-create "
                "the DistillJob",
            )
            return decision("stop", attempt=attempt)

    if preempted:
        # Not a failure (no restart counted): a new attempt, created suspended, resumes from the newest checkpoint
        # when Kueue admits it; the preempted RayJob is deleted once the new one exists (its Workload with it).
        checkpoint = progress.get("lastCheckpoint") or "the newest checkpoint"
        reason, what = (observed.reason, observed.message) if observed.phase == "Preempted" else (
            "RayJobSuspended", f"{name_of(attempt)} was suspended after it ran and its Ray cluster deleted")
        message = f"{what}; {name_of(attempt + 1)} resumes from {checkpoint} when Kueue admits it {PREEMPTION_NOTE}"
        st.set("Running", False, reason, what)
        st.set("Queued", True, reason, message)
        st.events.append(("Warning", "Preempted", message))
        st.state("Queued", reason, message)
        return launch(attempt + 1, resume=True, replaces=attempt)
    if queued:
        if not is_true(st.conditions, "Running"):  # True only while KubeRay tears down a preempted attempt
            st.set("Running", False, observed.reason, observed.message)
        was = get_condition(st.conditions, "Queued") or {}
        if observed.reason == "WaitingForWorkload" and was.get("reason") == "Preempted" and was.get("status") == "True":
            return decision()  # the preemption stays the news until Kueue has a say on the new attempt
        st.set("Queued", True, observed.reason, observed.message, "Normal")
        st.state("Queued", observed.reason, observed.message)
        return decision()

    restarting = is_true(st.conditions, "Restarting")
    if observed.phase == "Pending":
        st.set("Running", False, observed.reason, observed.message)
        if restarting:
            st.state("Restarting", (get_condition(st.conditions, "Restarting") or {}).get("reason") or observed.reason,
                     observed.message)
        else:
            st.state("Pending", observed.reason, observed.message)
        return decision()
    if observed.phase == "Running":
        st.set("Running", True, observed.reason, observed.message, "Normal")
        st.clear("Restarting", "Running", observed.message)
        st.state("Running", observed.reason, observed.message)
        return decision()
    if observed.phase == "Succeeded":
        if spec.mode == "cacheTeacher":
            where = teacher_cache_path or spec.distill.teacher_cache_dir
            st.finish(True, "Succeeded", f"{observed.message}: the teacher cache {where} is complete")
            return decision()
        steps = f" after {progress['step']} steps" if progress.get("step") is not None else ""
        st.finish(True, "Succeeded", f"{observed.message}{steps}")
        return decision()

    # Failed or Missing: retry from the newest checkpoint while backoffLimit allows.
    restarts = int(st.data.get("restarts") or 0)
    if restarts >= policy.backoff_limit:
        st.finish(
            False,
            "BackoffLimitExceeded",
            f"{observed.message}; backoffLimit={policy.backoff_limit} reached after {restarts} restarts. Fix the "
            "cause (the error above; the trainer's full log is the Ray job's driver log), then delete and re-create "
            "the DistillJob",
        )
        return decision()
    checkpoint = progress.get("lastCheckpoint") or "the newest checkpoint"
    resumes = "continues the teacher cache write" if spec.mode == "cacheTeacher" else f"resumes from {checkpoint}"
    message = (
        f"{observed.message}; restart {restarts + 1} of {policy.backoff_limit}: "
        f"{name_of(attempt + 1)} {resumes}"
    )
    st.set("Running", False, observed.reason, observed.message)
    st.set("Restarting", True, observed.reason, message)
    st.events.append(("Warning", "Restarting", message))
    st.state("Restarting", observed.reason, message)
    st.data.update(restarts=restarts + 1)
    return launch(attempt + 1, resume=True)


# --- spec.teacherCacheFrom: a train job starts once the cache job it names has Succeeded ---------------------------
WAITING_FOR_TEACHER_CACHE = "WaitingForTeacherCache"  # the cache job is missing, or not finished yet: wait
TEACHER_CACHE_FAILED = "TeacherCacheFailed"  # the cache job failed: wait (a re-created one of that name may succeed)
TEACHER_CACHE_MISMATCH = "TeacherCacheMismatch"  # the pair can never work (not a cache job, other claim or dir): fail
TEACHER_CACHE_READY = "TeacherCacheReady"  # the cache job Succeeded: start
_CACHE_DETAIL_LIMIT = 300  # characters of the cache job's own message quoted in ours


@dataclass(frozen=True)
class CacheGate:
    """May a train job with spec.teacherCacheFrom start? (``teacher_cache_gate``). ``refused``: never, as
    configured: the job fails with ``reason``; otherwise not ``start`` means it waits (state Pending, ``reason``)."""

    start: bool
    reason: str
    message: str
    refused: bool = False


def teacher_cache_gate(spec: DistillJobSpec, job: render.JobRef, cache: Mapping[str, Any] | None) -> CacheGate:
    """The decision for the first launch of a train job that reads the teacher cache written by the DistillJob
    ``spec.teacher_cache_from`` (``cache``: that job as read from the API server, None when it does not exist).

    - missing: wait (it may be created later), reason WaitingForTeacherCache;
    - not a cacheTeacher job, another storage claim, or another cache directory: refused, TeacherCacheMismatch
      (this job's fields are immutable, so waiting could not help unless the other job is re-created);
    - Succeeded: start (TeacherCacheReady);
    - Failed: wait, TeacherCacheFailed, quoting its reason (delete and re-create it, fixed, to write the cache);
    - otherwise (Pending, Queued, Running, Restarting, Suspended, not yet reconciled): wait, WaitingForTeacherCache.
    """
    name = spec.teacher_cache_from or ""
    mine = render.teacher_cache_path(spec, job)
    if cache is None:
        return CacheGate(False, WAITING_FOR_TEACHER_CACHE, (
            f"waiting for DistillJob {name} (spec.teacherCacheFrom) to write the teacher cache {mine}: it does not "
            f"exist (yet). Create it with spec.mode: cacheTeacher; this job starts once it has Succeeded"))
    try:
        cache_spec: DistillJobSpec | None = parse_spec(cache.get("spec") or {})
    except ValueError:  # pydantic's ValidationError too: that job fails with InvalidSpec, its state says so below
        cache_spec = None
    if cache_spec is not None:
        cache_job = render.JobRef.from_body(cache)
        if cache_spec.mode != "cacheTeacher":
            return CacheGate(False, TEACHER_CACHE_MISMATCH, (
                f"spec.teacherCacheFrom names DistillJob {name}, whose spec.mode is {cache_spec.mode}, not "
                "cacheTeacher: it writes no teacher cache. Name the job that writes the cache, or delete this job and "
                "re-create it without spec.teacherCacheFrom"), refused=True)
        claim = spec.storage.claim_name if spec.storage else None
        cache_claim = cache_spec.storage.claim_name if cache_spec.storage else None
        if claim != cache_claim:
            return CacheGate(False, TEACHER_CACHE_MISMATCH, (
                f"spec.storage.claimName {claim!r} differs from {cache_claim!r} of DistillJob {name} (spec."
                "teacherCacheFrom): a train job reads the teacher cache from the claim its cache job writes it to. "
                "Delete and re-create this job with the same claim"), refused=True)
        if render.teacher_cache_location(spec, job) != render.teacher_cache_location(cache_spec, cache_job):
            theirs = render.teacher_cache_path(cache_spec, cache_job)
            return CacheGate(False, TEACHER_CACHE_MISMATCH, (
                f"spec.distill.teacher_cache_dir is {mine} here but DistillJob {name} (spec.teacherCacheFrom) writes "
                f"its cache to {theirs}; they must be the same directory. Delete and re-create this job with "
                f"teacher_cache_dir {theirs}"), refused=True)
    status = cache.get("status") or {}
    state, reason = status.get("state"), status.get("reason")
    if state == "Succeeded":
        return CacheGate(True, TEACHER_CACHE_READY, f"DistillJob {name} has written the teacher cache {mine}")
    if state == "Failed":
        detail = (status.get("message") or "")[:_CACHE_DETAIL_LIMIT]
        return CacheGate(False, TEACHER_CACHE_FAILED, (
            f"DistillJob {name} (spec.teacherCacheFrom) failed ({reason or 'Failed'}"
            f"{': ' + detail if detail else ''}), so the teacher cache {mine} is incomplete. This job waits: delete "
            f"and re-create {name} (fixed) to write the cache, then this job starts; or delete this job"))
    what = f"{state} ({reason})" if state and reason else (state or "not started yet")
    return CacheGate(False, WAITING_FOR_TEACHER_CACHE, (
        f"waiting for DistillJob {name} (spec.teacherCacheFrom) to complete the teacher cache {mine}: it is {what}"))


def launch_blocked(
    old: Mapping[str, Any], planned: Decision, conflict: str, now: datetime, generation: int | None
) -> Decision:
    """The status when ``planned`` (a launch) could not run because a child's name is taken by an object this
    DistillJob does not own (``conflict`` names it). Nothing is written to that object and nothing else changes:
    the old status (no new attempt, no restart counted) plus a ``Conflict`` condition; the timer loop tries the
    same launch again on every tick, so the job proceeds once the object is gone."""
    st = _Status(old, now, generation)
    st.data["observedGeneration"] = generation
    if planned.status.get("specHashes"):
        st.data["specHashes"] = planned.status["specHashes"]
    message = f"{conflict}; the operator never adopts or modifies it. Delete or rename it and the job proceeds"
    st.set("Conflict", True, "NameConflict", message, "Warning")
    st.state(planned.status.get("state") or "Pending", "NameConflict", message)
    return Decision(status=st.data, events=st.events)


def timer_due(spec: Mapping[str, Any], status: Mapping[str, Any], now: datetime) -> bool:
    """Whether a time-based check of this job is due now (raw spec/status dicts, as watched).

    Deadlines and the TTL fire at known times, so the periodic loop reconciles only the jobs whose time has come;
    the RayAddress launcher has no watch, so its running jobs are polled on every tick.
    """
    policy = spec.get("runPolicy") or {}
    state = status.get("state")
    if state in TERMINAL_STATES:
        ttl, done = policy.get("ttlSecondsAfterFinished"), _elapsed(status.get("completionTime"), now)
        return ttl is not None and done is not None and done >= ttl
    if is_true(status.get("conditions") or [], "Conflict"):
        return True  # waiting for a foreign object to go: try again every tick
    if state is None or policy.get("suspend") or state == "Suspended":
        return False
    if spec.get("teacherCacheFrom") and status.get("attempt") is None:
        return True  # waiting for the cache job: also woken by its watch events (runtime), this is the backstop
    if state == "Queued":
        return True  # Kueue's Workload is not watched: its reason (quota, admission checks, eviction) is polled
    if (spec.get("launcher") or {}).get("type") == "RayAddress":
        return True
    active, started = policy.get("activeDeadlineSeconds"), _elapsed(status.get("startTime"), now)
    if active is not None and started is not None and started >= active:
        return True
    pre, waited = policy.get("preRunningDeadlineSeconds"), _elapsed(status.get("attemptStartTime"), now)
    return pre is not None and waited is not None and waited >= pre and state != "Running"


def needs_reconcile(body: Mapping[str, Any]) -> bool:
    """A DistillJob the operator has not acted on at its current generation (new, or its spec changed)."""
    status = body.get("status") or {}
    return status.get("observedGeneration") != (body.get("metadata") or {}).get("generation") or not status.get("state")


# --- Events: one per transition, named after it (runtime.post_event) ------------------------------------------------
# (condition type, status) -> (Event type, the condition's reason it needs, or None: any) of the Events ``decide``
# posts when a condition flips; Restarting and Preempted are posted once per attempt instead (``event_key``).
FLIP_EVENTS: dict[tuple[str, str], tuple[str, str | None]] = {
    ("Created", "True"): ("Normal", None),
    ("Running", "True"): ("Normal", None),
    ("Queued", "True"): ("Normal", None),
    ("Suspended", "True"): ("Normal", None),
    ("Succeeded", "True"): ("Normal", None),
    ("Failed", "True"): ("Warning", None),
    ("SpecChangeIgnored", "True"): ("Warning", None),
    ("Conflict", "True"): ("Warning", None),
    ("Suspended", "False"): ("Normal", "Resumed"),
    ("Queued", "False"): ("Normal", "Admitted"),
}
PER_ATTEMPT_EVENTS = ("Restarting", "Preempted")
PREEMPTION_NOTE = "(preemption is not a failure: no restart counted)"  # ends the Queued message of a preemption


def event_key(status: Mapping[str, Any], reason: str) -> tuple[str, ...]:
    """What identifies the transition an Event of ``reason`` reports, from the status written with it: the
    condition's type, status and ``lastTransitionTime`` for a flip (not its reason, which may change while the
    status stays), the attempt for Restarting/Preempted (one each per attempt). The same transition read back from
    the status after a restart gives the same key, so the Event's name (``event_name``) is the same."""
    if reason in PER_ATTEMPT_EVENTS:
        return (reason, str(status.get("attempt")))
    for condition in status.get("conditions") or []:
        flip = FLIP_EVENTS.get((condition.get("type"), condition.get("status")))
        if flip is not None and condition.get("reason") == reason and flip[1] in (None, reason):
            return (condition["type"], condition["status"], condition.get("lastTransitionTime") or "")
    return ("event", reason, str(status.get("attempt")))


def recorded_events(status: Mapping[str, Any]) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """The Events (type, reason, message, key) of the transitions the status records now: what a new leader posts
    (idempotently, by name) in case its predecessor was killed between the status write and the Event. The message
    is the condition's current one. Not recoverable: transitions the status has moved on from."""
    out = []
    for condition in status.get("conditions") or []:
        type_, value, reason = condition.get("type"), condition.get("status"), condition.get("reason") or ""
        message = condition.get("message") or ""
        flip = FLIP_EVENTS.get((type_, value))
        if (type_, value) == ("Queued", "True") and message.endswith(PREEMPTION_NOTE):
            out.append(("Warning", "Preempted", message, event_key(status, "Preempted")))
        elif flip is not None and flip[1] in (None, reason) and reason:
            out.append((flip[0], reason, message, (type_, value, condition.get("lastTransitionTime") or "")))
        elif (type_, value) == ("Restarting", "True"):
            out.append(("Warning", "Restarting", message, event_key(status, "Restarting")))
    return out


def event_name(job_name: str, uid: str, key: tuple[str, ...]) -> str:
    """The Event's name: ``<job>.<16 hex of sha256(uid, key)>``, a DNS subdomain of at most 253 characters (a long
    job name is cut). A second create of the same transition is a 409, never a second Event."""
    digest = hashlib.sha256("\0".join((uid or "", *key)).encode()).hexdigest()[:16]
    return f"{job_name[:253 - 17].rstrip('.-')}.{digest}"
