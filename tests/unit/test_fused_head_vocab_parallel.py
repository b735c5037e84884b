"""The fused output layer + loss over a vocabulary shard (``fused_head_distill_loss`` with a ``VocabShard``, what the
Megatron student runs on each TP rank) on 2 gloo CPU processes equals ``distill_loss`` on the same rank's logits
shard ``hidden @ W_shardᵀ`` (padded columns −inf): loss, CE and KD sums, and the gradients of the hidden states
and of the weight shard, for every objective, full-vocabulary and top-k targets (with the tail, renormalised),
CE + KD, pure KD and SFT, over several chunks."""

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from distill_trainer.data import IGNORE_INDEX
from distill_trainer.distill_loss import LossConfig, TeacherTargets, VocabShard, distill_loss, fused_head_distill_loss
from distill_trainer.losses import topk_teacher_logits
from distill_trainer.parallel_losses import shard_topk
from distill_trainer.shared_names import KD_OBJECTIVES

B, T, D, K = 3, 6, 10, 4
VOCAB, WIDTH = 45, 26  # two shards of 26 columns: [0, 26) and [26, 52); columns 45..51 are padding
WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _inputs():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(B, T, D, generator=g)
    weight = torch.randn(WORLD * WIDTH, D, generator=g) * 0.8
    weight[VOCAB:] = 0.0  # Megatron's padding rows
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[2, 4:] = IGNORE_INDEX
    teacher = torch.randn(int((labels != IGNORE_INDEX).sum()), VOCAB, generator=g) * 3
    return hidden, weight, labels, teacher


def _targets(kind, teacher, rank, cfg):
    if kind is None:
        return None
    full = torch.full((teacher.shape[0], WORLD * WIDTH), -float("inf"))
    full[:, :VOCAB] = teacher
    mine = full[:, rank * WIDTH : (rank + 1) * WIDTH]
    if kind == "full":
        return TeacherTargets(mine.clone())
    top = shard_topk(mine, K, rank * WIDTH)
    tail = None
    if kind == "topk_tail":
        tail = topk_teacher_logits(teacher, K, cfg.kd_temperature * cfg.teacher_temperature).tail_logmass
    return TeacherTargets(top.values, top.indices, tail)


def _check_rank(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    group = dist.new_group([0, 1])
    try:
        hidden, weight, labels, teacher_rows = _inputs()
        mask = labels != IGNORE_INDEX
        shard = VocabShard(group, rank * WIDTH, WIDTH)
        cases = [(o, kind, w) for o in KD_OBJECTIVES for kind in ("full", "topk_tail", "topk") for w in (0.5, 1.0)]
        cases.append(("forward_kl", None, 0.0))
        for objective, kind, w in cases:
            cfg = LossConfig(distill_loss_weight=w, kd_objective=objective, kd_temperature=1.5, teacher_temperature=0.8,
                             skew_lambda=0.2, adaptive_kl_alpha=0.4, logits_topk=K if kind != "full" else 0,
                             topk_tail=kind == "topk_tail")
            teacher = _targets(kind, teacher_rows, rank, cfg)
            name = f"{objective}/{kind}/w={w}"

            h = hidden.clone().requires_grad_()
            w_shard = weight[rank * WIDTH : (rank + 1) * WIDTH].clone().requires_grad_()
            logits = F.linear(h, w_shard)
            padded = torch.arange(WIDTH) + rank * WIDTH >= VOCAB
            expected = distill_loss(logits.masked_fill(padded, -float("inf")), labels, teacher, cfg, 17.0, shard)
            expected.loss.backward()

            h2 = hidden.clone().requires_grad_()
            w2 = weight[rank * WIDTH : (rank + 1) * WIDTH].clone().requires_grad_()
            got = fused_head_distill_loss(h2[mask], w2, None, labels[mask], teacher, cfg, 17.0, chunk_rows=4,
                                          shard=shard, vocab_size=VOCAB)
            got.loss.backward()

            torch.testing.assert_close(got.loss, expected.loss, rtol=1e-6, atol=1e-6, msg=name)
            torch.testing.assert_close(got.ce_sum, expected.ce_sum, rtol=1e-6, atol=1e-6, msg=name)
            torch.testing.assert_close(got.kd_sum, expected.kd_sum, rtol=1e-5, atol=1e-6, msg=name)
            assert got.label_tokens == expected.label_tokens
            torch.testing.assert_close(h2.grad, h.grad, rtol=1e-5, atol=1e-6, msg=name)  # this shard's part
            torch.testing.assert_close(w2.grad, w_shard.grad, rtol=1e-5, atol=1e-6, msg=name)
            if rank == 1:
                assert not w2.grad[VOCAB - WIDTH :].any(), name  # padding rows get nothing
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_fused_head_equals_sharded_logits_then_loss():
    mp.spawn(_check_rank, args=(_free_port(),), nprocs=WORLD, join=True)
