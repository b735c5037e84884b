"""Teacher top-k under tensor parallelism (2 gloo CPU processes): per-shard top-k with global indices,
then the global top-k of the candidates, equals the unsharded top-k; padded vocabulary columns never
win; the student's loss on the shipped top-k equals ``kd_loss`` on the unsharded logits."""

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distill_trainer.losses import KD_OBJECTIVES, TopK, kd_loss, topk_teacher_logits
from distill_trainer.parallel_losses import (
    gather_sharded_columns,
    mask_vocab_padding,
    vocab_parallel_kd_loss,
    vocab_parallel_topk,
)

N, VOCAB, PADDED, K = 7, 50, 64, 6  # tokenizer vocabulary 50, Megatron pads to 64 (two shards of 32)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _padded_logits(seed: int) -> torch.Tensor:
    """Logits as Megatron produces them: real columns mostly negative, padded columns exactly 0."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, PADDED, generator=g) * 2 - 4
    logits[:, VOCAB:] = 0.0
    return logits


def _check_rank(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    group = dist.new_group([0, 1])
    try:
        width = PADDED // 2
        start = rank * width
        teacher = _padded_logits(0)
        student = _padded_logits(1)

        # Unmasked, padded columns (logit 0) beat the real, negative ones: the bug masking prevents.
        assert (vocab_parallel_topk(teacher[:, start : start + width].clone(), K, vocab_start=start, group=group)
                .indices >= VOCAB).any()

        teacher_shard = mask_vocab_padding(teacher[:, start : start + width].clone(), start, VOCAB)
        shipped = vocab_parallel_topk(teacher_shard, K, vocab_start=start, group=group)
        expected = topk_teacher_logits(teacher[:, :VOCAB], K)
        assert torch.equal(shipped.indices, expected.indices), "global top-k indices differ from unsharded"
        assert torch.equal(shipped.values, expected.values)
        assert (shipped.indices < VOCAB).all()

        # Student side: its logits at the teacher's global indices, value and gradient.
        student_shard = mask_vocab_padding(student[:, start : start + width].clone(), start, VOCAB).requires_grad_()
        gathered = gather_sharded_columns(student_shard, shipped.indices, vocab_start=start, group=group)
        assert torch.equal(gathered, student[:, :VOCAB].gather(1, expected.indices))
        gathered.sum().backward()
        expected_grad = torch.zeros(N, PADDED).scatter_add_(1, expected.indices, torch.ones(N, K))
        assert torch.equal(student_shard.grad, expected_grad[:, start : start + width])

        mask = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
        for objective in KD_OBJECTIVES:
            full = student[:, :VOCAB].clone().requires_grad_()
            reference = kd_loss(full, expected, mask, objective=objective, kd_temperature=1.5, normalizer=9.0)
            reference.backward()
            shard = student_shard.detach().clone().requires_grad_()
            loss = vocab_parallel_kd_loss(
                shard,
                TopK(shipped.values, shipped.indices.to(torch.int32)),
                group=group,
                vocab_start=start,
                mask=mask,
                objective=objective,
                kd_temperature=1.5,
                normalizer=9.0,
            )
            loss.backward()
            torch.testing.assert_close(loss, reference.detach(), rtol=1e-6, atol=1e-7, msg=objective)
            full_grad = torch.cat([full.grad, torch.zeros(N, PADDED - VOCAB)], 1)
            torch.testing.assert_close(shard.grad, full_grad[:, start : start + width], rtol=1e-6, atol=1e-7)

        # With the tail: the teacher's mass outside the global top-k over the real vocabulary only (padding is
        # −inf), and the student's tail over its real columns; equal to the unsharded loss, padding gets no gradient.
        shipped = vocab_parallel_topk(teacher_shard, K, vocab_start=start, group=group, tail_temperature=1.5)
        expected = topk_teacher_logits(teacher[:, :VOCAB], K, tail_temperature=1.5)
        torch.testing.assert_close(shipped.tail_logmass, expected.tail_logmass, rtol=1e-5, atol=1e-6)
        for objective in KD_OBJECTIVES:
            full = student[:, :VOCAB].clone().requires_grad_()
            reference = kd_loss(full, expected, mask, objective=objective, kd_temperature=1.5, normalizer=9.0)
            reference.backward()
            shard = student_shard.detach().clone().requires_grad_()
            loss = vocab_parallel_kd_loss(shard, shipped, group=group, vocab_start=start, mask=mask,
                                          objective=objective, kd_temperature=1.5, normalizer=9.0)
            loss.backward()
            torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-6, msg=objective)
            full_grad = torch.cat([full.grad, torch.zeros(N, PADDED - VOCAB)], 1)
            torch.testing.assert_close(shard.grad, full_grad[:, start : start + width], rtol=1e-5, atol=1e-6)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_topk_under_tp_equals_unsharded_and_padding_never_wins():
    mp.spawn(_check_rank, args=(_free_port(),), nprocs=2, join=True)


def test_mask_vocab_padding_masks_only_global_columns_beyond_the_tokenizer():
    shard = torch.zeros(2, 8)
    mask_vocab_padding(shard, vocab_start=8, vocab_size=13)  # global columns 8..15, real up to 12
    assert torch.isinf(shard[:, 5:]).all() and (shard[:, :5] == 0).all()
    whole_padding = torch.zeros(2, 8)
    mask_vocab_padding(whole_padding, vocab_start=16, vocab_size=13)
    assert torch.isinf(whole_padding).all()
    untouched = torch.zeros(2, 8)
    mask_vocab_padding(untouched, vocab_start=0, vocab_size=13)
    assert (untouched == 0).all()
