"""kd_loss against a plain float64 reference written from the formulas in docs/losses.md."""

import pytest
import torch

from distill_trainer.losses import KD_OBJECTIVES, TopK, kd_loss, topk_teacher_logits

torch.set_num_threads(1)

INF = float("inf")
EPS = 1e-12  # the adaptive_kl guard, as documented


# ----------------------------------------------------------------------------------------------
# Reference: softmax, log and sums straight from the definitions; autograd gives its gradient.


def _log(x):
    """log x, with log 0 = −inf and no NaN gradient at 0."""
    positive = x > 0
    return torch.where(positive, torch.log(torch.where(positive, x, torch.ones_like(x))), -INF)


def _kl(a, log_a, log_b):
    """Σ a (log a − log b); summands with a = 0 or b = 0 count 0 (the documented convention)."""
    keep = (log_a > -INF) & (log_b > -INF)
    diff = torch.where(keep, log_a - torch.where(keep, log_b, torch.zeros_like(log_b)), torch.zeros_like(log_a))
    return torch.where(keep, a * diff, torch.zeros_like(a)).sum(-1)


def reference_per_token(s, t, objective, T=1.0, tau=1.0, lam=0.1, alpha=0.5):
    q = torch.softmax(s / T, -1)
    p = torch.softmax(t / (T * tau), -1)
    return reference_divergence(p, q, objective, lam, alpha)


def tail_bucket(dist, indices):
    """(dist at the k indices, Σ of dist over every other index): the k + 1 outcomes."""
    outside = torch.ones_like(dist, dtype=torch.bool).scatter_(-1, indices, False)
    return torch.cat([dist.gather(-1, indices), (dist * outside).sum(-1, keepdim=True)], -1)


def reference_tail_per_token(s, t_full, indices, objective, T=1.0, tau=1.0, lam=0.1, alpha=0.5):
    """The tail-bucket objective: p and q over the whole vocabulary, then (p_K, Σ_rest p) vs (q_K, Σ_rest q)."""
    q = tail_bucket(torch.softmax(s / T, -1), indices)
    p = tail_bucket(torch.softmax(t_full / (T * tau), -1), indices)
    return reference_divergence(p, q, objective, lam, alpha)


def reference_divergence(p, q, objective, lam=0.1, alpha=0.5):
    log_q, log_p = _log(q), _log(p)
    if objective == "forward_kl":
        return _kl(p, log_p, log_q)
    if objective == "reverse_kl":
        return _kl(q, log_q, log_p)
    if objective == "skewed_forward_kl":
        return _kl(p, log_p, _log(lam * p + (1 - lam) * q))
    if objective == "skewed_reverse_kl":
        return _kl(q, log_q, _log((1 - lam) * p + lam * q))
    if objective == "js_divergence":
        m = (p + q) / 2
        return 0.5 * _kl(p, log_p, _log(m)) + 0.5 * _kl(q, log_q, _log(m))
    if objective == "adaptive_kl":
        p_sorted, order = p.detach().sort(-1)
        gaps = (p.detach() - q.detach()).abs().gather(-1, order)
        tail = p_sorted.cumsum(-1) <= alpha
        g_tail, g_head = (gaps * tail).sum(-1), (gaps * ~tail).sum(-1)
        norm = g_head + g_tail + EPS
        return g_head / norm * _kl(p, log_p, log_q) + g_tail / norm * _kl(q, log_q, log_p)
    raise AssertionError(objective)


def reference_loss(student, teacher, mask=None, objective="forward_kl", full_teacher=None, **kw):
    """Mean over masked tokens; ``teacher`` is [N, V] logits or a TopK. A TopK with a tail is compared with
    the k + 1 outcomes computed from ``full_teacher``, the teacher's logits over the whole vocabulary."""
    s, t = student.double(), teacher
    if isinstance(teacher, TopK) and teacher.tail_logmass is not None:
        per_token = reference_tail_per_token(s, full_teacher.double(), teacher.indices, objective, **kw)
        return per_token.mean() if mask is None else (per_token * mask).sum() / mask.sum()
    if isinstance(teacher, TopK):
        s, t = s.gather(-1, teacher.indices), teacher.values
    per_token = reference_per_token(s, t.double(), objective, **kw)
    if mask is None:
        return per_token.mean()
    return (per_token * mask).sum() / mask.sum()


