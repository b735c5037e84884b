"""Knowledge-distillation objectives: how far the student's next-token distribution is from the teacher's.

Notation (per token; ``z_s``/``z_t`` are the student/teacher logits over the vocabulary):

    T = kd_temperature, τ = teacher_temperature, λ = skew_lambda, α = adaptive_kl_alpha
    p = softmax(z_t / (T·τ))        teacher distribution (no gradient)
    q = softmax(z_s / T)            student distribution
    KL(a ‖ b) = Σ_i a_i (log a_i − log b_i)

With ``TopK`` teacher logits (the teacher's k most likely indices K), there are two forms:

- with the teacher's tail (``TopK.tail_logmass`` given; the pipeline's default, ``topk_tail: true``):
  the distributions are over k+1 outcomes, the k tokens and "everything else":

      p̃ = (p_i for i ∈ K, P_tail),   P_tail = 1 − Σ_{i∈K} p_i   (shipped by the teacher as log P_tail)
      q̃ = (q_i for i ∈ K, Q_tail),   log Q_tail = logsumexp_{i∉K}(z_s,i/T) − logsumexp_i(z_s,i/T)

  with p and q the *full-vocabulary* softmaxes above (so p_i = exp(z_t,i/(T·τ)) · (1 − P_tail) /
  Σ_{j∈K} exp(z_t,j/(T·τ)) from the k shipped logits). Every objective below is applied to (p̃, q̃);
  the student's mass outside K is pulled towards the teacher's, so pure KD cannot move it elsewhere.
- without it (``tail_logmass`` None, ``topk_tail: false``): ``p`` and ``q`` are both renormalised over
  K (the student's logits gathered there); the student's mass outside K gets no gradient at all.

    forward_kl        = KL(p ‖ q)
    reverse_kl        = KL(q ‖ p)
    skewed_forward_kl = KL(p ‖ λp + (1−λ)q)
    skewed_reverse_kl = KL(q ‖ (1−λ)p + λq)
    js_divergence     = ½ KL(p ‖ m) + ½ KL(q ‖ m),   m = (p + q)/2
    adaptive_kl       = g_h/(g_h+g_t+ε) · KL(p ‖ q) + g_t/(g_h+g_t+ε) · KL(q ‖ p)
                        tail = tokens whose cumulative p, sorted ascending, is ≤ α; head = the rest;
                        g_h = Σ_head |p − q|, g_t = Σ_tail |p − q|  (weights carry no gradient;
                        tied p values stay on one side; ε = ADAPTIVE_KL_EPS)

The loss is the sum of the per-token values over the masked tokens divided by their count (or by
``normalizer``). There is no T² factor here: the caller scales the distillation term.

Masked vocabulary (−inf logits): a summand a_i (log a_i − log b_i) is 0 when a_i = 0 (0·log 0 = 0),
and it is dropped (counted as 0, not +∞) when b_i = 0 because of a −inf logit, e.g. forward_kl where
the student masks a token the teacher allows. A token whose student or teacher logits are all −inf
contributes 0. Nothing here produces NaN from −inf logits.

How it runs: tokens are processed in chunks, and for each chunk the loss *and* its closed-form
gradient w.r.t. the student logits are computed in the same pass (as Liger-Kernel's fused losses do).
Only the gradient ([N, V], the student's dtype, needed by autograd anyway) outlives a chunk, so the
extra memory is that buffer plus O(chunk × V) float32 scratch, instead of several [N, V] float32
intermediates kept for autograd. With ``x = z_s / T`` and any per-token loss L(q):
∂L/∂x = h − q·Σ_i h_i with h = q ⊙ ∂L/∂q, and ∂L/∂z_s = (∂L/∂x) / T. Per objective, h is:

    forward_kl        h = −p
    reverse_kl        h = q (log q − log p) + q
    skewed_forward_kl h = −(1−λ) p q / m                    m = λp + (1−λ)q
    skewed_reverse_kl h = q (log q − log m) + q − λ q²/m     m = (1−λ)p + λq
    js_divergence     h = ½ q (log q − log m)                m = (p + q)/2
    adaptive_kl       w_h · h_forward + w_t · h_reverse      (w detached)

(on dropped summands h is 0). With the tail bucket the objective runs on the k+1 "logits"
x̃ = (x_K, logsumexp_{i∉K} x_i) (softmax(x̃) = q̃), and the chain rule spreads the tail's gradient
over the vocabulary outside K: ∂L/∂x_i = ∂L/∂x̃_i for i ∈ K, ∂L/∂x̃_tail · exp(x_i − x̃_tail) for i ∉ K.
``vocab_parallel_kd_loss`` in ``parallel_losses`` runs the same code with the vocabulary sharded
across a process group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch

from .shared_names import KD_OBJECTIVES  # the names config.py accepts; one list

# Guard in the adaptive_kl weights g/(g_h + g_t + ε): both gaps are 0 when p == q.
ADAPTIVE_KL_EPS = 1e-12

# Default scratch budget per chunk; the chunk row count is chosen so the float32 temporaries fit.
# On CPU a smaller, cache-sized chunk is faster (measured in bench/kd_loss.py's setting).
CHUNK_BUDGET_BYTES = 256 * 2**20
CPU_CHUNK_BUDGET_BYTES = 32 * 2**20
# The teacher's top-k + tail pass: a few MiB of logits per chunk stay in cache (measured fastest at ~4 MiB).
TOPK_TAIL_CHUNK_BYTES = 4 * 2**20

Number = Union[int, float]


class TopK(NamedTuple):
    """Teacher logits kept only at the teacher's k most likely vocabulary entries."""

    values: torch.Tensor  # [N, k] raw teacher logits at `indices`
    indices: torch.Tensor  # [N, k] int64 vocabulary indices
    # [N] log P_tail: log of the mass softmax(z_t / (T·τ)) puts outside `indices` (at the temperatures of
    # the loss); None: no tail bucket, both distributions are renormalised over the k indices.
    tail_logmass: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class _Objective:
    """A validated objective with its hyper-parameters (temperatures already folded into logits)."""

    name: str
    skew_lambda: float
    adaptive_kl_alpha: float


