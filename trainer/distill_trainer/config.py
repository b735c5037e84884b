"""The trainer's configuration: one pydantic model tree, validated once at the edge.

A YAML file (composed with Hydra, so ``key=value`` overrides work on the command line) becomes a
``DistillConfig``; everything inside the trainer takes that typed object, never a raw dict. The field
names follow the pipeline we reimplement (``kd_objective``, ``distill_loss_weight``, ``student_pretrain``,
``strategy_args``, ``device_mapping``, ...), so existing configs keep working.

The same model is the ``spec.distill`` of the Kubernetes ``DistillJob`` resource: field descriptions and
bounds here flow into the generated CRD schema.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .textfiles import read_utf8

KdObjective = Literal[
    "forward_kl", "reverse_kl", "adaptive_kl", "skewed_forward_kl", "skewed_reverse_kl", "js_divergence"
]


class ConfigError(ValueError):
    """A configuration the user wrote is invalid; the message names the file, field and bad value."""


class _Strict(BaseModel):
    # Unknown keys are errors: a typo like `learning_rat` must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelArgs(_Strict):
    """How a worker's model is loaded."""

    model_type: Literal["causal_lm"] = Field("causal_lm", description="Model family; only causal language models.")
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Parameter and compute dtype of the worker's model (fp32 on CPU)."
    )


class TrainingArgs(_Strict):
    """Optimizer, schedule and batch shape. Only the student's section is used for training."""

    learning_rate: float = Field(1e-5, gt=0, description="Peak AdamW learning rate.")
    lr_scheduler_type: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "cosine", description="Learning-rate schedule after the warmup (decays to 0 at max_steps)."
    )
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warmup from 0 to learning_rate.")
    per_device_train_batch_size: int = Field(1, ge=1, description="Sequences per micro-batch on each rank.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (not applied to norms/biases).")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables clipping.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    per_device_eval_batch_size: int = Field(16, ge=1, description="Sequences per evaluation batch.")


class DataArgs(_Strict):
    """Where the question/answer records are and which keys hold them."""

    file_name: str | None = Field(None, description="Training data: a JSON array or JSONL file of records.")
    eval_file_name: str | None = Field(None, description="Held-out data in the same format; evaluation is off without it.")
    question_key: str = Field("question", min_length=1, description="Record key holding the prompt text.")
    answer_key: str = Field("answer", min_length=1, description="Record key holding the answer text.")


class StrategyArgs(_Strict):
    """How a model runs on its ranks."""

    strategy_name: Literal["torch_train", "torch_infer"] = Field(
        "torch_train",
        description="torch_train (student) / torch_infer (teacher): HF transformers on one device. A teacher section "
        "that leaves it unset gets torch_infer.",
    )
    tp_size: int = Field(1, ge=1, description="Tensor-parallel size.")
    pp_size: int = Field(1, ge=1, description="Pipeline-parallel size.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of GPU memory an inference engine may reserve."
    )


_RANGE_EXPR = re.compile(r"^\s*list\(\s*range\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*\)\s*$")


