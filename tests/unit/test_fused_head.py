"""The LM head only at the label positions, and the fused output layer + loss (fused_head): the same losses and
gradients as the logits of every position followed by ``distill_loss``."""

import copy

import pytest
import torch
import torch.nn.functional as F

from distill_trainer.data import IGNORE_INDEX
from distill_trainer.distill_loss import LossConfig, TeacherTargets, distill_loss, fused_head_distill_loss
from distill_trainer.losses import topk_teacher_logits
from distill_trainer.shared_names import KD_OBJECTIVES

B, T, D, V, K = 3, 7, 12, 50, 6


def batch(dtype, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 0.7).to(dtype)
    b = (torch.randn(V, generator=g) * 0.3).to(dtype) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = IGNORE_INDEX  # a prompt, and right padding: a partial mask
    labels[2, 5:] = IGNORE_INDEX
    teacher_logits = torch.randn(B, T, V, generator=g) * 3
    return hidden, weight, b, labels, teacher_logits


def targets(teacher_logits, labels, kind, cfg):
    rows = teacher_logits[labels != IGNORE_INDEX]
    if kind == "full":
        return TeacherTargets(rows)
    top = topk_teacher_logits(rows, K, cfg.kd_temperature * cfg.teacher_temperature if kind == "topk_tail" else None)
    return TeacherTargets(top.values, top.indices, top.tail_logmass)


def unfused(hidden, weight, bias, labels, teacher, cfg, normalizer):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    bias = None if bias is None else bias.clone().requires_grad_()
    terms = distill_loss(F.linear(hidden, weight, bias), labels, teacher, cfg, normalizer)
    terms.loss.backward()
    return terms, hidden.grad[labels != IGNORE_INDEX], weight.grad, None if bias is None else bias.grad


def fused(hidden, weight, bias, labels, teacher, cfg, normalizer, chunk_rows):
    mask = labels != IGNORE_INDEX
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    bias = None if bias is None else bias.clone().requires_grad_()
    terms = fused_head_distill_loss(hidden[mask], weight, bias, labels[mask], teacher, cfg, normalizer, chunk_rows)
    terms.loss.backward()
    return terms, hidden.grad[mask], weight.grad, None if bias is None else bias.grad


def assert_same(expected, actual, tol):
    (e_terms, *e_grads), (a_terms, *a_grads) = expected, actual
    torch.testing.assert_close(a_terms.loss, e_terms.loss, rtol=tol, atol=tol)
    torch.testing.assert_close(a_terms.ce_sum, e_terms.ce_sum, rtol=tol, atol=tol)
    torch.testing.assert_close(a_terms.kd_sum, e_terms.kd_sum, rtol=tol, atol=tol)
    assert a_terms.label_tokens == e_terms.label_tokens
    for name, e, a in zip(("hidden", "weight", "bias"), e_grads, a_grads):
        if e is None:
            assert a is None
            continue
        assert a.dtype == e.dtype, name
        scale = float(e.abs().max())
        difference = float((a.float() - e.float()).abs().max())
        assert difference <= tol * scale, f"{name}: max difference {difference:.3g} of max {scale:.3g}"


@pytest.mark.parametrize("kind", ["full", "topk_tail", "topk"])
@pytest.mark.parametrize("objective", KD_OBJECTIVES)
@pytest.mark.parametrize("weight", [1.0, 0.4])
def test_fused_head_equals_logits_then_loss_fp32(objective, kind, weight):
    cfg = LossConfig(distill_loss_weight=weight, kd_objective=objective, kd_temperature=1.5, teacher_temperature=1.2,
                     logits_topk=K if kind != "full" else 0, topk_tail=kind == "topk_tail")
    hidden, w, b, labels, teacher_logits = batch(torch.float32, bias=objective == "js_divergence")
    teacher = targets(teacher_logits, labels, kind, cfg)
    normalizer = 29.0
    expected = unfused(hidden, w, b, labels, teacher, cfg, normalizer)
    actual = fused(hidden, w, b, labels, teacher, cfg, normalizer, chunk_rows=4)  # several chunks, one partial
    assert_same(expected, actual, 2e-5)


