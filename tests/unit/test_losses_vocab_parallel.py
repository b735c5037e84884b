"""vocab_parallel_kd_loss on 2 gloo CPU processes equals kd_loss on the unsharded logits (full vocabulary,
top-k renormalised, top-k with the tail bucket: computed from the teacher's shards, or shipped)."""

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distill_trainer.losses import KD_OBJECTIVES, kd_loss, topk_teacher_logits
from distill_trainer.parallel_losses import vocab_parallel_kd_loss, vocab_parallel_tail_logmass, vocab_parallel_topk

N, V, K = 9, 41, 5
SPLIT = 23  # rank 0 holds columns [0, 23), rank 1 holds [23, 41): uneven on purpose
WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _inputs(masked_vocab: bool):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(N, V, generator=g) * 3
    teacher = torch.randn(N, V, generator=g) * 3
    if masked_vocab:  # entries masked on both sides and on the teacher's only, all in rank 1's shard
        student[:, 30] = teacher[:, 30] = -float("inf")
        teacher[:, 35] = -float("inf")
    mask = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    return student, teacher, mask


def _check_rank(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    group = dist.new_group([0, 1])
    try:
        start, stop = (0, SPLIT) if rank == 0 else (SPLIT, V)
        kw = dict(kd_temperature=1.6, teacher_temperature=0.7, skew_lambda=0.2, adaptive_kl_alpha=0.4)
        tail_temperature = kw["kd_temperature"] * kw["teacher_temperature"]
        cases = [(o, k, m) for o in KD_OBJECTIVES for k in (0, K, "tail", "shipped_tail") for m in (False, True)]
        for objective, topk, masked_vocab in cases:
            student, teacher, mask = _inputs(masked_vocab)
            full = student.clone().requires_grad_()
            if topk in ("tail", "shipped_tail"):
                target = topk_teacher_logits(teacher, K, tail_temperature=tail_temperature)
            else:
                target = teacher if not topk else topk_teacher_logits(teacher, topk)
            expected = kd_loss(full, target, mask, objective=objective, **kw)
            expected.backward()
            shard = student[:, start:stop].clone().requires_grad_()
            given, options = teacher[:, start:stop], dict(topk=topk)
            if topk == "tail":  # the loss takes the global top-k and the tail from the teacher's shards
                options = dict(topk=K, topk_tail=True)
            elif topk == "shipped_tail":  # what the teacher's TP ranks ship
                given = vocab_parallel_topk(teacher[:, start:stop].clone(), K, vocab_start=start, group=group,
                                            tail_temperature=tail_temperature)
                torch.testing.assert_close(given.tail_logmass, target.tail_logmass, rtol=1e-5, atol=1e-6)
                options = {}
            loss = vocab_parallel_kd_loss(
                shard,
                given,
                group=group,
                vocab_start=start,
                mask=mask,
                objective=objective,
                chunk_size=4,
                **options,
                **kw,
            )
            (3.0 * loss).backward()
            where = f"{objective} topk={topk} masked_vocab={masked_vocab} rank={rank}"
            torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6, msg=where)
            torch.testing.assert_close(
                shard.grad, 3.0 * full.grad[:, start:stop], rtol=1e-5, atol=1e-6, msg=where
            )
        student, teacher, _ = _inputs(False)
        # The teacher's tail from all-reduced log-sum-exps, near 0 and near 1, equals the unsharded one.
        for scale, k in ((15.0, K), (0.01, 1)):
            peaked = teacher * scale
            whole = topk_teacher_logits(peaked, k, tail_temperature=0.9)
            tail = vocab_parallel_tail_logmass(peaked[:, start:stop], whole.indices, vocab_start=start, group=group,
                                               temperature=0.9)
            torch.testing.assert_close(tail, whole.tail_logmass, rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # no gradient wanted: value only
            value = vocab_parallel_kd_loss(
                student[:, start:stop], teacher[:, start:stop], group=group, vocab_start=start
            )
        torch.testing.assert_close(value, kd_loss(student, teacher))
        try:
            vocab_parallel_kd_loss(
                student[:, start:stop], teacher[:, start:stop], group=group, vocab_start=start, topk=SPLIT
            )
        except ValueError as err:
            assert "topk" in str(err)
        else:
            raise AssertionError("topk larger than a shard was accepted")
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_vocab_parallel_loss_equals_unsharded_in_value_and_gradient():
    mp.spawn(_check_rank, args=(_free_port(),), nprocs=WORLD, join=True)
