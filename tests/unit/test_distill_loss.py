"""distill_loss: (1 − w)·CE + w·KD as sums over label tokens / the global normalizer, on whole and on
vocabulary-sharded logits (2 gloo CPU processes) with the same values and gradients."""

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from distill_trainer.data import IGNORE_INDEX
from distill_trainer.distill_loss import LossConfig, TeacherTargets, VocabShard, distill_loss
from distill_trainer.losses import kd_loss, topk_teacher_logits

B, T, V, K = 2, 5, 37, 4
SPLIT = 20  # rank 0 holds columns [0, 20), rank 1 [20, 37)


def _inputs():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(B, T, V, generator=g) * 2
    teacher = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[1, 4] = IGNORE_INDEX
    return student, teacher, labels


def _targets(teacher, labels, topk, tail_temperature=1.0):
    """What the teacher ships: full rows, or the top-k with its log mass outside them at T·τ."""
    rows = teacher[labels != IGNORE_INDEX]
    if not topk:
        return TeacherTargets(rows)
    top = topk_teacher_logits(rows, topk, tail_temperature=tail_temperature)
    return TeacherTargets(top.values, top.indices, top.tail_logmass)


@pytest.mark.parametrize("tail", [True, False], ids=["topk_tail", "renormalised"])
@pytest.mark.parametrize("topk", [0, K])
@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_loss_is_the_weighted_sum_of_ce_and_kd_over_the_normalizer(topk, weight, tail):
    student, teacher, labels = _inputs()
    mask = labels != IGNORE_INDEX
    cfg = LossConfig(weight, kd_objective="reverse_kl", kd_temperature=1.5, logits_topk=topk, topk_tail=tail)
    terms = distill_loss(student, labels, _targets(teacher, labels, topk, 1.5), cfg, normalizer=20.0)
    ce = F.cross_entropy(student[mask], labels[mask], reduction="sum")
    kd_teacher = teacher[mask] if not topk else topk_teacher_logits(teacher[mask], topk, 1.5 if tail else None)
    kd = kd_loss(student[mask], kd_teacher, objective="reverse_kl", kd_temperature=1.5, normalizer=1.0)
    assert terms.label_tokens == int(mask.sum())
    assert float(terms.ce_sum) == pytest.approx(float(ce), rel=1e-6)
    expected_loss = (1 - weight) * ce / 20 + weight * kd / 20
    assert float(terms.loss) == pytest.approx(float(expected_loss), rel=1e-5)
    assert float(terms.kd_sum) == (pytest.approx(float(kd), rel=1e-5) if weight else 0.0)


def test_sft_needs_no_teacher_and_a_nonfinite_ce_stays_out_of_pure_kd():
    student, teacher, labels = _inputs()
    terms = distill_loss(student, labels, None, LossConfig(0.0), normalizer=5.0)
    assert torch.isfinite(terms.loss)
    student[0, 3, :] = -float("inf")  # CE of that token is inf; pure KD ignores CE
    student[0, 3, 0] = 0.0
    labels[0, 3] = 1
    terms = distill_loss(student, labels, _targets(teacher, labels, 0), LossConfig(1.0), normalizer=5.0)
    assert torch.isfinite(terms.loss) and not torch.isfinite(terms.ce_sum)
    with pytest.raises(ValueError, match="no teacher targets"):
        distill_loss(student, labels, None, LossConfig(0.5), normalizer=5.0)


def test_pure_kd_still_reports_the_students_cross_entropy_and_trains_nothing_through_it():
    student, teacher, labels = _inputs()
    mask = labels != IGNORE_INDEX
    whole = student.clone().requires_grad_()
    terms = distill_loss(whole, labels, _targets(teacher, labels, K), LossConfig(1.0, logits_topk=K), normalizer=8.0)
    assert float(terms.ce_sum) == pytest.approx(float(F.cross_entropy(student[mask], labels[mask], reduction="sum")))
    terms.loss.backward()
    kd_only = student.clone().requires_grad_()
    kd_loss(kd_only[mask], topk_teacher_logits(teacher[mask], K, 1.0), normalizer=8.0).backward()
    torch.testing.assert_close(whole.grad, kd_only.grad)


