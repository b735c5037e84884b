"""The distillation losses of ``losses.py`` with the vocabulary sharded across tensor-parallel ranks.

Each rank holds logits for its contiguous slice ``[vocab_start, vocab_start + V_local)`` of the
vocabulary, for the same tokens. The process group is passed in; nothing is read from globals.

Full vocabulary: the same fused chunk loop as ``kd_loss`` runs on the local shard; every statistic
that sums or maxes over the vocabulary (softmax max and normaliser, the per-token divergence, Σh of
the gradient, the adaptive_kl gaps and its tail threshold) is all-reduced over ``group``. Each rank
thus gets the full per-token loss and the exact gradient for its own slice of the student logits,
computed analytically in the forward pass (no autograd-through-collectives needed).

Top-k: each rank takes the top-k of its teacher shard, the (value, global index) candidates are
all-gathered, and the global top-k is selected from them (``vocab_parallel_topk``: the teacher's TP
ranks do this and ship only the [N, k] result; ``vocab_parallel_kd_loss`` then takes it as a ``TopK``
with global indices, and the student never sees the teacher's shard). The k student logits at those indices are
then assembled on every rank (each rank fills in the entries it owns; one all-reduce of [N, k]),
so every rank evaluates the same small [N, k] loss; the [N, k] gradient is scattered back into the
entries this rank owns. Gathering k logits is cheaper and simpler than reducing partial statistics
over the k set, and the gradient then needs no collective at all.

Top-k with the teacher's tail (``TopK.tail_logmass``, see ``losses``): the teacher's TP ranks compute
log P_tail from all-reduced log-sum-exps over their shards (``vocab_parallel_tail_logmass``, at the
loss's temperature T·τ). The student's tail outcome logsumexp_{i∉K}(z_s,i/T) is one all-reduced
max and Σexp over the shards with K masked out; the k+1-outcome loss is then the same on every rank,
and each rank's gradient covers its own columns: the K entries it owns, and the tail's share of the
others (no further collective).

The result equals ``kd_loss`` on the unsharded logits, in value and gradient (the loss is replicated
on every rank; each rank's gradient is w.r.t. its own shard).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from distill_trainer.losses import (
    TopK,
    VocabReduce,
    _check_chunk_size,
    _check_objective,
    _check_temperatures,
    _denominator,
    _grad_scale,
    _flatten_tail,
    _masked_rows,
    attach_gradient,
    fused_loss_and_grad,
    fused_tail_loss_and_grad,
    grad_buffer,
    tail_logmass,
)


class ShardedVocab(VocabReduce):
    """Row statistics all-reduced across the ranks that each hold a slice of the vocabulary."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)  # [n] or [n, c]: never the caller's tensor
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def max(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    @property
    def is_local(self) -> bool:
        return False


def vocab_parallel_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: Union[torch.Tensor, TopK],
    *,
    group: dist.ProcessGroup,
    vocab_start: int,
    mask: Optional[torch.Tensor] = None,
    objective: str = "forward_kl",
    kd_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    skew_lambda: float = 0.1,
    adaptive_kl_alpha: float = 0.5,
    topk: int = 0,
    topk_tail: bool = False,
    chunk_size: Optional[int] = None,
    normalizer: Optional[Union[float, torch.Tensor]] = None,
) -> torch.Tensor:
    """``kd_loss`` for vocabulary-sharded logits (see the module docstring and ``losses.kd_loss``).

    Args:
        student_logits: [N, V_local] (or [B, T, V_local]) this rank's slice of the student logits.
        teacher_logits: the teacher's logits over the same slice, same shape; or the teacher's global
            top-k as ``TopK(values=[N, k], indices=[N, k])`` with *global* vocabulary indices, the same
            on every rank (what ``vocab_parallel_topk`` gives the teacher's TP ranks): the student's
            logits are gathered there and the loss is the top-k loss of ``kd_loss`` (with the tail
            bucket when its ``tail_logmass`` is set).
        group: the tensor-parallel process group the vocabulary is sharded over.
        vocab_start: global vocabulary index of this rank's first column; the slices of the ranks
            must tile [0, V) without gaps or overlaps.
        topk: 0 = full vocabulary; k > 0 = keep the teacher's global top-k of ``teacher_logits`` (each
            shard must have at least k columns). Must be 0 when ``teacher_logits`` is a ``TopK``.
        topk_tail: with ``topk`` > 0, add the tail bucket (the teacher's mass outside its global top-k,
            from the all-reduced log-sum-exp of ``teacher_logits``).
        Other arguments are as in ``kd_loss``.

    Returns:
        the same float32 scalar on every rank; backward gives each rank the gradient for its shard.
    """
    objective_ = _check_objective(objective, skew_lambda, adaptive_kl_alpha)
    _check_temperatures(kd_temperature, teacher_temperature)
    chunk_size = _check_chunk_size(chunk_size)
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 0:
        raise ValueError(f"topk must be a non-negative int, got {topk!r}")
    shipped = teacher_logits if isinstance(teacher_logits, TopK) else None
    if shipped is not None:
        if topk:
            raise ValueError("topk must be 0 when the teacher's top-k is given (TopK)")
        teacher_logits = _check_topk_targets(shipped, student_logits)
    student, teacher, mask = _flatten_shard(student_logits, teacher_logits, mask)
    local_vocab = student.shape[1]
    vocab_size, smallest_shard = _check_shards(local_vocab, vocab_start, group, student.device)
    if topk > vocab_size:
        raise ValueError(f"topk={topk} is larger than the vocabulary size V={vocab_size}")
    if topk > smallest_shard:
        raise ValueError(f"topk={topk} is larger than the smallest vocabulary shard ({smallest_shard} columns)")

    rows = _masked_rows(mask)
    denominator = _denominator(normalizer, rows, student.shape[0])
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    tail = None
    if shipped is not None:
        tail = _flatten_tail(shipped, student.shape[0])
    elif topk and topk_tail:
        top = vocab_parallel_topk(
            teacher.detach(), topk, vocab_start=vocab_start, group=group,
            tail_temperature=kd_temperature * teacher_temperature,
        )
        shipped, tail = top, top.tail_logmass
    if tail is not None:
        with torch.no_grad():
            student = student.detach()
            values = shipped.values.reshape(-1, shipped.values.shape[-1]).detach()
            index, owned, scores = _student_at(student, shipped.indices.reshape(values.shape).long(), vocab_start, group)
            grad = grad_buffer(student, need_grad, rows)
            total = fused_tail_loss_and_grad(
                student, scores, index, owned, values, tail, rows, objective_, kd_temperature,
                teacher_temperature, chunk_size, grad, _grad_scale(denominator), ShardedVocab(group),
            )
            loss = (total / denominator).to(torch.float32)
        return loss if not need_grad else attach_gradient(student_logits, loss, grad)
    with torch.no_grad():
        student = student.detach()
        teacher = teacher.detach()
        if shipped is not None:
            teacher = shipped.values.reshape(-1, shipped.values.shape[-1]).detach()
            global_index = shipped.indices.reshape(teacher.shape).long()
            index, owned, scores = _student_at(student, global_index, vocab_start, group)
            vocab = VocabReduce()  # every rank evaluates the whole [N, k] set
        elif topk:
            teacher, index, owned, scores = _global_topk(student, teacher, topk, vocab_start, group)
            vocab = VocabReduce()  # every rank evaluates the whole [N, k] set
        else:
            index = owned = None
            scores, vocab = student, ShardedVocab(group)
        grad = grad_buffer(scores, need_grad, rows, student.dtype if index is None else torch.float32)
        total = fused_loss_and_grad(
            scores,
            teacher,
            rows,
            objective_,
            kd_temperature,
            teacher_temperature,
            chunk_size,
            grad,
            _grad_scale(denominator),
            vocab,
        )
        loss = (total / denominator).to(torch.float32)
        if grad is not None and owned is not None:
            grad.masked_fill_(~owned, 0.0)  # only the entries this rank owns flow back here
    if not need_grad:
        return loss
    return attach_gradient(student_logits, loss, grad, index)


