"""The ``megatron_train`` (student) / ``megatron_infer`` (teacher) strategies: Megatron-Core GPT models over
DP × TP × PP ranks, HF weights in and out through mbridge (``megatron_bridge``).

Layout. The ranks of one side form the default torch.distributed group of their processes (the workers
initialize it; a single rank gets a one-process group here). ``initialize_model_parallel(tp, pp)`` splits
it in Megatron's default order (TP fastest, then DP, then PP), which is ``RankContext``'s numbering, so
rank r of the teacher and rank r of the student hold the same TP slice of the same PP stage. Each side splits its
own layers over the stages (``pipeline_split``: even, as set by ``num_layers_in_first/last_pipeline_stage``, or
chosen by ``layout.pipeline_stage_layers`` when pp does not divide them).

Logits. The last PP stage produces this TP rank's vocabulary slice ``[tp_rank·V_p/tp, (tp_rank+1)·V_p/tp)``
of the logits, where V_p is the vocabulary padded to a multiple of 128·tp that holds *both* models'
embeddings (``megatron_bridge.padded_vocab_size``), so teacher and student shards line up. Columns at or
beyond the tokenizer's size are set to −inf on every shard (``parallel_losses.mask_vocab_padding``):
Megatron's padding rows give logit 0, which would otherwise win a top-k and take softmax mass.
With tp = 1 the logits are simply cut to the tokenizer's size.

Teacher targets (``MegatronInferStrategy.forward``): the raw logits at the label positions; with
``logits_topk`` each TP rank ships the top-k of its own shard with global indices (the student's loss
all-gathers the k·tp candidates of its TP group and keeps the exact global top-k, see ``distill_loss``),
without top-k its whole (masked) shard. With ``topk_tail`` it also ships the log of its probability mass
outside the *global* top-k at the loss's temperature T·τ: the TP ranks merge their candidates and all-reduce
the log-sum-exps (``parallel_losses.vocab_parallel_tail_logmass``), so every rank ships the same tail.

Training step (``MegatronTrainStrategy``): ``forward_backward`` runs Megatron's schedule
(``get_forward_backward_func``: no pipelining at pp = 1, 1F1B otherwise) with a ``forward_step_func`` whose
loss function is the run's ``loss_fn`` on the last stage; the schedule runs the backward (through the
pipeline's send/receive of activation gradients). ``loss_fn`` already divides by the global label-token
count, so the schedule is told not to rescale (``calculate_per_token_loss`` with a token count of 1).
``optimizer_step`` is Megatron's: ``finalize_model_grads`` (DP all-reduce of the DDP grad buffers as a sum,
tied-embedding gradients between first and last stage), the global gradient norm over TP/PP without
duplicates, clipping and the inner AdamW step. The learning-rate schedule is transformers' (same as
``torch_train``) on the inner optimizer. A step whose loss on any rank, or whose gradient norm, is
NaN/inf is not applied. With fp16 the schedule scales each loss by the optimizer's dynamic loss scale
(``grad_scale_func``, as Megatron's own loop sets it) and ``prepare_grads`` divides it out again; a step
whose scaled gradients overflow is skipped and the scale lowered (``OptimizerStepResult.loss_scale_overflow``).

Student output layer (``model_args.fused_lm_head``, the default, as ``torch_train``): the last stage does not
compute the [B, T, V_p/tp] logits. While the schedule runs, the output layer returns its input
(``_output_layer_returns_hidden``: the final hidden states after the final norm, through the same TP gradient
reduction as ``ColumnParallelLinear``: the input gradient all-reduced over the TP group, or all-gathered along
the sequence with a reduce-scatter backward under sequence parallel) and remembers the weight it was given (its
own, or the shared embedding when tied). ``loss_fn.fused_head`` then takes the label rows only and computes this
rank's vocabulary shard of the logits and the loss chunk by chunk (``distill_loss.vocab_parallel_head_chunk_loss``:
the CE and KD statistics all-reduced over the TP group per chunk, padded columns −inf as in ``_logits_view``,
top-k targets merged to the global top-k). The weight's gradient is an ordinary autograd gradient of the
parameter: Megatron's DDP hook adds it to ``main_grad``, and ``finalize_model_grads`` joins a tied last-stage
weight to the first stage's embedding as before. Losses and gradients equal the logits path's within float32
rounding at tp = 1, tp = 2 and pp = 2, tied and untied (``tests/unit/test_megatron_fused_head.py``).
``fused_lm_head: false``, a ``loss_fn`` without ``fused_head`` or multi-token prediction keep the logits path;
``generate`` and the teacher always use the logits.

Sequence parallel (``strategy_args.sequence_parallel``, tp > 1) is Megatron's: between the TP regions each TP rank
holds 1/tp of the sequence, so ``_run`` right-pads a micro-batch whose length is not a multiple of tp
(``_pad_for_sequence_parallel``; the causal mask keeps every real position's output) and cuts the model's output
back to the micro-batch's length before ``on_logits``: teacher targets, the student's loss (both heads) and
sampling without a KV cache see the unpadded positions only. CPU ranks build it with ``megatron_cpu.SequenceParallelTorchNorm``.

Sampling (``sample``, both sides: on-policy distillation and seq_kd) is ``sampling.decode`` over prompts grouped by
length, with Megatron-Core's own static-batch inference path and its KV cache (``_MegatronKVStepper``:
``StaticInferenceContext`` driven through ``GPTInferenceWrapper``): one forward of the prompts, then one forward of
one token per step. The last position's logits are made whole on every rank of the replica (TP slices all-gathered
by Megatron's output layer, padding columns cut off, then broadcast from the last PP stage), so every rank's
identically seeded generator draws the same tokens. Under sequence parallel (which Megatron's static-batch inference
does not support for dense models) it falls back to ``_MegatronStepper``: no KV cache, every step one forward of the
replica over the whole sequence so far. Both give the same logits within float32 rounding
(``tests/unit/test_megatron_sampling.py``). The student's greedy ``generate`` (exact-match evaluation) is ``sample``
at temperature 0.

Checkpoints: the student is exported in HF format (merged across TP and PP, padding rows dropped) to
``<dir>/student/`` by global rank 0; each rank writes its optimizer and scheduler state and RNG states to
``<dir>/megatron/rank_<r>.pt``. ``load`` restores all of it (same layout required).

CPU: ``megatron_cpu`` installs the CUDA stand-ins and every Megatron call runs inside
``cpu_device_mode()``; on a GPU none of that is active and Megatron's own paths run (untested here).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .. import checkpoint
from ..config import ships_label_logprobs
from ..data import IGNORE_INDEX
from ..distill_loss import TeacherTargets, VocabShard, vocab_parallel_label_logprobs
from ..losses import TopK, tail_logmass
from ..parallel_losses import mask_vocab_padding, merge_topk, shard_topk, vocab_parallel_tail_logmass
from ..sampling import Completion, SamplingParams, decode, make_generator
from . import megatron_bridge as mb
from .base import InferStrategy, MicroBatch, OptimizerStepResult, RankContext, StepStats, TrainStrategy
from .megatron_cpu import apply_cpu_shims, cpu_device_mode, needs_cpu_shims

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MEGATRON_STATE_DIR = "megatron"


def rank_state_file(rank: int) -> str:
    return f"{MEGATRON_STATE_DIR}/rank_{rank:05d}.pt"


# ------------------------------------------------------------------------------------------- setup


def init_megatron(rank: RankContext, seed: int) -> None:
    """torch.distributed (a one-process group when this side has one rank) and Megatron's TP/PP/DP groups."""
    apply_cpu_shims()
    if not dist.is_initialized():
        if rank.world_size != 1:
            raise RuntimeError("torch.distributed must be initialized by the worker when a side has several ranks")
        backend = "gloo" if needs_cpu_shims() else "nccl"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != rank.world_size or dist.get_rank() != rank.rank:
        raise RuntimeError(
            f"the default process group (rank {dist.get_rank()} of {dist.get_world_size()}) is not this side's "
            f"ranks (rank {rank.rank} of {rank.world_size})"
        )
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if mpu.model_parallel_is_initialized():
        if (mpu.get_tensor_model_parallel_world_size(), mpu.get_pipeline_model_parallel_world_size()) != (
            rank.tp_size,
            rank.pp_size,
        ):
            raise RuntimeError("Megatron's parallel state is already initialized with another tp/pp layout")
    else:
        with cpu_device_mode():
            mpu.initialize_model_parallel(
                tensor_model_parallel_size=rank.tp_size, pipeline_model_parallel_size=rank.pp_size
            )
    if (mpu.get_tensor_model_parallel_rank(), mpu.get_data_parallel_rank(), mpu.get_pipeline_model_parallel_rank()) != (
        rank.tp_rank,
        rank.dp_rank,
        rank.pp_rank,
    ):
        raise RuntimeError("Megatron's rank order differs from RankContext's (tp fastest, then dp, then pp)")
    with cpu_device_mode():
        model_parallel_cuda_manual_seed(seed)


