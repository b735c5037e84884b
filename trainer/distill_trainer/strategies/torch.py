"""The ``torch_infer`` / ``torch_train`` strategies: an HF transformers model per rank, data parallel only.

Each rank holds the whole model. With several ranks (``device_mapping`` longer than 1) the student's ranks are
data-parallel replicas: each runs its own slice of the global batch, and ``optimizer_step`` all-reduces (sums)
the gradients over the side's process group before clipping, so every replica takes the same step. The loss is
already divided by the label tokens of the global batch, so the sum is the gradient of the global mean. Tensor
and pipeline parallelism are the Megatron-Core strategies' (``megatron_*``).

The output layer runs only where a loss is computed: the transformer body gives the hidden states of every
position, the label positions' rows are selected, and the LM head is applied to those alone (``CausalLMParts``;
a model without a plain body + ``lm_head`` structure falls back to the full logits). With ``fused_lm_head`` the
student goes further: ``fused_head`` computes the head and the loss chunk by chunk, never holding the
``[N_label, V]`` logits or their gradient.

Packed rows (``use_sequence_packing``: ``MicroBatch.position_ids`` set) go to the model without a 2D padding mask
and with positions restarting at every record (``model_inputs``): transformers then keeps attention within each
record (sdpa and eager: a block-diagonal causal mask built from the positions; flash attention: its variable-length
kernel, which reads the positions of a single row only, so the rows are laid end to end into one). Teacher and
student both run this way on the same micro-batch, so the teacher's targets line up with the student's rows.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from .. import checkpoint
from ..config import ModelArgs, ships_label_logprobs
from ..data import IGNORE_INDEX
from ..losses import topk_teacher_logits
from ..sampling import SamplingParams, sample_with_kv_cache
from .base import InferStrategy, LossFn, MicroBatch, OptimizerStepResult, RankContext, StepStats, TeacherTargets, TrainStrategy

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_causal_lm(path: str | Path, model_args: ModelArgs, device: torch.device):
    """The HF model with ``model_args``' dtype and attention kernel; with activation checkpointing
    (``disable_gradient_checkpointing: false``) each decoder layer keeps only its input in the forward pass and is
    recomputed in the backward pass (non-reentrant: the same gradients, less memory for long sequences)."""
    from transformers import AutoModelForCausalLM

    options = {"dtype": _DTYPES[model_args.dtype]}
    if model_args.hf_attn_implementation is not None:
        options["attn_implementation"] = model_args.hf_attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(path), **options)
    if model_args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device)


class CausalLMParts(NamedTuple):
    """An HF ``*ForCausalLM`` split into its transformer body (hidden states) and its output layer."""

    body: torch.nn.Module
    head: torch.nn.Module


# Config attributes of models whose logits are not just ``lm_head(hidden)`` (soft-capping, scaling): full logits.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def causal_lm_parts(model: torch.nn.Module) -> Optional[CausalLMParts]:
    """(body, head) of a Qwen2/Llama-style causal LM (``model.get_decoder()`` / ``model.model`` and ``lm_head``);
    None when the model has another structure or transforms its logits after the head."""
    head = getattr(model, "lm_head", None)
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if not isinstance(head, torch.nn.Module) or not isinstance(body, torch.nn.Module) or body is model:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return CausalLMParts(body, head)


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def flattens_packed_rows(module: torch.nn.Module) -> bool:
    """Whether packed rows must be laid end to end into one row for ``module``'s attention: flash attention finds
    the records from ``position_ids`` only in a batch of one row (transformers' ``_is_packed_sequence``); sdpa and
    eager build a block-diagonal mask per row (``masking_utils.find_packed_sequence_indices``), which a single long
    row would make quadratically larger."""
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None) or ""
    return "flash" in str(implementation)


def model_inputs(
    module: torch.nn.Module, micro_batch: MicroBatch, device
) -> tuple[dict, Callable[[torch.Tensor], torch.Tensor]]:
    """The keyword arguments of ``module``'s forward for ``micro_batch``, and the function that gives an output of
    that call ([rows, T, ...]) the micro-batch's [B, T, ...] shape back.

    Padded rows: ``input_ids`` and the 2D ``attention_mask``. Packed rows (``position_ids`` set): ``input_ids`` and
    ``position_ids`` and no 2D mask, which is how transformers is told the rows hold several records (it then
    attends within each one, and RoPE counts from each record's start); laid end to end into one row for flash
    attention (``flattens_packed_rows``). No KV cache: with one, transformers would not look for packed records.
    """
    input_ids = micro_batch.input_ids.to(device)
    if micro_batch.position_ids is None:
        mask = micro_batch.attention_mask.to(device)
        return {"input_ids": input_ids, "attention_mask": mask, "use_cache": False}, _same
    positions = micro_batch.position_ids.to(device)
    if not flattens_packed_rows(module):
        return {"input_ids": input_ids, "position_ids": positions, "use_cache": False}, _same
    shape = input_ids.shape

    def unflatten(output: torch.Tensor) -> torch.Tensor:
        return output.reshape(*shape, *output.shape[2:])

    one_row = {"input_ids": input_ids.reshape(1, -1), "position_ids": positions.reshape(1, -1), "use_cache": False}
    return one_row, unflatten


def label_hidden_states(parts: CausalLMParts, micro_batch: MicroBatch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """([N_label, hidden] hidden states at the label positions, [N_label] their labels), row-major order."""
    inputs, unflatten = model_inputs(parts.body, micro_batch, device)
    out = parts.body(**inputs)
    labels = micro_batch.labels.to(device)
    mask = labels != IGNORE_INDEX
    return unflatten(out.last_hidden_state)[mask], labels[mask]


def label_logits(model, parts: Optional[CausalLMParts], micro_batch: MicroBatch, vocab_size: int, device):
    """([N_label, vocab_size] logits at the label positions, [N_label] labels); the LM head runs on those rows
    only when the model splits into ``parts``."""
    if parts is None:
        inputs, unflatten = model_inputs(model, micro_batch, device)
        out = model(**inputs)
        labels = micro_batch.labels.to(device)
        mask = labels != IGNORE_INDEX
        return unflatten(out.logits[..., :vocab_size])[mask], labels[mask]
    hidden, labels = label_hidden_states(parts, micro_batch, device)
    return parts.head(hidden)[..., :vocab_size], labels


def _as_label_rows(micro_batch: MicroBatch, labels: torch.Tensor) -> MicroBatch:
    """The micro-batch seen by ``loss_fn`` when the logits are already the label rows: one sequence of them."""
    return dataclasses.replace(micro_batch, labels=labels[None])


def _data_parallel_only(rank: RankContext, name: str) -> None:
    if rank.tp_size != 1 or rank.pp_size != 1:
        raise ValueError(f"{name} has no tensor/pipeline parallelism (tp_size={rank.tp_size}, pp_size={rank.pp_size})")


class TorchInferStrategy(InferStrategy):
    """Forward-only model (the teacher): top-k (or all) logits at the label positions."""

    name = "torch_infer"

    def __init__(self, config, rank: RankContext, vocab):
        _data_parallel_only(rank, self.name)
        self.device = rank.device
        self.vocab_size = vocab.size
        self.topk = config.logits_topk
        # top-k with the tail: the mass outside the top-k at the loss's teacher temperature T·τ
        self.tail_temperature = config.kd_temperature * config.teacher_temperature if config.topk_tail else None
        self.ships_label_logprobs = ships_label_logprobs(config)
        self.model = load_causal_lm(config.teacher_pretrain, config.teacher.model_args, self.device).eval()
        self.model.requires_grad_(False)
        self.parts = causal_lm_parts(self.model)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, vocab_size] logits; rows of a padded embedding matrix beyond the tokenizer are cut off."""
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.logits[..., : self.vocab_size]

    @torch.inference_mode()
    def forward(self, micro_batch: MicroBatch) -> TeacherTargets:
        rows, labels = label_logits(self.model, self.parts, micro_batch, self.vocab_size, self.device)
        rows = rows.float()  # [N_label, V]
        logprobs = None
        if self.ships_label_logprobs:
            logprobs = torch.log_softmax(rows, -1).gather(1, labels[:, None]).squeeze(1)
        if not self.topk:
            return TeacherTargets(rows, label_logprobs=logprobs)
        top = topk_teacher_logits(rows, self.topk, self.tail_temperature)
        return TeacherTargets(top.values, top.indices, top.tail_logmass, logprobs)

    def sample(self, prompts, params, eos_token_id, pad_token_id, seed):
        """Sampled continuations with the KV cache (``sampling.sample_with_kv_cache``)."""
        return sample_with_kv_cache(self.model, prompts, params, eos_token_id, pad_token_id, seed, self.vocab_size,
                                    self.device)


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Weight decay on matrices only: decaying norms' gains and biases pulls them toward 0, which hurts.
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TorchTrainStrategy(TrainStrategy):
    """Trainable model with AdamW, a warmup+decay schedule and gradient clipping (the student)."""

    name = "torch_train"
    streams_micro_batches = True  # forward_backward: one pass over them, backward before the next

    def __init__(self, config, rank: RankContext, vocab):
        from transformers import get_scheduler

        _data_parallel_only(rank, self.name)
        training_args = config.student.training_args
        self.rank = rank
        self.device = rank.device
        self.vocab_size = vocab.size
        self.args = training_args
        self.model_args = config.student.model_args
        self.model = load_causal_lm(config.student_pretrain, self.model_args, self.device).train()
        self.optimizer = torch.optim.AdamW(
            _decay_groups(self.model, training_args.weight_decay),
            lr=training_args.learning_rate,
            betas=(training_args.adam_beta1, training_args.adam_beta2),
        )
        self.scheduler = get_scheduler(
            training_args.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=training_args.warmup_steps,
            num_training_steps=config.max_steps,
        )
        self._loss_finite = True  # of the micro-batches accumulated since the last optimizer step
        self.parts = causal_lm_parts(self.model)
        # The fused head + loss needs a plain linear output layer whose logits are the model's.
        self.fused_head = (
            self.model_args.fused_lm_head and self.parts is not None and type(self.parts.head) is torch.nn.Linear
        )

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.logits[..., : self.vocab_size]

    def _loss_terms(self, micro_batch: MicroBatch, loss_fn: LossFn):
        """``loss_fn``'s terms of one micro-batch, the LM head applied at the label positions only; with
        ``fused_lm_head`` (training) the head and the loss run fused, chunk by chunk (``loss_fn.fused_head``)."""
        fused = getattr(loss_fn, "fused_head", None)
        if self.fused_head and fused is not None and torch.is_grad_enabled():
            hidden, labels = label_hidden_states(self.parts, micro_batch, self.device)
            head = self.parts.head
            bias = None if head.bias is None else head.bias[: self.vocab_size]
            return fused(hidden, head.weight[: self.vocab_size], bias, labels, micro_batch)
        rows, labels = label_logits(self.model, self.parts, micro_batch, self.vocab_size, self.device)
        return loss_fn(rows[None], _as_label_rows(micro_batch, labels))

    def forward_backward(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn) -> StepStats:
        loss = ce_sum = kd_sum = 0.0
        label_tokens = input_tokens = 0
        for micro_batch in micro_batches:
            terms = self._loss_terms(micro_batch, loss_fn)
            loss += float(terms.loss.detach())
            if torch.isfinite(terms.loss.detach()):
                terms.loss.backward()
            else:  # its gradients would be NaN/inf everywhere; optimizer_step will not apply this step
                self._loss_finite = False
            ce_sum += float(terms.ce_sum)
            kd_sum += float(terms.kd_sum)
            label_tokens += terms.label_tokens
            input_tokens += int(micro_batch.attention_mask.sum())
        return StepStats(loss, ce_sum, kd_sum, label_tokens, input_tokens, self._loss_finite)

    def _all_reduce_gradients(self, loss_finite: bool) -> bool:
        """Sum the gradients of the data-parallel replicas (one flat buffer, one collective); returns whether
        every replica's loss was finite."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([0.0 if loss_finite else 1.0],
                                                                              device=self.device)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.rank.group)
        offset = 0
        for param in params:
            count = param.numel()
            param.grad = flat[offset : offset + count].view_as(param).to(param.dtype)
            offset += count
        return bool(flat[-1] == 0)

    def optimizer_step(self) -> OptimizerStepResult:
        """Reduce, clip, step, advance the schedule; returns (gradient norm before clipping, lr used, applied).

        The update is not applied when a loss was not finite or the gradient norm is NaN/inf: one such
        step would make every weight non-finite. The schedule still advances, so the learning rate stays a
        function of the step number (as with AMP's skipped steps).
        """
        loss_finite, self._loss_finite = self._loss_finite, True
        if self.rank.world_size > 1:
            loss_finite = self._all_reduce_gradients(loss_finite)
        lr = self.scheduler.get_last_lr()[0]
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        applied = loss_finite and math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return OptimizerStepResult(grad_norm, float(lr), applied)

    @torch.inference_mode()
    def eval_forward(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn) -> StepStats:
        self.model.eval()
        try:
            loss, ce_sum, kd_sum, label_tokens, input_tokens = 0.0, 0.0, 0.0, 0, 0
            for micro_batch in micro_batches:
                terms = self._loss_terms(micro_batch, loss_fn)
                loss += float(terms.loss)
                ce_sum += float(terms.ce_sum)
                kd_sum += float(terms.kd_sum)
                label_tokens += terms.label_tokens
                input_tokens += int(micro_batch.attention_mask.sum())
            return StepStats(loss, ce_sum, kd_sum, label_tokens, input_tokens)
        finally:
            self.model.train()

    def save(self, directory: str) -> None:
        """Rank 0 writes the HF model, optimizer and scheduler (the replicas hold equal copies); every rank its RNG."""
        checkpoint.refuse_nonfinite_parameters(self.model, directory)
        first = self.rank.rank == 0
        checkpoint.write_model_state(
            directory,
            model=self.model if first else None,
            optimizer=self.optimizer if first else None,
            scheduler=self.scheduler if first else None,
            rank=self.rank.rank,
        )

    def load(self, directory: str) -> None:
        """Weights from ``directory/student`` (HF format), then optimizer, scheduler and this rank's RNG."""
        restored = load_causal_lm(Path(directory) / checkpoint.STUDENT_DIR, self.model_args, self.device)
        with torch.no_grad():
            self.model.load_state_dict(restored.state_dict())
        del restored
        checkpoint.load_model_state(directory, optimizer=self.optimizer, scheduler=self.scheduler, rank=self.rank.rank)

    def sample(self, prompts, params, eos_token_id, pad_token_id, seed):
        """Sampled continuations with the KV cache (``sampling.sample_with_kv_cache``)."""
        return sample_with_kv_cache(self.model, prompts, params, eos_token_id, pad_token_id, seed, self.vocab_size,
                                    self.device)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> list[list[int]]:
        """Greedy continuations, cut at the first EOS (EOS excluded): the sampler's KV-cache decode at temperature
        0 (one left-padding and decode loop for evaluation and on-policy sampling)."""
        completions = self.sample(prompts, SamplingParams(max_new_tokens, temperature=0.0), eos_token_id, pad_token_id,
                                  seed=0)
        return [c.tokens[:-1] if c.tokens and c.tokens[-1] == eos_token_id else c.tokens for c in completions]
