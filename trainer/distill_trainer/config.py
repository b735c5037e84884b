"""The trainer's configuration: one pydantic model tree, validated once at the edge.

A YAML file (composed with Hydra, so ``key=value`` overrides work on the command line) becomes a
``DistillConfig``; everything inside the trainer takes that typed object, never a raw dict. The field
names follow the pipeline we reimplement (``kd_objective``, ``distill_loss_weight``, ``student_pretrain``,
``strategy_args``, ``device_mapping``, ...), so existing configs keep working. The original pipeline's own
keys and nesting (alibaba/ROLL's ``distill_megatron.yaml``: top-level ``question_key``/``answer_key``/
``max_grad_norm``, ``num_train_epochs``, ``strategy_config``, ``validation``, ``system_envs``, ...) are accepted
too: each is mapped onto our field here, once, and a value we cannot honour is refused naming its field. The
mapping is listed in the README ("Configs of the original pipeline").

The same model is the ``spec.distill`` of the Kubernetes ``DistillJob`` resource: field descriptions and
bounds here flow into the generated CRD schema.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
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


# --- Names of the original pipeline (alibaba/ROLL) and what they become here ------------------------------------
# data_args.template values that, in the original, format prompts with the tokenizer's own chat template (qwen3
# adds enable_thinking=True, which Qwen3's template does by default). Its other formats are refused.
TOKENIZER_TEMPLATES = ("native", "qwen2_5", "qwen3")
# strategy_name values of the original that are ours under another name.
STRATEGY_ALIASES = {"hf_infer": "torch_infer"}
SUPPORTED_STRATEGIES = ("torch_train", "torch_infer", "megatron_train", "megatron_infer")
# logits_transfer_backend -> what the channel (channel.py) is asked for: "same_device" lets channel.choose_transport
# pick by where the two ranks are (same GPU: CUDA IPC; same host: shared memory; else the object store).
LOGITS_TRANSPORTS = {"ipc+nccl": "same_device", "nccl-only": "same_device", "ray": "object_store"}
# Megatron options the config accepts and strategies/megatron.py does not pass to Megatron yet: refused (with the
# value that turns them off) rather than ignored. The megatron strategy removes an entry when it honours it.
MEGATRON_OPTIONS_NOT_YET_HONOURED: dict[str, Any] = {}
# Set by Ray from device_mapping; a worker environment must not move a rank to another device.
RESERVED_ENV = ("CUDA_VISIBLE_DEVICES",)
# Of each GPU, what teacher and student together may reserve when neither sets gpu_memory_fraction: the rest is
# for what no caching allocator counts (two CUDA contexts, NCCL's buffers).
GPU_MEMORY_FOR_BOTH = 0.9


def _data_files_schema(description: str) -> Any:
    # A string or a list of strings: Kubernetes' structural schemas have no such union, so the CRD leaves the field
    # open (as for resume_from_checkpoint) and the operator validates it with this model.
    return WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True, "description": description})


def data_files(value: str | list[str] | None) -> list[str]:
    """The files of a ``file_name`` / ``eval_file_name`` field, as a list (empty when unset)."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _check_data_files(value: Any) -> Any:
    if isinstance(value, list):
        if not value:
            raise ValueError("an empty list names no data file")
        if any(not isinstance(item, str) or not item for item in value):
            raise ValueError(f"expected file names (non-empty strings), got {value!r}")
    elif isinstance(value, str) and not value:
        raise ValueError("an empty string names no data file")
    return value


def _check_template(value: str | None) -> str | None:
    if value is not None and value not in TOKENIZER_TEMPLATES:
        raise ValueError(
            f"chat format {value!r} is not supported: prompts use the tokenizer's own chat template, which the "
            f"original's {', '.join(TOKENIZER_TEMPLATES)} name (or leave template unset)"
        )
    return value


# The two field types the data sections share; each carries its own check, so every field using it is checked.
DataFiles = Annotated[
    str | list[str] | None,
    BeforeValidator(_check_data_files),
    _data_files_schema("A JSON array or JSONL file of records, or a list of such files (read in order)."),
]
ChatTemplate = Annotated[str | None, AfterValidator(_check_template)]


class ModelArgs(_Strict):
    """How a worker's model is loaded."""

    model_type: Literal["causal_lm"] = Field(
        "causal_lm",
        description="Model family; only causal language models (null, the original's default, is causal_lm).",
    )
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Parameter and compute dtype of the worker's model (fp32 on CPU)."
    )
    attn_implementation: Literal["eager", "sdpa", "fa2", "flash_attention_2", "auto"] | None = Field(
        None,
        description="Attention kernel of the torch strategies' HF model: eager, sdpa, fa2 (= flash_attention_2: "
        "needs a GPU and the flash-attn package); auto or null: transformers' choice. Megatron strategies use "
        "Megatron's attention and ignore it.",
    )
    disable_gradient_checkpointing: bool = Field(
        True,
        description="true (default here): keep activations for the backward pass. false: activation checkpointing "
        "of the student (torch_train recomputes each decoder layer in the backward pass; same gradients, less "
        "memory for long sequences, about a third more compute). The original pipeline defaults to false; its "
        "Megatron strategies use strategy_args.recompute_granularity instead.",
    )

    fused_lm_head: bool = Field(
        True,
        description="torch_train and megatron_train: compute the student's output layer and the distillation loss "
        "together, chunk by chunk, never holding the [label tokens, vocabulary] logits or their gradient (same loss "
        "and gradients; torch_train needs a plain linear lm_head, else the unfused head is used; megatron_train "
        "computes it on each TP rank's vocabulary shard, at the label positions only). false: the head's logits, "
        "then the loss. Other strategies ignore it.",
    )

    @field_validator("model_type", mode="before")
    @classmethod
    def _null_is_causal_lm(cls, value: Any) -> Any:
        return "causal_lm" if value is None else value

    @property
    def hf_attn_implementation(self) -> str | None:
        """The ``attn_implementation`` argument of transformers' ``from_pretrained`` (None: its default)."""
        return {"fa2": "flash_attention_2", "auto": None}.get(self.attn_implementation, self.attn_implementation)

    @property
    def activation_checkpointing(self) -> bool:
        return not self.disable_gradient_checkpointing