def shared_padded_vocab(config, tp_size: int) -> int:
    """The padded vocabulary both sides use (from both models' config.json)."""
    from ..models import model_vocab_size

    sizes = [model_vocab_size(config.student_pretrain)]
    if getattr(config, "teacher_pretrain", None):
        sizes.append(model_vocab_size(config.teacher_pretrain))
    return mb.padded_vocab_size(sizes, tp_size)


def recompute_settings(granularity: str | None) -> dict:
    """Megatron's activation recompute for ``strategy_args.recompute_granularity``: ``selective`` recomputes the
    core attention of every layer (Megatron's default recompute_modules), ``full`` every transformer layer as a
    whole (uniform method, one layer per unit: what Megatron-LM users write as --recompute-method uniform
    --recompute-num-layers 1). Same gradients, activations of a layer kept only at its input."""
    if granularity is None:
        return {}
    if granularity == "selective":
        return {"recompute_granularity": "selective"}
    return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


def pipeline_split(hf_config, rank: RankContext, strategy_args, side: str) -> dict:
    """TransformerConfig fields for this side's split of the transformer layers over the pipeline stages
    (``layout.pipeline_stage_layers``: Megatron's even default, the split set by
    ``strategy_args.num_layers_in_first/last_pipeline_stage``, or one chosen when pp_size does not divide the
    layers); an uneven split is logged by the side's rank 0."""
    import logging

    from ..layout import FIRST, LAST, describe_split, pipeline_split_settings

    first, last = getattr(strategy_args, FIRST, None), getattr(strategy_args, LAST, None)
    layers = int(hf_config.num_hidden_layers)
    settings = pipeline_split_settings(layers, rank.pp_size, first, last)
    if settings and rank.rank == 0:
        logging.getLogger(__name__).info(describe_split(side, layers, rank.pp_size, first, last))
    return settings


