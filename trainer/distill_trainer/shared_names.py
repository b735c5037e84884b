"""Names that cross the trainer/operator boundary, defined once; both sides import them from here.

The operator renders a trainer's environment and reads what the trainer reports; dashboards and alerts query the
trainer's metrics. A name spelled twice drifts, so each lives here: the DistillJob API (group, version, kind,
plural), the environment variables the operator sets for a trainer, the progress ConfigMap's key, the field
managers, the timestamp format of status fields and reports, how a Kubernetes client finds its credentials, the
KD objective names, and the trainer's Prometheus metric names and labels. No torch, no kubernetes at import time:
the operator image has neither torch nor a GPU.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

# --- The DistillJob API ---------------------------------------------------------------------------------------------
GROUP = "kubedistill.io"
VERSION = "v1alpha1"
KIND = "DistillJob"
PLURAL = "distilljobs"
SHORT_NAMES = ("dj",)
API_VERSION = f"{GROUP}/{VERSION}"

# --- The trainer's environment, set by the operator (render.py) and read by the trainer -----------------------------
ENV_JOB_NAME = "KUBEDISTILL_DISTILLJOB_NAME"
ENV_JOB_NAMESPACE = "KUBEDISTILL_DISTILLJOB_NAMESPACE"
ENV_JOB_UID = "KUBEDISTILL_DISTILLJOB_UID"  # metadata.uid of the DistillJob: part of the run's identity
ENV_PROGRESS_CONFIGMAP = "KUBEDISTILL_PROGRESS_CONFIGMAP"
ENV_PROGRESS_INTERVAL = "KUBEDISTILL_PROGRESS_INTERVAL_SECONDS"  # seconds between progress reports
ENV_NUM_THREADS = "KUBEDISTILL_NUM_THREADS"  # torch threads per worker actor
ENV_PLACEMENT_TIMEOUT = "KUBEDISTILL_PLACEMENT_TIMEOUT_SECONDS"  # wait for room for every rank (default 300 s)
ENV_PEAK_TFLOPS = "KUBEDISTILL_PEAK_TFLOPS"  # peak dense TFLOP/s of one device, for train/mfu (config: device_peak_tflops)

# --- Progress reports: the trainer patches this key of its ConfigMap; the operator copies it to status.progress ----
PROGRESS_KEY = "progress.json"

# --- Field managers of server-side writes --------------------------------------------------------------------------
OPERATOR_FIELD_MANAGER = "kubedistill-operator"
TRAINER_FIELD_MANAGER = "kubedistill-trainer"

# --- Timestamps (status.conditions[].lastTransitionTime, status.progress.updatedAt): RFC 3339, UTC, seconds --------
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_timestamp(moment: datetime | None = None) -> str:
    """``moment`` (default: now) as a Kubernetes timestamp, e.g. ``2026-01-02T03:04:05Z``."""
    moment = datetime.now(timezone.utc) if moment is None else moment.astimezone(timezone.utc)
    return moment.replace(microsecond=0).strftime(TIMESTAMP_FORMAT)


def parse_timestamp(text: str) -> datetime:
    return datetime.strptime(text, TIMESTAMP_FORMAT).replace(tzinfo=timezone.utc)


def kube_client_configuration():
    """A ``kubernetes.client.Configuration``: in-cluster credentials when running in a pod, else ``$KUBECONFIG``
    (or ~/.kube/config). ``KUBECONFIG`` is read now: the kubernetes package reads it once at import, which may be
    too early."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
    return configuration


# --- KD objectives (config's kd_objective values; losses.py implements each) ----------------------------------------
KD_OBJECTIVES = (
    "forward_kl",
    "reverse_kl",
    "adaptive_kl",
    "skewed_forward_kl",
    "skewed_reverse_kl",
    "js_divergence",
)

# --- The trainer's Prometheus metrics (prometheus_sink.py), which dashboards and alerts query ------------------------
TRAINER_STEP = "kubedistill_trainer_step"
TRAINER_MAX_STEPS = "kubedistill_trainer_max_steps"
TRAINER_LOSS = "kubedistill_trainer_loss"
TRAINER_LEARNING_RATE = "kubedistill_trainer_learning_rate"
TRAINER_GRAD_NORM = "kubedistill_trainer_grad_norm"
TRAINER_TOKENS_PER_SECOND = "kubedistill_trainer_tokens_per_second"
TRAINER_MFU = "kubedistill_trainer_mfu"
TRAINER_STEP_PHASE_SECONDS = "kubedistill_trainer_step_phase_seconds"
TRAINER_EVAL_LOSS = "kubedistill_trainer_eval_loss"
TRAINER_EVAL_EXACT_MATCH = "kubedistill_trainer_eval_exact_match"
TRAINER_EVAL_ONPOLICY_RKL = "kubedistill_trainer_eval_onpolicy_reverse_kl"
TRAINER_LAST_CHECKPOINT_STEP = "kubedistill_trainer_last_checkpoint_step"
TRAINER_LAST_CHECKPOINT_TIMESTAMP = "kubedistill_trainer_last_checkpoint_timestamp_seconds"
TRAINER_START_TIMESTAMP = "kubedistill_trainer_start_timestamp_seconds"
TRAINER_NONFINITE_STEPS = "kubedistill_trainer_nonfinite_steps_total"
TRAINER_CACHE_RECORDS_WRITTEN = "kubedistill_trainer_cache_records_written"
TRAINER_CACHE_RECORDS_PER_SECOND = "kubedistill_trainer_cache_records_per_second"
TRAINER_CACHE_ETA_SECONDS = "kubedistill_trainer_cache_eta_seconds"
# Labels on every trainer series; the operator's per-job series carry the first two, so the two join on them.
METRIC_LABELS = ("distilljob_namespace", "distilljob_name", "exp_name")
