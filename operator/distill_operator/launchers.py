"""How an attempt of a DistillJob is started, observed and stopped.

- ``KubeRayLauncher`` creates one ``ray.io/v1`` RayJob per attempt (KubeRay brings up a Ray cluster, runs the
  trainer, tears the cluster down) and reads its ``jobDeploymentStatus``/``jobStatus``. Before the first RayJob it
  creates the job's NetworkPolicy (network.py): no Ray pod of the job exists unfenced.
- ``RayAddressLauncher`` submits the trainer to an existing Ray cluster through the Ray Jobs API
  (``ray.job_submission.JobSubmissionClient``) and reads the Ray job's status. The address is checked to be a
  base URL (scheme, host, port) before any request: the operator calls it from its own network position.

Both report an ``Observation`` (conditions.py), so the run policy does not know which one ran the attempt.
Launching is idempotent: names/ids are deterministic and "already exists" counts as launched.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Any, Protocol

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from distill_operator import network, render
from distill_operator.children import ChildConflict
from distill_operator.conditions import MISSING, Observation, observe_rayjob, observe_submission
from distill_operator.render import JobRef
from distill_operator.resources import DistillJobSpec, check_ray_address
from distill_operator.settings import OperatorSettings

log = logging.getLogger(__name__)

RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayjobs"
# Kueue's Workloads (read only, for a queued RayJob's reason): v1beta2 (Kueue >= 0.15), else v1beta1.
KUEUE_GROUP, KUEUE_VERSION, KUEUE_VERSION_OLD, WORKLOAD_PLURAL = "kueue.x-k8s.io", "v1beta2", "v1beta1", "workloads"
KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
NET_GROUP, NET_VERSION, NET_PLURAL = "networking.k8s.io", "v1", "networkpolicies"


class Launcher(Protocol):
    kind: str

    def run_name(self, job: JobRef, attempt: int) -> str: ...

    def observe(self, job: JobRef, attempt: int) -> Observation: ...

    def launch(
        self, spec: DistillJobSpec, job: JobRef, attempt: int, resume: bool, remaining_deadline: int | None
    ) -> None: ...

    def stop(self, job: JobRef, attempt: int) -> None: ...


class KubeRayLauncher:
    """One RayJob per attempt, named ``<job>-<attempt>``, owned by the DistillJob."""

    kind = "KubeRay"

    def __init__(self, api_client: client.ApiClient, settings: OperatorSettings | None = None):
        self.custom = client.CustomObjectsApi(api_client)
        self.networking = client.NetworkingV1Api(api_client)
        self.settings = settings or OperatorSettings.from_env()

    def run_name(self, job: JobRef, attempt: int) -> str:
        return render.rayjob_name(job, attempt)

    def get(self, job: JobRef, attempt: int) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, job.namespace, RAY_PLURAL, self.run_name(job, attempt)
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def observe(self, job: JobRef, attempt: int) -> Observation:
        rayjob = self.get(job, attempt)
        if rayjob is not None and rayjob["metadata"].get("deletionTimestamp"):
            return MISSING  # being deleted: the attempt is over
        if rayjob is not None and not _owned_by(rayjob, job):
            return Observation("Missing", "RayJobNotOwned", f"RayJob {self.run_name(job, attempt)} belongs to another object")
        suspended = rayjob is not None and (rayjob.get("spec") or {}).get("suspend")
        workload = self.workload_of(rayjob) if suspended else None
        return observe_rayjob(rayjob, workload)

    def workload_of(self, rayjob: dict[str, Any]) -> dict[str, Any] | None:
        """The Kueue Workload owned by ``rayjob`` (Kueue names it rayjob-<name>-<hash>; found by ownerReference,
        narrowed first by the job-uid label Kueue puts on it). None without one, or without Kueue's CRD."""
        uid = rayjob["metadata"].get("uid", "")
        for selector in (f"{KUEUE_JOB_UID_LABEL}={uid}", None):
            try:
                try:
                    found = self.custom.list_namespaced_custom_object(
                        KUEUE_GROUP, KUEUE_VERSION, rayjob["metadata"]["namespace"], WORKLOAD_PLURAL,
                        label_selector=selector)
                except ApiException as error:
                    if error.status != 404:
                        raise
                    found = self.custom.list_namespaced_custom_object(
                        KUEUE_GROUP, KUEUE_VERSION_OLD, rayjob["metadata"]["namespace"], WORKLOAD_PLURAL,
                        label_selector=selector)
            except ApiException as error:
                if error.status == 404:
                    return None  # Kueue is not installed
                raise
            owned = [w for w in found.get("items") or []
                     if any(ref.get("uid") == uid for ref in w["metadata"].get("ownerReferences") or [])]
            if owned:
                return max(owned, key=lambda w: w["metadata"].get("creationTimestamp") or "")
        return None

    def launch(
        self, spec: DistillJobSpec, job: JobRef, attempt: int, resume: bool, remaining_deadline: int | None
    ) -> None:
        self.ensure_network_policy(job)
        manifest = render.render_rayjob(spec, job, attempt, resume, remaining_deadline)
        try:
            self.custom.create_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, job.namespace, RAY_PLURAL, manifest, field_manager=render.MANAGER
            )
        except ApiException as error:
            if error.status != 409:
                raise
            existing = self.get(job, attempt)
            if existing is not None and not _owned_by(existing, job):
                raise ChildConflict("RayJob", job.namespace, manifest["metadata"]["name"]) from None
            log.info("RayJob %s/%s already exists (launched before a restart)", job.namespace, manifest["metadata"]["name"])
            return
        from distill_operator import metrics

        metrics.RAYJOBS_CREATED.labels(launcher=self.kind).inc()

    def ensure_network_policy(self, job: JobRef) -> None:
        """Create the job's NetworkPolicy, or bring its spec up to date (the operator's settings may have changed).
        One owned by something else is never written to, and then nothing is launched."""
        manifest = network.render_network_policy(job, self.settings.dashboard_clients, self.settings.metrics_clients)
        name = manifest["metadata"]["name"]
        try:
            self.networking.create_namespaced_network_policy(job.namespace, manifest, field_manager=render.MANAGER)
            return
        except ApiException as error:
            if error.status != 409:
                raise
        existing = self.networking.read_namespaced_network_policy(name, job.namespace)
        existing = existing.to_dict() if hasattr(existing, "to_dict") else existing
        refs = (existing.get("metadata") or {}).get("owner_references") or []
        if job.uid and not any(ref.get("uid") == job.uid for ref in refs):
            raise ChildConflict("NetworkPolicy", job.namespace, name)  # no Ray pods without their own policy
        self.networking.patch_namespaced_network_policy(
            name, job.namespace, {"spec": manifest["spec"]}, field_manager=render.MANAGER
        )

    def stop(self, job: JobRef, attempt: int) -> None:
        """Delete the attempt's RayJob if it is ours (the uid precondition: never one re-created by someone else)."""
        rayjob = self.get(job, attempt)
        if rayjob is None or not _owned_by(rayjob, job):
            return
        try:
            self.custom.delete_namespaced_custom_object(
                RAY_GROUP,
                RAY_VERSION,
                job.namespace,
                RAY_PLURAL,
                self.run_name(job, attempt),
                propagation_policy="Background",
                body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=rayjob["metadata"]["uid"])),
            )
        except ApiException as error:
            if error.status not in (404, 409):
                raise


