"""Training progress -> the progress ConfigMap of the DistillJob the trainer runs under.

Active only when the operator launched the trainer: it sets ``KUBEDISTILL_DISTILLJOB_NAME`` and
``KUBEDISTILL_DISTILLJOB_NAMESPACE`` (and ``KUBEDISTILL_PROGRESS_CONFIGMAP``, ``KUBEDISTILL_DISTILLJOB_UID``);
``K8sProgressReporter.from_env`` returns None otherwise, so local runs never touch Kubernetes.

The report is one JSON object ``{step, maxSteps, loss, tokensPerSecond, lastCheckpoint, updatedAt}`` under the key
``progress.json`` of the ConfigMap ``<job>-progress``, written with a merge patch as field manager
``kubedistill-trainer``. That ConfigMap is the only object the trainer's account may touch (get/patch, created by the
operator); the operator checks the report and mirrors it into the DistillJob's ``status.progress``. A trainer
cannot write any DistillJob's status. Reports are rate-limited (checkpoints and close() flush at once), and an API
error is logged, never raised: a Kubernetes hiccup must not kill a training run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from typing import Any, Callable, Mapping

from . import shared_names

log = logging.getLogger(__name__)

# Names that cross the operator/trainer boundary (shared_names; the operator's render.py and access.py use the same).
ENV_NAME = shared_names.ENV_JOB_NAME
ENV_NAMESPACE = shared_names.ENV_JOB_NAMESPACE
ENV_UID = shared_names.ENV_JOB_UID
ENV_PROGRESS_CONFIGMAP = shared_names.ENV_PROGRESS_CONFIGMAP
PROGRESS_KEY = shared_names.PROGRESS_KEY
FIELD_MANAGER = shared_names.TRAINER_FIELD_MANAGER


def _now() -> str:
    return shared_names.format_timestamp()


class K8sProgressReporter:
    """Implements the tracking protocol: ``log(step, metrics)``, ``checkpoint_saved(step, path)``, ``close()``."""

    def __init__(
        self,
        name: str,
        namespace: str,
        max_steps: int,
        min_interval_seconds: float = 10.0,
        apply: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        configmap: str | None = None,
    ):
        self.name, self.namespace, self.max_steps = name, namespace, max_steps
        self.configmap = configmap or f"{name}-progress"
        self.min_interval_seconds = min_interval_seconds
        self._apply = apply or self._patch_configmap
        self._clock = clock
        self._progress: dict[str, Any] = {"maxSteps": max_steps}
        self._last_sent: float | None = None
        self._dirty = False
        self._lock = threading.Lock()
        self._api = None

    @classmethod
    def from_env(cls, max_steps: int, **kwargs: Any) -> "K8sProgressReporter | None":
        name, namespace = os.environ.get(ENV_NAME), os.environ.get(ENV_NAMESPACE)
        if not name or not namespace:
            return None
        interval = float(os.environ.get(shared_names.ENV_PROGRESS_INTERVAL, kwargs.pop("min_interval_seconds", 10.0)))
        kwargs.setdefault("configmap", os.environ.get(ENV_PROGRESS_CONFIGMAP) or None)
        return cls(name, namespace, max_steps, min_interval_seconds=interval, **kwargs)

    # --- the tracking protocol ---------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        with self._lock:
            self._progress["step"] = int(step)
            for key, field in (("train/loss", "loss"), ("train/tokens_per_second", "tokensPerSecond")):
                value = metrics.get(key)
                if value is not None and math.isfinite(float(value)):
                    self._progress[field] = float(value)
            self._dirty = True
            due = self._last_sent is None or self._clock() - self._last_sent >= self.min_interval_seconds
            if due or step >= self.max_steps:
                self._flush_locked()

    def checkpoint_saved(self, step: int, path: str) -> None:
        with self._lock:
            self._progress["step"] = max(int(step), int(self._progress.get("step", 0)))
            self._progress["lastCheckpoint"] = str(path)
            self._dirty = True
            self._flush_locked()

    def close(self) -> None:
        with self._lock:
            if self._dirty:
                self._flush_locked()

    # --- writing -----------------------------------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        return dict(self._progress)

    def _flush_locked(self) -> None:
        self._progress["updatedAt"] = _now()
        patch = {"data": {PROGRESS_KEY: json.dumps(self._progress, sort_keys=True)}}
        self._last_sent = self._clock()
        self._dirty = False
        try:
            self._apply(patch)
        except Exception as error:  # noqa: BLE001 - progress is best effort; training goes on
            log.warning(
                "could not report progress to ConfigMap %s/%s of DistillJob %s: %s",
                self.namespace, self.configmap, self.name, error,
            )

    def _patch_configmap(self, patch: dict[str, Any]) -> None:
        from kubernetes import client

        if self._api is None:
            self._api = client.CoreV1Api(client.ApiClient(shared_names.kube_client_configuration()))
        self._api.patch_namespaced_config_map(
            self.configmap, self.namespace, patch, field_manager=FIELD_MANAGER,
            _content_type="application/merge-patch+json", _request_timeout=10,
        )


def from_env(max_steps: int, **kwargs: Any) -> K8sProgressReporter | None:
    """The reporter for the DistillJob named in the environment, or None when not running under one."""
    return K8sProgressReporter.from_env(max_steps, **kwargs)