class WorkerConfig(_Strict):
    """One side of the distillation (student or teacher)."""

    model_args: ModelArgs = Field(default_factory=ModelArgs)
    training_args: TrainingArgs = Field(default_factory=TrainingArgs)
    data_args: DataArgs = Field(default_factory=DataArgs)
    strategy_args: StrategyArgs = Field(default_factory=StrategyArgs)
    device_mapping: list[int] = Field(
        default_factory=list,
        description="Accelerator indices this worker's ranks occupy, e.g. [0,1] or 'list(range(0,8))'; "
        "empty runs one rank on CPU.",
    )

    @field_validator("device_mapping", mode="before")
    @classmethod
    def _parse_range_expression(cls, value: Any) -> Any:
        # Configs written for the original pipeline use the string form "list(range(0,8))". We parse that one
        # shape instead of eval()-ing user input.
        if isinstance(value, str):
            match = _RANGE_EXPR.match(value)
            if not match:
                raise ValueError(f"expected a list of integers or 'list(range(a,b))', got {value!r}")
            return list(range(int(match.group(1)), int(match.group(2))))
        return value

    @field_validator("device_mapping")
    @classmethod
    def _distinct_devices(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or any(d < 0 for d in value):
            raise ValueError(f"device indices must be distinct and non-negative, got {value}")
        return value


def _default_teacher() -> WorkerConfig:
    return WorkerConfig(strategy_args=StrategyArgs(strategy_name="torch_infer"))


class DistillConfig(_Strict):
    """Everything a distillation run needs. Field names are the public interface of the YAML files."""

    exp_name: str = Field("distill", min_length=1, description="Experiment name, used in logs.")
    seed: int = Field(42, description="Seed of model init, data order and dropout.")
    logging_dir: str = Field("./output/logs", description="TensorBoard events and metrics.jsonl go here.")
    output_dir: str = Field("./output", description="Checkpoints checkpoint-<step>/ are written here.")

    max_steps: int = Field(..., ge=1, description="Optimizer steps to train.")
    save_steps: int = Field(0, ge=0, description="Checkpoint every this many steps (and at the last); 0 = only at the end.")
    logging_steps: int = Field(1, ge=1, description="Log metrics every this many steps.")
    eval_steps: int = Field(0, ge=0, description="Evaluate every this many steps (and at the last); 0 = only at the end.")
    resume_from_checkpoint: bool | str = Field(
        False, description="false: start fresh; true: newest checkpoint in output_dir; a path: that checkpoint."
    )
    max_ckpt_to_keep: int = Field(
        0, ge=0, description="Keep at most this many of this run's checkpoints (oldest pruned); 0 = all."
    )
    overwrite_output_dir: bool = Field(
        False,
        description="If output_dir holds checkpoints of another run (other models, data, objective, seed, batch, "
        "sequence length, or DistillJob), delete them and train there; false stops before training with a message.",
    )
    on_nonfinite_loss: Literal["stop", "skip"] = Field(
        "stop",
        description="When a step's loss or gradient norm is NaN/inf: stop (exit non-zero naming the step; nothing "
        "is saved from that state) or skip (drop that step's update and go on).",
    )
    max_skipped_steps: int = Field(
        10, ge=1, description="With on_nonfinite_loss=skip: stop once this many steps in a row were skipped."
    )

    student_pretrain: str = Field(..., min_length=1, description="HF-format directory of the student model and tokenizer.")
    teacher_pretrain: str = Field(..., min_length=1, description="HF-format directory of the teacher model.")

    distill_loss_weight: float = Field(
        0.5, ge=0, le=1, description="Weight of the KD term; the SFT (cross-entropy) term gets 1 - this."
    )
    kd_temperature: float = Field(1.0, gt=0, description="Softmax temperature T of student and teacher logits.")
    teacher_temperature: float = Field(1.0, gt=0, description="Extra temperature of the teacher: its logits / (T * this).")
    kd_objective: KdObjective = Field("forward_kl", description="Divergence between teacher and student distributions.")
    adaptive_kl_alpha: float = Field(0.5, ge=0, le=1, description="Tail mass threshold of adaptive_kl.")
    skew_lambda: float = Field(0.1, ge=0, le=1, description="Skew coefficient of the skewed KL objectives.")
    logits_topk: int = Field(64, ge=0, description="Teacher logits kept per token (top-k); 0 = full vocabulary.")
    distill_on_prompt: bool = Field(False, description="Also train (CE and KD) on prompt tokens, not only answers.")
    sequence_length: int = Field(1024, ge=2, description="Maximum tokens of prompt + answer; longer answers are truncated.")

    eval_exact_match: bool = Field(
        False, description="At evaluation, also generate greedy answers and report exact-match accuracy."
    )
    eval_max_new_tokens: int = Field(32, ge=1, description="Generation budget per answer for eval_exact_match.")

    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Serve the run's Prometheus metrics (kubedistill_trainer_*) at http://<metrics_bind_address>:"
        "<port>/metrics on the driver; 0 = off. Under a DistillJob (KubeRay launcher) the operator sets 9108 on "
        "the Ray head, whatever is written here.",
    )
    metrics_bind_address: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the metrics endpoint listens on: 127.0.0.1 = this machine only, 0.0.0.0 = every "
        "interface. Under a DistillJob (KubeRay launcher) the operator sets 0.0.0.0 (the job's NetworkPolicy "
        "admits only the metrics clients).",
    )
    metrics_linger_seconds: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="After the run ends (finished, stopped or failed), keep serving the final metrics this long, "
        "so that the last scrape sees them; set it to about the scrape interval. Under a DistillJob (KubeRay "
        "launcher) the operator sets 30 unless this is set.",
    )

    student: WorkerConfig = Field(default_factory=WorkerConfig)
    teacher: WorkerConfig = Field(default_factory=_default_teacher)

    @model_validator(mode="after")
    def _teacher_defaults_to_inference(self) -> "DistillConfig":
        # StrategyArgs defaults to the student's torch_train; a teacher section that leaves strategy_name unset
        # (e.g. only model_args) means the teacher's default, torch_infer.
        if "strategy_name" not in self.teacher.strategy_args.model_fields_set:
            self.teacher.strategy_args.strategy_name = "torch_infer"
        return self

    @model_validator(mode="after")
    def _check_workers(self) -> "DistillConfig":
        # Each error names the field to change and the values that clash (format_validation_error prints
        # `path: message (got value)`), not the whole config.
        student, teacher = self.student, self.teacher
        s, t = student.strategy_args, teacher.strategy_args
        if not s.strategy_name.endswith("_train"):
            raise _field_error("student.strategy_args.strategy_name", "must be a *_train strategy", s.strategy_name)
        if not t.strategy_name.endswith("_infer"):
            raise _field_error("teacher.strategy_args.strategy_name", "must be an *_infer strategy", t.strategy_name)
        # Teacher logits are handed to the student rank on the same device, so both sides need the same layout.
        for name in ("tp_size", "pp_size"):
            if getattr(t, name) != getattr(s, name):
                raise _field_error(
                    f"teacher.strategy_args.{name}",
                    f"must equal student.strategy_args.{name} ({getattr(s, name)}): teacher and student share a "
                    "parallel layout",
                    getattr(t, name),
                )
        if student.device_mapping != teacher.device_mapping:
            raise _field_error(
                "teacher.device_mapping",
                f"must equal student.device_mapping {student.device_mapping}: each student rank reads the logits "
                "of the teacher rank on its device",
                teacher.device_mapping,
            )
        ranks = max(1, len(student.device_mapping))
        if ranks % (s.tp_size * s.pp_size):
            raise _field_error(
                "student.device_mapping",
                f"{ranks} rank(s) (an empty list is one CPU rank) is not a multiple of tp_size*pp_size="
                f"{s.tp_size * s.pp_size}",
                student.device_mapping,
            )
        for name in ("tp_size", "pp_size"):
            if getattr(s, name) != 1:
                raise _field_error(
                    f"student.strategy_args.{name}",
                    "values > 1 need the megatron strategies, which this version does not ship",
                    getattr(s, name),
                )
        if student.data_args.file_name is None:
            raise _field_error("student.data_args.file_name", "required: the training data file")
        return self

    @property
    def train_args(self) -> TrainingArgs:
        return self.student.training_args

    @property
    def data_args(self) -> DataArgs:
        return self.student.data_args


