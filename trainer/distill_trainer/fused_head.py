"""The chunking engine of a fused output layer + loss: ``loss(hidden @ Wᵀ + b)`` without the ``[N, V]`` logits.

For hidden states ``H`` [N, d] and an output layer ``W`` [V, d] (bias ``b`` [V] or None), the rows are taken
``chunk_rows`` at a time. Per chunk:

    z      = H_c Wᵀ + b                      [n, V] float32 logits of the chunk
    loss_c, G_c = chunk_fn(z, rows)          the chunk's share of the loss and ∂loss/∂z (closed form)
    ∂H_c   = G_c W                           written into the [N, d] gradient of H
    ∂W    += G_cᵀ H_c,  ∂b += Σ_rows G_c     accumulated in float32 over the chunks

and ``z``, ``G_c`` are discarded, so the extra memory is O(chunk × V) plus the gradients of H and W that
autograd needs anyway. The gradients are computed in the forward pass; backward only scales them by the
incoming grad_output (Liger-Kernel's ``fused_linear_*`` split: this module owns the loop, the gradient
accumulation and the backward scaling; the math of a chunk is a plain function passed in, here
``distill_loss.head_chunk_loss``, or ``distill_loss.vocab_parallel_head_chunk_loss`` when ``W`` is one TP rank's
vocabulary shard). With fp16 weights the gradients are kept (and ``∂H`` computed) in float32 until backward has
multiplied them by grad_output: a mixed-precision loss scale (Megatron's 2^16 and up) arrives there, and
unscaled fp16 gradients would underflow.

A chunk function may also return its gradient *sparse*, only at ``index`` [n, k] columns (top-k distillation
without a CE term or tail): then ``∂H_c = Σ_j g_j W[index_j]`` and ``∂W[index] += g ⊗ H_c``, the ``[n, V]``
gradient is never formed, and the backward matmuls cost O(n·k·d) instead of O(n·V·d).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .losses import CHUNK_BUDGET_BYTES


class ChunkLoss(NamedTuple):
    """What a chunk function returns for rows ``rows`` of the batch."""

    loss: torch.Tensor  # float64 0-dim: the chunk's contribution to the loss
    metrics: torch.Tensor  # float64 [m]: sums reported beside the loss (never differentiated)
    grad: Optional[torch.Tensor] = None  # [n, V] float32 ∂loss/∂z, or None (no dense gradient)
    sparse: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (index [n, k], ∂loss/∂z there [n, k] float32)


# chunk_fn(z [n, V] float32 (may be overwritten), rows: slice of the batch, need_grad) -> ChunkLoss
ChunkFn = Callable[[torch.Tensor, slice, bool], ChunkLoss]


# On CPU a chunk's float32 logits should stay in one core's L2 cache (2 MiB per core here) while the loss makes
# its passes over them; but every chunk re-reads W for its three matmuls, so a chunk keeps at least 64 rows,
# enough to keep those matmuls compute-bound for a large vocabulary. Measured (1 thread, N 1,400, d 128,
# V 8,192, top-64 with the tail): 64 rows 120 ms a forward + backward, 128 rows 150 ms, all 1,400 rows at once
# 188 ms.
CPU_HEAD_CHUNK_BYTES = 2 * 2**20
MIN_CPU_HEAD_CHUNK_ROWS = 64


def default_chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk: on CPU cache-sized (above); elsewhere the chunk's float32 logits and their gradient
    (plus the loss's own scratch) within ``CHUNK_BUDGET_BYTES``."""
    if device.type == "cpu":
        return max(MIN_CPU_HEAD_CHUNK_ROWS, CPU_HEAD_CHUNK_BYTES // (4 * max(vocab, 1)))
    return max(1, CHUNK_BUDGET_BYTES // (4 * 4 * max(vocab, 1)))


def fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    chunk_fn: ChunkFn,
    n_metrics: int,
    chunk_rows: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 loss, float64 [n_metrics] metric sums) of ``chunk_fn`` over ``hidden`` [N, d] through the linear
    layer (``weight`` [V, d], ``bias``); the loss backpropagates into ``hidden``, ``weight`` and ``bias``."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, d] and weight [V, d], got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    rows = chunk_rows or default_chunk_rows(weight.shape[0], hidden.device)
    # (needs_input_grad is True under no_grad too: without grad mode no gradient is computed)
    return _FusedLinearLoss.apply(hidden, weight, bias, chunk_fn, n_metrics, rows, torch.is_grad_enabled())


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_fn, n_metrics, chunk_rows, grad_enabled):
        need_hidden, need_weight = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        need_bias = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        need_grad = need_hidden or need_weight or need_bias
        n_rows, width = hidden.shape
        vocab = weight.shape[0]
        loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
        metrics = torch.zeros(n_metrics, dtype=torch.float64, device=hidden.device)
        # fp16: the gradients stay float32 until backward has scaled them by grad_output (a mixed-precision loss
        # scale): unscaled, many would underflow fp16, and the scale itself (2^16) is beyond fp16's range.
        fp16 = torch.float16 in (hidden.dtype, weight.dtype)
        mat = weight.float() if fp16 and need_hidden else weight  # what ∂H = G W multiplies by
        grad_hidden = torch.zeros_like(hidden, dtype=mat.dtype) if need_hidden else None
        # float32 accumulators over the chunks (the parameter's own buffer when it is float32)
        grad_weight = torch.zeros(vocab, width, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_bias else None
        with torch.no_grad():
            for start in range(0, n_rows, chunk_rows):
                stop = min(start + chunk_rows, n_rows)
                h = hidden[start:stop]
                z = F.linear(h, weight, bias).float()
                part = chunk_fn(z, slice(start, stop), need_grad)
                del z
                loss += part.loss
                metrics += part.metrics
                if not need_grad:
                    continue
                h32 = h.float()
                if part.grad is not None:
                    g = part.grad
                    if need_hidden:
                        grad_hidden[start:stop].addmm_(g.to(mat.dtype), mat)
                    if need_weight:
                        grad_weight.addmm_(g.t(), h32)
                    if need_bias:
                        grad_bias.add_(g.sum(0))
                if part.sparse is not None:
                    index, g = part.sparse
                    if need_hidden:
                        picked = mat[index]  # [n, k, d]
                        grad_hidden[start:stop].add_(torch.bmm(g.to(mat.dtype)[:, None, :], picked).squeeze(1))
                        del picked
                    if need_weight:
                        grad_weight.index_add_(0, index.reshape(-1), (g[:, :, None] * h32[:, None, :]).reshape(-1, width))
                    if need_bias:
                        grad_bias.index_add_(0, index.reshape(-1), g.reshape(-1))
                del part
        del mat
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if not fp16:  # (fp16: float32 until backward)
            grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
            grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(metrics)
        return loss.to(torch.float32), metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        grads = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            if grad is not None:
                if bool(grad_loss != 1.0):
                    grad = grad * grad_loss.to(grad.dtype)
                grad = grad.to(dtype)
            grads.append(grad)
        return (*grads, None, None, None, None)