def _global_topk(student, teacher, k, vocab_start, group):
    """The teacher's global top-k over the sharded vocabulary, and the student logits there.

    Returns (teacher values [N, k], local column index [N, k] clamped into this shard, owned [N, k]
    bool: whether this rank holds that column, student logits [N, k] assembled from all ranks).
    """
    top = vocab_parallel_topk(teacher, k, vocab_start=vocab_start, group=group)
    local, owned, scores = _student_at(student, top.indices, vocab_start, group)
    return top.values, local, owned, scores


def shard_topk(teacher_shard: torch.Tensor, k: int, vocab_start: int) -> TopK:
    """The top-k candidates of one vocabulary shard, with *global* vocabulary indices (teacher side).

    A shard narrower than k contributes all its columns. Padded columns must already be −inf
    (``mask_vocab_padding``) so that they can never be chosen over a real token.
    """
    with torch.no_grad():
        values, local = torch.topk(teacher_shard.detach(), min(k, teacher_shard.shape[-1]), dim=-1)
    return TopK(values=values, indices=local + vocab_start)


def merge_topk(candidates: TopK, k: int, group: dist.ProcessGroup) -> TopK:
    """The global top-k from every shard's candidates (all-gathered over ``group``; exact, because each
    of the global top-k is among the top-k of the shard that holds it). Same result on every rank."""
    values = _all_gather_cat(candidates.values, group)
    indices = _all_gather_cat(candidates.indices, group)
    top_v, pick = torch.topk(values, k, dim=-1)
    return TopK(values=top_v, indices=indices.gather(-1, pick))


