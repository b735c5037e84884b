"""MegatronTrainStrategy at tp=2 (2 gloo CPU ranks): the checkpoint's ``student/`` is an HF model that
``from_pretrained`` loads with exactly the trained weights; resuming from it (weights, optimizer, schedule,
RNG per rank) reproduces the uninterrupted run bit for bit; greedy ``generate`` equals transformers'."""

import json

import pytest
import torch
import torch.distributed as dist

from distill_trainer.data import IGNORE_INDEX
from distill_trainer.distill_loss import LossConfig, make_loss_fn
from distill_trainer.models import VocabInfo

from .megatron_helpers import (
    TOKENIZER_VOCAB, assert_generate_equals_transformers, fake_config, rank_context, spawn, write_tiny_model,
)

VOCAB = VocabInfo(size=TOKENIZER_VOCAB, eos_token_id=1, pad_token_id=0)
SFT = LossConfig(distill_loss_weight=0.0)


def _batch(step: int):
    from distill_trainer.strategies.base import MicroBatch

    g = torch.Generator().manual_seed(step)
    ids = torch.randint(2, TOKENIZER_VOCAB, (2, 9), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 2:-1] = ids[:, 3:]
    return [MicroBatch(ids, torch.ones_like(ids), labels)], float((labels != IGNORE_INDEX).sum())


def _steps(strategy, steps):
    losses = []
    for step in steps:
        micro_batches, normalizer = _batch(step)
        strategy.forward_backward(micro_batches, make_loss_fn(SFT, normalizer))
        losses.append(strategy.optimizer_step().grad_norm)
    return losses


def _check(rank, world, root):
    from transformers import AutoModelForCausalLM

    from distill_trainer.strategies import megatron_bridge as mb
    from distill_trainer.strategies.megatron import MegatronTrainStrategy

    config = fake_config(f"{root}/student", max_steps=6)
    ctx = rank_context(rank, world, 2, 1)
    first = MegatronTrainStrategy(config, ctx, VOCAB)
    _steps(first, [0, 1])
    saved = f"{root}/checkpoint-2"
    first.save(saved)
    at_save = mb.export_hf_state_dict(first.bridge, first.module)
    uninterrupted = _steps(first, [2, 3, 4])
    final = mb.export_hf_state_dict(first.bridge, first.module)
    del first

    resumed = MegatronTrainStrategy(config, ctx, VOCAB)
    resumed.load(saved)
    again = _steps(resumed, [2, 3, 4])
    assert again == uninterrupted, (again, uninterrupted)
    after = mb.export_hf_state_dict(resumed.bridge, resumed.module)
    assert all(torch.equal(after[name], final[name]) for name in final), "resumed weights differ"

    prompts = [[5, 9, 13], [7, 3, 2, 8], [11, 12, 4]]
    generated = resumed.generate(prompts, max_new_tokens=6, eos_token_id=VOCAB.eos_token_id, pad_token_id=0)
    resumed.save(f"{root}/checkpoint-5")
    if rank == 0:
        hf = AutoModelForCausalLM.from_pretrained(f"{saved}/student")
        state = hf.state_dict()
        assert all(torch.equal(state[name], tensor) for name, tensor in at_save.items())
        assert_generate_equals_transformers(generated, prompts, f"{root}/checkpoint-5/student", VOCAB.eos_token_id)
        with open(f"{root}/result.json", "w") as f:
            json.dump({"grad_norms": again}, f)
    dist.barrier()


@pytest.mark.timeout(240)
def test_hf_checkpoint_loads_and_resume_is_bit_exact_at_tp2(tmp_path):
    write_tiny_model(str(tmp_path / "student"), "qwen2", tied=True, seed=7, layers=2, hidden=32)
    spawn(_check, 2, str(tmp_path))
    assert (tmp_path / "result.json").exists()
    assert (tmp_path / "checkpoint-2" / "megatron" / "rank_00001.pt").exists()


def _distributed_optimizer(rank, world, root):
    """DP=2: the distributed optimizer trains what the replicated one does, and resumes bit for bit."""
    from distill_trainer.strategies import megatron_bridge as mb
    from distill_trainer.strategies.megatron import MegatronTrainStrategy

    ctx = rank_context(rank, world, 1, 1)
    plain = MegatronTrainStrategy(fake_config(f"{root}/student", max_steps=6), ctx, VOCAB)
    replicated = _steps(plain, [0, 1, 2, 3, 4])
    replicated_weights = mb.export_hf_state_dict(plain.bridge, plain.module)
    del plain

    config = fake_config(f"{root}/student", max_steps=6, distributed_optimizer=True)
    first = MegatronTrainStrategy(config, ctx, VOCAB)
    assert first._sharded(), "no distributed optimizer was built"
    before = _steps(first, [0, 1])
    first.save(f"{root}/checkpoint-2")
    after = _steps(first, [2, 3, 4])
    final = mb.export_hf_state_dict(first.bridge, first.module)
    del first
    # Reduce-scatter + all-gather instead of all-reduce: the same sums, up to float rounding.
    assert max(abs(a - b) for a, b in zip(before + after, replicated)) <= 1e-6, (before + after, replicated)
    worst = max((float((tensor - replicated_weights[name]).abs().max()), name) for name, tensor in final.items())
    print(f"distributed vs replicated optimizer after 5 steps: max |weight difference| {worst[0]:.3g} ({worst[1]})")
    assert worst[0] <= 1e-5, worst

    # Regression: Megatron's load_state_dict shared one Adam `step` tensor among all parameters (the second
    # step after a resume differed).
    resumed = MegatronTrainStrategy(config, ctx, VOCAB)
    resumed.load(f"{root}/checkpoint-2")
    again = _steps(resumed, [2, 3, 4])
    assert again == after, (again, after)
    weights = mb.export_hf_state_dict(resumed.bridge, resumed.module)
    assert all(torch.equal(weights[name], final[name]) for name in final), "resumed weights differ"
    if rank == 0:
        with open(f"{root}/distributed.json", "w") as f:
            json.dump({"grad_norms": again}, f)
    dist.barrier()


@pytest.mark.timeout(240)
def test_distributed_optimizer_trains_as_the_replicated_one_and_resumes_bit_exact_at_dp2(tmp_path):
    write_tiny_model(str(tmp_path / "student"), "qwen2", tied=True, seed=7, layers=2, hidden=32)
    spawn(_distributed_optimizer, 2, str(tmp_path))
    assert (tmp_path / "distributed.json").exists()