_NO_VALUE = object()


def _field_error(path: str, message: str, got: Any = _NO_VALUE) -> PydanticCustomError:
    """A cross-field error of a model validator, reported at ``path`` (dotted, below the model) with ``got``."""
    context: dict[str, Any] = {"field": path, "message": message}
    if got is not _NO_VALUE:
        context["got"] = got
    return PydanticCustomError("cross_field", "{message}", context)


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: ``field.path: message (got value)`` under a heading naming ``source``.

    A model validator's error (the loc of the whole model) is reported at the field it names (``_field_error``)
    with only the values that clash; without one, its input (the whole section) is not printed.
    """
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        loc = [str(p) for p in item["loc"]]
        context = item.get("ctx") or {}
        message = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        if item["type"] == "cross_field":
            loc.append(context["field"])
            got = f" (got {context['got']!r})" if "got" in context else ""
        elif item["type"] == "missing" or (isinstance(value, dict) and not item["type"].endswith("_type")):
            got = ""  # a validator of a whole section: its input is the section
        else:
            got = f" (got {value!r})"
        if item["type"] == "extra_forbidden":
            message, got = "unknown field (check the spelling)", ""
        lines.append(f"  {'.'.join(loc) or '<top level>'}: {message}{got}")
    return "\n".join(lines)


def config_from_dict(data: Any, source: str = "<config>") -> DistillConfig:
    """Validate a plain mapping into a DistillConfig, raising ConfigError naming each bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config fields, got {type(data).__name__}")
    try:
        return DistillConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None