def vocab_parallel_topk(
    teacher_shard: torch.Tensor,
    k: int,
    *,
    vocab_start: int,
    group: dist.ProcessGroup,
    tail_temperature: Optional[float] = None,
) -> TopK:
    """``topk_teacher_logits`` of vocabulary-sharded logits: per-shard top-k with global indices, then the
    global top-k of the k·tp candidates. Every rank of ``group`` gets the same [N, k] values and global
    indices; this is all the teacher needs to ship (not its shard). ``tail_temperature`` (T·τ): also the
    log of the mass softmax(z / tail_temperature) puts outside that global top-k (``vocab_parallel_tail_logmass``)."""
    top = merge_topk(shard_topk(teacher_shard, k, vocab_start), k, group)
    if tail_temperature is None:
        return top
    tail = vocab_parallel_tail_logmass(teacher_shard, top.indices, vocab_start=vocab_start, group=group,
                                       temperature=tail_temperature)
    return TopK(top.values, top.indices, tail)


def vocab_parallel_tail_logmass(
    teacher_shard: torch.Tensor, indices: torch.Tensor, *, vocab_start: int, group: dist.ProcessGroup, temperature: float
) -> torch.Tensor:
    """[N] float32 log Σ_{i ∉ indices} softmax(z / temperature)_i of vocabulary-sharded logits ``teacher_shard``
    [N, V_local]; ``indices`` [N, k] are *global* (the global top-k, the same on every rank). The log-sum-exps
    over all columns and over those outside ``indices`` are all-reduced (max, then Σexp) over ``group``;
    the same result on every rank (``losses.tail_logmass`` unsharded)."""
    local = indices.long() - vocab_start
    owned = (local >= 0) & (local < teacher_shard.shape[-1])
    local = local.clamp(0, max(teacher_shard.shape[-1] - 1, 0))
    return tail_logmass(teacher_shard, local, temperature, vocab=ShardedVocab(group), owned=owned)