@pytest.mark.parametrize("kind", ["full", "topk_tail", "topk"])
@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_fused_head_equals_logits_then_loss_bf16(kind, weight):
    cfg = LossConfig(distill_loss_weight=weight, kd_objective="forward_kl", logits_topk=K, topk_tail=kind == "topk_tail")
    hidden, w, b, labels, teacher_logits = batch(torch.bfloat16, seed=3)
    teacher = targets(teacher_logits, labels, kind, cfg)
    expected = unfused(hidden, w, b, labels, teacher, cfg, 20.0)
    actual = fused(hidden, w, b, labels, teacher, cfg, 20.0, chunk_rows=5)
    assert_same(expected, actual, 2e-2)  # bf16: the gradients are rounded at different points


def test_fused_head_sft_only_needs_no_teacher():
    cfg = LossConfig(distill_loss_weight=0.0)
    hidden, w, b, labels, _ = batch(torch.float32, seed=5, bias=True)
    assert_same(unfused(hidden, w, b, labels, None, cfg, 17.0), fused(hidden, w, b, labels, None, cfg, 17.0, None), 2e-5)


def test_fused_head_backward_scales_by_grad_output():
    cfg = LossConfig(distill_loss_weight=0.5, kd_objective="reverse_kl", logits_topk=K)
    hidden, w, _, labels, teacher_logits = batch(torch.float32, seed=7)
    mask = labels != IGNORE_INDEX
    teacher = targets(teacher_logits, labels, "topk_tail", cfg)
    grads = []
    for scale in (1.0, 3.0):
        h = hidden[mask].clone().requires_grad_()
        (fused_head_distill_loss(h, w, None, labels[mask], teacher, cfg, 10.0).loss * scale).backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[1], 3.0 * grads[0])


@pytest.mark.parametrize("kind", ["full", "topk"])
def test_fp16_gradients_take_a_loss_scale_without_underflow_or_overflow(kind):
    # A mixed-precision loss scale (2^16, Megatron's fp16 start) is beyond fp16's range, and the unscaled fp16
    # gradients of small losses underflow: the fp16 gradients are float32 until the scale is applied.
    cfg = LossConfig(distill_loss_weight=1.0 if kind == "topk" else 0.5, logits_topk=K if kind == "topk" else 0,
                     topk_tail=False)
    hidden, w, _, labels, teacher_logits = batch(torch.float32, seed=9)
    mask = labels != IGNORE_INDEX
    teacher = targets(teacher_logits, labels, kind, cfg)
    scale = 2.0**16
    grads = {}
    for dtype in (torch.float32, torch.float16):
        h, weight = hidden[mask].to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
        (fused_head_distill_loss(h, weight, None, labels[mask], teacher, cfg, 1e4).loss * scale).backward()
        assert h.grad.dtype == weight.grad.dtype == dtype
        grads[dtype] = (h.grad, weight.grad)
    for expected, got in zip(grads[torch.float32], grads[torch.float16]):
        assert torch.isfinite(got).all()
        assert (got != 0).sum() == (expected != 0).sum()  # nothing underflowed
        torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=float(expected.abs().max()) * 2e-2)