def reference_value_and_grad(student, teacher, mask=None, objective="forward_kl", full_teacher=None, **kw):
    s = student.detach().double().requires_grad_()
    loss = reference_loss(s, teacher, mask, objective, full_teacher, **kw)
    loss.backward()
    return loss.detach(), s.grad


def value_and_grad(student, teacher, mask=None, objective="forward_kl", **kw):
    s = student.detach().clone().requires_grad_()
    loss = kd_loss(s, teacher, mask, objective=objective, **kw)
    loss.backward()
    return loss.detach(), s.grad


def logits(n, v, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


N, V, K = 11, 37, 6
PARTIAL_MASK = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
TEMPERATURES = [dict(kd_temperature=1.0, teacher_temperature=1.0), dict(kd_temperature=1.7, teacher_temperature=0.6)]


# ----------------------------------------------------------------------------------------------
# Exactness against the reference


@pytest.mark.parametrize("objective", KD_OBJECTIVES)
@pytest.mark.parametrize("topk", [None, K, "tail"], ids=["full", "topk", "topk_tail"])
@pytest.mark.parametrize("temps", TEMPERATURES, ids=["T1", "T1.7_tau0.6"])
@pytest.mark.parametrize("mask", [None, PARTIAL_MASK], ids=["all", "partial"])
def test_value_and_gradient_match_reference(objective, topk, temps, mask):
    student, full_teacher = logits(N, V, 0), logits(N, V, 1)
    T, tau = temps["kd_temperature"], temps["teacher_temperature"]
    teacher = full_teacher
    if topk == "tail":  # the teacher ships its mass outside the top-k at the loss's temperature T·τ
        teacher = topk_teacher_logits(full_teacher, K, tail_temperature=T * tau)
    elif topk:
        teacher = topk_teacher_logits(full_teacher, topk)
    kw = dict(skew_lambda=0.3, adaptive_kl_alpha=0.4, **temps)
    loss, grad = value_and_grad(student, teacher, mask, objective, chunk_size=4, **kw)
    ref_loss, ref_grad = reference_value_and_grad(
        student, teacher, mask, objective, full_teacher, T=T, tau=tau, lam=0.3, alpha=0.4
    )
    assert loss.dtype == torch.float32 and loss.dim() == 0
    close(loss, ref_loss)
    close(grad, ref_grad)
    if mask is not None:
        assert torch.all(grad[~mask] == 0)
    outside = torch.ones(N, V, dtype=torch.bool)
    if topk:
        outside.scatter_(1, teacher.indices, False)
    if topk == K:  # renormalised over the top-k: nothing outside it is trained
        assert torch.all(grad[outside] == 0)
    if topk == "tail":  # the tail bucket trains the student's mass outside the top-k
        rows = torch.ones(N, dtype=torch.bool) if mask is None else mask
        assert torch.all(grad[rows][outside[rows]] != 0)


# ----------------------------------------------------------------------------------------------
# The tail bucket (top-k + "everything else")


def test_tail_logmass_is_the_teachers_mass_outside_its_topk_at_the_given_temperature():
    teacher = logits(N, V, 50)
    for temperature in (1.0, 1.7 * 0.6, 3.0):
        top = topk_teacher_logits(teacher, K, tail_temperature=temperature)
        p = torch.softmax(teacher.double() / temperature, -1)
        expected = tail_bucket(p, top.indices)[:, -1].log()
        assert top.tail_logmass.dtype == torch.float32 and top.tail_logmass.shape == (N,)
        close(top.tail_logmass, expected, 1e-5)


def test_tail_logmass_is_accurate_when_the_tail_is_almost_nothing_or_almost_everything():
    peaked = logits(N, V, 51, scale=40.0)  # the top-k holds all but ~e^-100 of the mass
    flat = logits(N, 4000, 52, scale=0.01)  # k = 1 of 4000 nearly equal logits: the tail is ~1 − 1/4000
    for teacher, k in ((peaked, K), (flat, 1)):
        top = topk_teacher_logits(teacher, k, tail_temperature=1.0)
        expected = tail_bucket(torch.softmax(teacher.double(), -1), top.indices)[:, -1].log()
        assert torch.isfinite(top.tail_logmass).all()
        torch.testing.assert_close(top.tail_logmass.double(), expected, rtol=1e-5, atol=1e-6)
    assert peaked_tail_is_tiny(peaked)


def test_tail_logmass_edge_cases_padded_columns_k_equals_vocab_overflowing_top_and_batched_shapes(monkeypatch):
    """The teacher's one-pass top-k + tail against the float64 definition and the general ``tail_logmass``."""
    from distill_trainer import losses
    from distill_trainer.losses import tail_logmass

    monkeypatch.setattr(losses, "TOPK_TAIL_CHUNK_BYTES", 3 * 4 * V)  # 3 rows a chunk: chunk edges are crossed

    padded = logits(N, V, 57)
    padded[:, V - 7:] = -INF  # a padded embedding's columns beyond the tokenizer
    gap = logits(N, V, 58)
    gap[:, :K] += 200.0  # the top-k sits 200 above the rest: exp((top − rest)/t) overflows float32
    for teacher, k, temperature in ((padded, K, 1.0), (padded, V - 7, 1.0), (padded, V - 8, 0.7), (gap, K, 0.5)):
        top = topk_teacher_logits(teacher, k, tail_temperature=temperature)
        p = torch.softmax(teacher.double() / temperature, -1)
        expected = tail_bucket(p, top.indices)[:, -1].log()
        torch.testing.assert_close(top.tail_logmass.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(top.tail_logmass, tail_logmass(teacher, top.indices, temperature), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(top.values, teacher.gather(1, top.indices))
        assert torch.equal(top.indices, torch.topk(teacher, k, dim=-1).indices)
    whole = topk_teacher_logits(logits(N, V, 59), V, tail_temperature=1.0)  # k = V: nothing is outside
    assert torch.equal(whole.tail_logmass, torch.full((N,), -INF))
    batched = logits(12, V, 60).reshape(2, 6, V).to(torch.bfloat16)  # [B, T, V], bf16 as a model emits
    top = topk_teacher_logits(batched, K, tail_temperature=1.0)
    assert top.values.dtype == torch.bfloat16 and top.values.shape == top.indices.shape == (2, 6, K)
    flat = topk_teacher_logits(batched.reshape(12, V), K, tail_temperature=1.0)
    assert torch.equal(top.tail_logmass.reshape(12), flat.tail_logmass) and top.tail_logmass.shape == (2, 6)
    expected = tail_bucket(torch.softmax(batched.reshape(12, V).double(), -1), flat.indices)[:, -1].log()
    torch.testing.assert_close(flat.tail_logmass.double(), expected, rtol=1e-5, atol=1e-6)


def peaked_tail_is_tiny(teacher):
    return bool((topk_teacher_logits(teacher, K, tail_temperature=1.0).tail_logmass < -20).any())


@pytest.mark.parametrize("objective", KD_OBJECTIVES)
def test_tail_bucket_matches_reference_when_the_tail_is_almost_nothing_or_almost_everything(objective):
    student = logits(N, V, 53)
    for full_teacher in (logits(N, V, 54, scale=40.0), logits(N, V, 55, scale=0.01)):
        teacher = topk_teacher_logits(full_teacher, K, tail_temperature=1.3)
        loss, grad = value_and_grad(student, teacher, None, objective, kd_temperature=1.3)
        ref_loss, ref_grad = reference_value_and_grad(student, teacher, None, objective, full_teacher, T=1.3)
        assert torch.isfinite(grad).all()
        close(loss, ref_loss)
        close(grad, ref_grad)
    # and a student whose own tail is ~0 (very peaked on the teacher's top-k)
    full_teacher = logits(N, V, 56)
    teacher = topk_teacher_logits(full_teacher, K, tail_temperature=1.0)
    peaked = torch.full((N, V), -60.0).scatter_(1, teacher.indices, teacher.values)
    loss, grad = value_and_grad(peaked, teacher, None, objective)
    ref_loss, ref_grad = reference_value_and_grad(peaked, teacher, None, objective, full_teacher)
    close(loss, ref_loss)
    close(grad, ref_grad)


@pytest.mark.parametrize("objective", KD_OBJECTIVES)
def test_tail_bucket_chunked_equals_unchunked(objective):
    student, full_teacher = logits(N, V, 57), logits(N, V, 58)
    teacher = topk_teacher_logits(full_teacher, K, tail_temperature=2.0)
    whole = value_and_grad(student, teacher, PARTIAL_MASK, objective, chunk_size=N, kd_temperature=2.0)
    for chunk in (1, 3, None):
        part = value_and_grad(student, teacher, PARTIAL_MASK, objective, chunk_size=chunk, kd_temperature=2.0)
        close(part[0], whole[0], 1e-6)
        close(part[1], whole[1], 1e-6)


def test_tail_bucket_with_k_equal_to_vocab_is_the_full_loss():
    student, teacher = logits(N, V, 59), logits(N, V, 60)
    for objective in KD_OBJECTIVES:
        full = value_and_grad(student, teacher, objective=objective)
        top = topk_teacher_logits(teacher, V, tail_temperature=1.0)
        assert torch.all(top.tail_logmass == -INF)
        with_tail = value_and_grad(student, top, objective=objective)
        close(with_tail[0], full[0])
        close(with_tail[1], full[1])


@pytest.mark.parametrize("objective", KD_OBJECTIVES)
def test_tail_bucket_with_minus_inf_logits_is_finite_and_follows_the_convention(objective):
    student, full_teacher = logits(N, V, 61), logits(N, V, 62)
    full_teacher[:, 20:] = -INF  # the teacher masks part of the vocabulary
    student[:, [0, 30]] = -INF  # the student masks tokens (one may be in the teacher's top-k)
    few = full_teacher.clone()
    few[:, 3:] = -INF  # fewer than k allowed tokens: −inf top-k values and an empty tail
    for t in (full_teacher, few):
        teacher = topk_teacher_logits(t, K, tail_temperature=1.5)
        loss, grad = value_and_grad(student, teacher, PARTIAL_MASK, objective, kd_temperature=1.5, chunk_size=4)
        ref_loss, ref_grad = reference_value_and_grad(student, teacher, PARTIAL_MASK, objective, t, T=1.5)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        close(loss, ref_loss)
        close(grad, ref_grad)


@pytest.mark.parametrize("objective", KD_OBJECTIVES)
def test_tail_bucket_row_of_all_minus_inf_logits_contributes_zero(objective):
    student, full_teacher = logits(N, V, 63), logits(N, V, 64)
    student[2] = -INF
    teacher = topk_teacher_logits(full_teacher, K, tail_temperature=1.0)
    loss, grad = value_and_grad(student, teacher, None, objective, chunk_size=4)
    keep = torch.arange(N) != 2
    kept = TopK(teacher.values[keep], teacher.indices[keep], teacher.tail_logmass[keep])
    ref_loss, ref_grad = reference_value_and_grad(student[keep], kept, None, objective, full_teacher[keep])
    close(loss, ref_loss * keep.sum() / N)
    close(grad[keep], ref_grad * keep.sum() / N)
    assert torch.all(grad[2] == 0)


@pytest.mark.parametrize("objective", KD_OBJECTIVES)
def test_tail_bucket_identical_teacher_and_student_give_zero(objective):
    same = logits(N, V, 65)
    loss, grad = value_and_grad(same, topk_teacher_logits(same, K, tail_temperature=2.0), None, objective,
                                kd_temperature=2.0)
    assert abs(loss.item()) < 1e-6 and grad.abs().max().item() < 1e-6


def test_tail_bucket_differs_from_renormalised_only_through_the_tail():
    """Same k logits, with and without the tail: both are valid losses, and only the tail trains outside K."""
    student, teacher = logits(N, V, 66), logits(N, V, 67)
    renormalised = value_and_grad(student, topk_teacher_logits(teacher, K))
    with_tail = value_and_grad(student, topk_teacher_logits(teacher, K, tail_temperature=1.0))
    assert with_tail[0] > 0 and renormalised[0] > 0 and not torch.allclose(with_tail[0], renormalised[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tail_bucket_low_precision_inputs_compute_in_float32(dtype):
    student, full_teacher = logits(N, V, 68).to(dtype), logits(N, V, 69).to(dtype)
    teacher = topk_teacher_logits(full_teacher, K, tail_temperature=2.0)
    loss, grad = value_and_grad(student, teacher, PARTIAL_MASK, "skewed_reverse_kl", kd_temperature=2.0)
    ref_loss, ref_grad = reference_value_and_grad(student, teacher, PARTIAL_MASK, "skewed_reverse_kl", full_teacher,
                                                  T=2.0)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    close(loss, ref_loss)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-2 * ref_grad.abs().max().item())


def test_tail_bucket_rejects_a_tail_of_the_wrong_shape():
    top = topk_teacher_logits(logits(4, 8, 70), 2, tail_temperature=1.0)
    with pytest.raises(ValueError, match="tail_logmass"):
        kd_loss(logits(4, 8, 71), TopK(top.values, top.indices, top.tail_logmass[:3]))


@pytest.mark.parametrize("objective", ["skewed_forward_kl", "skewed_reverse_kl"])
@pytest.mark.parametrize("lam", [0.0, 1.0, 0.9])
def test_skew_endpoints_match_reference(objective, lam):
    student, teacher = logits(N, V, 2), logits(N, V, 3)
    loss, grad = value_and_grad(student, teacher, None, objective, skew_lambda=lam)
    ref_loss, ref_grad = reference_value_and_grad(student, teacher, None, objective, lam=lam)
    close(loss, ref_loss)
    close(grad, ref_grad)


def test_skew_zero_is_the_plain_divergence():
    student, teacher = logits(N, V, 4), logits(N, V, 5)
    for skewed, plain in (("skewed_forward_kl", "forward_kl"), ("skewed_reverse_kl", "reverse_kl")):
        close(kd_loss(student, teacher, objective=skewed, skew_lambda=0.0), kd_loss(student, teacher, objective=plain))


def test_adaptive_kl_alpha_zero_is_forward_kl_and_alpha_one_is_reverse_kl():
    student, teacher = logits(N, V, 6), logits(N, V, 7)
    fkl, fkl_grad = value_and_grad(student, teacher, objective="forward_kl")
    rkl, rkl_grad = value_and_grad(student, teacher, objective="reverse_kl")
    a0, a0_grad = value_and_grad(student, teacher, objective="adaptive_kl", adaptive_kl_alpha=0.0)
    a1, a1_grad = value_and_grad(student, teacher, objective="adaptive_kl", adaptive_kl_alpha=1.0)
    close(a0, fkl)
    close(a0_grad, fkl_grad)
    close(a1, rkl)
    close(a1_grad, rkl_grad)


def test_adaptive_kl_weights_carry_no_gradient():
    """The gradient is exactly w_h ∇FKL + w_t ∇RKL with w computed from detached p and q."""
    student, teacher = logits(4, 9, 8), logits(4, 9, 9)
    s = student.double().requires_grad_()
    per_token = reference_per_token(s, teacher.double(), "adaptive_kl")
    with torch.no_grad():
        q = torch.softmax(s, -1)
        p = torch.softmax(teacher.double(), -1)
        p_sorted, order = p.sort(-1)
        gaps = (p - q).abs().gather(-1, order)
        tail = p_sorted.cumsum(-1) <= 0.5
        g_t, g_h = (gaps * tail).sum(-1), (gaps * ~tail).sum(-1)
    fkl = reference_per_token(s, teacher.double(), "forward_kl")
    rkl = reference_per_token(s, teacher.double(), "reverse_kl")
    mixed = (g_h / (g_h + g_t + EPS) * fkl + g_t / (g_h + g_t + EPS) * rkl).mean()
    expected = torch.autograd.grad(mixed, s)[0]
    close(kd_loss(student, teacher, objective="adaptive_kl"), per_token.mean())
    close(value_and_grad(student, teacher, objective="adaptive_kl")[1], expected)


@pytest.mark.parametrize("objective", KD_OBJECTIVES)
def test_chunked_equals_unchunked(objective):
    student, teacher = logits(N, V, 10), logits(N, V, 11)
    whole = value_and_grad(student, teacher, PARTIAL_MASK, objective, chunk_size=N)
    for chunk in (1, 3, None):
        part = value_and_grad(student, teacher, PARTIAL_MASK, objective, chunk_size=chunk)
        close(part[0], whole[0], 1e-6)
        close(part[1], whole[1], 1e-6)


def test_topk_with_k_equal_to_vocab_is_the_full_loss():
    student, teacher = logits(N, V, 12), logits(N, V, 13)
    for objective in KD_OBJECTIVES:
        full = value_and_grad(student, teacher, objective=objective)
        topk = value_and_grad(student, topk_teacher_logits(teacher, V), objective=objective)
        close(topk[0], full[0])
        close(topk[1], full[1])


def test_topk_teacher_logits_keeps_the_largest_k():
    teacher = logits(N, V, 14)
    kept = topk_teacher_logits(teacher, K)
    assert kept.values.shape == kept.indices.shape == (N, K) and kept.indices.dtype == torch.int64
    torch.testing.assert_close(kept.values, teacher.gather(1, kept.indices))
    assert torch.all(kept.values.min(1).values >= teacher.sort(1, descending=True).values[:, K - 1])


def test_normalizer_replaces_the_masked_count():
    student, teacher = logits(N, V, 15), logits(N, V, 16)
    mean, mean_grad = value_and_grad(student, teacher, PARTIAL_MASK, "reverse_kl")
    count = int(PARTIAL_MASK.sum())
    for normalizer in (50.0, torch.tensor(50.0), torch.tensor([50])):
        loss, grad = value_and_grad(student, teacher, PARTIAL_MASK, "reverse_kl", normalizer=normalizer)
        close(loss, mean * count / 50.0)
        close(grad, mean_grad * count / 50.0)


def test_batch_time_inputs_are_flattened():
    student, teacher = logits(N - 1, V, 17).view(2, 5, V), logits(N - 1, V, 18).view(2, 5, V)
    mask = PARTIAL_MASK[: N - 1].view(2, 5)
    loss, grad = value_and_grad(student, topk_teacher_logits(teacher, K), mask, "js_divergence")
    flat_loss, flat_grad = value_and_grad(
        student.view(-1, V), topk_teacher_logits(teacher.view(-1, V), K), mask.view(-1), "js_divergence"
    )
    assert grad.shape == (2, 5, V)
    close(loss, flat_loss)
    close(grad.view(-1, V), flat_grad)


def test_backward_scales_by_the_incoming_gradient_and_composes_with_other_terms():
    student, teacher = logits(N, V, 19), logits(N, V, 20)
    for topk in (None, K):
        t = teacher if topk is None else topk_teacher_logits(teacher, topk)
        _, unit = value_and_grad(student, t, objective="js_divergence")
        s = student.clone().requires_grad_()
        (0.25 * kd_loss(s, t, objective="js_divergence") + s.sum()).backward()
        close(s.grad, 0.25 * unit + 1.0)


def test_student_without_grad_gives_a_plain_scalar():
    student, teacher = logits(N, V, 21), logits(N, V, 22)
    loss = kd_loss(student, teacher, objective="adaptive_kl")
    assert loss.grad_fn is None and loss.dtype == torch.float32
    close(loss, reference_loss(student, teacher, objective="adaptive_kl"))
    with torch.no_grad():
        assert kd_loss(student.requires_grad_(), teacher).grad_fn is None


def test_teacher_receives_no_gradient():
    student, teacher = logits(N, V, 23).requires_grad_(), logits(N, V, 24).requires_grad_()
    kd_loss(student, teacher, objective="js_divergence").backward()
    assert teacher.grad is None and student.grad is not None


# ----------------------------------------------------------------------------------------------
# Degenerate inputs


def test_single_masked_token_is_that_tokens_divergence():
    student, teacher = logits(N, V, 25), logits(N, V, 26)
    mask = torch.zeros(N, dtype=torch.bool)
    mask[4] = True
    for objective in KD_OBJECTIVES:
        loss, grad = value_and_grad(student, teacher, mask, objective)
        ref_loss, ref_grad = reference_value_and_grad(student[4:5], teacher[4:5], None, objective)
        close(loss, ref_loss)
        close(grad[4:5], ref_grad)
        assert torch.all(grad[torch.arange(N) != 4] == 0)


@pytest.mark.parametrize("topk", [None, K], ids=["full", "topk"])
def test_all_masked_batch_gives_zero_loss_and_zero_gradient(topk):
    student, teacher = logits(N, V, 27), logits(N, V, 28)
    teacher = teacher if topk is None else topk_teacher_logits(teacher, topk)
    for objective in KD_OBJECTIVES:
        loss, grad = value_and_grad(student, teacher, torch.zeros(N, dtype=torch.bool), objective)
        assert loss.item() == 0.0
        assert grad.shape == student.shape and torch.all(grad == 0)


@pytest.mark.parametrize("objective", KD_OBJECTIVES)
def test_identical_teacher_and_student_give_zero(objective):
    same = logits(N, V, 29)
    for teacher in (same, topk_teacher_logits(same, K)):
        loss, grad = value_and_grad(same, teacher, None, objective, kd_temperature=2.0)
        assert abs(loss.item()) < 1e-6
        assert grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("objective", KD_OBJECTIVES)
def test_vocab_masked_on_both_sides_is_the_loss_over_the_rest(objective):
    student, teacher = logits(N, V, 30), logits(N, V, 31)
    masked = torch.zeros(V, dtype=torch.bool)
    masked[[0, 5, 6, 30]] = True
    student[:, masked], teacher[:, masked] = -INF, -INF
    loss, grad = value_and_grad(student, teacher, PARTIAL_MASK, objective, kd_temperature=1.3, chunk_size=3)
    ref_loss, ref_grad = reference_value_and_grad(
        student[:, ~masked], teacher[:, ~masked], PARTIAL_MASK, objective, T=1.3
    )
    assert not torch.isnan(grad).any()
    close(loss, ref_loss)
    close(grad[:, ~masked], ref_grad)
    assert torch.all(grad[:, masked] == 0)


@pytest.mark.parametrize("objective", KD_OBJECTIVES)
@pytest.mark.parametrize("side", ["teacher", "student"])
def test_vocab_masked_on_one_side_is_finite_and_follows_the_convention(objective, side):
    student, teacher = logits(N, V, 32), logits(N, V, 33)
    (teacher if side == "teacher" else student)[:, 3:9] = -INF
    loss, grad = value_and_grad(student, teacher, None, objective, chunk_size=5)
    ref_loss, ref_grad = reference_value_and_grad(student, teacher, None, objective)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    close(loss, ref_loss)
    close(grad, ref_grad)


@pytest.mark.parametrize("objective", KD_OBJECTIVES)
def test_a_row_of_all_minus_inf_logits_contributes_zero(objective):
    student, teacher = logits(N, V, 34), logits(N, V, 35)
    student[2], teacher[7] = -INF, -INF
    loss, grad = value_and_grad(student, teacher, None, objective, chunk_size=4)
    keep = torch.ones(N, dtype=torch.bool)
    keep[[2, 7]] = False
    ref_loss, ref_grad = reference_value_and_grad(student[keep], teacher[keep], None, objective)
    close(loss, ref_loss * keep.sum() / N)
    close(grad[keep], ref_grad * keep.sum() / N)
    assert torch.all(grad[~keep] == 0)


def test_topk_with_minus_inf_teacher_values_is_finite():
    student, teacher = logits(N, V, 36), logits(N, V, 37)
    teacher[:, K // 2 :] = -INF  # fewer than k allowed tokens: some kept entries are −inf
    kept = topk_teacher_logits(teacher, K)
    for objective in KD_OBJECTIVES:
        loss, grad = value_and_grad(student, kept, None, objective)
        ref_loss, ref_grad = reference_value_and_grad(student, kept, None, objective)
        close(loss, ref_loss)
        close(grad, ref_grad)


# ----------------------------------------------------------------------------------------------
# Dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_inputs_compute_in_float32(dtype):
    student, teacher = logits(N, V, 38).to(dtype), logits(N, V, 39).to(dtype)
    for t in (teacher, topk_teacher_logits(teacher, K)):
        loss, grad = value_and_grad(student, t, PARTIAL_MASK, "skewed_reverse_kl", kd_temperature=2.0)
        ref_loss, ref_grad = reference_value_and_grad(student, t, PARTIAL_MASK, "skewed_reverse_kl", T=2.0, lam=0.1)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        close(loss, ref_loss)
        tol = 1e-5 if dtype == torch.float64 else 1e-2
        torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol * ref_grad.abs().max().item())


# ----------------------------------------------------------------------------------------------
# Argument errors name the argument


def _call(**overrides):
    args = dict(student_logits=logits(4, 8, 40), teacher=logits(4, 8, 41))
    args.update(overrides)
    return kd_loss(**args)


@pytest.mark.parametrize(
    "overrides, argument",
    [
        (dict(objective="kl"), "objective"),
        (dict(teacher=logits(4, 9, 0)), "teacher"),
        (dict(teacher=logits(3, 8, 0)), "teacher"),
        (dict(teacher=TopK(torch.zeros(4, 9), torch.zeros(4, 9, dtype=torch.long))), "teacher"),
        (dict(teacher=TopK(torch.zeros(4, 3), torch.zeros(4, 2, dtype=torch.long))), "teacher"),
        (dict(teacher=TopK(torch.zeros(4, 2), torch.full((4, 2), 8))), "teacher"),
        (dict(mask=torch.ones(5, dtype=torch.bool)), "mask"),
        (dict(student_logits=torch.zeros(8)), "student_logits"),
        (dict(skew_lambda=1.5), "skew_lambda"),
        (dict(skew_lambda=-0.1), "skew_lambda"),
        (dict(adaptive_kl_alpha=-0.01), "adaptive_kl_alpha"),
        (dict(adaptive_kl_alpha=2), "adaptive_kl_alpha"),
        (dict(kd_temperature=0.0), "kd_temperature"),
        (dict(teacher_temperature=-1.0), "teacher_temperature"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(normalizer=0.0), "normalizer"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_the_argument(overrides, argument):
    with pytest.raises(ValueError, match=argument):
        _call(**overrides)


def test_topk_teacher_logits_rejects_k_larger_than_vocab():
    with pytest.raises(ValueError, match="k"):
        topk_teacher_logits(logits(2, 5, 0), 6)


def test_objective_list_is_complete():
    assert set(KD_OBJECTIVES) == {
        "forward_kl",
        "reverse_kl",
        "adaptive_kl",
        "skewed_forward_kl",
        "skewed_reverse_kl",
        "js_divergence",
    }


def test_retained_graph_allows_a_second_unit_backward():
    student, teacher = logits(N, V, 42).requires_grad_(), logits(N, V, 43)
    loss = kd_loss(student, teacher, objective="reverse_kl")
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    loss.backward()
    close(student.grad, 2 * first)


@pytest.mark.parametrize("topk", [None, K, "tail"], ids=["full", "topk", "topk_tail"])
def test_autograd_keeps_only_the_gradient_between_forward_and_backward(topk):
    """The memory claim: nothing [N, V]-sized but the gradient itself (full, top-k with the tail) or the [N, k]
    one (top-k renormalised)."""
    student, teacher = logits(N, V, 44).requires_grad_(), logits(N, V, 45)
    if topk == "tail":
        teacher = topk_teacher_logits(teacher, K, tail_temperature=1.0)
        topk = None  # the same bound as the full vocabulary
    else:
        teacher = teacher if topk is None else topk_teacher_logits(teacher, topk)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = kd_loss(student, teacher, objective="adaptive_kl", chunk_size=3)
    assert sum(saved) <= (N * V if topk is None else 2 * N * K)
    loss.backward()


def test_adaptive_kl_keeps_tied_teacher_probabilities_on_one_side():
    """A uniform teacher has cumulative mass 1 at every tied token: all head, so the loss is forward KL."""
    student, teacher = logits(N, V, 46), torch.zeros(N, V)
    adaptive = value_and_grad(student, teacher, objective="adaptive_kl", adaptive_kl_alpha=0.5)
    forward = value_and_grad(student, teacher, objective="forward_kl")
    close(adaptive[0], forward[0])
    close(adaptive[1], forward[1])
