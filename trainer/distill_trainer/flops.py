"""Model FLOPs of a distillation step and model FLOPs utilization (MFU), counted as MaxText and PaLM count them.

Per input token, a forward pass of a model costs 2 FLOPs per weight that takes part in a matrix multiply
(attention q/k/v/o, the MLP, the output layer; not the embedding lookup, norms or biases: ``N`` below), plus the
attention scores and the weighted sum of values, 2·2·layers·seq·(heads·head_dim) over the whole sequence (PaLM,
Chowdhery et al. 2022, appendix B; a causal kernel does about half of that part). A training step is 3 forward
passes (backward = 2), so a distillation step costs

    6·N_student·tokens + 2·N_teacher·tokens + (3·A_student + A_teacher)·Σ tokens·seq,    A = 4·layers·heads·head_dim

(tokens: the non-padding input tokens of the step; seq: the width of each micro-batch). These are *model* FLOPs:
what the math needs, whatever the implementation does (recomputation under activation checkpointing, or an
output layer applied only at label positions, do not change them). MFU = model FLOPs / step seconds / (peak
FLOP/s of one device × devices), with the peak from ``device_peak_tflops`` or ``KUBEDISTILL_PEAK_TFLOPS``;
without one (as on CPU) no MFU is reported. ``tests/gpu/gpu_check.py`` counts the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .shared_names import ENV_PEAK_TFLOPS


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of one model: its matmul weights and its attention width times layers."""

    matmul_params: int
    attention_flops_per_position: int  # A = 4·layers·heads·head_dim: forward FLOPs per token per position attended

    @classmethod
    def of(cls, model_dir: str) -> "ModelShape":
        """From an HF model directory's config, built on the meta device (no weights are read)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        # Every nn.Linear is a matmul per token: projections, MLP and the output layer (counted even when tied
        # to the embedding, whose lookup is not a matmul).
        matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(matmul, 4 * text.num_hidden_layers * heads * head_dim)


@dataclass(frozen=True)
class ModelFlops:
    """The FLOP count of one run's step (student trained, teacher forward only) and the peak it is measured against."""

    student: ModelShape
    teacher: ModelShape | None
    peak_flops_per_second: float  # of all devices the run uses

    @classmethod
    def of(cls, student_dir: str, teacher_dir: str | None, peak_flops_per_second: float) -> "ModelFlops":
        return cls(ModelShape.of(student_dir), ModelShape.of(teacher_dir) if teacher_dir else None,
                   peak_flops_per_second)

    def step_flops(self, tokens: int, token_positions: int) -> float:
        """Model FLOPs of a step over ``tokens`` input tokens; ``token_positions`` = Σ tokens·seq per micro-batch."""
        flops = 6.0 * self.student.matmul_params * tokens + 3.0 * self.student.attention_flops_per_position * token_positions
        if self.teacher is not None:
            flops += 2.0 * self.teacher.matmul_params * tokens + self.teacher.attention_flops_per_position * token_positions
        return flops

    def utilization(self, tokens: int, token_positions: int, seconds: float) -> float:
        """MFU of a step: its model FLOPs per second over the peak."""
        return self.step_flops(tokens, token_positions) / seconds / self.peak_flops_per_second


def peak_flops_per_second(config) -> float | None:
    """Peak FLOP/s of one device: ``device_peak_tflops``, else ``KUBEDISTILL_PEAK_TFLOPS``, else None (no MFU)."""
    tflops = config.device_peak_tflops or float(os.environ.get(ENV_PEAK_TFLOPS) or 0) or None
    return tflops * 1e12 if tflops else None