def test_topk_tail_off_is_the_renormalised_loss_bit_for_bit_and_on_needs_the_shipped_tail():
    student, teacher, labels = _inputs()
    mask = labels != IGNORE_INDEX
    shipped = _targets(teacher, labels, K)  # carries the tail; topk_tail=false ignores it
    off = distill_loss(student, labels, shipped, LossConfig(1.0, logits_topk=K, topk_tail=False), normalizer=8.0)
    plain = kd_loss(student[mask], topk_teacher_logits(teacher[mask], K), normalizer=8.0)
    assert torch.equal(off.loss, plain)
    without_tail = TeacherTargets(shipped.values, shipped.indices)
    with pytest.raises(ValueError, match="topk_tail"):
        distill_loss(student, labels, without_tail, LossConfig(1.0, logits_topk=K), normalizer=8.0)


def test_targets_travel_by_name_with_their_tail():
    _, teacher, labels = _inputs()
    shipped = _targets(teacher, labels, K)
    named = shipped.tensors()
    assert set(named) == {"values", "indices", "tail"} and named["indices"].dtype == torch.int32
    back = TeacherTargets.from_tensors(named)
    halves = TeacherTargets.cat(back.split([3, back.rows - 3]))
    assert torch.equal(halves.tail, shipped.tail) and torch.equal(halves.indices.long(), shipped.indices)
    assert set(TeacherTargets(shipped.values).tensors()) == {"values"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sharded_rank(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        start, stop = (0, SPLIT) if rank == 0 else (SPLIT, V)
        group = dist.group.WORLD
        for topk, tail in ((0, False), (K, False), (K, True)):
            for objective in ("forward_kl", "adaptive_kl"):
                student, teacher, labels = _inputs()
                cfg = LossConfig(0.4, kd_objective=objective, kd_temperature=1.3, teacher_temperature=0.8,
                                 logits_topk=topk, topk_tail=tail)
                whole = student.clone().requires_grad_()
                shipped_whole = _targets(teacher, labels, topk, 1.3 * 0.8)
                expected = distill_loss(whole, labels, shipped_whole, cfg, normalizer=11.0)
                expected.loss.backward()
                # The teacher rank with the same TP index sends its shard, or its shard's top-k with global indices
                # and the tail mass outside the global top-k (the same on every teacher rank).
                rows = teacher[labels != IGNORE_INDEX][:, start:stop]
                if topk:
                    top = topk_teacher_logits(rows, topk)
                    mine = TeacherTargets(top.values, top.indices + start, shipped_whole.tail)
                else:
                    mine = TeacherTargets(rows)
                part = student[..., start:stop].clone().requires_grad_()
                terms = distill_loss(part, labels, mine, cfg, normalizer=11.0,
                                     shard=VocabShard(group, start, stop - start))
                terms.loss.backward()
                where = f"rank {rank} topk={topk} tail={tail} {objective}"
                torch.testing.assert_close(terms.loss, expected.loss, rtol=1e-5, atol=1e-6, msg=where)
                torch.testing.assert_close(terms.ce_sum, expected.ce_sum, rtol=1e-6, atol=1e-6, msg=where)
                torch.testing.assert_close(terms.kd_sum, expected.kd_sum, rtol=1e-5, atol=1e-6, msg=where)
                torch.testing.assert_close(part.grad, whole.grad[..., start:stop], rtol=1e-5, atol=1e-6, msg=where)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def test_vocab_sharded_loss_equals_the_whole_vocabulary_loss():
    mp.spawn(_sharded_rank, args=(_free_port(),), nprocs=2, join=True)
