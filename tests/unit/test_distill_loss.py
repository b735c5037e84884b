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


def _targets(teacher, labels, topk):
    rows = teacher[labels != IGNORE_INDEX]
    if not topk:
        return TeacherTargets(rows)
    top = topk_teacher_logits(rows, topk)
    return TeacherTargets(top.values, top.indices)


@pytest.mark.parametrize("topk", [0, K])
@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_loss_is_the_weighted_sum_of_ce_and_kd_over_the_normalizer(topk, weight):
    student, teacher, labels = _inputs()
    mask = labels != IGNORE_INDEX
    cfg = LossConfig(weight, kd_objective="reverse_kl", kd_temperature=1.5, logits_topk=topk)
    terms = distill_loss(student, labels, _targets(teacher, labels, topk), cfg, normalizer=20.0)
    ce = F.cross_entropy(student[mask], labels[mask], reduction="sum")
    kd_teacher = teacher[mask] if not topk else topk_teacher_logits(teacher[mask], topk)
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
        for topk in (0, K):
            for objective in ("forward_kl", "adaptive_kl"):
                student, teacher, labels = _inputs()
                cfg = LossConfig(0.4, kd_objective=objective, kd_temperature=1.3, teacher_temperature=0.8,
                                 logits_topk=topk)
                whole = student.clone().requires_grad_()
                expected = distill_loss(whole, labels, _targets(teacher, labels, topk), cfg, normalizer=11.0)
                expected.loss.backward()
                # The teacher rank with the same TP index sends its shard, or its shard's top-k with global indices.
                rows = teacher[labels != IGNORE_INDEX][:, start:stop]
                if topk:
                    top = topk_teacher_logits(rows, topk)
                    mine = TeacherTargets(top.values, top.indices + start)
                else:
                    mine = TeacherTargets(rows)
                part = student[..., start:stop].clone().requires_grad_()
                terms = distill_loss(part, labels, mine, cfg, normalizer=11.0,
                                     shard=VocabShard(group, start, stop - start))
                terms.loss.backward()
                where = f"rank {rank} topk={topk} {objective}"
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
