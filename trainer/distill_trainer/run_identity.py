"""Which run a checkpoint belongs to: a run identity recorded in every checkpoint and checked before reuse.

Two runs that share an ``output_dir`` must never resume from, overwrite or prune each other's checkpoints.
A run is identified by

- a fingerprint of the config fields that change what is trained: the models, the data, the objective and
  its parameters, the seed, the batch shape and the sequence length. Fields that may legitimately change
  between a run and its resumption (``max_steps``, learning rate, logging and saving cadence, paths of
  outputs) are left out, so extending a run or lowering its learning rate still resumes;
- under a DistillJob, the resource's namespace, name and uid (the operator passes them in the environment).
  A DistillJob deleted and re-created under the same name has a new uid, so it is a different run even
  with an identical spec.

Pure functions over a ``DistillConfig`` and plain dicts; ``checkpoint.py`` stores and compares them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .config import DistillConfig
# Set by the operator on the trainer (render.py; k8s_progress.py reads the first two as well). The uid makes a
# DistillJob deleted and re-created under the same name a new run.
from .shared_names import ENV_JOB_NAME, ENV_JOB_NAMESPACE, ENV_JOB_UID

# The fields of DistillConfig (dotted paths) whose values change what a run trains.
FINGERPRINT_FIELDS = (
    "student_pretrain",
    "teacher_pretrain",
    "student.data_args.file_name",
    "student.data_args.question_key",
    "student.data_args.answer_key",
    "distill_loss_weight",
    "kd_objective",
    "kd_temperature",
    "teacher_temperature",
    "skew_lambda",
    "adaptive_kl_alpha",
    "logits_topk",
    "distill_on_prompt",
    "seed",
    "sequence_length",
    "student.training_args.per_device_train_batch_size",
    "student.training_args.gradient_accumulation_steps",
)
# Fields that change what a run trains added since checkpoints carry identities, with the value every earlier run
# had: fingerprinted only when set to something else, so that an earlier run's checkpoints keep their identity.
LATER_FINGERPRINT_FIELDS = {
    "student.use_sequence_packing": False,  # packed rows: other micro-batches, and the data cursor counts rows
    # On-policy distillation: where completions come from and the loss on them.
    "on_policy_fraction": 0.0,
    "on_policy_loss": "kd",
    "seq_kd": False,
    "samples_per_prompt": 1,
}
# Fields that name files: compared by absolute path, so the same file reached from another directory matches.
_PATH_FIELDS = {"student_pretrain", "teacher_pretrain", "student.data_args.file_name"}


@dataclass(frozen=True)
class RunIdentity:
    """``job``: "namespace/name (uid ...)" under a DistillJob, else None. ``fields``: the fingerprinted values."""

    fields: Mapping[str, Any]
    job: str | None = None
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        payload = json.dumps({"job": self.job, "fields": dict(self.fields)}, sort_keys=True)
        object.__setattr__(self, "fingerprint", hashlib.sha256(payload.encode()).hexdigest()[:16])

    def to_json(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "job": self.job, "fields": dict(self.fields)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RunIdentity":
        return cls(fields=dict(data.get("fields") or {}), job=data.get("job"))

    def describe(self) -> str:
        """A short human name: the DistillJob, or the fields people tell runs apart by."""
        summary = ", ".join(
            f"{name}={self.fields.get(name)!r}"
            for name in ("kd_objective", "seed", "distill_loss_weight")
            if name in self.fields
        )
        owner = f"DistillJob {self.job}" if self.job else "a local run"
        return f"{owner} [{summary}; fingerprint {self.fingerprint}]"


def _lookup(data: Mapping[str, Any], dotted: str) -> Any:
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _normalize(name: str, value: Any) -> Any:
    if name in _PATH_FIELDS and isinstance(value, str):
        return os.path.abspath(value)
    if name in _PATH_FIELDS and isinstance(value, list):  # data_args.file_name as a list of files
        return [os.path.abspath(item) if isinstance(item, str) else item for item in value]
    return value


def identity_from_dict(config: Mapping[str, Any], job: str | None = None) -> RunIdentity:
    """The identity of a run whose config is the plain dict ``config`` (e.g. a checkpoint's distill_config.json)."""
    fields = {name: _normalize(name, _lookup(config, name)) for name in FINGERPRINT_FIELDS}
    for name, earlier in LATER_FINGERPRINT_FIELDS.items():
        value = _lookup(config, name)
        if value is not None and value != earlier:
            fields[name] = value
    return RunIdentity(fields=fields, job=job)


def job_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """"namespace/name (uid ...)" when the operator launched this run, else None."""
    env = os.environ if env is None else env
    name, namespace, uid = env.get(ENV_JOB_NAME), env.get(ENV_JOB_NAMESPACE), env.get(ENV_JOB_UID)
    if not name:
        return None
    return f"{namespace or 'default'}/{name} (uid {uid or 'unknown'})"


def identity_of(config: DistillConfig, env: Mapping[str, str] | None = None) -> RunIdentity:
    """The identity of the run ``config`` describes, in this process's environment."""
    return identity_from_dict(config.model_dump(mode="json"), job=job_from_env(env))


def differences(ours: RunIdentity, theirs: RunIdentity) -> list[str]:
    """Human lines naming what differs, e.g. ``seed: 1 (theirs) vs 2 (this run)``."""
    lines = []
    if ours.job != theirs.job:
        lines.append(f"DistillJob: {theirs.job or 'none (a local run)'} (theirs) vs {ours.job or 'none (a local run)'} (this run)")
    for name in (*FINGERPRINT_FIELDS, *LATER_FINGERPRINT_FIELDS):
        default = LATER_FINGERPRINT_FIELDS.get(name)
        a, b = theirs.fields.get(name, default), ours.fields.get(name, default)
        if a != b:
            lines.append(f"{name}: {a!r} (theirs) vs {b!r} (this run)")
    return lines


def read_identity(checkpoint_dir: Path, identity_file: str, config_file: str) -> RunIdentity | None:
    """The identity stored in a checkpoint; for one written before identities existed, derived from its
    recorded config (no DistillJob part); None when neither file is readable."""
    try:
        return RunIdentity.from_json(json.loads((checkpoint_dir / identity_file).read_text()))
    except (OSError, ValueError):
        pass
    try:
        return identity_from_dict(json.loads((checkpoint_dir / config_file).read_text()))
    except (OSError, ValueError):
        return None