def _owned_by(obj: dict[str, Any], job: JobRef) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return not job.uid or any(ref.get("uid") == job.uid for ref in refs)


class RayAddressLauncher:
    """Submit ``kubedistill train distill.yaml`` to the Ray cluster at ``address`` through the Ray Jobs API."""

    kind = "RayAddress"
    _clients: dict[str, Any] = {}
    _clients_lock = threading.Lock()

    def __init__(self, address: str):
        self.address = check_ray_address(address)

    def _client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        with self._clients_lock:
            if self.address not in self._clients:
                self._clients[self.address] = JobSubmissionClient(self.address)
            return self._clients[self.address]

    def run_name(self, job: JobRef, attempt: int) -> str:
        return render.submission_id(job, attempt)

    def observe(self, job: JobRef, attempt: int) -> Observation:
        submission = self.run_name(job, attempt)
        try:
            info = self._client().get_job_info(submission)
        except RuntimeError as error:  # the Jobs API answers 404 for an unknown submission id
            if "does not exist" in str(error) or "404" in str(error):
                return observe_submission(None, submission)
            raise
        status = getattr(info.status, "value", str(info.status))
        return observe_submission(status, submission, info.message or "")

    def launch(
        self, spec: DistillJobSpec, job: JobRef, attempt: int, resume: bool, remaining_deadline: int | None
    ) -> None:
        submission = render.render_submission(spec, job, attempt, resume)
        if self.observe(job, attempt).phase != "Missing":
            return  # submitted before an operator restart
        with tempfile.TemporaryDirectory(prefix="kubedistill-") as workdir:
            Path(workdir, render.CONFIG_FILE).write_text(submission["config_yaml"])
            runtime_env = dict(submission["runtime_env"], working_dir=workdir)
            self._client().submit_job(
                entrypoint=submission["entrypoint"],
                submission_id=submission["submission_id"],
                runtime_env=runtime_env,
                metadata=submission["metadata"],
            )
        from distill_operator import metrics

        metrics.RAYJOBS_CREATED.labels(launcher=self.kind).inc()

    def stop(self, job: JobRef, attempt: int) -> None:
        try:
            self._client().stop_job(self.run_name(job, attempt))
        except RuntimeError as error:
            if "does not exist" not in str(error) and "404" not in str(error):
                raise


def launcher_for(
    spec: DistillJobSpec, api_client: client.ApiClient, settings: OperatorSettings | None = None
) -> Launcher:
    if spec.launcher.type == "RayAddress":
        if not spec.launcher.ray_address:
            raise ValueError("spec.launcher.rayAddress is required when spec.launcher.type is RayAddress")
        return RayAddressLauncher(spec.launcher.ray_address)
    return KubeRayLauncher(api_client, settings)
