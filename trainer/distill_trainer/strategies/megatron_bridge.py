"""HF transformers <-> Megatron-Core weights for the Qwen2 and Llama families, through mbridge 0.15.1.

mbridge's ``Qwen2Bridge`` / ``LLaMABridge`` know the weight layouts (QKV interleaved per query group for
GQA, gate/up fused into ``linear_fc1`` and split per TP rank, Qwen2's QKV bias, tied or untied output
layer, vocabulary padding with zero rows) and load/export across TP and PP ranks with collectives over
Megatron's process groups. Three small adaptations make it usable here; each is one override in
``_Adapted`` below:

1. **Layer spec.** mbridge builds TransformerEngine layers unconditionally. Without TransformerEngine
   (always on CPU; on a GPU image that lacks it) the model uses Megatron's local spec, whose RMSNorms are
   separate modules (``input_layernorm`` / ``pre_mlp_layernorm``) instead of being fused into
   ``linear_qkv`` / ``linear_fc1``: the name map gains those two entries.
2. **RoPE base.** transformers 5 moved ``rope_theta`` into ``config.rope_parameters``; read it from
   there (or from ``rope_theta`` on older transformers). RoPE scaling (Llama 3's ``llama3``, YaRN) is
   refused rather than mis-converted: mbridge maps any scaling to a linear interpolation factor.
3. **Sequence parallel as configured.** mbridge turns it on whenever TP > 1; here it is the configured
   value on every path (``make_bridge(sequence_parallel=...)``). Megatron's local spec (torch norms, used
   without TransformerEngine) asserts it off: on CPU ranks the spec's norms and the decoder's final norm
   are ``megatron_cpu.SequenceParallelTorchNorm`` instead (same math, gradients summed over TP by Megatron);
   on a GPU without TransformerEngine it is refused with the reason (the GPU path is Megatron's own).
4. **CPU.** The fused kernels are off on CPU (``megatron_cpu.cpu_transformer_config_overrides``);
   ``use_cpu_initialization`` is on.

The model is built here, not by mbridge's ``get_model`` (which moves modules to CUDA and wraps them for
its own trainer): ``build_gpt_model`` returns the bare ``GPTModel`` stage of this pipeline rank, and
the strategy wraps it.

Vocabulary padding: Megatron needs the embedding's rows to split evenly over TP ranks. Teacher and
student must be padded to the *same* size so that TP rank i of both holds the same vocabulary columns;
``padded_vocab_size`` computes it from both models' configs. Padding rows are zeros (their logits are
0 and are masked to −inf by the strategies); export drops them again.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch

from .megatron_cpu import cpu_transformer_config_overrides, needs_cpu_shims

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")

# Megatron's default: the vocabulary is padded to a multiple of 128 per TP rank.
VOCAB_MULTIPLE = 128


def padded_vocab_size(hf_vocab_sizes: list[int], tp_size: int) -> int:
    """One padded vocabulary size for teacher and student: a multiple of 128·tp that holds both."""
    multiple = VOCAB_MULTIPLE * tp_size
    return int(math.ceil(max(hf_vocab_sizes) / multiple) * multiple)


def rope_base(hf_config) -> float:
    """RoPE base frequency from transformers 5's ``rope_parameters`` or the older ``rope_theta``."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    scaling = getattr(hf_config, "rope_scaling", None)
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "default":
        raise ValueError(f"RoPE scaling {kind!r} is not supported by the Megatron strategies (only plain RoPE)")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError("the model config has no rope_theta (neither in rope_parameters nor at the top level)")
    return float(theta)


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def have_fused_softmax_kernel() -> bool:
    try:
        import scaled_masked_softmax_cuda  # noqa: F401  (built with Megatron-LM's fused kernels, or by NGC images)
    except ImportError:
        return False
    return True