class TrainingArgs(_Strict):
    """Optimizer, schedule and batch shape. Only the student's section is used for training."""

    learning_rate: float = Field(1e-5, gt=0, description="Peak AdamW learning rate.")
    lr_scheduler_type: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "cosine", description="Learning-rate schedule after the warmup (decays to 0 at max_steps)."
    )
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warmup from 0 to learning_rate.")
    per_device_train_batch_size: int = Field(
        1, ge=1, description="Sequences per micro-batch on each data-parallel rank (packed rows with "
        "use_sequence_packing)."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    num_train_epochs: float | None = Field(
        None,
        gt=0,
        description="Passes over the training data, the original pipeline's way of setting the run's length: "
        "max_steps = floor(num_train_epochs * records / (per_device_train_batch_size * gradient_accumulation_steps "
        "* dp)), at least 1, with dp = len(device_mapping) / (tp_size * pp_size); with use_sequence_packing the "
        "packed rows of one epoch count instead of the records. A max_steps that is set wins.",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (not applied to norms/biases).")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables clipping.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    per_device_eval_batch_size: int = Field(16, ge=1, description="Sequences per evaluation batch.")


class DataArgs(_Strict):
    """Where the question/answer records are and which keys hold them."""

    file_name: DataFiles = Field(
        None, description="Training data: a JSON array or JSONL file of records, or a list of such files."
    )
    eval_file_name: DataFiles = Field(
        None, description="Held-out data in the same format (a file or a list); evaluation is off without it."
    )
    question_key: str = Field("question", min_length=1, description="Record key holding the prompt text.")
    answer_key: str = Field("answer", min_length=1, description="Record key holding the answer text.")
    template: ChatTemplate = Field(
        None,
        description="Chat format by the original pipeline's names: native, qwen2_5 and qwen3 (and null) use the "
        "tokenizer's own chat template; a tokenizer without one gets the plain question text, with a warning. "
        "Other formats are refused.",
    )
    preprocessing_num_workers: int | None = Field(
        None, ge=1, description="Accepted from the original pipeline's configs; records are tokenized in the driver."
    )


class StrategyConfig(_Strict):
    """The original pipeline's ``strategy_config`` (Megatron names), mapped onto ``strategy_args``' own fields."""

    tensor_model_parallel_size: int | None = Field(None, ge=1, description="Same as strategy_args.tp_size.")
    pipeline_model_parallel_size: int | None = Field(None, ge=1, description="Same as strategy_args.pp_size.")
    context_parallel_size: int = Field(1, ge=1, description="Only 1: context parallelism is not supported.")
    sequence_parallel: bool | None = Field(None, description="Same as strategy_args.sequence_parallel.")
    use_distributed_optimizer: bool | None = Field(None, description="Same as strategy_args.use_distributed_optimizer.")
    recompute_granularity: Literal["full", "selective"] | None = Field(
        None, description="Same as strategy_args.recompute_granularity."
    )
    bf16: bool | None = Field(None, description="true: model_args.dtype bf16.")
    num_layers_in_first_pipeline_stage: int | None = Field(
        None, ge=1, description="Same as strategy_args.num_layers_in_first_pipeline_stage."
    )
    num_layers_in_last_pipeline_stage: int | None = Field(
        None, ge=1, description="Same as strategy_args.num_layers_in_last_pipeline_stage."
    )

    @model_validator(mode="before")
    @classmethod
    def _only_known_keys(cls, data: Any) -> Any:
        # The original passes this dict to Megatron or FSDP as is; we map a known set. Name the first key we do not
        # honour instead of a generic "unknown field".
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise _field_error(
                        str(key),
                        f"not supported here; strategy_config may hold {', '.join(cls.model_fields)}",
                        data[key],
                    )
        return data

    @field_validator("context_parallel_size")
    @classmethod
    def _no_context_parallel(cls, value: int) -> int:
        if value != 1:
            raise ValueError("context parallelism is not supported; set 1 (sequences stay whole on each rank). "
                             "Megatron splits a sequence over ranks only with TransformerEngine's attention, and "
                             "the megatron strategies do not pass it on yet")
        return value


class StrategyArgs(_Strict):
    """How a model runs on its ranks."""

    strategy_name: Literal["torch_train", "torch_infer", "megatron_train", "megatron_infer"] = Field(
        "torch_train",
        description="torch_train (student) / torch_infer (teacher): HF transformers, one device per rank; "
        "megatron_train / megatron_infer: Megatron-Core with tp_size x pp_size ranks per model replica. Teacher "
        "and student use the same family. A teacher section that leaves it unset gets torch_infer; the original's "
        "hf_infer is torch_infer.",
    )
    tp_size: int = Field(1, ge=1, description="Tensor-parallel size (megatron strategies).")
    pp_size: int = Field(1, ge=1, description="Pipeline-parallel size (megatron strategies).")
    num_layers_in_first_pipeline_stage: int | None = Field(
        None,
        ge=1,
        description="Transformer layers on the first pipeline stage (Megatron's uneven pipeline; needs pp_size > 1); "
        "the stages between first and last share the rest equally. null: layers / pp_size on every stage, or, when "
        "pp_size does not divide the layers, a split with the first and last stages lightest (logged at start).",
    )
    num_layers_in_last_pipeline_stage: int | None = Field(
        None,
        ge=1,
        description="Transformer layers on the last pipeline stage (Megatron's uneven pipeline; needs pp_size > 1); "
        "see num_layers_in_first_pipeline_stage.",
    )
    sequence_parallel: bool = Field(
        False, description="Megatron sequence parallelism (activations split along the sequence; needs tp_size > 1)."
    )
    use_distributed_optimizer: bool = Field(
        False, description="Shard the optimizer state over data-parallel ranks (megatron_train)."
    )
    recompute_granularity: Literal["full", "selective"] | None = Field(
        None,
        description="Megatron activation recomputation: full (whole layers) or selective (attention core); null: "
        "none. torch_train uses model_args.disable_gradient_checkpointing instead.",
    )
    strategy_config: StrategyConfig | None = Field(
        None,
        description="The original pipeline's form of the fields above (tensor_model_parallel_size, "
        "pipeline_model_parallel_size, context_parallel_size (1 only), sequence_parallel, use_distributed_optimizer, "
        "recompute_granularity, bf16, num_layers_in_first_pipeline_stage, num_layers_in_last_pipeline_stage); a "
        "value that differs from the same field set here is refused.",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of GPU memory an inference engine may reserve."
    )

    @field_validator("strategy_name", mode="before")
    @classmethod
    def _original_names(cls, value: Any) -> Any:
        if isinstance(value, str) and value in STRATEGY_ALIASES:
            return STRATEGY_ALIASES[value]
        if isinstance(value, str) and value not in SUPPORTED_STRATEGIES:
            aliases = ", ".join(f"{a} (= {b})" for a, b in STRATEGY_ALIASES.items())
            raise ValueError(f"not supported; supported: {', '.join(SUPPORTED_STRATEGIES)}, {aliases}")
        return value

    @model_validator(mode="after")
    def _map_strategy_config(self) -> "StrategyArgs":
        config = self.strategy_config
        if config is None:
            return self
        pairs = {
            "tensor_model_parallel_size": "tp_size",
            "pipeline_model_parallel_size": "pp_size",
            "sequence_parallel": "sequence_parallel",
            "use_distributed_optimizer": "use_distributed_optimizer",
            "recompute_granularity": "recompute_granularity",
            "num_layers_in_first_pipeline_stage": "num_layers_in_first_pipeline_stage",
            "num_layers_in_last_pipeline_stage": "num_layers_in_last_pipeline_stage",
        }
        for theirs, ours in pairs.items():
            value = getattr(config, theirs)
            if value is not None:
                _adopt(self, ours, value, f"strategy_config.{theirs}", f"strategy_args.{ours}")
        return self


def _adopt(model: BaseModel, field: str, value: Any, source: str, target: str) -> None:
    """Set ``model.field`` to ``value`` written at ``source`` (the original's place for it); refuse a different value
    set explicitly at ``target`` (ours), naming both places."""
    current = getattr(model, field)
    if current == value:
        return
    if field in model.model_fields_set:
        raise _field_error(
            source,
            f"conflicts with {target}={current!r}: both set one setting (the original pipeline's place and ours); "
            "remove one or make them equal",
            value,
        )
    setattr(model, field, value)


class _PackingWithMegatron:
    """``use_sequence_packing: true`` on a side of a megatron strategy (WorkerConfig marks it, then refuses it)."""

    def __repr__(self) -> str:
        return "True"  # as the user wrote it, in the error's "(got ...)"


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
        "empty runs one rank on CPU. Without GPUs the indices name CPU ranks. The teacher's list has the "
        "student's length (teacher rank i feeds student rank i); the same list keeps each pair on one device.",
    )
    use_sequence_packing: bool = Field(
        False,
        description="Pack several whole records into each row of sequence_length tokens (each epoch's shuffled "
        "records, first-fit in that order), with positions restarting at every record and attention kept within "
        "it: a micro-batch is per_device_train_batch_size packed rows, and num_train_epochs counts packed rows. One "
        "setting for both sides (the teacher runs the student's micro-batches): a side left unset follows the other, "
        "different values are refused. torch strategies only (Megatron packs only through TransformerEngine's THD "
        "attention, which the megatron strategies do not pass). Evaluation batches are not packed.",
    )
    infer_batch_size: int | None = Field(
        None,
        ge=1,
        description="Teacher side: the batch size of `kubedistill cache-teacher` (default: "
        "per_device_train_batch_size). In training the teacher runs the student's micro-batches.",
    )
    system_envs: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables of this side's worker processes, over the top-level system_envs.",
    )
    gpu_memory_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Of each GPU, the share this side's rank may reserve (torch.cuda.set_per_process_memory_fraction; "
        "a caching allocator keeps what it freed, which the other side of the GPU could not use). Unset: "
        f"{GPU_MEMORY_FOR_BOTH / 2:g} each when a teacher shares the GPU, {GPU_MEMORY_FOR_BOTH:g} for a side alone on "
        "its GPUs (no teacher, or teacher.device_mapping apart from the student's); "
        f"set on one side only, the other gets {GPU_MEMORY_FOR_BOTH:g} minus it. Teacher and student together "
        "at most 1.",
    )

    @field_validator("system_envs", mode="before")
    @classmethod
    def _env(cls, value: Any) -> Any:
        return _check_env(value)

    @model_validator(mode="before")
    @classmethod
    def _mark_packing_with_megatron(cls, data: Any) -> Any:
        # use_sequence_packing: true with a megatron strategy is refused at the field (_packing_needs_torch), also
        # when strategy_args has errors of its own (the original's example has context_parallel_size 2 there): the
        # strategy is read from the input here, as strategy_args' validation would not hand it over.
        if isinstance(data, dict) and data.get("use_sequence_packing") in (True, "true", "True"):
            args = data.get("strategy_args")
            name = args.get("strategy_name") if isinstance(args, dict) else getattr(args, "strategy_name", None)
            if isinstance(name, str) and name.startswith("megatron"):
                data = {**data, "use_sequence_packing": _PackingWithMegatron()}
        return data

    @field_validator("use_sequence_packing", mode="before")
    @classmethod
    def _packing_needs_torch(cls, value: Any) -> Any:
        if isinstance(value, _PackingWithMegatron):
            raise ValueError(megatron_packing_refusal())
        return value

    @model_validator(mode="after")
    def _strategy_config_dtype(self) -> "WorkerConfig":
        config = self.strategy_args.strategy_config
        if config is not None and config.bf16 is not None:
            dtype = self.model_args.dtype
            if config.bf16 and dtype != "bf16":
                _adopt(self.model_args, "dtype", "bf16", "strategy_args.strategy_config.bf16", "model_args.dtype")
            elif not config.bf16 and dtype == "bf16" and "dtype" in self.model_args.model_fields_set:
                raise _field_error(
                    "strategy_args.strategy_config.bf16",
                    "conflicts with model_args.dtype='bf16'; remove one or make them agree",
                    False,
                )
        return self

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


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_env(value: Any) -> Any:
    """Environment variables as text: numbers become their YAML spelling; a boolean or a nested value is refused
    (the environment holds only text, and ``true`` could mean "1" or "true": quote what is meant)."""
    if not isinstance(value, dict):
        return value
    env = {}
    for name, item in value.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ValueError(f"{name!r} is not an environment variable name (letters, digits, _; not first a digit)")
        if name in RESERVED_ENV:
            raise ValueError(f"{name} is set by Ray from device_mapping; remove it")
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ValueError(f"{name}: the value must be text; quote it in the YAML (got {item!r})")
        env[name] = str(item)
    return env


