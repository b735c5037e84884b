"""The distillation losses of ``losses.py`` with the vocabulary sharded across tensor-parallel ranks.

Each rank holds logits for its contiguous slice ``[vocab_start, vocab_start + V_local)`` of the
vocabulary, for the same tokens. The process group is passed in; nothing is read from globals.

Full vocabulary: the same fused chunk loop as ``kd_loss`` runs on the local shard; every statistic
that sums or maxes over the vocabulary (softmax max and normaliser, the per-token divergence, Σh of
the gradient, the adaptive_kl gaps and its tail threshold) is all-reduced over ``group``. Each rank
thus gets the full per-token loss and the exact gradient for its own slice of the student logits,
computed analytically in the forward pass (no autograd-through-collectives needed).

Top-k: each rank takes the top-k of its teacher shard, the (value, global index) candidates are
all-gathered, and the global top-k is selected from them. The k student logits at those indices are
then assembled on every rank (each rank fills in the entries it owns; one all-reduce of [N, k]),
so every rank evaluates the same small [N, k] loss; the [N, k] gradient is scattered back into the
entries this rank owns. Gathering k logits is cheaper and simpler than reducing partial statistics
over the k set, and the gradient then needs no collective at all.

The result equals ``kd_loss`` on the unsharded logits, in value and gradient (the loss is replicated
on every rank; each rank's gradient is w.r.t. its own shard).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from distill_trainer.losses import (
    VocabReduce,
    _check_chunk_size,
    _check_objective,
    _check_temperatures,
    _denominator,
    _grad_scale,
    _masked_rows,
    attach_gradient,
    fused_loss_and_grad,
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
    teacher_logits: torch.Tensor,
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
    chunk_size: Optional[int] = None,
    normalizer: Optional[Union[float, torch.Tensor]] = None,
) -> torch.Tensor:
    """``kd_loss`` for vocabulary-sharded logits (see the module docstring and ``losses.kd_loss``).

    Args:
        student_logits: [N, V_local] (or [B, T, V_local]) this rank's slice of the student logits.
        teacher_logits: the teacher's logits over the same slice, same shape.
        group: the tensor-parallel process group the vocabulary is sharded over.
        vocab_start: global vocabulary index of this rank's first column; the slices of the ranks
            must tile [0, V) without gaps or overlaps.
        topk: 0 = full vocabulary; k > 0 = keep the teacher's global top-k (each shard must have at
            least k columns).
        Other arguments are as in ``kd_loss``.

    Returns:
        the same float32 scalar on every rank; backward gives each rank the gradient for its shard.
    """
    objective_ = _check_objective(objective, skew_lambda, adaptive_kl_alpha)
    _check_temperatures(kd_temperature, teacher_temperature)
    chunk_size = _check_chunk_size(chunk_size)
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 0:
        raise ValueError(f"topk must be a non-negative int, got {topk!r}")
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
    with torch.no_grad():
        student = student.detach()
        teacher = teacher.detach()
        if topk:
            teacher, index, owned, scores = _global_topk(student, teacher, topk, vocab_start, group)
            vocab = VocabReduce()  # every rank evaluates the whole [N, k] set
        else:
            index = owned = None
            scores, vocab = student, ShardedVocab(group)
        grad = None
        if need_grad and (rows is None or rows.numel() > 0):
            dtype = student.dtype if index is None else torch.float32
            grad = torch.empty_like(scores, dtype=dtype) if rows is None else torch.zeros_like(scores, dtype=dtype)
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
    values, local_index = torch.topk(teacher, k, dim=1)
    candidates_v = _all_gather_cat(values, group)
    candidates_i = _all_gather_cat(local_index + vocab_start, group)
    top_v, pick = torch.topk(candidates_v, k, dim=1)
    global_index = candidates_i.gather(1, pick)

    local = global_index - vocab_start
    owned = (local >= 0) & (local < student.shape[1])
    local = local.clamp(0, student.shape[1] - 1)
    scores = torch.where(owned, student.gather(1, local), torch.zeros((), dtype=student.dtype, device=student.device))
    scores = scores.float()
    dist.all_reduce(scores, op=dist.ReduceOp.SUM, group=group)  # exactly one rank owns each entry
    return top_v, local, owned, scores


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
