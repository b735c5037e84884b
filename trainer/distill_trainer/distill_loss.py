"""The one distillation loss of a training step: ``(1 − w)·CE + w·KD`` over the label positions.

Every train strategy calls ``distill_loss`` (through the ``loss_fn`` the worker hands it); nothing else
composes the loss, and the driver only adds up the sums it returns. With ``N`` the label tokens of the
*global* batch (all data-parallel ranks, all micro-batches of the step) and w = ``distill_loss_weight``:

    ce_sum = Σ_label −log q(label)                 (q = softmax(z_s), T = 1: CE is never tempered)
    kd_sum = Σ_label D(p ‖ q)                      (D = the kd_objective of losses.py, with its temperatures;
                                                    top-k: over the k tokens + the tail, or renormalised)
    loss   = (1 − w)·ce_sum / N  +  w·kd_sum / N

so summing ``loss`` over micro-batches and data-parallel ranks gives the step's mean loss, and its
gradients sum the same way (torchtune's ``normalize=False``: sums compose, means do not). A term whose
weight is 0 is left out of ``loss`` (0·inf would be NaN; pure KD must not stop on a non-finite CE), but
``ce_sum`` is always computed (without a graph when w = 1): it is the run's SFT-comparable figure.

Inputs are the *logits at every position* of a micro-batch and its ``labels`` (``IGNORE_INDEX`` where
nothing is learned); the teacher's targets (``TeacherTargets``) cover exactly the label positions, in
row-major order of ``labels != IGNORE_INDEX``.

Tensor parallelism: with a ``VocabShard`` the student logits are this rank's contiguous slice of the
vocabulary. CE then uses the all-reduced log-sum-exp (max and Σexp over the shard group) and the label's
logit from the rank that owns it; KD with full-vocabulary targets uses
``parallel_losses.vocab_parallel_kd_loss`` (the teacher rank of the same TP index sends the same slice);
KD with top-k targets takes the per-shard candidates every teacher TP rank sent, all-gathers them and keeps
the global top-k (``parallel_losses.merge_topk``; exact: the global top-k is among the per-shard top-k's), and
``vocab_parallel_kd_loss`` gathers the student's logits there from the ranks that own them. The process group is passed in, never looked up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import IGNORE_INDEX
from .fused_head import ChunkLoss, ChunkFn, fused_linear_loss
from .losses import TopK, VocabReduce, _check_objective, fused_loss_and_grad, fused_tail_loss_and_grad, kd_loss

if TYPE_CHECKING:
    from .config import DistillConfig


@dataclass(frozen=True)
class TeacherTargets:
    """What the teacher ships for the label positions of one micro-batch (temperatures not yet applied).

    ``indices is None``: full-vocabulary logits, ``values`` [N_label, V_local] (the whole vocabulary, or
    under TP the slice ``[vocab_start, vocab_start + V_local)`` of the teacher rank with the student
    rank's TP index). ``indices`` set: top-k, ``values``/``indices`` [N_label, k] with *global* vocabulary
    indices; unsharded they are the top-k, under TP they are one shard's candidates (the loss picks the
    global top-k of all shards' candidates). Columns beyond the tokenizer's vocabulary must be −inf (or
    absent), so that a padded column can never win a top-k. ``tail`` [N_label] (top-k with ``topk_tail``):
    log of the mass softmax(z_t / (T·τ)) puts outside the *global* top-k, over the whole vocabulary (under
    TP from the all-reduced log-sum-exp, the same on every teacher rank). ``label_logprobs`` [N_label]
    (``on_policy_loss: sampled_reverse_kl``): log softmax(z_t)[label] at temperature 1, the teacher's log-prob
    of each label token over the whole vocabulary (under TP the same on every teacher rank).
    """

    values: torch.Tensor
    indices: Optional[torch.Tensor] = None
    tail: Optional[torch.Tensor] = None
    label_logprobs: Optional[torch.Tensor] = None

    @property
    def rows(self) -> int:
        return int(self.values.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """By name, as the channel carries them (indices as int32)."""
        named = {"values": self.values}
        if self.indices is not None:
            named["indices"] = self.indices.to(torch.int32)
        if self.tail is not None:
            named["tail"] = self.tail
        if self.label_logprobs is not None:
            named["label_logprobs"] = self.label_logprobs
        return named

    @staticmethod
    def from_tensors(named: dict[str, torch.Tensor]) -> "TeacherTargets":
        return TeacherTargets(named["values"], named.get("indices"), named.get("tail"), named.get("label_logprobs"))

    def to(self, device: torch.device) -> "TeacherTargets":
        indices = None if self.indices is None else self.indices.to(device).long()
        tail = None if self.tail is None else self.tail.to(device)
        logprobs = None if self.label_logprobs is None else self.label_logprobs.to(device)
        return TeacherTargets(self.values.to(device), indices, tail, logprobs)

    def split(self, rows: list[int]) -> list["TeacherTargets"]:
        """Per-micro-batch targets of targets published for several micro-batches at once (rows concatenated)."""
        def parts(t):
            return torch.split(t, rows) if t is not None else [None] * len(rows)

        return [TeacherTargets(*p) for p in zip(parts(self.values), parts(self.indices), parts(self.tail),
                                                parts(self.label_logprobs))]

    @staticmethod
    def cat(parts: list["TeacherTargets"]) -> "TeacherTargets":
        def joined(name):
            first = getattr(parts[0], name)
            return None if first is None else torch.cat([getattr(p, name) for p in parts])

        return TeacherTargets(joined("values"), joined("indices"), joined("tail"), joined("label_logprobs"))


@dataclass(frozen=True)
class VocabShard:
    """This rank holds vocabulary columns ``[start, start + size)`` of logits sharded over ``group`` (TP)."""

    group: "dist.ProcessGroup"
    start: int
    size: int


@dataclass(frozen=True)
class LossConfig:
    """The fields of ``DistillConfig`` the loss reads."""

    distill_loss_weight: float
    kd_objective: str = "forward_kl"
    kd_temperature: float = 1.0
    teacher_temperature: float = 1.0
    skew_lambda: float = 0.1
    adaptive_kl_alpha: float = 0.5
    logits_topk: int = 0
    topk_tail: bool = True  # top-k: the k tokens + the teacher's tail (False: renormalise over the k)
    on_policy_loss: str = "kd"  # on student-sampled micro-batches: "kd" or "sampled_reverse_kl"
    opd_kl_coef: float = 1.0

    @classmethod
    def from_config(cls, config: "DistillConfig") -> "LossConfig":
        return cls(
            distill_loss_weight=config.distill_loss_weight,
            kd_objective=config.kd_objective,
            kd_temperature=config.kd_temperature,
            teacher_temperature=config.teacher_temperature,
            skew_lambda=config.skew_lambda,
            adaptive_kl_alpha=config.adaptive_kl_alpha,
            logits_topk=config.logits_topk,
            topk_tail=config.topk_tail,
            on_policy_loss=config.on_policy_loss,
            opd_kl_coef=config.opd_kl_coef,
        )

    def on_samples(self) -> "LossConfig":
        """The loss on sampled completions (the student's or, with seq_kd, the teacher's): the KD term alone at
        weight 1. Cross-entropy on a model's own samples would only reinforce them (GKD and TRL train these
        with the divergence only); ``ce_sum`` is still reported."""
        return dataclasses.replace(self, distill_loss_weight=1.0)


class LossTerms(NamedTuple):
    """``loss`` (with grad) is what backward runs on; ``ce_sum``/``kd_sum`` (float64, detached) are for metrics."""

    loss: torch.Tensor
    ce_sum: torch.Tensor
    kd_sum: torch.Tensor
    label_tokens: int


def distill_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: Optional[TeacherTargets],
    cfg: LossConfig,
    normalizer: float,
    shard: Optional[VocabShard] = None,
) -> LossTerms:
    """``(1 − w)·CE + w·KD`` of one micro-batch, both sums over its label tokens divided by ``normalizer``.

    Args:
        student_logits: [B, T, V] (or [B, T, V_local] with ``shard``) logits at every position; extra
            columns beyond the vocabulary must already be cut off (or be −inf).
        labels: [B, T] next-token ids, ``IGNORE_INDEX`` where nothing is learned.
        teacher: the teacher's targets at the label positions; None is allowed only when w = 0 (SFT).
        cfg: weight, objective and temperatures.
        normalizer: label tokens of the global batch (> 0).
        shard: the TP vocabulary shard these logits are (None: the whole vocabulary).

    Returns:
        ``LossTerms(loss, ce_sum, kd_sum, label_tokens)``; under TP the same values on every rank of the
        shard group, and backward gives each rank the gradient of its own slice.
    """
    mask = (labels != IGNORE_INDEX).to(student_logits.device)
    rows = student_logits[mask]  # [N_label, V(_local)]: the positions both terms are computed on
    targets = labels.to(student_logits.device)[mask]
    weight = cfg.distill_loss_weight
    with torch.set_grad_enabled(torch.is_grad_enabled() and weight < 1):  # pure KD: CE is a metric only
        ce_sum = _ce_sum(rows, targets, shard)
    loss = (1.0 - weight) * ce_sum / normalizer if weight < 1 else ce_sum.new_zeros(())
    kd_sum = torch.zeros((), dtype=torch.float64)
    if weight > 0:
        if teacher is None:
            raise ValueError("distill_loss_weight > 0 but no teacher targets were given for this micro-batch")
        if teacher.rows != rows.shape[0]:
            raise ValueError(f"teacher targets have {teacher.rows} rows, the micro-batch {rows.shape[0]} label tokens")
        kd_mean = _kd_mean(rows, teacher.to(rows.device), cfg, normalizer, shard)
        loss = loss + weight * kd_mean
        kd_sum = kd_mean.detach().double().cpu() * normalizer
    return LossTerms(loss, ce_sum.detach().double().cpu(), kd_sum, int(rows.shape[0]))


class _LossFn:
    """``loss_fn(logits, micro_batch, shard=None)``, and ``loss_fn.fused_head(hidden, weight, bias, labels,
    micro_batch)`` for a strategy that fuses the output layer into the loss (``fused_head_distill_loss``).

    A micro-batch of sampled completions (``MicroBatch.sampler``) gets the loss of samples: ``sampled_reverse_kl``
    (ROLL's on-policy distillation) on the student's own samples when the run asks for it, else the KD term alone
    (``LossConfig.on_samples``)."""

    def __init__(self, cfg: LossConfig, normalizer: float):
        self.cfg, self.normalizer = cfg, normalizer

    def _policy_gradient(self, micro_batch) -> bool:
        from .sampling import SAMPLER_STUDENT

        return micro_batch.sampler == SAMPLER_STUDENT and self.cfg.on_policy_loss == "sampled_reverse_kl"

    def _cfg(self, micro_batch) -> LossConfig:
        return self.cfg.on_samples() if micro_batch.sampler else self.cfg

    def __call__(self, logits: torch.Tensor, micro_batch, shard: Optional[VocabShard] = None) -> LossTerms:
        if self._policy_gradient(micro_batch):
            mask = (micro_batch.labels != IGNORE_INDEX).to(logits.device)
            return sampled_reverse_kl_loss(logits[mask], micro_batch.labels.to(logits.device)[mask], micro_batch,
                                           self.cfg.opd_kl_coef, self.normalizer, shard)
        return distill_loss(logits, micro_batch.labels, micro_batch.teacher, self._cfg(micro_batch), self.normalizer,
                            shard)

    def fused_head(self, hidden, weight, bias, labels, micro_batch, shard: Optional[VocabShard] = None,
                   vocab_size: Optional[int] = None) -> LossTerms:
        if self._policy_gradient(micro_batch):
            # Only the label rows: their logits are formed (no fused pass for this loss; rows are few per step).
            rows = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
            if shard is not None and vocab_size is not None:
                from .parallel_losses import mask_vocab_padding

                rows = mask_vocab_padding(rows.clone(), shard.start, vocab_size)
            return sampled_reverse_kl_loss(rows, labels.to(rows.device), micro_batch, self.cfg.opd_kl_coef,
                                           self.normalizer, shard)
        return fused_head_distill_loss(hidden, weight, bias, labels, micro_batch.teacher, self._cfg(micro_batch),
                                       self.normalizer, shard=shard, vocab_size=vocab_size)


def sampled_reverse_kl_loss(rows: torch.Tensor, tokens: torch.Tensor, micro_batch, coef: float, normalizer: float,
                            shard: Optional[VocabShard] = None) -> LossTerms:
    """ROLL's / tinker's on-policy distillation on the student's own samples, as an importance-weighted policy
    gradient with the per-token reverse KL as its advantage (discount 0):

        log q_t = log softmax(z_s)[a_t]      (the student now, T = 1; with gradient)
        A_t     = −coef · (log q_t − log p_t)                 (detached: p_t the teacher's, q_t without gradient)
        loss    = −Σ_t exp(log q_t − log b_t) · A_t / N       (b_t: the sampler's log-prob of a_t)

    With the student's own unfiltered samples the ratio is 1 and the gradient is coef · Σ (log q − log p) ∇log q
    / N, the score-function gradient of the sampled reverse KL (its pathwise part, E_q[∇log q], is 0); the ratio
    keeps it right for a sampler that is tempered or lags behind. ``kd_sum`` reports Σ (log q − log p), the
    sampled (k1) estimate of KL(q ‖ p); ``ce_sum`` Σ −log q.

    ``rows`` [N, V(_local)]: the student's logits at the sampled tokens' positions (under TP this rank's vocabulary
    slice); ``tokens`` [N] the sampled tokens; ``micro_batch.teacher.label_logprobs`` and
    ``micro_batch.behaviour_logprobs`` [N] in the same order.
    """
    teacher, behaviour = micro_batch.teacher, micro_batch.behaviour_logprobs
    if teacher is None or teacher.label_logprobs is None:
        raise ValueError("on_policy_loss sampled_reverse_kl needs the teacher's log-prob of each sampled token "
                         "(TeacherTargets.label_logprobs)")
    if behaviour is None:
        raise ValueError("a student-sampled micro-batch carries the sampler's log-probs (behaviour_logprobs)")
    if not teacher.rows == behaviour.shape[0] == rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} sampled tokens, {teacher.rows} teacher log-probs, {behaviour.shape[0]} "
                         "sampler log-probs")
    log_q = -_token_nll(rows, tokens, shard)
    log_p = teacher.label_logprobs.to(rows.device).float()
    estimate = log_q.detach() - log_p  # per-token sampled reverse KL
    advantage = -coef * estimate
    ratio = torch.exp(log_q - behaviour.to(rows.device).float())
    loss = -(ratio * advantage).sum() / normalizer
    return LossTerms(loss, (-log_q.detach()).double().sum().cpu(), estimate.double().sum().cpu(), int(rows.shape[0]))


def make_loss_fn(cfg: LossConfig, normalizer: float) -> Callable[..., LossTerms]:
    """``loss_fn(logits, micro_batch, shard=None)`` for ``TrainStrategy.forward_backward`` (see strategies.base)."""
    return _LossFn(cfg, normalizer)


# ------------------------------------------------------------------------------- fused output layer


def fused_head_distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    teacher: Optional[TeacherTargets],
    cfg: LossConfig,
    normalizer: float,
    chunk_rows: Optional[int] = None,
    *,
    shard: Optional[VocabShard] = None,
    vocab_size: Optional[int] = None,
) -> LossTerms:
    """``distill_loss`` of the logits ``hidden @ weightᵀ + bias`` without forming them (``fused_head``).

    Args:
        hidden: [N_label, d] the student's final hidden states at the label positions (row-major order).
        weight, bias: the output layer, [V, d] and [V] or None (rows beyond the tokenizer's vocabulary cut off).
            With ``shard``: this TP rank's rows ``[shard.start, shard.start + shard.size)`` of the (padded)
            output layer, the same ``hidden`` on every rank of ``shard.group``.
        labels: [N_label] the next-token ids at those positions.
        teacher, cfg, normalizer: as ``distill_loss`` (with ``shard``, the teacher's targets as the teacher rank of
            this TP index ships them: its vocabulary slice, or its shard's top-k candidates with global indices).
        chunk_rows: rows per chunk (None: from a scratch budget). Every rank of ``shard.group`` must use the
            same (the chunks' statistics are all-reduced chunk by chunk).
        shard: the TP vocabulary shard ``weight`` is (None: the whole vocabulary).
        vocab_size: with ``shard``, the tokenizer's vocabulary: columns at or beyond it are −inf (Megatron's
            padding rows).

    Returns the same ``LossTerms`` as ``distill_loss`` on the logits (under TP: as ``distill_loss`` on the
    vocabulary-sharded logits, the same on every rank); ``loss`` backpropagates into ``hidden``, ``weight`` and
    ``bias`` (under TP each rank's ``hidden`` gradient is its shard's part: the caller sums them over the group,
    as Megatron's column-parallel output layer does).
    """
    if cfg.distill_loss_weight > 0:
        if teacher is None:
            raise ValueError("distill_loss_weight > 0 but no teacher targets were given for this micro-batch")
        if teacher.rows != hidden.shape[0]:
            raise ValueError(f"teacher targets have {teacher.rows} rows, the micro-batch {hidden.shape[0]} label tokens")
        teacher = teacher.to(hidden.device)
    if shard is None:
        chunk_fn = head_chunk_loss(labels.to(hidden.device), teacher, cfg, normalizer)
    else:
        if vocab_size is None:
            raise ValueError("a vocabulary-sharded fused head needs vocab_size (the padded columns are masked)")
        chunk_fn = vocab_parallel_head_chunk_loss(labels.to(hidden.device), teacher, cfg, normalizer, shard, vocab_size)
    loss, (ce_sum, kd_sum) = fused_linear_loss(hidden, weight, bias, chunk_fn, 2, chunk_rows)
    return LossTerms(loss, ce_sum.detach().cpu(), kd_sum.detach().cpu(), int(hidden.shape[0]))


def head_chunk_loss(labels: torch.Tensor, teacher: Optional[TeacherTargets], cfg: LossConfig, normalizer: float) -> ChunkFn:
    """The math of one chunk of the fused head: ``(1 − w)·CE + w·KD`` of its rows divided by ``normalizer``, the
    metrics (ce_sum, kd_sum), and the gradient w.r.t. the chunk's float32 logits ``z`` [n, V]:

        ∂/∂z = (1 − w)/N · (softmax(z) − onehot(label))  +  w/N · ∂KD/∂z   (the closed forms of ``losses``)

    Top-k targets without the tail and w = 1: ∂KD/∂z is nonzero only at the teacher's k indices and is returned
    sparse ([n, k]); the chunk's full logits still give the CE figure the run reports.
    """
    w = cfg.distill_loss_weight
    objective = _check_objective(cfg.kd_objective, cfg.skew_lambda, cfg.adaptive_kl_alpha)
    temperatures = (cfg.kd_temperature, cfg.teacher_temperature)
    tail = _tail_of(teacher, cfg) if teacher is not None and w > 0 else None
    kd_scale = w / normalizer

    def chunk(z: torch.Tensor, rows: slice, need_grad: bool) -> ChunkLoss:
        label = labels[rows]
        lse = torch.logsumexp(z, 1)
        ce_sum = (lse - z.gather(1, label[:, None]).squeeze(1)).sum(dtype=torch.float64)
        loss = (1.0 - w) * ce_sum / normalizer if w < 1 else torch.zeros_like(ce_sum)
        kd_sum = torch.zeros_like(ce_sum)
        grad = sparse = None
        if w > 0:
            values = teacher.values[rows]
            if teacher.indices is None:  # full vocabulary
                grad = torch.empty_like(z) if need_grad else None
                kd_sum = fused_loss_and_grad(z, values, None, objective, *temperatures, None, grad, kd_scale, VocabReduce())
            else:
                index = teacher.indices[rows]
                scores = z.gather(1, index)
                if tail is not None:  # k + 1 outcomes: the gradient reaches every column
                    grad = torch.empty_like(z) if need_grad else None
                    kd_sum = fused_tail_loss_and_grad(
                        z, scores, index, None, values, tail[rows], None, objective, *temperatures, None, grad,
                        kd_scale, VocabReduce(),
                    )
                else:  # renormalised over the k: the gradient lives at the k indices only
                    grad_k = torch.empty_like(scores) if need_grad else None
                    kd_sum = fused_loss_and_grad(
                        scores, values, None, objective, *temperatures, None, grad_k, kd_scale, VocabReduce()
                    )
                    sparse = None if grad_k is None else (index, grad_k)
            loss = loss + w * kd_sum / normalizer
        if need_grad and w < 1:  # CE: softmax(z) − onehot(label), in z's buffer (the KD is done with z)
            rows = torch.arange(z.shape[0], device=z.device)
            grad, sparse = _add_ce_grad(z, lse, rows, label, (1.0 - w) / normalizer, grad, sparse)
        return ChunkLoss(loss, torch.stack([ce_sum, kd_sum.to(ce_sum.dtype)]), grad, sparse)

    return chunk


def vocab_parallel_head_chunk_loss(
    labels: torch.Tensor,
    teacher: Optional[TeacherTargets],
    cfg: LossConfig,
    normalizer: float,
    shard: VocabShard,
    vocab_size: int,
) -> ChunkFn:
    """``head_chunk_loss`` with the chunk's logits ``z`` [n, V_local] this TP rank's vocabulary slice (Megatron's
    column-parallel output layer): the statistics ``distill_loss`` all-reduces on sharded logits are all-reduced
    here chunk by chunk, over ``shard.group``:

        CE   the row max and Σexp over the shards, the label's logit from the rank that owns it
             (``_VocabParallelNll``); ∂/∂z = softmax(z) − onehot(label) on this rank's columns
        KD   full vocabulary: ``fused_loss_and_grad`` with ``ShardedVocab`` (``vocab_parallel_kd_loss``);
             top-k: the global top-k of every rank's candidates (``merge_topk``, once for all rows), the student's
             logits there gathered from their owners, and with the tail ``fused_tail_loss_and_grad`` with
             ``ShardedVocab``; without it the [n, k] loss on every rank, its gradient kept where this rank owns
             the column (sparse)

    Columns at or beyond ``vocab_size`` are −inf before anything is computed (``mask_vocab_padding``), as in
    ``MegatronTrainStrategy``'s logits view. Every rank of the group must call the chunks in the same order.
    """
    from .parallel_losses import ShardedVocab, _student_at, mask_vocab_padding, merge_topk

    w = cfg.distill_loss_weight
    objective = _check_objective(cfg.kd_objective, cfg.skew_lambda, cfg.adaptive_kl_alpha)
    temperatures = (cfg.kd_temperature, cfg.teacher_temperature)
    kd_scale = w / normalizer
    vocab = ShardedVocab(shard.group)
    top = tail = None
    if w > 0 and teacher.indices is not None:
        # This TP index's candidates -> the exact global top-k, as distill_loss does (same on every rank).
        k = min(cfg.logits_topk or teacher.values.shape[1], teacher.values.shape[1] * dist.get_world_size(shard.group))
        top = merge_topk(TopK(teacher.values, teacher.indices.long()), k, shard.group)
        tail = _tail_of(teacher, cfg)
    local_label = labels - shard.start
    owns_label = (local_label >= 0) & (local_label < shard.size)
    local_label = local_label.clamp(0, shard.size - 1)

    def chunk(z: torch.Tensor, rows: slice, need_grad: bool) -> ChunkLoss:
        mask_vocab_padding(z, shard.start, vocab_size)
        n = z.shape[0]
        label, owned = local_label[rows], owns_label[rows]
        row_max = vocab.max(z.amax(1))
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        sum_exp = torch.exp(z - row_max[:, None]).sum(1)
        picked = torch.where(owned, z.gather(1, label[:, None]).squeeze(1), torch.zeros_like(sum_exp))
        both = vocab.sum(torch.stack([sum_exp, picked], 1))
        lse = both[:, 0].log() + row_max
        ce_sum = (lse - both[:, 1]).sum(dtype=torch.float64)
        loss = (1.0 - w) * ce_sum / normalizer if w < 1 else torch.zeros_like(ce_sum)
        kd_sum = torch.zeros_like(ce_sum)
        grad = sparse = None
        if w > 0:
            if top is None:  # full vocabulary: the teacher rank's slice, the same columns as z's
                grad = torch.empty_like(z) if need_grad else None
                kd_sum = fused_loss_and_grad(z, teacher.values[rows], None, objective, *temperatures, None, grad,
                                             kd_scale, vocab)
            else:
                index, mine, scores = _student_at(z, top.indices[rows], shard.start, shard.group)
                if tail is not None:  # k + 1 outcomes: the gradient reaches every column
                    grad = torch.empty_like(z) if need_grad else None
                    kd_sum = fused_tail_loss_and_grad(
                        z, scores, index, mine, top.values[rows], tail[rows], None, objective, *temperatures, None,
                        grad, kd_scale, vocab,
                    )
                else:  # renormalised over the k: every rank evaluates the [n, k] loss, keeps its own columns
                    grad_k = torch.empty_like(scores) if need_grad else None
                    kd_sum = fused_loss_and_grad(
                        scores, top.values[rows], None, objective, *temperatures, None, grad_k, kd_scale, VocabReduce()
                    )
                    if grad_k is not None:
                        sparse = (index, grad_k.masked_fill_(~mine, 0.0))
            loss = loss + w * kd_sum / normalizer
        if need_grad and w < 1:  # CE: softmax(z) − onehot(label) on this rank's columns, in z's buffer
            rows = torch.arange(n, device=z.device)[owned]
            grad, sparse = _add_ce_grad(z, lse, rows, label[owned], (1.0 - w) / normalizer, grad, sparse)
        return ChunkLoss(loss, torch.stack([ce_sum, kd_sum.to(ce_sum.dtype)]), grad, sparse)

    return chunk


# ----------------------------------------------------------------------------------------------- CE


def _ce_sum(rows: torch.Tensor, targets: torch.Tensor, shard: Optional[VocabShard]) -> torch.Tensor:
    if shard is None:
        return F.cross_entropy(rows.float(), targets, reduction="sum")
    return _VocabParallelNll.apply(rows, targets, shard.start, shard.group).sum()


def _token_nll(rows: torch.Tensor, targets: torch.Tensor, shard: Optional[VocabShard]) -> torch.Tensor:
    """[N] −log softmax(z)[target] of each row (z sharded over the vocabulary with ``shard``), with gradient."""
    if shard is None:
        return F.cross_entropy(rows.float(), targets, reduction="none")
    return _VocabParallelNll.apply(rows, targets, shard.start, shard.group)


def vocab_parallel_label_logprobs(rows: torch.Tensor, targets: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
    """[N] log softmax(z)[target] with z [N, V_local] sharded over ``group`` (no gradient); the same on every rank."""
    with torch.no_grad():
        return -_VocabParallelNll.apply(rows, targets, vocab_start, group)


class _VocabParallelNll(torch.autograd.Function):
    """−log softmax(z)[label] of each row, z sharded over the vocabulary: lse = max + log Σexp(z − max), both
    all-reduced over the group; the label's logit comes from the rank that owns it (one all-reduce)."""

    @staticmethod
    def forward(ctx, rows, targets, vocab_start, group):
        x = rows.float()
        local_max = x.amax(1) if x.shape[1] else torch.full((x.shape[0],), -torch.inf, device=x.device)
        row_max = local_max.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        exp = torch.exp(x - row_max[:, None])
        sum_exp = exp.sum(1)
        local = targets - vocab_start
        owned = (local >= 0) & (local < x.shape[1])
        local = local.clamp(0, max(x.shape[1] - 1, 0))
        picked = torch.where(owned, x.gather(1, local[:, None]).squeeze(1), torch.zeros_like(sum_exp))
        both = torch.stack([sum_exp, picked], 1)
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        sum_exp, picked = both[:, 0], both[:, 1]
        softmax = exp.div_(sum_exp[:, None])
        ctx.save_for_backward(softmax, local, owned)
        ctx.rows_dtype = rows.dtype
        return sum_exp.log() + row_max - picked

    @staticmethod
    def backward(ctx, grad_output):
        softmax, local, owned = ctx.saved_tensors
        grad = softmax  # d/dz = softmax − onehot(label) on the owning rank
        grad[torch.arange(grad.shape[0], device=grad.device)[owned], local[owned]] -= 1.0
        return (grad * grad_output[:, None]).to(ctx.rows_dtype), None, None, None


# ----------------------------------------------------------------------------------------------- KD


def _kd_mean(rows, teacher: TeacherTargets, cfg: LossConfig, normalizer: float, shard) -> torch.Tensor:
    options = dict(
        objective=cfg.kd_objective,
        kd_temperature=cfg.kd_temperature,
        teacher_temperature=cfg.teacher_temperature,
        skew_lambda=cfg.skew_lambda,
        adaptive_kl_alpha=cfg.adaptive_kl_alpha,
        normalizer=float(normalizer),
    )
    tail = _tail_of(teacher, cfg)
    if shard is None:
        target = teacher.values if teacher.indices is None else TopK(teacher.values, teacher.indices, tail)
        return kd_loss(rows, target, **options)
    from .parallel_losses import merge_topk, vocab_parallel_kd_loss

    if teacher.indices is None:  # the teacher rank's vocabulary slice, the same columns as ours
        return vocab_parallel_kd_loss(rows, teacher.values, group=shard.group, vocab_start=shard.start, **options)
    # This TP index's candidates -> the exact global top-k (the same on every rank of the group).
    k = min(cfg.logits_topk or teacher.values.shape[1], teacher.values.shape[1] * dist.get_world_size(shard.group))
    top = merge_topk(TopK(teacher.values, teacher.indices), k, shard.group)
    top = TopK(top.values, top.indices, tail)  # the teacher's tail is of this same global top-k
    return vocab_parallel_kd_loss(rows, top, group=shard.group, vocab_start=shard.start, **options)


def _tail_of(teacher: TeacherTargets, cfg: LossConfig) -> Optional[torch.Tensor]:
    """The teacher's log tail mass when the run uses the tail bucket (top-k with ``topk_tail``), else None."""
    if teacher.indices is None or not cfg.topk_tail:
        return None
    if teacher.tail is None:
        raise ValueError("topk_tail is on but the teacher's targets carry no tail mass (TeacherTargets.tail)")
    return teacher.tail


def _add_ce_grad(z: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, scale: float,
                 grad: Optional[torch.Tensor], sparse):
    """CE's gradient, (softmax(z) − onehot) × ``scale``, computed in z's buffer (the KD is done with z) and added
    to ``grad`` (or becoming it); the one-hot is at (``rows``, ``columns``). A sparse top-k gradient is folded into
    the dense one, which exists anyway. Returns (grad, sparse)."""
    ce_grad = z.sub_(lse[:, None]).exp_()
    ce_grad[rows, columns] -= 1.0
    if grad is None:
        grad = ce_grad.mul_(scale)
    else:
        grad.add_(ce_grad, alpha=scale)
    if sparse is not None:
        grad.scatter_add_(1, *sparse)
    return grad, None