def mask_vocab_padding(logits_shard: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """Columns whose global index is ≥ ``vocab_size`` (the tokenizer's) set to −inf, in place.

    Megatron pads the vocabulary so that it splits evenly over TP ranks; padded columns have logit 0,
    which would beat every negative logit in a top-k and take probability mass in a softmax.
    """
    first_padded = max(0, vocab_size - vocab_start)
    if first_padded < logits_shard.shape[-1]:
        logits_shard[..., first_padded:] = -float("inf")
    return logits_shard


def gather_sharded_columns(
    student_shard: torch.Tensor, index: torch.Tensor, *, vocab_start: int, group: dist.ProcessGroup
) -> torch.Tensor:
    """[N, k] float32 student logits at global vocabulary ``index`` from vocabulary-sharded rows
    [N, V_local]; the same on every rank (each entry comes from the rank that owns it, one all-reduce).
    Differentiable: backward puts the [N, k] gradient into the columns this rank owns (no collective)."""
    return _GatherShardedColumns.apply(student_shard, index, vocab_start, group)


class _GatherShardedColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, index, vocab_start, group):
        local, owned, scores = _student_at(rows.detach(), index, vocab_start, group)
        ctx.save_for_backward(local, owned)
        ctx.shape, ctx.dtype = rows.shape, rows.dtype
        return scores

    @staticmethod
    def backward(ctx, grad_scores):
        local, owned = ctx.saved_tensors
        grad = torch.zeros(ctx.shape, dtype=torch.float32, device=grad_scores.device)
        grad.scatter_add_(1, local, grad_scores.float() * owned)
        return grad.to(ctx.dtype), None, None, None


def _student_at(student, global_index, vocab_start, group):
    """(local index clamped into this shard, owned mask, float32 logits at global_index from all ranks)."""
    local = global_index - vocab_start
    owned = (local >= 0) & (local < student.shape[1])
    local = local.clamp(0, student.shape[1] - 1)
    scores = torch.where(owned, student.gather(1, local), torch.zeros((), dtype=student.dtype, device=student.device))
    scores = scores.float()
    dist.all_reduce(scores, op=dist.ReduceOp.SUM, group=group)  # exactly one rank owns each entry
    return local, owned, scores


def _all_gather_cat(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _check_shards(local_vocab: int, vocab_start: int, group, device) -> tuple[int, int]:
    """(global V, smallest shard width); raises unless the ranks' slices tile [0, V)."""
    if not isinstance(vocab_start, int) or isinstance(vocab_start, bool) or vocab_start < 0:
        raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
    mine = torch.tensor([[vocab_start, local_vocab]], dtype=torch.int64, device=device)
    every = _all_gather_cat(mine.T, group).T.tolist()  # [world, 2], identical on every rank
    every.sort()
    expected = 0
    for start, width in every:
        if start != expected:
            raise ValueError(f"vocab_start: the ranks' vocabulary slices {every} do not tile [0, V)")
        expected = start + width
    return expected, min(width for _, width in every)


def _check_topk_targets(top: TopK, student_logits: torch.Tensor) -> torch.Tensor:
    """Validate shipped top-k targets; returns a stand-in of the student's shape for _flatten_shard."""
    lead = student_logits.shape[:-1]
    if top.values.shape != top.indices.shape or top.values.shape[:-1] != lead:
        raise ValueError(
            f"TopK values {tuple(top.values.shape)} and indices {tuple(top.indices.shape)} must both be "
            f"{tuple(lead)} + (k,) to match student_logits"
        )
    if top.indices.dtype not in (torch.int32, torch.int64):
        raise ValueError("TopK indices must be int32/int64 global vocabulary indices")
    return student_logits.detach()  # shape and dtype only


def _flatten_shard(student_logits, teacher_logits, mask):
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point():
        raise ValueError("student_logits must be a floating-point tensor")
    if student_logits.dim() not in (2, 3):
        raise ValueError(f"student_logits must be [N, V_local] or [B, T, V_local], got {tuple(student_logits.shape)}")
    if not isinstance(teacher_logits, torch.Tensor) or not teacher_logits.is_floating_point():
        raise ValueError("teacher_logits must be a floating-point tensor")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} must equal student_logits shape "
            f"{tuple(student_logits.shape)}"
        )
    lead = student_logits.shape[:-1]
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex():
            raise ValueError("mask must be a bool (or integer 0/1) tensor")
        if mask.shape != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} must be {tuple(lead)} to match student_logits")
        mask = mask.reshape(-1).to(torch.bool)
    width = student_logits.shape[-1]
    return student_logits.reshape(-1, width), teacher_logits.reshape(-1, width), mask