def compose_config(config_path: str | Path, config_name: str, overrides: Sequence[str] = ()) -> DistillConfig:
    """Compose ``<config_path>/<config_name>.yaml`` with Hydra (defaults lists, ``key=value`` overrides).

    Relative paths inside the config stay relative to the current directory, as with the original launcher.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    config_dir = Path(config_path).resolve()
    name = config_name.removesuffix(".yaml")
    source = str(config_dir / f"{name}.yaml")
    if not (config_dir / f"{name}.yaml").is_file():
        raise ConfigError(f"config file not found: {source} (check --config_path and --config_name)")
    _check_yaml_file(source)
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None, job_name="kubedistill"):
            composed = compose(config_name=name, overrides=[_add_or_override(o, config_dir) for o in overrides])
        data = OmegaConf.to_container(composed, resolve=True)
    except yaml.YAMLError as error:  # in a file the defaults list pulls in
        raise ConfigError(_yaml_error_message(error, source)) from None
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise ConfigError(f"{source}: {error}") from None
    return config_from_dict(data, source)


def _check_yaml_file(path: str) -> None:
    """Stop on what Hydra reports badly: not UTF-8 (a traceback), a YAML error (a traceback), a top level that is
    a list ("must be a DictConfig") or a plain string (read as a field of that name)."""
    try:
        from omegaconf._utils import get_yaml_loader  # Hydra's own YAML dialect (rejects duplicate keys)

        loader = get_yaml_loader()
    except ImportError:  # a private helper; without it, plain safe YAML checks the same syntax
        loader = yaml.SafeLoader
    text = read_utf8(path, ConfigError)
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_error_message(error, path)) from None
    if data is not None and not isinstance(data, dict):
        kind = {list: "a list", str: "a plain string"}.get(type(data), f"a single {type(data).__name__} value")
        raise ConfigError(
            f"{path}: expected a mapping of config fields (`key: value` lines such as `max_steps: 100`), but the "
            f"file holds {kind}"
        )


def _yaml_error_message(error: yaml.YAMLError, path: str) -> str:
    """``file:line:column: invalid YAML: problem (context)`` from PyYAML's marks (which count from 0)."""
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return f"{path}: invalid YAML: {error}"
    name = path if mark.name.startswith("<") else mark.name  # "<unicode string>" when parsed from text
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    within = ""
    if context and context_mark:
        within = f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    hint = "" if isinstance(error, yaml.constructor.ConstructorError) else "; check the indentation, quotes and brackets"
    return f"{name}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {error.problem}{within}{hint}"


def _add_or_override(override: str, config_dir: Path) -> str:
    """Let ``key=value`` set any field, also one the YAML leaves at its default.

    Plain Hydra would demand ``+key=value`` for keys absent from the file; the schema lives in the pydantic
    model, which still rejects unknown keys after composition. Config-group choices (``group=option``, where
    ``<config_dir>/group/`` exists) and explicit ``+``/``++``/``~`` forms pass through unchanged.
    """
    key = override.split("=", 1)[0]
    if "=" not in override or override[0] in "+~" or (config_dir / key.split("@")[0]).is_dir():
        return override
    return "++" + override


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DistillConfig:
    """Load one YAML file path (``kubedistill train CONFIG.yaml key=value ...``)."""
    path = Path(path)
    return compose_config(path.parent, path.name, overrides)


def dump_config(config: DistillConfig) -> dict[str, Any]:
    """The config as plain data (what a checkpoint records and the operator renders into a ConfigMap)."""
    return config.model_dump(mode="json")
