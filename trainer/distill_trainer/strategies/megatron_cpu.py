"""Stand-ins that let megatron-core 0.16.1 run on CPU ranks (gloo), applied only when CUDA is absent.

Megatron-Core assumes a GPU in a handful of places that have nothing to do with the math. On a machine
without CUDA, ``apply_cpu_shims()`` (idempotent, a no-op when CUDA is available) replaces exactly these:

- ``torch.cuda.current_device()`` returns ``"cpu"``: rotary embeddings, the global memory buffer,
  tensor-parallel gathers and pipeline send/receive buffers allocate on "the current device"; so do the KV
  cache of Megatron's static-batch inference (``Attention._allocate_memory``) and the receive buffers of its
  pipeline-parallel forward (``AbstractModelInferenceWrapper._allocate_recv_buffer``), which sampling uses.
- The CUDA RNG that Megatron's ``CudaRNGStatesTracker`` forks for tensor-parallel regions becomes one
  dedicated CPU ``torch.Generator`` (``torch.cuda.get_rng_state`` / ``set_rng_state`` / ``manual_seed``
  and Megatron's ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` read and write it). It is not the CPU
  default generator, so forking it never disturbs the rest of the process's random stream.
- ``torch.cuda.synchronize`` and ``torch.cuda.current_stream`` do nothing (the 1F1B schedule calls them, and
  ``inference.communication_utils`` synchronizes after each ``batch_isend_irecv``, which runs on gloo as it is).
- ``clip_grad_by_total_norm_fp32`` (the optimizer's gradient clipping) asserts that every gradient is a
  ``torch.cuda.FloatTensor``: the same math (scale by max_norm / (total_norm + 1e-6) when below 1) without it.

and ``cpu_device_mode()`` is a ``TorchFunctionMode`` that turns ``device="cuda"`` (and ``cuda:N``) into
CPU in factory calls, ``Tensor.cuda()`` into a no-op and ``Tensor.type()`` of a CPU tensor into its CUDA
name: ``get_default_causal_mask`` and ``pipeline_parallel/schedules.py`` create tensors with a hard-coded
``device="cuda"``, the tied output layer of the last PP stage is moved with ``.cuda()``, and the
fp16/bf16 optimizer (``Float16OptimizerWithFloat16Params``) accepts only parameters whose ``type()`` is
``torch.cuda.HalfTensor`` / ``BFloat16Tensor`` / ``FloatTensor``. The strategy enters it around every Megatron call on CPU.

Sequence parallel on CPU ranks: Megatron's local layer spec (the only one without TransformerEngine) builds
its norms with ``WrappedTorchNorm``, which asserts ``not config.sequence_parallel``. ``SequenceParallelTorchNorm``
is the same torch ``RMSNorm`` / ``LayerNorm`` without that assertion, its parameters marked
``sequence_parallel = True``: each TP rank normalizes its own slice of the sequence, so its weight gradient is a
partial sum, and Megatron's ``finalize_model_grads`` all-reduces the gradients of exactly such parameters over
the TP group (``config.sequence_parallel and param.sequence_parallel``, as it does for TransformerEngine's
norms). ``megatron_bridge`` puts it into the layer spec and the decoder's final norm on CPU ranks only. The
collectives along the sequence (``all_gather_into_tensor``, ``reduce_scatter_tensor``) run on gloo as they are.

What is *not* shimmed, but configured (``cpu_transformer_config_overrides``): fused kernels are off
(masked softmax, bias-dropout, RoPE and gradient-accumulation fusions), the model is built from the
local layer spec (no TransformerEngine) and ``use_cpu_initialization=True``. On a GPU none of this
applies: Megatron runs its own paths.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_applied = False
_cuda_rng = None  # the CPU generator standing in for the CUDA default generator


def needs_cpu_shims() -> bool:
    return not torch.cuda.is_available()


def cpu_transformer_config_overrides() -> dict:
    """TransformerConfig fields that keep Megatron off CUDA-only kernels."""
    return dict(
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=True,
    )


class SequenceParallelTorchNorm:
    """Megatron's ``WrappedTorchNorm`` (torch ``RMSNorm`` / ``LayerNorm`` from ``config.normalization``) that also
    builds under sequence parallel: its parameters carry ``sequence_parallel`` = the config's value, which makes
    ``finalize_model_grads`` sum their gradients over the TP group (see the module docstring)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ValueError("zero-centered gamma / memory-efficient layer norm are not supported by torch norms")
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds:
            raise ValueError(f"normalization {config.normalization!r} is not supported by torch norms")
        norm = kinds[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


def apply_cpu_shims() -> None:
    """Install the CPU stand-ins listed in the module docstring (once; nothing when CUDA is present)."""
    global _applied, _cuda_rng
    if _applied or not needs_cpu_shims():
        return
    from megatron.core.tensor_parallel import random as mrandom

    _cuda_rng = torch.Generator(device="cpu")

    def get_rng_state(device=None, clone=False, graph_safe=False):
        return _cuda_rng.get_state()

    def set_rng_state(new_state, device=None, graph_safe=False):
        _cuda_rng.set_state(new_state)

    def manual_seed(seed):
        _cuda_rng.manual_seed(int(seed))

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.get_rng_state = get_rng_state
    torch.cuda.set_rng_state = set_rng_state
    torch.cuda.manual_seed = manual_seed
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _NoStream()
    mrandom._get_cuda_rng_state = get_rng_state
    mrandom._set_cuda_rng_state = set_rng_state
    # Activation recompute reruns a layer's forward inside the autograd engine's backward, where the
    # TorchFunctionMode of cpu_device_mode (thread-local, not carried into backward) is not active.
    recompute = mrandom.CheckpointFunction.backward

    def backward_on_cpu(ctx, *grads):
        with _CudaToCpu():
            return recompute(ctx, *grads)

    mrandom.CheckpointFunction.backward = staticmethod(backward_on_cpu)

    from megatron.core.optimizer import optimizer as moptimizer

    moptimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    _applied = True


@torch.no_grad()
def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's ``clip_grad_by_total_norm_fp32`` without its CUDA-only assertion and kernel."""
    attribute = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attribute) for p in parameters if getattr(p, attribute, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


class _NoStream:
    def synchronize(self) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return False


class _CudaToCpu(TorchFunctionMode):
    """``device="cuda"`` in any torch call becomes ``"cpu"``; a CPU tensor's ``type()`` names its CUDA type."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:  # e.g. the tied output layer's copy on the last PP stage
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # The fp16/bf16 optimizer sorts parameters by their type name and accepts only torch.cuda.* ones.
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


def cpu_device_mode():
    """A context in which hard-coded ``device="cuda"`` allocations land on CPU; a no-op with CUDA."""
    if not needs_cpu_shims():
        return contextlib.nullcontext()
    return _CudaToCpu()