def test_default_chunk_on_cpu_is_cache_sized_but_never_under_64_rows_and_default_chunks_equal_explicit_ones():
    from distill_trainer.fused_head import default_chunk_rows

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_chunk_rows(8192, cpu) == 64  # 64 rows x 8,192 float32 logits: 2 MiB, one core's L2
    assert default_chunk_rows(151_936, cpu) == 64  # W is re-read per chunk: never fewer rows
    assert default_chunk_rows(1024, cpu) == 512
    assert default_chunk_rows(151_936, cuda) == 110  # 256 MiB of logits and their gradient
    # 200 label rows at V = 50: one default chunk; the same rows in chunks of 7 give the same loss and gradients
    cfg = LossConfig(distill_loss_weight=0.5, logits_topk=K)
    g = torch.Generator().manual_seed(11)
    hidden, weight = torch.randn(200, D, generator=g), torch.randn(V, D, generator=g) * 0.7
    labels = torch.randint(0, V, (200,), generator=g)
    top = topk_teacher_logits(torch.randn(200, V, generator=g) * 3, K, 1.0)
    teacher = TeacherTargets(top.values, top.indices, top.tail_logmass)
    results = []
    for rows in (None, 7):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        terms = fused_head_distill_loss(h, w, None, labels, teacher, cfg, 200.0, rows)
        terms.loss.backward()
        results.append((terms.loss, h.grad, w.grad))
    for default, explicit in zip(*results):
        torch.testing.assert_close(default, explicit, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ the torch strategies


@pytest.fixture(scope="module")
def strategies(tiny_setup, tmp_path_factory):
    from distill_trainer.config import DistillConfig
    from distill_trainer.models import VocabInfo
    from distill_trainer.strategies.base import RankContext
    from distill_trainer.strategies.torch import TorchInferStrategy, TorchTrainStrategy
    from tests.conftest import tiny_config_dict

    config = DistillConfig.model_validate(
        tiny_config_dict(tiny_setup, tmp_path_factory.mktemp("fused"), logits_topk=8, distill_loss_weight=0.5))
    teacher = TorchInferStrategy(config, RankContext(), VocabInfo(size=40, eos_token_id=1, pad_token_id=0))
    student = TorchTrainStrategy(config, RankContext(), VocabInfo(size=40, eos_token_id=1, pad_token_id=0))
    return config, teacher, student


def micro_batch_of(seed):
    from distill_trainer.strategies.base import MicroBatch

    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 40, (3, 10), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    labels = input_ids.roll(-1, 1).masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX  # the prompt
    return MicroBatch(input_ids, attention_mask, labels)


def test_teacher_applies_the_head_at_label_positions_only(strategies):
    _, teacher, _ = strategies
    assert teacher.parts is not None
    mb = micro_batch_of(0)
    head_inputs = []
    handle = teacher.parts.head.register_forward_hook(lambda module, args, out: head_inputs.append(args[0].shape))
    try:
        targets_ = teacher.forward(mb)
    finally:
        handle.remove()
    n_label = int((mb.labels != IGNORE_INDEX).sum())
    assert head_inputs == [torch.Size([n_label, teacher.model.config.hidden_size])]
    full = teacher.logits(mb.input_ids, mb.attention_mask)[mb.labels != IGNORE_INDEX].float()
    top = topk_teacher_logits(full, teacher.topk, teacher.tail_temperature)
    torch.testing.assert_close(targets_.values, top.values, rtol=0, atol=1e-5)
    torch.testing.assert_close(targets_.tail, top.tail_logmass, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fused_head", [False, True])
def test_student_step_equals_full_logits_then_loss(strategies, fused_head):
    from distill_trainer.distill_loss import make_loss_fn

    config, teacher, student = strategies
    mb = micro_batch_of(1)
    mb.teacher = teacher.forward(mb)
    loss_fn = make_loss_fn(LossConfig.from_config(config), normalizer=23.0)
    model = student.model

    reference = copy.deepcopy(model)  # every position's logits, then the loss, as before
    logits = reference(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[..., :40]
    expected = loss_fn(logits, mb)
    expected.loss.backward()

    assert student.parts is not None and type(student.parts.head) is torch.nn.Linear
    student.fused_head = fused_head
    model.zero_grad(set_to_none=True)
    stats = student.forward_backward([mb], loss_fn)
    assert stats.loss == pytest.approx(float(expected.loss), rel=1e-6)
    assert stats.ce_sum == pytest.approx(float(expected.ce_sum), rel=1e-6)
    assert stats.kd_sum == pytest.approx(float(expected.kd_sum), rel=1e-5)
    worst = 0.0
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        worst = max(worst, float((p.grad - q.grad).abs().max()))
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    model.zero_grad(set_to_none=True)
    eval_stats = student.eval_forward([mb], loss_fn)
    assert eval_stats.ce_sum == pytest.approx(float(expected.ce_sum), rel=1e-6)