def _default_teacher() -> WorkerConfig:
    return WorkerConfig(strategy_args=StrategyArgs(strategy_name="torch_infer"))


class GenerationConfig(_Strict):
    """How completions are sampled for on-policy distillation (``on_policy_fraction``) and ``seq_kd``."""

    max_new_tokens: int = Field(
        128, ge=1, description="Most tokens sampled per completion; a completion ends at EOS or here. Prompts longer "
        "than sequence_length - max_new_tokens are refused at start."
    )
    temperature: float = Field(
        1.0, ge=0, description="Sampling temperature; 0 = greedy. The sampled reverse KL (on_policy_loss: "
        "sampled_reverse_kl) is an unbiased estimate only at 1 with top_p 1 and top_k 0."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens with this mass.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens only; 0 = no limit.")

    def unfiltered(self) -> bool:
        """Whether tokens are drawn from the model's own distribution (temperature 1, no top-p / top-k cut)."""
        return self.temperature == 1 and self.top_p == 1 and self.top_k == 0


class ValidationDataArgs(_Strict):
    """The ``data_args`` of the original pipeline's ``validation`` section."""

    file_name: DataFiles = Field(None, description="Held-out data: a file or a list of files.")
    template: ChatTemplate = Field(None, description="Chat format; must agree with student.data_args.template.")


class ValidationConfig(_Strict):
    """The original pipeline's held-out data section."""

    data_args: ValidationDataArgs = Field(default_factory=ValidationDataArgs)


class CheckpointConfig(_Strict):
    """The original pipeline's checkpoint upload target (accepted; checkpoints stay in output_dir)."""

    type: Literal["file_system"] = Field("file_system", description="Only file_system.")
    output_dir: str | None = Field(None, description="Where the original copies checkpoints; not used here.")


class DistillConfig(_Strict):
    """Everything a distillation run needs. Field names are the public interface of the YAML files."""

    exp_name: str = Field("distill", min_length=1, description="Experiment name, used in logs.")
    seed: int = Field(
        42,
        description="Seed of the data order (shuffling) and of each worker's torch RNG (dropout, sampling). The "
        "models' weights are loaded from student_pretrain / teacher_pretrain, so it does not change them.",
    )
    logging_dir: str = Field("./output/logs", description="TensorBoard events and metrics.jsonl go here.")
    output_dir: str = Field("./output", description="Checkpoints checkpoint-<step>/ are written here.")

    max_steps: int | None = Field(
        None,
        ge=1,
        description="Optimizer steps to train. Without it, student.training_args.num_train_epochs sets the length "
        "(resolved once the data is read).",
    )
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
    topk_tail: bool = Field(
        True,
        description="With logits_topk > 0: the teacher also ships its probability mass outside its top-k and the KD "
        "objective compares k + 1 outcomes (the k tokens and everything else), so the student's mass outside the "
        "top-k is trained too. false: renormalize both distributions over the top-k (the original pipeline's math; "
        "with distill_loss_weight 1 nothing then constrains the student outside the top-k).",
    )
    distill_on_prompt: bool = Field(False, description="Also train (CE and KD) on prompt tokens, not only answers.")
    sequence_length: int = Field(1024, ge=2, description="Maximum tokens of prompt + answer; longer answers are truncated.")

    eval_exact_match: bool = Field(
        False, description="At evaluation, also generate greedy answers and report exact-match accuracy."
    )
    eval_max_new_tokens: int = Field(32, ge=1, description="Generation budget per answer for eval_exact_match.")
    eval_onpolicy_rkl: bool | None = Field(
        None,
        description="At evaluation, also report eval/onpolicy_rkl: the student's greedy completions of the held-out "
        "prompts (up to generation.max_new_tokens), scored by the teacher, and the per-token reverse KL(student ‖ "
        "teacher) at those tokens (over the teacher's top-k + tail, or the full vocabulary). Unset: on when "
        "on_policy_fraction > 0. Needs a live teacher.",
    )

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

    # The original pipeline's top-level keys for settings we keep in the student's sections.
    question_key: str | None = Field(
        None, min_length=1, description="Same as student.data_args.question_key (the original pipeline's place)."
    )
    answer_key: str | None = Field(
        None, min_length=1, description="Same as student.data_args.answer_key (the original pipeline's place)."
    )
    max_grad_norm: float | None = Field(
        None, ge=0, description="Same as student.training_args.max_grad_norm (the original pipeline's place)."
    )
    validation: ValidationConfig | None = Field(
        None, description="The original pipeline's held-out data section: validation.data_args.file_name is "
        "student.data_args.eval_file_name."
    )
    checkpoint_config: CheckpointConfig | None = Field(
        None, description="The original pipeline's checkpoint upload target. Accepted with type file_system; "
        "checkpoints are written to output_dir only (a warning says so when output_dir here differs)."
    )
    logits_transfer_backend: Literal["ipc+nccl", "nccl-only", "ray"] = Field(
        "ipc+nccl",
        description="How teacher logits reach the student rank on the same device: ipc+nccl and nccl-only (the "
        "original's names) use the same-device hand-off (CUDA IPC when both ranks are on one GPU, shared memory "
        "between CPU ranks or GPUs of one host, the Ray object store across hosts); ray always sends them through "
        "the Ray object store.",
    )
    overlap_teacher: bool = Field(
        True,
        description="The teacher computes the next step's targets while the student trains on this step's (one "
        "step ahead at most, the same batches in the same order: the same losses and weights bit for bit); "
        "false: the two take turns.",
    )
    channel_memory_limit_gb: float = Field(
        16.0,
        gt=0,
        description="Most memory (GiB) one teacher rank's channel ring may take: GPU memory for CUDA IPC, /dev/shm "
        "for shared memory. Its size (slots x per_device_train_batch_size x sequence_length rows of top-k or full-"
        "vocabulary fp32 targets, 1.25x headroom) is computed before the run starts, and a run that needs more is "
        "refused with the figures.",
    )
    teacher_cache_dir: str | None = Field(
        None,
        min_length=1,
        description="Teacher cache directory. `kubedistill cache-teacher` writes the teacher's targets for every "
        "training record here (shards + manifest.json); a training run that sets it to a complete cache starts no "
        "teacher and reads the targets from it (its config must match the one the cache was written with: the "
        "run stops naming each differing field).",
    )
    teacher_cache_dtype: Literal["compact", "float32"] = Field(
        "compact",
        description="Encoding of a teacher cache being written: float32 = exactly what the live teacher hands over "
        "(training from it equals a live run bit for bit); compact = quantised values and bit-packed indices "
        "(top-k: about 155 B per label token at k=64 for a 151,936-token vocabulary, the KD loss within 1e-3 of "
        "live). A cache being read is read in the encoding it was written with.",
    )
    teacher_cache_records_per_shard: int = Field(
        1024,
        ge=1,
        description="Records per teacher-cache shard file. The shards are the unit of resume after an interrupted "
        "write and of the checksum; the same shards are written whatever the number of ranks.",
    )
    on_policy_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="On-policy distillation (GKD's lambda; TRL's lmbda): the probability that a micro-batch's "
        "completions are sampled by the student from its prompts, with its current weights, and the teacher scores "
        "them; 0 = the dataset's answers only (off-policy, as before).",
    )
    on_policy_loss: Literal["kd", "sampled_reverse_kl"] = Field(
        "kd",
        description="The loss on student-sampled micro-batches: kd = kd_objective against the teacher's targets "
        "(top-k + tail or full vocabulary) at the sampled positions (GKD); sampled_reverse_kl = ROLL's / tinker's "
        "on-policy distillation, the per-token advantage -opd_kl_coef * (log q(token) - log p_teacher(token)) "
        "trained by importance-weighted policy gradient. No cross-entropy on sampled tokens in either.",
    )
    opd_kl_coef: float = Field(
        1.0, gt=0, description="With on_policy_loss sampled_reverse_kl: the coefficient of the reverse-KL advantage "
        "(ROLL's opd_kl_coef, tinker's kl_penalty_coef)."
    )
    seq_kd: bool = Field(
        False,
        description="Micro-batches the student does not sample get completions sampled by the teacher instead of "
        "the dataset's answers (sequence-level KD, TRL's seq_kd).",
    )
    samples_per_prompt: int = Field(
        1, ge=1, description="Completions sampled per prompt (ROLL and tinker use 4): a sampled micro-batch has "
        "per_device_train_batch_size x this rows."
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    lmbda: float | None = Field(None, ge=0, le=1, description="TRL GKDTrainer's name for on_policy_fraction.")
    beta: float | None = Field(
        None, ge=0, le=1, description="TRL GKDTrainer's generalized-JSD beta: 0 = kd_objective forward_kl, 0.5 = "
        "js_divergence, 1 = reverse_kl (other values are refused)."
    )
    use_opd: bool | None = Field(
        None, description="ROLL's switch for on-policy distillation: true = on_policy_fraction 1 with on_policy_loss "
        "sampled_reverse_kl."
    )
    is_pure_opd: bool | None = Field(None, description="ROLL's pure on-policy distillation: the same as use_opd here.")
    device_peak_tflops: float | None = Field(
        None,
        gt=0,
        description="Peak dense TFLOP/s of one device (e.g. 989 for an H100/H200 in bf16), for train/mfu (model "
        "FLOPs utilization); unset, and KUBEDISTILL_PEAK_TFLOPS unset too: no MFU is reported (as on CPU).",
    )
    system_envs: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables of every worker process (a side's own system_envs win), e.g. NCCL_* "
        "settings. CUDA_VISIBLE_DEVICES is Ray's and refused.",
    )

    student: WorkerConfig = Field(default_factory=WorkerConfig)
    teacher: WorkerConfig = Field(default_factory=_default_teacher)

    @model_validator(mode="before")
    @classmethod
    def _drop_hydra_section(cls, data: Any) -> Any:
        # The original's YAML starts with a `hydra:` section (run dir, output_subdir) for Hydra's launcher. Hydra
        # consumes it when composing; a config given as plain data (a DistillJob) may still carry it.
        if isinstance(data, dict) and "hydra" in data:
            if data["hydra"] is not None and not isinstance(data["hydra"], dict):
                raise _field_error("hydra", "expected Hydra's settings (a mapping)", data["hydra"])
            data = {key: value for key, value in data.items() if key != "hydra"}
        return data

    @model_validator(mode="before")
    @classmethod
    def _map_trl_and_roll_names(cls, data: Any) -> Any:
        # TRL's GKDTrainer (lmbda, beta) and ROLL's on-policy distillation (use_opd, is_pure_opd) name settings we
        # keep under our names. Both names with different values are refused, naming both.
        if not isinstance(data, dict):
            return data
        data = dict(data)

        def adopt(source: str, target: str, value: Any) -> None:
            if target in data and data[target] != value:
                raise _field_error(source, f"conflicts with {target}={data[target]!r}: both set one setting (TRL's or "
                                   "ROLL's name and ours); remove one or make them equal", data[source])
            data[target] = value

        if data.get("lmbda") is not None:
            adopt("lmbda", "on_policy_fraction", data["lmbda"])
        if data.get("beta") is not None:
            objective = {0: "forward_kl", 0.5: "js_divergence", 1: "reverse_kl"}.get(data["beta"])
            if objective is None:
                raise _field_error("beta", "TRL's generalized JSD is implemented at beta 0 (forward_kl), 0.5 "
                                   "(js_divergence) and 1 (reverse_kl); set kd_objective instead", data["beta"])
            adopt("beta", "kd_objective", objective)
        for name in ("use_opd", "is_pure_opd"):
            if data.get(name):
                adopt(name, "on_policy_fraction", 1.0)
                adopt(name, "on_policy_loss", "sampled_reverse_kl")
        return data

    @field_validator("logits_transfer_backend", mode="before")
    @classmethod
    def _nccl_only_spelling(cls, value: Any) -> Any:
        return "nccl-only" if value == "nccl_only" else value  # the original's comment spells it nccl_only

    @field_validator("system_envs", mode="before")
    @classmethod
    def _env(cls, value: Any) -> Any:
        return _check_env(value)

    @model_validator(mode="after")
    def _map_original_places(self) -> "DistillConfig":
        # Top-level keys of the original pipeline name settings that live in the student's sections here. Either
        # place may be used; both with different values is refused, naming both.
        student = self.student
        if self.question_key is not None:
            _adopt(student.data_args, "question_key", self.question_key, "question_key",
                   "student.data_args.question_key")
        if self.answer_key is not None:
            _adopt(student.data_args, "answer_key", self.answer_key, "answer_key", "student.data_args.answer_key")
        if self.max_grad_norm is not None:
            _adopt(student.training_args, "max_grad_norm", self.max_grad_norm, "max_grad_norm",
                   "student.training_args.max_grad_norm")
        if self.validation is not None and self.validation.data_args.file_name is not None:
            _adopt(student.data_args, "eval_file_name", self.validation.data_args.file_name,
                   "validation.data_args.file_name", "student.data_args.eval_file_name")
        # One chat format is used (the student's tokenizer formats every batch): the sections must not disagree.
        places = {
            "student.data_args.template": student.data_args.template,
            "teacher.data_args.template": self.teacher.data_args.template,
            "validation.data_args.template": self.validation.data_args.template if self.validation else None,
        }
        named = [(place, value) for place, value in places.items() if value is not None]
        for place, value in named[1:]:
            if value != named[0][1]:
                raise _field_error(place, f"differs from {named[0][0]}={named[0][1]!r}; one chat format is used", value)
        return self

    @model_validator(mode="after")
    def _teacher_defaults_to_inference(self) -> "DistillConfig":
        # StrategyArgs defaults to the student's torch_train; a teacher section that leaves strategy_name unset
        # (e.g. only model_args) means the teacher's default, torch_infer.
        if "strategy_name" not in self.teacher.strategy_args.model_fields_set:
            self.teacher.strategy_args.strategy_name = "torch_infer"
        return self

    @model_validator(mode="after")
    def _one_packing_setting(self) -> "DistillConfig":
        # The teacher runs the student's micro-batches, so packing is one setting of the run. The original's configs
        # set it on both sides; a side that leaves it unset follows the other, and two different values are refused.
        student, teacher = self.student, self.teacher
        if student.use_sequence_packing != teacher.use_sequence_packing:
            on, off = ("student", "teacher") if student.use_sequence_packing else ("teacher", "student")
            if "use_sequence_packing" in getattr(self, off).model_fields_set:
                raise _field_error(
                    f"{off}.use_sequence_packing",
                    f"differs from {on}.use_sequence_packing=true: the teacher runs the student's micro-batches, so "
                    "both sides see the same packing; set both the same (or leave one unset)",
                    False,
                )
            getattr(self, off).use_sequence_packing = True
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
        if len(student.device_mapping) != len(teacher.device_mapping):
            # Teacher rank i feeds student rank i. The same list puts each pair on one device (the hand-off stays
            # there: CUDA IPC or shared memory); another list of the same length places the teacher elsewhere, and
            # a pair on two hosts goes through the Ray object store (channel.choose_transport).
            raise _field_error(
                "teacher.device_mapping",
                f"must name as many devices as student.device_mapping {student.device_mapping} (teacher rank i "
                "feeds student rank i); the same list keeps each pair on one device",
                teacher.device_mapping,
            )
        if t.strategy_name.split("_")[0] != s.strategy_name.split("_")[0]:
            family = s.strategy_name.split("_")[0]
            raise _field_error(
                "teacher.strategy_args.strategy_name",
                f"must be {family}_infer to go with student.strategy_args.strategy_name={s.strategy_name!r}: both "
                "sides share one parallel layout and logits format",
                t.strategy_name,
            )
        ranks = max(1, len(student.device_mapping))
        if ranks % (s.tp_size * s.pp_size):
            raise _field_error(
                "student.device_mapping",
                f"{ranks} rank(s) (an empty list is one CPU rank) is not a multiple of tp_size*pp_size="
                f"{s.tp_size * s.pp_size}",
                student.device_mapping,
            )
        for side in ("student", "teacher"):
            _check_strategy_options(side, getattr(self, side))
        both = runs_live_teacher(self) and shares_devices(self)
        if both and sum(gpu_memory_fraction(self, side) for side in ("student", "teacher")) > 1:
            side = "teacher" if teacher.gpu_memory_fraction is not None else "student"
            raise _field_error(
                f"{side}.gpu_memory_fraction",
                f"teacher {gpu_memory_fraction(self, 'teacher'):g} + student {gpu_memory_fraction(self, 'student'):g} "
                "is more than the whole GPU they share; lower it",
                getattr(self, side).gpu_memory_fraction,
            )
        if self.max_steps is None and student.training_args.num_train_epochs is None:
            raise _field_error("max_steps", "required, or student.training_args.num_train_epochs (the original's way)")
        if student.data_args.file_name is None:
            raise _field_error("student.data_args.file_name", "required: the training data file")
        _check_on_policy(self)
        return self

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: len(device_mapping) / (tp_size * pp_size), at least 1 (one CPU rank when empty)."""
        s = self.student.strategy_args
        return max(1, len(self.student.device_mapping) // (s.tp_size * s.pp_size))

    @property
    def train_args(self) -> TrainingArgs:
        return self.student.training_args

    @property
    def data_args(self) -> DataArgs:
        return self.student.data_args


def _check_strategy_options(side: str, worker: WorkerConfig) -> None:
    """Refuse options the side's strategy family cannot honour, naming the field."""
    args = worker.strategy_args
    where = f"{side}.strategy_args"
    if args.strategy_name.startswith("torch"):
        for name in ("tp_size", "pp_size"):
            if getattr(args, name) != 1:
                raise _field_error(
                    f"{where}.{name}", "values > 1 need megatron_train/megatron_infer", getattr(args, name)
                )
        for name in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"):
            if getattr(args, name) is not None:
                raise _field_error(f"{where}.{name}", "a pipeline split needs megatron_train/megatron_infer with "
                                   "pp_size > 1; remove it", getattr(args, name))
        hints = {
            "sequence_parallel": "it splits activations over tensor-parallel ranks (megatron strategies)",
            "use_distributed_optimizer": "the optimizer state is sharded by megatron_train only",
        }
        for name, why in hints.items():
            if getattr(args, name):
                raise _field_error(f"{where}.{name}", f"not supported by {args.strategy_name}: {why}; set false", True)
        if args.recompute_granularity is not None:
            raise _field_error(
                f"{where}.recompute_granularity",
                f"not supported by {args.strategy_name}; use {side}.model_args.disable_gradient_checkpointing: false "
                "for activation checkpointing",
                args.recompute_granularity,
            )
        if worker.model_args.hf_attn_implementation == "flash_attention_2" and not worker.device_mapping:
            raise _field_error(
                f"{side}.model_args.attn_implementation",
                "flash attention needs a GPU; an empty device_mapping runs on CPU: use sdpa or eager",
                worker.model_args.attn_implementation,
            )
    else:
        for name in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"):
            if getattr(args, name) is not None and args.pp_size == 1:
                raise _field_error(f"{where}.{name}", "needs pp_size > 1 (a split of the layers over pipeline "
                                   "stages); remove it or raise pp_size", getattr(args, name))
        if args.sequence_parallel and args.tp_size == 1:
            raise _field_error(f"{where}.sequence_parallel", "needs tp_size > 1; set false or raise tp_size", True)
        for name, off in MEGATRON_OPTIONS_NOT_YET_HONOURED.items():
            if getattr(args, name) != off:
                shown = "null" if off is None else str(off).lower()  # as written in YAML
                raise _field_error(
                    f"{where}.{name}",
                    f"not supported by {args.strategy_name} yet (it would be ignored); set {shown} or remove it",
                    getattr(args, name),
                )


def megatron_packing_refusal() -> str:
    """Why ``use_sequence_packing`` is refused with megatron_train / megatron_infer (depends on whether
    TransformerEngine is installed: Megatron's packed attention is TE's THD format)."""
    import importlib.util

    why = "Megatron packs sequences only with TransformerEngine's attention (packed_seq_params / THD); "
    if importlib.util.find_spec("transformer_engine") is None:
        why += ("TransformerEngine is not installed here, and Megatron's local attention would let the records of a "
                "packed row attend to each other (nor do the megatron strategies pass packed_seq_params yet)")
    else:
        why += ("TransformerEngine is installed, but the megatron strategies do not pass packed_seq_params to it yet "
                "(that path needs a GPU to test)")
    return why + "; set false (micro-batches are then padded) or use torch_train / torch_infer"


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


# --- What the run derives from the config once it starts (used by pipeline.py and workers.py) ----------------------


def worker_env(config: DistillConfig, role: Literal["student", "teacher"] | None = None) -> dict[str, str]:
    """Environment variables of a worker process: the top-level ``system_envs``, under ``role``'s own; with
    sequence parallel also ``CUDA_DEVICE_MAX_CONNECTIONS=1`` unless set there (Megatron's sequence-parallel
    layers rely on the GPU running their communication and compute kernels in the order they were issued,
    and the variable must be in the environment before CUDA starts)."""
    env = dict(config.system_envs)
    if role is not None:
        worker = getattr(config, role)
        env.update(worker.system_envs)
        if worker.strategy_args.sequence_parallel:
            env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    return env


def gpu_memory_fraction(config: DistillConfig, side: Literal["student", "teacher"]) -> float:
    """The share of each GPU ``side``'s rank may reserve (``WorkerConfig.gpu_memory_fraction``'s rules)."""
    own = getattr(config, side).gpu_memory_fraction
    if own is not None:
        return own
    # The side has its GPUs to itself: no teacher (SFT), one side only (a teacher cache being written or read), or
    # teacher and student on different devices.
    if not runs_live_teacher(config) or not shares_devices(config):
        return GPU_MEMORY_FOR_BOTH
    other = (config.teacher if side == "student" else config.student).gpu_memory_fraction
    if other is not None:
        return max(GPU_MEMORY_FOR_BOTH - other, 0.05)
    return GPU_MEMORY_FOR_BOTH / 2


def shares_devices(config: DistillConfig) -> bool:
    """Whether some device holds a teacher rank and a student rank (always on CPU: an empty device_mapping)."""
    student, teacher = config.student.device_mapping, config.teacher.device_mapping
    return not student or bool(set(student) & set(teacher))


def logits_transport(config: DistillConfig) -> Literal["same_device", "object_store"]:
    """What ``logits_transfer_backend`` asks of the channel (``LOGITS_TRANSPORTS``)."""
    return LOGITS_TRANSPORTS[config.logits_transfer_backend]  # type: ignore[return-value]


def steps_for_epochs(config: DistillConfig, num_records: int) -> int:
    """Optimizer steps of ``num_train_epochs`` passes over ``num_records`` records: each step takes
    ``per_device_train_batch_size * gradient_accumulation_steps`` records on each of ``dp_size`` ranks. At least 1
    (a data set smaller than one global batch is still trained on, its records drawn again)."""
    args = config.train_args
    if args.num_train_epochs is None:
        raise ValueError("num_train_epochs is not set")
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * config.dp_size
    # The small epsilon keeps e.g. 0.3 * 10 / 3 (0.99999...) from rounding down a whole step.
    return max(1, math.floor(args.num_train_epochs * num_records / global_batch + 1e-9))


def resolve_max_steps(config: DistillConfig, num_records: int, packed_rows: int | None = None) -> str | None:
    """Set ``config.max_steps`` from ``num_train_epochs`` when it is unset; returns a line saying how, else None.
    With sequence packing ``packed_rows`` (the rows one epoch's records pack into) counts instead of the records."""
    if config.max_steps is not None:
        return None
    config.max_steps = steps_for_epochs(config, num_records if packed_rows is None else packed_rows)
    args = config.train_args
    counted = f"{num_records} records" if packed_rows is None else \
        f"{packed_rows} packed rows (of {num_records} records, use_sequence_packing)"
    return (
        f"max_steps={config.max_steps}: num_train_epochs={args.num_train_epochs:g} x {counted} / "
        f"({args.per_device_train_batch_size} per rank x {args.gradient_accumulation_steps} accumulated x "
        f"{config.dp_size} data-parallel ranks)"
    )


def samples_completions(config: "DistillConfig") -> bool:
    """A run whose micro-batches may carry sampled completions (the student's, on-policy, or the teacher's,
    ``seq_kd``) rather than the dataset's answers."""
    return config.on_policy_fraction > 0 or config.seq_kd


def evaluates_onpolicy_rkl(config: "DistillConfig") -> bool:
    """Whether evaluation reports eval/onpolicy_rkl (``eval_onpolicy_rkl``; unset: with on-policy distillation)."""
    wanted = config.eval_onpolicy_rkl if config.eval_onpolicy_rkl is not None else config.on_policy_fraction > 0
    return wanted and runs_live_teacher(config)


def ships_label_logprobs(config) -> bool:
    """Whether the teacher also ships its log-prob of each label token (``TeacherTargets.label_logprobs``): the
    advantage of ``on_policy_loss: sampled_reverse_kl``. Read with defaults: tests duck-type the config."""
    return getattr(config, "on_policy_fraction", 0) > 0 and getattr(config, "on_policy_loss", "kd") == "sampled_reverse_kl"


def _check_on_policy(config: "DistillConfig") -> None:
    """Refuse what on-policy distillation and seq_kd cannot do, naming the field."""
    field = "on_policy_fraction" if config.on_policy_fraction > 0 else "seq_kd"
    if not samples_completions(config):
        if config.samples_per_prompt > 1:
            raise _field_error("samples_per_prompt", "needs on_policy_fraction > 0 or seq_kd: only sampled "
                               "completions come several per prompt", config.samples_per_prompt)
        return
    if config.distill_loss_weight == 0:
        raise _field_error(field, "needs a teacher to score the samples: distill_loss_weight is 0 (SFT only)",
                           getattr(config, field))
    if config.teacher_cache_dir is not None:
        raise _field_error("teacher_cache_dir", f"cannot serve {field}: sampled completions are new every step, so "
                           "the teacher must score them live; unset teacher_cache_dir", config.teacher_cache_dir)
    if config.student.use_sequence_packing:
        raise _field_error("student.use_sequence_packing", f"not supported with {field}: sampled completions are "
                           "one per row; set false", True)
    if config.generation.max_new_tokens >= config.sequence_length:
        raise _field_error("generation.max_new_tokens", f"leaves no room for a prompt within sequence_length="
                           f"{config.sequence_length}", config.generation.max_new_tokens)


def reads_teacher_cache(config: DistillConfig) -> bool:
    """A training run whose teacher targets come from ``teacher_cache_dir`` (written by `kubedistill
    cache-teacher`), with no teacher actor."""
    return config.distill_loss_weight > 0 and config.teacher_cache_dir is not None


def runs_live_teacher(config: DistillConfig) -> bool:
    """A training run with teacher ranks beside its students (KD, and no teacher cache)."""
    return config.distill_loss_weight > 0 and config.teacher_cache_dir is None


def startup_warnings(config: DistillConfig, *, has_chat_template: bool) -> list[str]:
    """What a user of the original pipeline's config should know before the run starts (logged as warnings)."""
    warnings = []
    templates = [
        (place, value)
        for place, value in (
            ("student.data_args.template", config.student.data_args.template),
            ("validation.data_args.template", config.validation.data_args.template if config.validation else None),
            ("teacher.data_args.template", config.teacher.data_args.template),
        )
        if value is not None
    ]
    if templates and not has_chat_template:
        place, value = templates[0]
        warnings.append(
            f"{place}={value!r}: the tokenizer of student_pretrain has no chat template, so prompts are the plain "
            "question text"
        )
    if config.distill_loss_weight == 1 and config.logits_topk > 0 and not config.topk_tail:
        warnings.append(
            f"distill_loss_weight=1 with logits_topk={config.logits_topk} and topk_tail=false: pure KD on the "
            "teacher's top-k renormalized, with no cross-entropy term, leaves the student's probability mass outside "
            "those tokens untrained, and the student can collapse while the KD loss falls (watch "
            "train/student_loss). Set topk_tail: true, or distill_loss_weight below 1"
        )
    checkpoint = config.checkpoint_config
    if config.on_policy_fraction > 0 and config.on_policy_loss == "sampled_reverse_kl" \
            and not config.generation.unfiltered():
        g = config.generation
        warnings.append(
            f"on_policy_loss=sampled_reverse_kl with generation temperature={g.temperature:g}, top_p={g.top_p:g}, "
            f"top_k={g.top_k}: the sampled reverse KL is an unbiased estimate only for samples from the student's own "
            "distribution (temperature 1, top_p 1, top_k 0); the importance ratio corrects the temperature, but tokens "
            "the filter removes are never seen, so the estimate is biased"
        )
    if config.eval_onpolicy_rkl and not runs_live_teacher(config):
        warnings.append(
            "eval_onpolicy_rkl=true is not reported in this run: it needs a live teacher to score the student's "
            "completions (distill_loss_weight > 0, no teacher_cache_dir)"
        )
    if config.on_policy_fraction > 0 and config.distill_loss_weight < 1:
        warnings.append(
            f"distill_loss_weight={config.distill_loss_weight:g}: on student-sampled micro-batches the loss is the "
            "distillation term alone at weight 1 (cross-entropy on the student's own samples would reinforce them); "
            "the weight applies to the dataset's micro-batches"
        )
    if checkpoint is not None and checkpoint.output_dir and checkpoint.output_dir != config.output_dir:
        warnings.append(
            f"checkpoint_config.output_dir={checkpoint.output_dir!r} is not used: checkpoints are written to "
            f"output_dir={config.output_dir!r} only"
        )
    return warnings


def check_runtime_support(config: DistillConfig) -> None:
    """Refuse, before Ray starts, what the config asks of this installation and it lacks (ConfigError)."""
    import importlib.util

    for side in ("student", "teacher"):
        worker: WorkerConfig = getattr(config, side)
        wants_flash = worker.model_args.hf_attn_implementation == "flash_attention_2"
        if wants_flash and worker.strategy_args.strategy_name.startswith("torch"):
            if importlib.util.find_spec("flash_attn") is None:
                raise ConfigError(
                    f"{side}.model_args.attn_implementation={worker.model_args.attn_implementation!r} needs the "
                    "flash-attn package, which is not installed; use sdpa (or install flash-attn)"
                )
        if worker.use_sequence_packing and worker.strategy_args.strategy_name.startswith("torch") and not wants_flash:
            # sdpa / eager keep a packed row's records apart only where transformers builds the block-diagonal mask
            # from the position ids (flash attention reads them in its own kernel).
            # Imported here, at run time only: the operator's image reads this module without the trainer's stack.
            transformers = importlib.import_module("transformers")
            try:
                importlib.import_module("transformers.masking_utils").find_packed_sequence_indices  # noqa: B018
            except (ImportError, AttributeError):
                raise ConfigError(
                    f"{side}.use_sequence_packing needs a transformers that keeps packed records apart for sdpa and "
                    f"eager attention (transformers.masking_utils.find_packed_sequence_indices); transformers "
                    f"{transformers.__version__} does not, so the records of a row would attend to each other. "
                    "Upgrade transformers, or set false"
                ) from None