class VocabReduce:
    """How per-row sums and maxima over the vocabulary combine across shards. This base class is
    the unsharded case (nothing to combine); ``parallel_losses`` all-reduces over a process group."""

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def max(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def is_local(self) -> bool:
        return True


def topk_teacher_logits(teacher_logits: torch.Tensor, k: int, tail_temperature: Optional[float] = None) -> TopK:
    """Keep the teacher's k largest logits per position (what the teacher worker ships).

    ``tail_temperature`` (T·τ, the temperature the loss will apply to the teacher): also ship the log of the
    probability mass softmax(teacher_logits / tail_temperature) puts outside those k (``TopK.tail_logmass``).
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    width = teacher_logits.shape[-1]
    if k > width:
        raise ValueError(f"k={k} is larger than the vocabulary size V={width} of teacher_logits")
    logits = teacher_logits.detach()
    if tail_temperature is None:
        with torch.no_grad():
            values, indices = torch.topk(logits, k, dim=-1)
        return TopK(values=values, indices=indices)
    _check_temperatures(tail_temperature, 1.0)
    # One pass per cache-sized chunk of rows: the top k + 1 (the extra one is the largest logit *outside* the
    # top-k, the shift that keeps the tail's sum exact), then the tail's Σexp with the top-k columns zeroed.
    # Measured (1 thread, 1,816 rows x V 8,192) 1.8x faster than top-k followed by ``tail_logmass``, which
    # copies the logits four times to give each of its two log-sum-exps its own maximum.
    flat = logits.reshape(-1, width)
    values = torch.empty(flat.shape[0], k, dtype=flat.dtype, device=flat.device)
    indices = torch.empty(flat.shape[0], k, dtype=torch.long, device=flat.device)
    tail = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    chunk = max(1, TOPK_TAIL_CHUNK_BYTES // (4 * width))
    with torch.no_grad():
        for start in range(0, flat.shape[0], chunk):
            rows = slice(start, min(start + chunk, flat.shape[0]))
            top_values, top_indices = torch.topk(flat[rows], min(k + 1, width), dim=-1)
            values[rows], indices[rows] = top_values[:, :k], top_indices[:, :k]
            tail[rows] = _tail_after_topk(flat[rows], top_values.float(), top_indices, k, tail_temperature)
    shape = logits.shape[:-1]
    return TopK(values.reshape(*shape, k), indices.reshape(*shape, k), tail.reshape(shape))


def _tail_after_topk(rows: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor, k: int,
                     temperature: float) -> torch.Tensor:
    """log P_tail of ``rows`` [n, V] given their top ``k + 1`` (or all V when k = V) values and indices.

    With m the largest logit outside the top-k (the (k+1)-th), every term of the tail's Σexp((z − m)/t) is ≤ 1
    and one is 1, so the sum is exact however small the tail is (no 1 − Σp cancellation); the top-k's own
    log-sum-exp comes from their k values; log P_tail = lse_tail − logaddexp(lse_topk, lse_tail). The top-k
    columns may overflow to inf before they are zeroed; they never enter the sum.
    """
    head = torch.logsumexp(top_values[:, :k] / temperature, 1)
    if top_values.shape[1] == k:  # k = V: nothing is outside
        return torch.full_like(head, -math.inf)
    rest_max = top_values[:, k]
    shift = torch.where(torch.isfinite(rest_max), rest_max, torch.zeros_like(rest_max))
    scaled = torch.sub(rows.float(), shift[:, None])  # a fresh float32 buffer, reused in place
    if temperature != 1.0:
        scaled.div_(temperature)
    scaled.exp_().scatter_(1, top_indices[:, :k], 0.0)
    rest = shift / temperature + scaled.sum(1).log()
    return (rest - torch.logaddexp(head, rest)).clamp_(max=0.0)


def tail_logmass(
    logits: torch.Tensor,
    indices: torch.Tensor,
    temperature: float,
    *,
    vocab: Optional["VocabReduce"] = None,
    owned: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[...] float32 log Σ_{i ∉ indices} softmax(logits / temperature)_i, per row of ``logits`` [..., V].

    Computed as logsumexp over the columns outside ``indices`` minus logsumexp over all (each with its own
    maximum), so it is exact for a tail mass near 0 (no 1 − Σp cancellation) and near 1; −inf when
    nothing is outside (k = V, or the rest is −inf). ``vocab``/``owned``: ``logits`` is this rank's shard
    ([..., V_local]) of a vocabulary sharded through ``vocab``, ``indices`` are local columns and only
    those marked ``owned`` are this rank's (``parallel_losses.vocab_parallel_tail_logmass``).
    """
    _check_temperatures(temperature, 1.0)
    vocab = vocab or VocabReduce()
    width, k = logits.shape[-1], indices.shape[-1]
    flat = logits.detach().reshape(-1, width)
    index = indices.reshape(-1, k).long()
    owned = None if owned is None else owned.reshape(-1, k)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    chunk = max(1, CPU_CHUNK_BUDGET_BYTES // (6 * 4 * max(width, 1)))
    with torch.no_grad():
        for start in range(0, max(flat.shape[0], 1), chunk):
            stop = min(start + chunk, flat.shape[0])
            if stop <= start:
                break
            y = flat[start:stop].float() / temperature  # a fresh float32 copy
            rest = y.clone()
            _mask_columns(rest, index[start:stop], None if owned is None else owned[start:stop])
            both = torch.stack([y, rest], 1)  # [n, 2, V]
            top = vocab.max(both.amax(2))
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            sums = vocab.sum(torch.exp(both - top[:, :, None]).sum(2))
            lse = top + sums.log()  # [n, 2]: all, outside
            out[start:stop] = (lse[:, 1] - lse[:, 0]).clamp_(max=0.0)
    return out.reshape(logits.shape[:-1])


def _mask_columns(x: torch.Tensor, index: torch.Tensor, owned: Optional[torch.Tensor]) -> torch.Tensor:
    """x[r, index[r, j]] = −inf in place (only where ``owned``, when given)."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(index)
    if owned is not None:
        rows, index = rows[owned], index[owned]
    x.index_put_((rows, index), torch.tensor(-math.inf, dtype=x.dtype, device=x.device))
    return x


def _log1mexp(t: torch.Tensor) -> torch.Tensor:
    """log(1 − e^t) for t ≤ 0, accurate at both ends (Mächler 2012); −inf at t = 0, 0 at t = −inf."""
    return torch.where(t > -math.log(2.0), torch.log(-torch.expm1(t)), torch.log1p(-torch.exp(t)))


def kd_loss(
    student_logits: torch.Tensor,
    teacher: Union[torch.Tensor, TopK],
    mask: Optional[torch.Tensor] = None,
    objective: str = "forward_kl",
    kd_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    skew_lambda: float = 0.1,
    adaptive_kl_alpha: float = 0.5,
    chunk_size: Optional[int] = None,
    normalizer: Optional[Union[Number, torch.Tensor]] = None,
) -> torch.Tensor:
    """Distillation loss between student and teacher next-token distributions (see module docstring).

    Args:
        student_logits: [N, V] (or [B, T, V]) raw student logits, any float dtype.
        teacher: [N, V] raw teacher logits, or ``TopK(values=[N, k], indices=[N, k])``; no gradient.
        mask: [N] (or [B, T]) bool, the positions that count; None = all.
        objective: one of ``KD_OBJECTIVES``.
        kd_temperature: T; student logits / T, teacher logits / (T·τ).
        teacher_temperature: τ, extra smoothing of the teacher only.
        skew_lambda: λ ∈ [0, 1] of the skewed objectives.
        adaptive_kl_alpha: α ∈ [0, 1], the tail mass of adaptive_kl.
        chunk_size: tokens per chunk; None picks one from a scratch budget (~32 MiB on CPU, where
            cache-sized chunks are fastest; ~256 MiB on accelerators).
        normalizer: divide the summed per-token divergence by this (e.g. the label-token count of the
            global batch across gradient-accumulation micro-batches) instead of the masked count.

    Returns:
        float32 scalar: Σ_masked per-token divergence / (masked count or normalizer); 0 when nothing
        is masked in. No T² factor is applied. Its gradient w.r.t. ``student_logits`` is computed in
        the forward pass; backward scales it by grad_output in place, so a loss supports one backward
        with grad_output ≠ 1 (or repeated unit ones with ``retain_graph=True``).
    """
    objective_ = _check_objective(objective, skew_lambda, adaptive_kl_alpha)
    _check_temperatures(kd_temperature, teacher_temperature)
    chunk_size = _check_chunk_size(chunk_size)
    student, teacher_values, teacher_indices, mask = _flatten_inputs(student_logits, teacher, mask)
    rows = _masked_rows(mask)
    denominator = _denominator(normalizer, rows, student.shape[0])

    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    tail = _flatten_tail(teacher, student.shape[0])
    if tail is not None:  # top-k with the teacher's tail: k + 1 outcomes, the gradient is dense
        with torch.no_grad():
            student = student.detach()
            grad = grad_buffer(student, need_grad, rows)
            total = fused_tail_loss_and_grad(
                student,
                student.gather(1, teacher_indices).float(),
                teacher_indices,
                None,
                teacher_values.detach(),
                tail,
                rows,
                objective_,
                kd_temperature,
                teacher_temperature,
                chunk_size,
                grad,
                _grad_scale(denominator),
                VocabReduce(),
            )
            loss = (total / denominator).to(torch.float32)
        return loss if not need_grad else attach_gradient(student_logits, loss, grad)
    with torch.no_grad():
        student = student.detach()
        scores = student if teacher_indices is None else student.gather(1, teacher_indices)
        # top-k: the [N, k] gradient is kept in float32 and scattered into [N, V] in backward
        grad = grad_buffer(scores, need_grad, rows, student.dtype if teacher_indices is None else torch.float32)
        total = fused_loss_and_grad(
            scores,
            teacher_values.detach(),
            rows,
            objective_,
            kd_temperature,
            teacher_temperature,
            chunk_size,
            grad,
            _grad_scale(denominator),
            VocabReduce(),
        )
        loss = (total / denominator).to(torch.float32)
    if not need_grad:
        return loss
    return attach_gradient(student_logits, loss, grad, teacher_indices)


# ----------------------------------------------------------------------------------------------
# The fused chunk loop (shared with the vocab-parallel form)


def grad_buffer(like: torch.Tensor, need_grad: bool, rows: Optional[torch.Tensor],
                dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """The buffer a fused loss writes ∂loss/∂``like`` into, or None when no gradient is needed or no row is
    selected: uninitialised when every row is written (``rows`` None), zeros when only ``rows`` are."""
    if not need_grad or (rows is not None and rows.numel() == 0):
        return None
    dtype = dtype or like.dtype
    return torch.empty_like(like, dtype=dtype) if rows is None else torch.zeros_like(like, dtype=dtype)


def fused_loss_and_grad(
    student: torch.Tensor,
    teacher: torch.Tensor,
    rows: Optional[torch.Tensor],
    objective: _Objective,
    kd_temperature: float,
    teacher_temperature: float,
    chunk_size: Optional[int],
    grad_out: Optional[torch.Tensor],
    grad_scale: Union[float, torch.Tensor],
    vocab: VocabReduce,
) -> torch.Tensor:
    """Σ over ``rows`` (None = all) of the per-token divergence, as a float64 0-dim tensor.

    ``student``/``teacher`` are [N, v] logits over the same v entries (the whole vocabulary, a
    vocabulary shard combined through ``vocab``, or a top-k set). When ``grad_out`` ([N, v]) is given,
    ``grad_scale · ∂(per-token divergence)/∂student`` is written into its ``rows``; other rows are
    left untouched.
    """
    n_total, width = student.shape
    n_rows = n_total if rows is None else rows.numel()
    total = torch.zeros((), dtype=torch.float64, device=student.device)
    if n_rows == 0:
        return total
    chunk = chunk_size or _default_chunk_rows(width, objective.name, grad_out is not None, student.device)
    chunk = min(chunk, n_rows)
    work = _Workspace(chunk, width, student.device)
    student_scale = 1.0 / kd_temperature
    direct = grad_out is not None and rows is None and grad_out.dtype == torch.float32

    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        select = slice(start, stop) if rows is None else rows[start:stop]
        n = stop - start
        x = _load_scaled(student, select, kd_temperature, work("x", n))
        y = _load_scaled(teacher, select, kd_temperature * teacher_temperature, work("y", n))
        lq, lp, q, p, finite = _log_softmax_pair(x, y, work, n, vocab)
        g = None
        if grad_out is not None:
            g = grad_out[start:stop] if direct else work("grad", n)
        per_token = _OBJECTIVES[objective.name](lp, p, lq, q, objective, work, n, g, vocab, finite)
        # A row whose logits are all −inf on one side has NaN log-probabilities (every entry of the
        # row, on every shard): it contributes 0.
        bad = torch.isnan(lq[:, 0]) | torch.isnan(lp[:, 0])
        if bool(bad.any()):
            per_token = per_token.masked_fill(bad, 0.0)
            if g is not None:
                g.masked_fill_(bad[:, None], 0.0)
        total += per_token.sum(dtype=torch.float64)
        if g is not None:
            g.mul_(grad_scale * student_scale)
            if not direct:
                if rows is None:
                    grad_out[start:stop].copy_(g)
                else:
                    grad_out.index_copy_(0, select, g.to(grad_out.dtype))
    return total


def fused_tail_loss_and_grad(
    student: torch.Tensor,
    scores: torch.Tensor,
    index: torch.Tensor,
    owned: Optional[torch.Tensor],
    teacher: torch.Tensor,
    teacher_tail: torch.Tensor,
    rows: Optional[torch.Tensor],
    objective: _Objective,
    kd_temperature: float,
    teacher_temperature: float,
    chunk_size: Optional[int],
    grad_out: Optional[torch.Tensor],
    grad_scale: Union[float, torch.Tensor],
    vocab: VocabReduce,
) -> torch.Tensor:
    """The top-k loss with the tail bucket: Σ over ``rows`` of the per-token divergence over k+1 outcomes.

    ``student`` [N, v]: the student's raw logits over the vocabulary (or this rank's shard of it, combined
    through ``vocab``); ``scores`` [N, k]: its raw logits at the teacher's k indices (the same on every rank);
    ``index`` [N, k]: those columns in ``student`` (only where ``owned``, when given); ``teacher`` [N, k] raw
    logits and ``teacher_tail`` [N] log P_tail. ``grad_out`` [N, v] (the student's dtype) receives
    ``grad_scale ·`` ∂/∂student on ``rows``: the k+1-outcome gradient at K, and the tail's spread over the
    columns outside K in proportion to the student's softmax there.
    """
    n_total, width = student.shape
    k = scores.shape[1]
    n_rows = n_total if rows is None else rows.numel()
    total = torch.zeros((), dtype=torch.float64, device=student.device)
    if n_rows == 0:
        return total
    budget = CPU_CHUNK_BUDGET_BYTES if student.device.type == "cpu" else CHUNK_BUDGET_BYTES
    chunk = min(chunk_size or max(1, budget // (3 * 4 * width)), n_rows)  # x, e and the dense gradient
    wide = _Workspace(chunk, width, student.device)
    narrow = _Workspace(chunk, k + 1, student.device)  # the k+1 outcomes: negligible
    student_scale = 1.0 / kd_temperature
    local = VocabReduce()  # the k+1 outcomes are the same on every rank

    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        select = slice(start, stop) if rows is None else rows[start:stop]
        n = stop - start
        columns, mine = index[select], None if owned is None else owned[select]
        # x̃_tail = logsumexp of x = z_s/T over the columns outside K (its own maximum: no underflow)
        x = wide("x", n)
        x.copy_(student[select])
        if kd_temperature != 1.0:
            x.div_(kd_temperature)
        _mask_columns(x, columns, mine)
        top = vocab.max(x.amax(1))
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        e = torch.sub(x, top[:, None], out=wide("e", n)).exp_()
        mass = vocab.sum(e.sum(1))
        lq = narrow("lq", n)
        torch.mul(scores[select], student_scale, out=lq[:, :k])
        torch.add(top, mass.log(), out=lq[:, k])
        lq.sub_(torch.logsumexp(lq, 1, keepdim=True))  # log q̃; NaN rows when every student logit is −inf
        # log p̃ = (y_K − logsumexp(y_K) + log(1 − P_tail), log P_tail), y = z_t/(T·τ)
        lp = narrow("lp", n)
        log_tail = teacher_tail[select].float().clamp(max=0.0)
        torch.div(teacher[select].float(), kd_temperature * teacher_temperature, out=lp[:, :k])
        lp[:, :k].sub_(torch.logsumexp(lp[:, :k], 1, keepdim=True) - _log1mexp(log_tail)[:, None])
        lp[:, k] = log_tail
        q = torch.exp(lq, out=narrow("q", n))
        p = torch.exp(lp, out=narrow("p", n))
        finite = bool(lq.amin() > -math.inf) and bool(lp.amin() > -math.inf)
        g = None if grad_out is None else narrow("grad", n)
        per_token = _OBJECTIVES[objective.name](lp, p, lq, q, objective, narrow, n, g, local, finite)
        bad = torch.isnan(lq[:, 0]) | torch.isnan(lp).any(1)
        if bool(bad.any()):
            per_token = per_token.masked_fill(bad, 0.0)
            if g is not None:
                g.masked_fill_(bad[:, None], 0.0)
        total += per_token.sum(dtype=torch.float64)
        if g is None:
            continue
        # ∂L/∂x_i = ∂L/∂x̃_tail · exp(x_i − x̃_tail) outside K (e = exp(x − top) is 0 at K), ∂L/∂x̃_i at K
        e.mul_(torch.where(mass > 0, g[:, k] / mass, torch.zeros_like(mass))[:, None])
        at = torch.arange(n, device=e.device)[:, None].expand_as(columns)
        values = g[:, :k]
        if mine is not None:
            at, columns, values = at[mine], columns[mine], values[mine]
        e.index_put_((at, columns), values)
        e.mul_(grad_scale * student_scale)
        if rows is None:
            grad_out[start:stop].copy_(e)
        else:
            grad_out.index_copy_(0, select, e.to(grad_out.dtype))
    return total


class _Workspace:
    """Float32 [chunk, width] scratch buffers reused by every chunk.

    Large fresh allocations on CPU are page-faulted in 4 KiB at a time on every chunk; reusing the
    buffers (and writing with ``out=``/in-place ops) avoids that and keeps the scratch bounded.
    """

    def __init__(self, rows: int, width: int, device: torch.device):
        self._shape = (rows, width)
        self._device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, n: int) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = torch.empty(self._shape, dtype=torch.float32, device=self._device)
        return buf[:n]


def _default_chunk_rows(width: int, objective: str, with_grad: bool, device: torch.device) -> int:
    # float32 [chunk, width] buffers alive at once: x, y, lq, lp, q, p, 2 scratch, grad (+ a second
    # gradient and the sort/cumsum temporaries of adaptive_kl: ~9 more float32 equivalents).
    buffers = 8 + (1 if with_grad else 0) + (9 if objective == "adaptive_kl" else 0)
    budget = CPU_CHUNK_BUDGET_BYTES if device.type == "cpu" else CHUNK_BUDGET_BYTES
    return max(1, budget // (buffers * 4 * width))


def _load_scaled(src: torch.Tensor, select, temperature: float, buf: torch.Tensor) -> torch.Tensor:
    """float32 rows ``src[select] / temperature``; a view of ``src`` when nothing needs changing."""
    if isinstance(select, slice):
        rows = src[select]
        if rows.dtype == torch.float32 and temperature == 1.0:
            return rows
        buf.copy_(rows)
    elif src.dtype == torch.float32:
        torch.index_select(src, 0, select, out=buf)
    else:
        buf.copy_(src.index_select(0, select))
    if temperature != 1.0:
        buf.div_(temperature)
    return buf


def _log_softmax_pair(x, y, work, n, vocab: VocabReduce):
    """log q, log p, q, p of student scores x and teacher scores y (rows normalised over the
    vocabulary, across shards when ``vocab`` is sharded), and whether no logit in the chunk is −inf
    (on any shard)."""
    lq, lp = work("lq", n), work("lp", n)
    if vocab.is_local:
        torch.log_softmax(x, 1, out=lq)
        torch.log_softmax(y, 1, out=lp)
        finite = bool(lq.amin() > -math.inf) and bool(lp.amin() > -math.inf)  # False on NaN rows too
        q = torch.softmax(x, 1, out=work("q", n))  # the fused kernel is faster than exp(lq)
        p = torch.softmax(y, 1, out=work("p", n))
        return lq, lp, q, p, finite
    # Sharded: the global max and Σexp are all-reduced (one collective each for both sides); the
    # minima ride along with the maxima so every rank takes the same branch afterwards.
    extremes = vocab.max(torch.stack([x.amax(1), y.amax(1), -x.amin(1), -y.amin(1)], 1))
    finite = bool((extremes[:, 2:] < math.inf).all())
    maxes = extremes[:, :2]
    maxes = torch.where(torch.isfinite(maxes), maxes, torch.zeros_like(maxes))
    torch.sub(x, maxes[:, :1], out=lq)
    torch.sub(y, maxes[:, 1:], out=lp)
    q = torch.exp(lq, out=work("q", n))
    p = torch.exp(lp, out=work("p", n))
    sums = vocab.sum(torch.stack([q.sum(1), p.sum(1)], 1))
    lq.sub_(sums[:, :1].log())
    lp.sub_(sums[:, 1:].log())
    q.div_(sums[:, :1])
    p.div_(sums[:, 1:])
    return lq, lp, q, p, finite


# ----------------------------------------------------------------------------------------------
# Objectives: per-token value (summed over the vocabulary, across shards) and, into g, ∂/∂(z_s/T).
# Each returns the [n] per-token values and leaves lp, p, lq, q unchanged. ``finite``: no −inf
# (hence no dropped summand) anywhere in the chunk.


def _kl_summands(w, log_w, log_r, out):
    """w (log w − log r) elementwise into ``out``; non-finite summands (w = 0, or r = 0) become 0."""
    return torch.sub(log_w, log_r, out=out).mul_(w).nan_to_num_(0.0, 0.0, 0.0)


def _finish_grad(g, q, h_sum):
    """g ← h − q · Σh (g holds h)."""
    g.addcmul_(q, h_sum[:, None], value=-1.0)


def _forward_kl(lp, p, lq, q, objective, work, n, g, vocab, finite):
    if finite:  # no −inf logit in the chunk: h = −p, Σh = −1
        loss = vocab.sum(torch.sub(lp, lq, out=work("t0", n)).mul_(p).sum(1))
        if g is not None:
            torch.sub(q, p, out=g)
        return loss
    terms = _kl_summands(p, lp, lq, work("t0", n))
    if g is None:
        return vocab.sum(terms.sum(1))
    # h = −p where the summand is kept (the student is not −inf there).
    g.copy_(p).masked_fill_(torch.isneginf(lq), 0.0).neg_()
    loss, h_sum = vocab.sum(torch.stack([terms.sum(1), g.sum(1)], 1)).unbind(1)
    _finish_grad(g, q, h_sum)
    return loss


def _reverse_kl(lp, p, lq, q, objective, work, n, g, vocab, finite):
    if finite:  # h = q (log q − log p) + q, Σh = loss + 1, so ∂/∂x = q (log q − log p − loss)
        log_ratio = torch.sub(lq, lp, out=work("t0", n))
        loss = vocab.sum(torch.mul(log_ratio, q, out=g if g is not None else work("t1", n)).sum(1))
        if g is not None:
            torch.sub(log_ratio, loss[:, None], out=g).mul_(q)
        return loss
    terms = _kl_summands(q, lq, lp, work("t0", n))
    if g is None:
        return vocab.sum(terms.sum(1))
    # h = q (log q − log p) + q where the summand is kept (the teacher is not −inf there).
    g.copy_(q).masked_fill_(torch.isneginf(lp), 0.0).add_(terms)
    loss, h_sum = vocab.sum(torch.stack([terms.sum(1), g.sum(1)], 1)).unbind(1)
    _finish_grad(g, q, h_sum)
    return loss


def _skewed_forward_kl(lp, p, lq, q, objective, work, n, g, vocab, finite):
    lam = objective.skew_lambda
    if lam == 0.0:
        return _forward_kl(lp, p, lq, q, objective, work, n, g, vocab, finite)
    mix = torch.mul(p, lam, out=work("t0", n)).add_(q, alpha=1.0 - lam)  # m = λp + (1−λ)q
    log_mix = torch.log(mix, out=work("t1", n))
    terms = _kl_summands(p, lp, log_mix, log_mix)
    if g is None:
        return vocab.sum(terms.sum(1))
    torch.div(q, mix, out=g).mul_(p).nan_to_num_(0.0, 0.0, 0.0).mul_(lam - 1.0)  # h = −(1−λ) p q / m
    loss, h_sum = vocab.sum(torch.stack([terms.sum(1), g.sum(1)], 1)).unbind(1)
    _finish_grad(g, q, h_sum)
    return loss


def _skewed_reverse_kl(lp, p, lq, q, objective, work, n, g, vocab, finite):
    lam = objective.skew_lambda
    if lam == 0.0:
        return _reverse_kl(lp, p, lq, q, objective, work, n, g, vocab, finite)
    mix = torch.mul(p, 1.0 - lam, out=work("t0", n)).add_(q, alpha=lam)  # m = (1−λ)p + λq
    log_mix = torch.log(mix, out=work("t1", n))
    terms = _kl_summands(q, lq, log_mix, log_mix)
    if g is None:
        return vocab.sum(terms.sum(1))
    q_sq_over_mix = torch.div(q, mix, out=mix).mul_(q).nan_to_num_(0.0, 0.0, 0.0)
    torch.add(terms, q, out=g).add_(q_sq_over_mix, alpha=-lam)  # h = q (log q − log m) + q − λ q²/m
    loss, h_sum = vocab.sum(torch.stack([terms.sum(1), g.sum(1)], 1)).unbind(1)
    _finish_grad(g, q, h_sum)
    return loss


def _js_divergence(lp, p, lq, q, objective, work, n, g, vocab, finite):
    log_mid = torch.add(p, q, out=work("t0", n)).mul_(0.5).log_()  # log m, m = (p + q)/2
    p_terms = _kl_summands(p, lp, log_mid, work("t1", n))
    kl_p = p_terms.sum(1)
    q_terms = _kl_summands(q, lq, log_mid, log_mid)
    kl_p, kl_q = vocab.sum(torch.stack([kl_p, q_terms.sum(1)], 1)).unbind(1)
    if g is not None:
        # h = ½ q (log q − log m), Σh = ½ KL(q ‖ m)
        torch.addcmul(q_terms, q, kl_q[:, None], value=-1.0, out=g).mul_(0.5)
    return 0.5 * (kl_p + kl_q)


def _adaptive_kl(lp, p, lq, q, objective, work, n, g, vocab, finite):
    w_head, w_tail = _adaptive_weights(p, q, objective.adaptive_kl_alpha, work, n, vocab)
    g_reverse = None if g is None else work("grad2", n)
    forward = _forward_kl(lp, p, lq, q, objective, work, n, g, vocab, finite)
    reverse = _reverse_kl(lp, p, lq, q, objective, work, n, g_reverse, vocab, finite)
    if g is not None:
        g.mul_(w_head[:, None]).addcmul_(g_reverse, w_tail[:, None])
    return w_head * forward + w_tail * reverse


def _adaptive_weights(p, q, alpha, work, n, vocab):
    """(g_h, g_t)/(g_h + g_t + ε) with tail = {i : C(p_i) ≤ α}, C(x) = Σ_{p_j ≤ x} p_j / Σ_j p_j.

    This is "sort p ascending, tail = tokens whose cumulative p ≤ α" with tied p values kept
    together. It is written so a sharded vocabulary gives the same set: each shard sorts its own
    entries, and the largest threshold x with C(x) ≤ α is found by bisection on the float32 bit
    pattern (exact, 31 steps), C(x) being summed across shards at each step.
    """
    errors = torch.sub(p, q, out=work("t0", n)).abs_()
    sorted_p, order = torch.sort(p, dim=1)
    sorted_errors = errors.gather(1, order)
    del order
    cum_p = _cumsum_from_zero(sorted_p)
    cum_err = _cumsum_from_zero(sorted_errors)
    del sorted_errors
    total_p = vocab.sum(cum_p[:, -1].clone())

    def mass_at_or_below(bits: torch.Tensor) -> torch.Tensor:
        x = bits.to(torch.int32).view(torch.float32)[:, None]
        count = torch.searchsorted(sorted_p, x, right=True)
        return vocab.sum(cum_p.gather(1, count)[:, 0]) / total_p

    lo = torch.zeros(n, dtype=torch.int64, device=p.device)  # C(0) = 0 ≤ α always
    hi = torch.full((n,), 0x7F800000, dtype=torch.int64, device=p.device)  # +inf
    everything = mass_at_or_below(hi) <= alpha
    for _ in range(31):  # hi − lo < 2^31 halves to 1
        mid = (lo + hi) // 2
        ok = mass_at_or_below(mid) <= alpha
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    threshold = torch.where(everything, hi, lo).to(torch.int32).view(torch.float32)[:, None]
    count = torch.searchsorted(sorted_p, threshold, right=True)
    gaps = vocab.sum(torch.stack([cum_err.gather(1, count)[:, 0], cum_err[:, -1]], 1))
    tail, total = gaps.unbind(1)
    head = total - tail
    denominator = head + tail + ADAPTIVE_KL_EPS
    return (head / denominator).float(), (tail / denominator).float()


def _cumsum_from_zero(x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], x.shape[1] + 1, dtype=torch.float64, device=x.device)
    torch.cumsum(x, 1, dtype=torch.float64, out=out[:, 1:])
    return out


_OBJECTIVES: dict[str, Callable] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "adaptive_kl": _adaptive_kl,
    "skewed_forward_kl": _skewed_forward_kl,
    "skewed_reverse_kl": _skewed_reverse_kl,
    "js_divergence": _js_divergence,
}
assert set(_OBJECTIVES) == set(KD_OBJECTIVES)


# ----------------------------------------------------------------------------------------------
# Autograd glue: the gradient is already known when the loss is returned.


class _PrecomputedGradient(torch.autograd.Function):
    """Returns ``loss``; its gradient w.r.t. ``student`` is ``grad`` (computed in the forward pass),
    scattered along the last dim at ``index`` when given (top-k), times the incoming grad_output."""

    @staticmethod
    def forward(ctx, student, loss, grad, index):
        ctx.student_shape = student.shape
        ctx.student_dtype = student.dtype
        ctx.scaled_in_place = False
        ctx.save_for_backward(grad, index)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        grad, index = ctx.saved_tensors
        shape, dtype = ctx.student_shape, ctx.student_dtype
        if grad is None:  # nothing masked in
            return torch.zeros(shape, dtype=dtype, device=grad_output.device), None, None, None
        scale = grad_output.to(torch.float32)
        if index is not None:  # top-k: scatter the [N, k] gradient into a dense [N, V] one
            dense = torch.zeros(index.shape[0], shape[-1], dtype=dtype, device=grad.device)
            dense.scatter_add_(1, index, (grad * scale).to(dtype))
            return dense.view(shape), None, None, None
        if bool(scale != 1.0):
            # In place, so no second [N, V] buffer: the buffer is ours, and autograd frees it after this
            # call unless the graph is retained, in which case a second backward must not reuse it.
            if ctx.scaled_in_place:
                raise RuntimeError("kd_loss: a second backward with a non-unit grad_output through the same loss")
            ctx.scaled_in_place = True
            grad.mul_(scale.to(grad.dtype))
        return grad.view(shape), None, None, None


def attach_gradient(student, loss, grad, index=None) -> torch.Tensor:
    """``loss`` with ``grad`` ([N, v] over the flattened student, or at ``index`` if given) as its
    gradient w.r.t. ``student``."""
    return _PrecomputedGradient.apply(student, loss, grad, index)


# ----------------------------------------------------------------------------------------------
# Argument checks (ValueError naming the argument)


def _check_objective(objective, skew_lambda, adaptive_kl_alpha) -> _Objective:
    if objective not in KD_OBJECTIVES:
        raise ValueError(f"objective must be one of {KD_OBJECTIVES}, got {objective!r}")
    for name, value in (("skew_lambda", skew_lambda), ("adaptive_kl_alpha", adaptive_kl_alpha)):
        if not _is_real(value) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return _Objective(objective, float(skew_lambda), float(adaptive_kl_alpha))


def _check_temperatures(kd_temperature, teacher_temperature) -> None:
    for name, value in (("kd_temperature", kd_temperature), ("teacher_temperature", teacher_temperature)):
        if not _is_real(value) or not math.isfinite(float(value)) or float(value) <= 0.0:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_chunk_size(chunk_size) -> Optional[int]:
    if chunk_size is None:
        return None
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flatten_inputs(student_logits, teacher, mask):
    """[N, V] student, [N, V or k] teacher values, [N, k] int64 indices or None, [N] bool mask or None."""
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point():
        raise ValueError("student_logits must be a floating-point tensor")
    if student_logits.dim() not in (2, 3):
        raise ValueError(f"student_logits must be [N, V] or [B, T, V], got shape {tuple(student_logits.shape)}")
    lead = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    indices = None
    if isinstance(teacher, TopK):
        values, indices = teacher.values, teacher.indices
        if not isinstance(values, torch.Tensor) or not values.is_floating_point():
            raise ValueError("teacher.values must be a floating-point tensor")
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex():
            raise ValueError("teacher.indices must be an integer tensor")
        if values.shape != indices.shape or values.shape[:-1] != lead:
            raise ValueError(
                f"teacher (TopK) values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be "
                f"{tuple(lead)} + (k,) to match student_logits {tuple(student_logits.shape)}"
            )
        k = values.shape[-1]
        if k < 1 or k > vocab:
            raise ValueError(f"teacher (TopK) has k={k}; it must be in [1, V={vocab}] of student_logits")
        indices = indices.reshape(-1, k).to(torch.long)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
            raise ValueError(f"teacher (TopK) indices must lie in [0, {vocab})")
        values = values.reshape(-1, k)
    elif isinstance(teacher, torch.Tensor):
        if not teacher.is_floating_point():
            raise ValueError("teacher must be a floating-point tensor or a TopK")
        if teacher.shape != student_logits.shape:
            raise ValueError(
                f"teacher shape {tuple(teacher.shape)} must equal student_logits shape {tuple(student_logits.shape)}"
            )
        values = teacher.reshape(-1, vocab)
    else:
        raise ValueError(f"teacher must be a tensor of logits or a TopK, got {type(teacher).__name__}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex():
            raise ValueError("mask must be a bool (or integer 0/1) tensor")
        if mask.shape != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} must be {tuple(lead)} to match student_logits")
        mask = mask.reshape(-1).to(torch.bool)
    return student, values, indices, mask


def _flatten_tail(teacher, n_rows: int) -> Optional[torch.Tensor]:
    """[N] float32 log P_tail of a ``TopK`` with a tail, else None."""
    if not isinstance(teacher, TopK) or teacher.tail_logmass is None:
        return None
    tail = teacher.tail_logmass
    if not isinstance(tail, torch.Tensor) or not tail.is_floating_point():
        raise ValueError("teacher.tail_logmass must be a floating-point tensor")
    if tail.shape != teacher.values.shape[:-1]:
        raise ValueError(
            f"teacher (TopK) tail_logmass {tuple(tail.shape)} must be {tuple(teacher.values.shape[:-1])}, one per token"
        )
    return tail.detach().reshape(n_rows).float()


def _masked_rows(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """None when every row counts, else the int64 indices of the rows that do."""
    if mask is None or bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1)


def _denominator(normalizer, rows, n_total) -> Union[float, torch.Tensor]:
    if normalizer is None:
        count = n_total if rows is None else rows.numel()
        return float(max(count, 1))  # all masked → total 0 → loss 0
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a scalar, got shape {tuple(normalizer.shape)}")
        return normalizer.detach().reshape(()).to(torch.float64)
    if not _is_real(normalizer) or not math.isfinite(float(normalizer)) or float(normalizer) <= 0.0:
        raise ValueError(f"normalizer must be a positive number or a scalar tensor, got {normalizer!r}")
    return float(normalizer)


def _grad_scale(denominator) -> Union[float, torch.Tensor]:
    if isinstance(denominator, torch.Tensor):
        return (1.0 / denominator).to(torch.float32)
    return 1.0 / denominator
