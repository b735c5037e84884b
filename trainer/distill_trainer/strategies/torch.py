"""The ``torch_infer`` / ``torch_train`` strategies: an HF transformers model on one device.

A strategy knows how to run a model (load it, produce logits, take an optimizer step, save it); it knows
nothing about distillation. The Megatron-Core strategies will offer the same methods over TP/PP ranks.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import ModelArgs, TrainingArgs

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_causal_lm(path: str | Path, model_args: ModelArgs, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_DTYPES[model_args.dtype])
    return model.to(device)


class TorchInferStrategy:
    """Forward-only model (the teacher)."""

    def __init__(self, path: str | Path, model_args: ModelArgs, device: torch.device, vocab_size: int):
        self.device = device
        self.vocab_size = vocab_size
        self.model = load_causal_lm(path, model_args, device).eval()
        self.model.requires_grad_(False)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, vocab_size] logits; rows of a padded embedding matrix beyond the tokenizer are cut off."""
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.logits[..., : self.vocab_size]


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Weight decay on matrices only: decaying norms' gains and biases pulls them toward 0, which hurts.
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TorchTrainStrategy:
    """Trainable model with AdamW, a warmup+decay schedule and gradient clipping (the student)."""

    def __init__(
        self,
        path: str | Path,
        model_args: ModelArgs,
        training_args: TrainingArgs,
        max_steps: int,
        device: torch.device,
        vocab_size: int,
    ):
        from transformers import get_scheduler

        self.device = device
        self.vocab_size = vocab_size
        self.args = training_args
        self.model = load_causal_lm(path, model_args, device).train()
        self.optimizer = torch.optim.AdamW(
            _decay_groups(self.model, training_args.weight_decay),
            lr=training_args.learning_rate,
            betas=(training_args.adam_beta1, training_args.adam_beta2),
        )
        self.scheduler = get_scheduler(
            training_args.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=training_args.warmup_steps,
            num_training_steps=max_steps,
        )

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.logits[..., : self.vocab_size]

    def optimizer_step(self, loss_finite: bool = True) -> tuple[float, float, bool]:
        """Clip, step, advance the schedule; returns (gradient norm before clipping, lr used, whether applied).

        The update is not applied when the loss was not finite or the gradient norm is NaN/inf: one such
        step would make every weight non-finite. The schedule still advances, so the learning rate stays a
        function of the step number (as with AMP's skipped steps).
        """
        lr = self.scheduler.get_last_lr()[0]
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        applied = loss_finite and math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, float(lr), applied

    @torch.inference_mode()
    def eval_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        try:
            return self.logits(input_ids, attention_mask)
        finally:
            self.model.train()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> list[list[int]]:
        """Greedy continuations of left-padded prompts, cut at the first EOS (EOS excluded)."""
        self.model.eval()
        try:
            width = max(len(p) for p in prompts)
            input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, prompt in enumerate(prompts):
                input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
                attention_mask[row, width - len(prompt) :] = 1
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
            )
            results = []
            for row in output[:, width:].tolist():
                results.append(row[: row.index(eos_token_id)] if eos_token_id in row else row)
            return results
        finally:
            self.model.train()