class _MegatronModel:
    """What both strategies share: the parallel setup, the model stage of this rank and its logits view."""

    def _setup(self, config, rank: RankContext, vocab, model_path: str, worker, *, train: bool) -> None:
        """``worker``: this side's section of the config (``config.student`` or ``config.teacher``)."""
        from transformers import AutoConfig

        self.config, self.rank, self.vocab = config, rank, vocab
        init_megatron(rank, config.seed)
        from megatron.core import parallel_state as mpu

        self.mpu = mpu
        self.device = torch.device("cpu") if needs_cpu_shims() else torch.device("cuda", torch.cuda.current_device())
        self.hf_config = AutoConfig.from_pretrained(model_path)
        self.padded_vocab = shared_padded_vocab(config, rank.tp_size)
        # Recompute only matters where there is a backward pass: the student's.
        overrides = {"calculate_per_token_loss": True, **recompute_settings(worker.strategy_args.recompute_granularity)} \
            if train else {}
        side = "student" if train else "teacher"
        overrides.update(pipeline_split(self.hf_config, rank, worker.strategy_args, side))
        with cpu_device_mode():
            self.bridge = mb.make_bridge(
                self.hf_config,
                dtype=_DTYPES[worker.model_args.dtype],
                padded_vocab=self.padded_vocab,
                sequence_parallel=worker.strategy_args.sequence_parallel,
                config_overrides=overrides,
            )
            self.module = mb.build_gpt_model(self.bridge)
            mb.load_hf_weights(self.bridge, self.module, model_path)
        self.shard_width = self.padded_vocab // rank.tp_size
        self.vocab_start = rank.tp_rank * self.shard_width
        self.tp_group = mpu.get_tensor_model_parallel_group()

    def local_targets(self, targets: TeacherTargets) -> TeacherTargets:
        """Whole targets as a live teacher rank of this TP index ships them: top-k entries outside this rank's
        vocabulary shard set to −inf (the loss's merge over the TP group then finds exactly the k entries again),
        or this shard's columns of the full vocabulary, −inf beyond it."""
        if self.rank.tp_size == 1:
            return targets
        if targets.indices is not None:
            local = targets.indices - self.vocab_start
            owned = (local >= 0) & (local < self.shard_width)
            return TeacherTargets(targets.values.masked_fill(~owned, -float("inf")), targets.indices, targets.tail)
        columns = torch.full((targets.values.shape[0], self.shard_width), -float("inf"), dtype=targets.values.dtype)
        stop = min(self.vocab_start + self.shard_width, targets.values.shape[1])
        if stop > self.vocab_start:
            columns[:, : stop - self.vocab_start] = targets.values[:, self.vocab_start : stop]
        return TeacherTargets(columns)

    def whole_targets(self, targets: TeacherTargets) -> TeacherTargets:
        """This TP rank's targets as one unsharded rank would have them: the global top-k of every rank's
        candidates (the tail is already of that top-k), or the vocabulary slices gathered and cut at its size."""
        if self.rank.tp_size == 1:
            return targets
        if targets.indices is not None:
            top = merge_topk(TopK(targets.values, targets.indices), self.topk, self.tp_group)
            return TeacherTargets(top.values, top.indices, targets.tail)
        slices = [torch.empty_like(targets.values) for _ in range(self.rank.tp_size)]
        dist.all_gather(slices, targets.values.contiguous(), group=self.tp_group)
        return TeacherTargets(torch.cat(slices, dim=-1)[:, : self.vocab.size])

    def _logits_view(self, output: torch.Tensor) -> tuple[torch.Tensor, Optional[VocabShard]]:
        """[B, T, V_local] logits ready for the loss: padded columns −inf (tp > 1) or cut off (tp = 1)."""
        if self.rank.tp_size == 1:
            return output[..., : self.vocab.size], None
        first_padded = max(0, self.vocab.size - self.vocab_start)
        if first_padded < output.shape[-1]:
            keep = torch.arange(output.shape[-1], device=output.device) < first_padded
            output = output.masked_fill(~keep, -float("inf"))
        return output, VocabShard(self.tp_group, self.vocab_start, self.shard_width)

    def _sequence_parallel_length(self, length: int) -> int:
        """``length`` rounded up to a multiple of tp under sequence parallel (each TP rank holds an equal slice of
        the sequence between the TP regions); ``length`` otherwise."""
        if not self.bridge.config.sequence_parallel:
            return length
        return -(-length // self.rank.tp_size) * self.rank.tp_size

    def _pad_for_sequence_parallel(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids right-padded (token 0) to ``_sequence_parallel_length(T)``. Under the causal mask the
        padding changes no real position's output; ``_run`` cuts the model's output back to T before the loss."""
        extra = self._sequence_parallel_length(input_ids.shape[1]) - input_ids.shape[1]
        return torch.nn.functional.pad(input_ids, (0, extra)) if extra else input_ids

    def _run(self, model, micro_batches: Sequence[MicroBatch], on_logits, *, forward_only: bool) -> None:
        """Megatron's schedule over ``micro_batches``; ``on_logits(output, micro_batch)`` runs on the last
        stage and returns the loss tensor the schedule backpropagates (ignored when forward_only)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model_chunk):
            micro_batch = next(data_iterator)
            length = micro_batch.input_ids.shape[1]
            input_ids = self._pad_for_sequence_parallel(micro_batch.input_ids.to(self.device))
            positions = torch.arange(input_ids.shape[1], device=self.device).expand_as(input_ids)
            # Right-padded batches: the causal mask alone gives every real position exactly HF's logits.
            output = model_chunk(input_ids, positions, None)

            def loss_func(output_tensor):
                output_tensor = output_tensor[:, :length]  # [B, T, ...]: the sequence-parallel padding cut off
                return on_logits(output_tensor, micro_batch), torch.tensor(1, dtype=torch.int), {}

            return output, loss_func

        with cpu_device_mode():
            get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(micro_batches),
                model=[model],
                num_microbatches=len(micro_batches),
                seq_length=max(self._sequence_parallel_length(int(m.input_ids.shape[1])) for m in micro_batches),
                micro_batch_size=max(int(m.input_ids.shape[0]) for m in micro_batches),
                forward_only=forward_only,
            )

    @property
    def is_last_stage(self) -> bool:
        return self.rank.is_last_stage

    # -- sampling (on-policy distillation, seq_kd)

    def _sampling_model(self):
        """The model a forward of the replica runs through (the student's DDP wrapper overrides it)."""
        return self.module

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], params: SamplingParams, eos_token_id: int, pad_token_id: int,
               seed: int) -> list[Completion]:
        """``sampling.decode`` over the replica: prompts of equal length together (no padding, so no attention mask
        is needed), each group with its own generator (``_group_seed``), so every rank of the replica, given the
        same arguments, draws the same tokens from the same whole-vocabulary logits. Each group decodes with a KV
        cache (``_MegatronKVStepper``), or, under sequence parallel, without one (``_MegatronStepper``, see
        ``_sampling_stepper``). Eval mode (no dropout) while sampling; the model's mode is restored.
        ``pad_token_id`` is unused: nothing is padded."""
        model = self._sampling_model()
        training = model.training
        model.eval()
        try:
            completions: list[Optional[Completion]] = [None] * len(prompts)
            for group, indices in enumerate(_length_groups(prompts)):
                tokens = torch.tensor([prompts[i] for i in indices], dtype=torch.long, device=self.device)
                stepper = self._sampling_stepper(model, tokens, params.max_new_tokens)
                generator = make_generator(_group_seed(seed, group), self.device)
                for index, completion in zip(indices, decode(stepper, len(indices), params, eos_token_id, generator)):
                    completions[index] = completion
            return completions
        finally:
            model.train(training)

    def _sampling_stepper(self, model, tokens: torch.Tensor, max_new_tokens: int):
        """The stepper ``sample`` decodes ``tokens`` [B, T] with: ``_MegatronKVStepper``, except under sequence
        parallel, where Megatron's static-batch inference does not run for dense models (its
        ``TextGenerationController`` raises NotImplementedError; a one-token decode step cannot be split along the
        sequence over the TP ranks), so ``_MegatronStepper`` (no KV cache) decodes instead."""
        if self.bridge.config.sequence_parallel:
            return _MegatronStepper(self, model, tokens)
        return _MegatronKVStepper(self, model, tokens, max_new_tokens)

    def _whole_logits(self, last: Optional[torch.Tensor], rows: int) -> torch.Tensor:
        """[rows, vocab.size] float32 logits on every rank of the replica from ``last``, the last stage's whole
        (TP-gathered) logits [rows, ≥ vocab.size] (None on other stages): padding columns cut off, then under PP
        broadcast from the last stage."""
        logits = torch.empty(rows, self.vocab.size, dtype=torch.float32, device=self.device)
        if self.is_last_stage:
            logits.copy_(last[:, : self.vocab.size])
        if self.rank.pp_size > 1:
            group = self.mpu.get_pipeline_model_parallel_group()
            dist.broadcast(logits, src=dist.get_global_rank(group, self.rank.pp_size - 1), group=group)
        return logits

    def _last_logits(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """[B, vocab.size] float32 logits after the last position of ``tokens`` [B, T], whole on every rank of the
        replica: the TP slices gathered (padding columns −inf first, then cut at the tokenizer's size), and under
        PP broadcast from the last stage, so that each rank's identically seeded generator draws the same tokens."""
        out: list[torch.Tensor] = []

        def keep(output, batch):
            last = output[:, -1].to(torch.float32, copy=True)  # a copy: the mask below writes in place
            if self.rank.tp_size > 1:
                mask_vocab_padding(last, self.vocab_start, self.vocab.size)
                slices = [torch.empty_like(last) for _ in range(self.rank.tp_size)]
                dist.all_gather(slices, last, group=self.tp_group)
                last = torch.cat(slices, dim=-1)
            out.append(last)
            return output.new_zeros(())

        batch = MicroBatch(tokens, torch.ones_like(tokens), torch.full_like(tokens, IGNORE_INDEX))
        self._run(model, [batch], keep, forward_only=True)
        return self._whole_logits(out[0] if out else None, int(tokens.shape[0]))


class _MegatronStepper:
    """``sampling.Stepper`` for a Megatron replica, without a KV cache: Megatron's schedule runs whole sequences,
    so every step is one forward of the prompts and the tokens drawn so far (quadratic in the completion's
    length). ``sample`` uses it only under sequence parallel (``_sampling_stepper``); the tests
    use it as the reference of ``_MegatronKVStepper``. Logits as ``_last_logits``."""

    def __init__(self, strategy: _MegatronModel, model, tokens: torch.Tensor):
        self.strategy, self.model, self.tokens = strategy, model, tokens

    def start(self) -> torch.Tensor:
        return self.strategy._last_logits(self.model, self.tokens)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens = torch.cat([self.tokens, tokens.to(self.tokens.device, torch.long)[:, None]], dim=1)
        return self.start()


class _MegatronKVStepper:
    """``sampling.Stepper`` for a Megatron replica with a KV cache: Megatron-Core's static-batch inference path.

    A ``StaticInferenceContext`` (room for the B rows and T + ``max_new_tokens`` positions) is passed to the
    GPTModel's forward by Megatron's ``GPTInferenceWrapper``: each attention layer keeps its keys and values in
    the context (allocated at its first forward, on "the current device": CPU under ``megatron_cpu``), the
    prompts' forward is causal, and each step forwards the one new token per row against the cached positions
    (rotary positions from the context's offset). Under PP the wrapper receives the previous stage's hidden states
    and sends its own to the next stage (``inference.communication_utils``: ``batch_isend_irecv``, which runs on
    gloo), the whole batch as one micro-batch. The output layer gathers the TP slices (``runtime_gather_output``)
    and keeps only the last position; ``_whole_logits`` cuts the padding and broadcasts from the last stage, so the
    logits are what ``_MegatronStepper`` gives, within float32 rounding.

    The wrapper's ``run_one_forward_step`` is not called, only the two forwards it dispatches to, under the caller's
    ``no_grad``: it runs under ``torch.inference_mode()``, and Megatron's ``RotaryEmbedding.forward`` is
    ``lru_cache``d by sequence length, so the rotary table it makes there (an inference tensor) is what a later
    training forward of the student at that length gets back. The unfused RoPE of CPU ranks only reads it (a
    training step after such a forward runs fine here); a kernel that saved it for backward (TransformerEngine's
    fused RoPE saves its frequencies) would fail, so no inference tensor is made at all.
    ``forwarded``: the number of positions each forward took (tests)."""

    def __init__(self, strategy: _MegatronModel, model, tokens: torch.Tensor, max_new_tokens: int):
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig

        config = strategy.bridge.config
        self.strategy, self.tokens = strategy, tokens
        rows, length = tokens.shape
        self.context = StaticInferenceContext(rows, length + max(1, max_new_tokens))
        wrapper_config = InferenceWrapperConfig(
            hidden_size=config.hidden_size,
            params_dtype=config.params_dtype,
            fp32_residual_connection=config.fp32_residual_connection,
            inference_batch_times_seqlen_threshold=-1,  # the whole group is one micro-batch, as in ``_run``
            padded_vocab_size=strategy.padded_vocab,
        )
        with cpu_device_mode():
            self.wrapper = GPTInferenceWrapper(model, wrapper_config, self.context)
            self.wrapper.prep_model_for_inference()  # eval mode, the context reset to prefill
        self.forwarded: list[int] = []

    def start(self) -> torch.Tensor:
        positions = torch.arange(self.tokens.shape[1], device=self.tokens.device).expand_as(self.tokens)
        return self._forward(self.tokens, positions)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.context.enable_decode_mode()
        tokens = tokens.to(self.tokens.device, torch.long)[:, None]
        positions = torch.full_like(tokens, self.context.sequence_len_offset)
        return self._forward(tokens, positions)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch = {"tokens": tokens, "position_ids": positions, "attention_mask": None}  # causal / no mask
        with torch.no_grad(), cpu_device_mode():
            if self.wrapper.model_is_pipeline_parallel:
                output = self.wrapper.forward_pass_with_pipeline_parallel_small_input_batch(batch)
            else:
                output = self.wrapper.forward_pass_without_pipeline_parallel(batch)
        self.forwarded.append(int(tokens.shape[1]))
        last = output[:, -1].float() if output is not None else None  # [B, V_p], gathered over TP
        return self.strategy._whole_logits(last, int(tokens.shape[0]))


def _length_groups(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Indices of ``prompts`` grouped by length, groups in order of first appearance (the same on every rank)."""
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    return list(by_length.values())


def _group_seed(seed: int, group: int) -> int:
    """The generator seed of a length group: ``seed`` itself for the first (so equal-length prompts draw exactly
    what ``sampling.sample_with_kv_cache`` draws from the same logits), a hash of (seed, group) for the others
    (independent draws, not the first group's shifted by one seed)."""
    if group == 0:
        return seed
    digest = hashlib.sha256(f"kubedistill-megatron-group:{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ------------------------------------------------------------------------------------------- teacher


class MegatronInferStrategy(_MegatronModel, InferStrategy):
    """The teacher on DP × TP × PP ranks, forward only."""

    name = "megatron_infer"

    def __init__(self, config, rank: RankContext, vocab):
        self._setup(config, rank, vocab, config.teacher_pretrain, config.teacher, train=False)
        self.module.eval()
        self.module.requires_grad_(False)
        self.topk = config.logits_topk
        self.tail_temperature = config.kd_temperature * config.teacher_temperature if config.topk_tail else None
        self.ships_label_logprobs = ships_label_logprobs(config)

    def _tail(self, rows: torch.Tensor, candidates) -> Optional[torch.Tensor]:
        """log mass outside the global top-k (of every TP rank's candidates), at T·τ; None without the tail."""
        if self.tail_temperature is None:
            return None
        if self.rank.tp_size == 1:
            return tail_logmass(rows, candidates.indices, self.tail_temperature)
        top = merge_topk(candidates, self.topk, self.tp_group)
        return vocab_parallel_tail_logmass(rows, top.indices, vocab_start=self.vocab_start, group=self.tp_group,
                                           temperature=self.tail_temperature)

    def _label_logprobs(self, rows: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """The teacher's log-prob of each label token at T = 1 (``on_policy_loss: sampled_reverse_kl``), over the
        whole vocabulary (under TP from the all-reduced log-sum-exp: the same on every rank); else None."""
        if not self.ships_label_logprobs:
            return None
        if self.rank.tp_size == 1:
            return torch.log_softmax(rows, -1).gather(1, labels[:, None]).squeeze(1)
        return vocab_parallel_label_logprobs(rows, labels, self.vocab_start, self.tp_group)

    @torch.no_grad()
    def forward(self, micro_batch: MicroBatch) -> Optional[TeacherTargets]:
        out: list[TeacherTargets] = []

        def targets(output, batch):
            mask = (batch.labels != IGNORE_INDEX).to(output.device)
            rows = output[mask].float()  # [N_label, V_local]
            if self.rank.tp_size == 1:
                rows = rows[:, : self.vocab.size]
            else:
                mask_vocab_padding(rows, self.vocab_start, self.vocab.size)
            logprobs = self._label_logprobs(rows, batch.labels.to(output.device)[mask])
            if self.topk:
                top = shard_topk(rows, self.topk, self.vocab_start if self.rank.tp_size > 1 else 0)
                out.append(TeacherTargets(top.values, top.indices, self._tail(rows, top), logprobs))
            else:
                out.append(TeacherTargets(rows, label_logprobs=logprobs))
            return output.new_zeros(())

        self._run(self.module, [micro_batch], targets, forward_only=True)
        return out[0] if self.is_last_stage else None

    def logits(self, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """[B, T, V_local] raw logits of this TP rank's vocabulary slice (padding columns included), on the
        last stage; None elsewhere. For tests and tools."""
        out = []

        def keep(output, batch):
            out.append(output.detach().float())
            return output.new_zeros(())

        batch = MicroBatch(input_ids, torch.ones_like(input_ids), torch.full_like(input_ids, IGNORE_INDEX))
        with torch.no_grad():
            self._run(self.module, [batch], keep, forward_only=True)
        return out[0] if out else None


# ------------------------------------------------------------------------------------------- student


class MegatronTrainStrategy(_MegatronModel, TrainStrategy):
    """The student on DP × TP × PP ranks: Megatron's DDP, schedule and optimizer."""

    name = "megatron_train"

    def __init__(self, config, rank: RankContext, vocab):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from transformers import get_scheduler

        self._setup(config, rank, vocab, config.student_pretrain, config.student, train=True)
        args = config.student.training_args
        self.args = args
        # The distributed optimizer (ZeRO-1): the DP ranks reduce-scatter the gradients, each updates its shard of
        # the fp32 main weights and Adam state, and they all-gather the new weights.
        self.distributed_optimizer = bool(config.student.strategy_args.use_distributed_optimizer)
        with cpu_device_mode():
            self.model = DistributedDataParallel(
                config=self.bridge.config,
                ddp_config=DistributedDataParallelConfig(
                    grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                    use_distributed_optimizer=self.distributed_optimizer,
                ),
                module=self.module,
            )
            dtype = _DTYPES[config.student.model_args.dtype]
            self.optimizer = get_megatron_optimizer(
                OptimizerConfig(
                    optimizer="adam",
                    lr=args.learning_rate,
                    weight_decay=args.weight_decay,
                    adam_beta1=args.adam_beta1,
                    adam_beta2=args.adam_beta2,
                    adam_eps=1e-8,  # torch.optim.AdamW's default, as torch_train
                    clip_grad=0.0,  # clipping is done in optimizer_step, after the NaN/inf check
                    bf16=dtype is torch.bfloat16,
                    fp16=dtype is torch.float16,
                    # fp16's dynamic loss scale starts where torch.amp.GradScaler does; Megatron's 2^32 would skip
                    # the first ~17 steps while it halves its way down.
                    initial_loss_scale=2.0**16,
                    params_dtype=dtype,
                    use_distributed_optimizer=self.distributed_optimizer,
                ),
                [self.model],
            )
        # The schedule multiplies each loss by this before its backward (Megatron's own training loop sets it
        # too): with fp16 the optimizer's dynamic loss scale, which prepare_grads divides out again; with bf16
        # and fp32 a scale of 1. Without it fp16 gradients arrive divided by the scale (2^32 at first).
        self.bridge.config.grad_scale_func = self.optimizer.scale_loss
        # The fused output layer + loss on the last stage (model_args.fused_lm_head, as torch_train): Megatron's
        # plain column-parallel output layer only (no multi-token prediction, whose heads share it).
        self.fused_head = bool(getattr(config.student.model_args, "fused_lm_head", True)) and \
            getattr(self.bridge.config, "mtp_num_layers", None) is None
        self._head_weight = None
        self._inner = [opt.optimizer for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer])]
        self.schedulers = [
            get_scheduler(
                args.lr_scheduler_type, inner, num_warmup_steps=args.warmup_steps, num_training_steps=config.max_steps
            )
            for inner in self._inner
        ]
        self._loss_finite = True

    def _sampling_model(self):
        """The DDP wrapper, as the schedule runs it in training."""
        return self.model

    # -- training

    def _uses_fused_head(self, loss_fn) -> bool:
        return self.fused_head and getattr(loss_fn, "fused_head", None) is not None

    @contextlib.contextmanager
    def _output_layer_returns_hidden(self, active: bool):
        """While active, the last stage's output layer returns its input instead of the logits, so the model (and
        the schedule's ``on_logits``) gives the final hidden states [B, T, h] (after the final norm), the same on
        every TP rank; the weight it was given (the shared embedding when tied) is kept in ``_head_weight``. The
        input goes through what ``ColumnParallelLinear`` does before its matmul, so its gradient is summed over
        the TP ranks as Megatron's: an all-gather along the sequence under sequence parallel (backward a
        reduce-scatter), else a copy whose backward all-reduces (``_SumGradOverGroup``: Megatron's own
        ``copy_to_tensor_model_parallel_region`` all-reduces a *copy* when the gradient arrives non-contiguous, as
        it does here through GPTModel's transpose, and the sum is lost)."""
        if not active or not getattr(self.module, "post_process", False):
            yield
            return
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        layer = self.module.output_layer

        def hidden_out(input_, weight=None, runtime_gather_output=None):
            self._head_weight = layer.weight if weight is None else weight
            if layer.sequence_parallel:
                input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True,
                                                              group=layer.tp_group)
            elif self.rank.tp_size > 1:
                input_ = _SumGradOverGroup.apply(input_, layer.tp_group)
            return input_, None

        layer.forward = hidden_out
        try:
            yield
        finally:
            del layer.forward
            self._head_weight = None

    def _fused_terms(self, hidden: torch.Tensor, micro_batch: MicroBatch, loss_fn):
        """``loss_fn``'s terms from the final hidden states: the output layer at the label rows only, fused with the
        loss chunk by chunk over this rank's vocabulary shard (``distill_loss.fused_head_distill_loss``)."""
        labels = micro_batch.labels.to(hidden.device)
        mask = labels != IGNORE_INDEX
        rows = hidden[:, : labels.shape[1]][mask]  # [N_label, h], row-major as the teacher's targets
        weight = self._head_weight
        if self.rank.tp_size == 1:
            return loss_fn.fused_head(rows, weight[: self.vocab.size], None, labels[mask], micro_batch)
        shard = VocabShard(self.tp_group, self.vocab_start, self.shard_width)
        return loss_fn.fused_head(rows, weight, None, labels[mask], micro_batch, shard, self.vocab.size)

    def forward_backward(self, micro_batches: Sequence[MicroBatch], loss_fn) -> StepStats:
        self.model.train()
        terms = []
        fused = self._uses_fused_head(loss_fn)

        def loss_of(output, micro_batch):
            if fused:
                result = self._fused_terms(output, micro_batch, loss_fn)
            else:
                logits, shard = self._logits_view(output)
                result = loss_fn(logits, micro_batch, shard)
            terms.append(result)
            if torch.isfinite(result.loss.detach()):
                return result.loss
            self._loss_finite = False
            # Backpropagate exact zeros instead: the schedule (and the other PP stages) expect a backward.
            return output.sum() * 0.0

        with self._output_layer_returns_hidden(fused):
            self._run(self.model, micro_batches, loss_of, forward_only=False)
        return self._stats(micro_batches, terms)

    @torch.no_grad()
    def eval_forward(self, micro_batches: Sequence[MicroBatch], loss_fn) -> StepStats:
        self.model.eval()
        terms = []
        try:

            fused = self._uses_fused_head(loss_fn)

            def loss_of(output, micro_batch):
                if fused:
                    terms.append(self._fused_terms(output, micro_batch, loss_fn))
                else:
                    logits, shard = self._logits_view(output)
                    terms.append(loss_fn(logits, micro_batch, shard))
                return output.new_zeros(())

            with self._output_layer_returns_hidden(fused):
                self._run(self.model, micro_batches, loss_of, forward_only=True)
        finally:
            self.model.train()
        return self._stats(micro_batches, terms)

    def _stats(self, micro_batches, terms) -> StepStats:
        finite = all(bool(torch.isfinite(t.loss.detach())) for t in terms)
        if not self.rank.counted:
            return StepStats(loss_finite=finite, counted=False)
        extra = {}
        if "loss" in StepStats.__dataclass_fields__:  # this rank's share of the step's loss
            extra["loss"] = float(sum(float(t.loss.detach()) for t in terms))
        return StepStats(
            **extra,
            ce_sum=float(sum(float(t.ce_sum) for t in terms)),
            kd_sum=float(sum(float(t.kd_sum) for t in terms)),
            label_tokens=sum(t.label_tokens for t in terms),
            input_tokens=sum(int(m.attention_mask.sum()) for m in micro_batches),
            loss_finite=finite,
        )

    def optimizer_step(self) -> OptimizerStepResult:
        from megatron.core.distributed import finalize_model_grads

        lr = float(self.schedulers[0].get_last_lr()[0])
        with cpu_device_mode():
            finalize_model_grads([self.model])  # DP all-reduce (a sum) and tied-embedding grads across PP
            finite = torch.tensor([1.0 if self._loss_finite else 0.0], device=self.device)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank applies or skips the same step
            # Unscales the gradients; with fp16's loss scale also reports overflow and lowers the scale.
            overflow = self.optimizer.prepare_grads()
            grad_norm = float(self.optimizer.get_grad_norm())
            loss_finite = bool(finite.item())
            applied = loss_finite and not overflow and math.isfinite(grad_norm)
            if applied:
                if self.args.max_grad_norm > 0:
                    self.optimizer.clip_grad_norm(self.args.max_grad_norm)
                self.optimizer.step_with_ready_grads()
            for scheduler in self.schedulers:
                scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.model.zero_grad_buffer()
        self._loss_finite = True
        return OptimizerStepResult(grad_norm=grad_norm, lr=lr, applied=applied,
                                   loss_scale_overflow=loss_finite and overflow)

    # -- evaluation by generation

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> list[list[int]]:
        """Greedy continuations, cut at the first EOS (EOS excluded): ``sample`` at temperature 0, so evaluation
        decodes as on-policy sampling does (length groups, Megatron's KV cache, whole logits on every rank), and
        as the torch strategies' ``generate``."""
        completions = self.sample(prompts, SamplingParams(max_new_tokens, temperature=0.0), eos_token_id, pad_token_id,
                                  seed=0)
        return [c.tokens[:-1] if c.tokens and c.tokens[-1] == eos_token_id else c.tokens for c in completions]

    # -- checkpoints

    def save(self, directory: str) -> None:
        """HF student under ``directory/student`` (global rank 0; merged across TP/PP by the ranks of DP replica
        0), this rank's optimizer/scheduler/RNG state under ``directory/megatron/``. Collective."""
        directory = Path(directory)
        bad = next((n for n, p in self.module.named_parameters() if not torch.isfinite(p).all()), None)
        flag = torch.tensor([0.0 if bad is None else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank refuses together (no rank left in a collective)
        if flag.item():
            raise checkpoint.CheckpointError(
                f"refusing to write {directory.name}: a student parameter"
                f"{' (' + bad + ')' if bad else ''} holds NaN/inf values; the existing checkpoints are left as they are"
            )
        if self.rank.dp_rank == 0:  # one replica exports; its TP/PP ranks take part in the gathers
            with cpu_device_mode():
                state = mb.export_hf_state_dict(self.bridge, self.module)
            if self.rank.rank == 0:
                self._write_hf(directory / checkpoint.STUDENT_DIR, state)
        (directory / MEGATRON_STATE_DIR).mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                # A distributed optimizer's state_dict leaves out its shard of main weights and Adam moments.
                "optimizer_shards": [_shard_state(opt) for opt in self._sharded()],
                "schedulers": [s.state_dict() for s in self.schedulers],
                "rng": checkpoint.capture_rng_state(),
                "tracker": _tracker_states(),
                "layout": [self.rank.world_size, self.rank.tp_size, self.rank.pp_size],
            },
            directory / rank_state_file(self.rank.rank),
        )
        dist.barrier()

    def _sharded(self) -> list:
        """The distributed optimizers among this rank's (Megatron chains one per parameter group kind)."""
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        optimizers = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        return [opt for opt in optimizers if isinstance(opt, DistributedOptimizer)]

    def _write_hf(self, target: Path, state: dict) -> None:
        """config.json + model.safetensors, as ``save_pretrained`` writes them (the worker adds the tokenizer)."""
        from safetensors.torch import save_file

        target.mkdir(parents=True, exist_ok=True)
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
        self.hf_config.save_pretrained(target)

    def load(self, directory: str) -> None:
        directory = Path(directory)
        path = directory / rank_state_file(self.rank.rank)
        if not path.is_file():
            raise checkpoint.CheckpointError(f"cannot resume from {directory.resolve()}: missing {rank_state_file(self.rank.rank)}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        layout = [self.rank.world_size, self.rank.tp_size, self.rank.pp_size]
        if list(state["layout"]) != layout:
            raise checkpoint.CheckpointError(
                f"cannot resume from {directory.resolve()}: written with world_size/tp/pp {state['layout']}, "
                f"this run has {layout}"
            )
        with cpu_device_mode():
            mb.load_hf_weights(self.bridge, self.module, str(directory / checkpoint.STUDENT_DIR))
            self.optimizer.load_state_dict(state["optimizer"])
            shards = state.get("optimizer_shards", [])
            if len(shards) != len(self._sharded()):
                raise checkpoint.CheckpointError(
                    f"cannot resume from {directory.resolve()}: written with use_distributed_optimizer="
                    f"{bool(shards)}, this run has {self.distributed_optimizer}")
            with torch.no_grad():  # it copies into views of the fp32 weights, which require grad
                for optimizer, shard in zip(self._sharded(), shards):
                    _unshare_adam_steps(optimizer.optimizer)
                    optimizer.load_parameter_state_from_dp_reshardable(shard)
        for scheduler, saved in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        _set_tracker_states(state["tracker"])
        checkpoint.restore_rng_state(state["rng"])  # last: nothing draws random numbers after it


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over ``group``, whatever its memory layout."""

    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return input_.view_as(input_)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _unshare_adam_steps(adam) -> None:
    """Give each parameter's Adam state its own ``step`` tensor again.

    Without Apex or TransformerEngine, ``DistributedOptimizer.load_state_dict`` puts one ``step`` tensor into the
    state of every parameter; torch's Adam then adds 1 to it once per parameter per step, so after a resume the
    bias correction runs ahead and the updates differ from the uninterrupted run's (seen here: the first step
    equal, the second not)."""
    for state in adam.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _shard_state(optimizer) -> dict:
    """A distributed optimizer's own shard of main weights and Adam moments, as its loader reads it back.

    ``get_parameter_state_dp_reshardable`` returns each parameter's entry without the ``padding`` flag that
    ``load_parameter_state_from_dp_reshardable`` filters on (Megatron's sharded-checkpoint path adds it): added
    here, False, as that path does for every real parameter."""
    state = optimizer.get_parameter_state_dp_reshardable()
    for key, by_dtype in state.items():
        if isinstance(key, int):  # a gradient buffer: {dtype: [bucket: [parameter entry]]}
            for buckets in by_dtype.values():
                for bucket in buckets:
                    for entry in bucket:
                        entry.setdefault("padding", False)
    return state


def _tracker_states() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {name: state.clone() for name, state in get_cuda_rng_tracker().get_states().items()}


def _set_tracker_states(states: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    get_cuda_rng_tracker().set_states(dict(states))


__all__ = ["MegatronInferStrategy", "MegatronTrainStrategy", "init_megatron", "shared_padded_vocab"]