def make_bridge(hf_config, *, dtype: torch.dtype, padded_vocab: int, sequence_parallel: bool = False,
                config_overrides: dict | None = None):
    """The mbridge bridge for ``hf_config`` with the adaptations of the module docstring.

    Megatron's parallel state must be initialized (the bridge reads TP/PP sizes, ranks and groups from it).
    ``sequence_parallel`` is the configured value (``strategy_args.sequence_parallel``); ``config_overrides``
    are extra TransformerConfig fields (e.g. recompute settings).
    """
    import mbridge  # noqa: F401  (registers the model types)
    from mbridge.core.bridge import _MODEL_REGISTRY

    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by the Megatron strategies (supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if padded_vocab < hf_config.vocab_size:
        raise ValueError(f"padded_vocab={padded_vocab} is smaller than the model's vocab_size {hf_config.vocab_size}")
    rope_base(hf_config)  # refuse unsupported RoPE before building anything
    use_te = have_transformer_engine() and not needs_cpu_shims()
    if sequence_parallel and not use_te and not needs_cpu_shims():
        raise ValueError(
            "sequence_parallel needs TransformerEngine: without it Megatron's local layer spec uses torch norms, "
            "which do not support sequence parallelism; set sequence_parallel: false"
        )
    overrides = dict(config_overrides or {})
    if needs_cpu_shims():
        overrides.update(cpu_transformer_config_overrides())
    elif not have_fused_softmax_kernel():
        # mbridge turns masked_softmax_fusion on; its kernel is Megatron's compiled extension, which a pip install
        # of megatron-core lacks: Megatron would import it on the first bf16 attention and fail.
        overrides.setdefault("masked_softmax_fusion", False)
    # mbridge sets sequence_parallel = (tp > 1); the configured value wins on every path.
    overrides["sequence_parallel"] = sequence_parallel
    adapted = type(f"Adapted{_MODEL_REGISTRY[model_type].__name__}", (_Adapted, _MODEL_REGISTRY[model_type]), {})
    adapted._overrides = overrides
    adapted._use_te = use_te
    # make_vocab_size_divisible_by = the padded size itself pads the vocabulary to exactly that size.
    return adapted(hf_config, dtype=dtype, make_vocab_size_divisible_by=padded_vocab)


class _Adapted:
    """Mixed in before mbridge's Qwen2Bridge / LLaMABridge (see the module docstring)."""

    _overrides: dict = {}
    _use_te: bool = False

    def _build_config(self):
        self.extra_args.update(self._overrides)  # applied last by mbridge's _build_base_config
        return super()._build_config()

    def _adjust_mapping_for_shared_weights(self):
        # mbridge's mappings are class attributes it mutates in place; copy them per instance first.
        self._DIRECT_MAPPING = dict(self._DIRECT_MAPPING)
        self._ATTENTION_MAPPING = dict(self._ATTENTION_MAPPING)
        self._MLP_MAPPING = dict(self._MLP_MAPPING)
        self._OTHER_MAPPING = dict(self._OTHER_MAPPING)
        # Local spec: the norms are their own modules.
        self._MLP_MAPPING["pre_mlp_layernorm.weight"] = ["model.layers.{layer_number}.post_attention_layernorm.weight"]
        self._OTHER_MAPPING["input_layernorm.weight"] = ["model.layers.{layer_number}.input_layernorm.weight"]
        if getattr(self.hf_config, "tie_word_embeddings", False):
            self._DIRECT_MAPPING["output_layer.weight"] = "model.embed_tokens.weight"

    def _get_transformer_layer_spec(self, vp_stage=None):
        if self._use_te:
            return super()._get_transformer_layer_spec(vp_stage)
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        self.has_vp_stage = False
        spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=self.config.qk_layernorm)
        if self.config.sequence_parallel and needs_cpu_shims():
            return _sequence_parallel_cpu_block(spec, self.config)
        return spec

    def _get_gptmodel_args(self) -> dict:
        return dict(
            vocab_size=self.hf_config.vocab_size,
            max_sequence_length=self.hf_config.max_position_embeddings,
            position_embedding_type="rope",
            rotary_base=rope_base(self.hf_config),
        )


def _sequence_parallel_cpu_block(layer_spec, config):
    """The decoder of ``layer_spec`` (Megatron's local spec) with every torch norm, the final one included, built
    as ``SequenceParallelTorchNorm``: what the block would build for this pipeline stage, norms swapped."""
    import dataclasses

    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from .megatron_cpu import SequenceParallelTorchNorm

    def swap(spec):
        if spec is WrappedTorchNorm:
            return SequenceParallelTorchNorm
        if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
            return dataclasses.replace(spec, **{f.name: swap(getattr(spec, f.name)) for f in dataclasses.fields(spec)})
        return spec

    layer = swap(layer_spec)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelTorchNorm)


def build_gpt_model(bridge) -> torch.nn.Module:
    """This pipeline rank's ``GPTModel`` stage (embedding on the first, output layer on the last), on CPU
    or the current CUDA device, weights not loaded yet."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    provider = bridge._model_provider([])
    model = provider(pre_process=mpu.is_pipeline_first_stage(), post_process=mpu.is_pipeline_last_stage())
    for param in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    if not needs_cpu_shims():
        model.cuda(torch.cuda.current_device())
    return model


def load_hf_weights(bridge, model: torch.nn.Module, hf_dir: str) -> None:
    """Load the HF safetensors in ``hf_dir`` into this rank's shard (collective over the TP group)."""
    with torch.no_grad():
        bridge.load_weights([model], hf_dir)


def export_hf_weights(bridge, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) pairs, merged across TP and PP, vocabulary padding dropped.

    Collective: every rank of the model-parallel group must drain the iterator; each gets every tensor.
    With tied embeddings and PP > 1 the embedding is yielded by both the first and the last stage.
    """
    with torch.no_grad():
        yield from bridge.export_weights([model])


def export_hf_state_dict(bridge, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``export_hf_weights`` collected into a CPU state dict (every model-parallel rank gets it)."""
    state: dict[str, Any] = {}
    for name, tensor in export_hf_weights(bridge, model):
        state[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return state
