"""Sequence parallel (``strategy_args.sequence_parallel``) on gloo CPU ranks: at tp=2 with SP a teacher
(``MegatronInferStrategy``) gives tp=1's logits and targets, and five distillation steps of a student give tp=1's
losses, gradient norms and weights; sequences of odd length are padded to a multiple of tp and cut back.
Resuming at tp=2+SP is bit for bit, and greedy ``generate`` equals transformers'."""

import json

import pytest
import torch
import torch.distributed as dist

from distill_trainer.data import IGNORE_INDEX
from distill_trainer.distill_loss import LossConfig, make_loss_fn
from distill_trainer.models import VocabInfo

from .megatron_helpers import (
    TOKENIZER_VOCAB, assert_generate_equals_transformers, distill_step, fake_config, rank_context, spawn,
    write_tiny_model,
)

STEPS, TOPK = 5, 5
LOSS = LossConfig(distill_loss_weight=0.5, kd_objective="forward_kl", kd_temperature=2.0, logits_topk=TOPK)
VOCAB = VocabInfo(size=TOKENIZER_VOCAB, eos_token_id=1, pad_token_id=0)
LENGTHS = (9, 7, 10)  # micro-batch lengths: odd ones need one position of sequence-parallel padding at tp=2


def _micro_batches():
    """Right-padded micro-batches of 2 rows each, of the lengths in LENGTHS (the same every step)."""
    from distill_trainer.strategies.base import MicroBatch

    g = torch.Generator().manual_seed(100)
    batches = []
    for length in LENGTHS:
        ids = torch.randint(2, TOKENIZER_VOCAB, (2, length), generator=g)
        mask = torch.ones_like(ids)
        ids[1, length - 2:], mask[1, length - 2:] = VOCAB.pad_token_id, 0
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, 2:-1] = ids[:, 3:]
        labels[mask == 0] = IGNORE_INDEX
        labels[1, length - 3] = IGNORE_INDEX
        batches.append(MicroBatch(ids, mask, labels))
    return batches


def _config(root, tp, sp, recompute=None, fused=True):
    config = fake_config(f"{root}/student", f"{root}/teacher", topk=TOPK, recompute=recompute, max_steps=STEPS)
    for side in (config.student, config.teacher):
        side.strategy_args.sequence_parallel = sp
    config.student.model_args.fused_lm_head = fused
    config.kd_temperature = LOSS.kd_temperature
    return config


def _gather_vocab(logits: torch.Tensor, tp: int) -> torch.Tensor:
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=dist.group.WORLD)
    return torch.cat(parts, -1)


def _train(rank, world, tp, sp, root, out, recompute, fused):
    from distill_trainer.strategies import megatron_bridge as mb
    from distill_trainer.strategies.base import MicroBatch
    from distill_trainer.strategies.megatron import MegatronInferStrategy, MegatronTrainStrategy

    ctx = rank_context(rank, world, tp, 1)
    config = _config(root, tp, sp, recompute, fused)
    teacher = MegatronInferStrategy(config, ctx, VOCAB)
    student = MegatronTrainStrategy(config, ctx, VOCAB)
    assert student.bridge.config.sequence_parallel == sp and teacher.bridge.config.sequence_parallel == sp
    if sp:  # the norms' gradients are summed over TP by finalize_model_grads
        norms = [p for n, p in student.module.named_parameters() if "layernorm" in n]
        assert norms and all(getattr(p, "sequence_parallel", False) for p in norms)
    micro_batches = _micro_batches()
    logits = [_gather_vocab(teacher.logits(m.input_ids), tp)[..., :TOKENIZER_VOCAB] for m in micro_batches]
    targets = [teacher.forward(m) for m in micro_batches]
    normalizer = float(sum(int((m.labels != IGNORE_INDEX).sum()) for m in micro_batches))
    losses, grad_norms = [], []
    for _ in range(STEPS):
        batches = [MicroBatch(m.input_ids, m.attention_mask, m.labels, t) for m, t in zip(micro_batches, targets)]
        loss, grad_norm = distill_step(student, batches, LOSS, normalizer)
        losses.append(loss)
        grad_norms.append(grad_norm)
    weights = mb.export_hf_state_dict(student.bridge, student.module)
    if rank == 0:
        torch.save({"logits": logits, "tails": [t.tail for t in targets], "weights": weights}, f"{out}.pt")
        with open(out, "w") as f:
            json.dump({"losses": losses, "grad_norms": grad_norms}, f)
    dist.barrier()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_sp")
    write_tiny_model(str(root / "student"), "qwen2", tied=False, seed=5, layers=2, hidden=32)
    write_tiny_model(str(root / "teacher"), "qwen2", tied=False, seed=6, layers=2, hidden=64)
    return root


def _run(models, tp, sp, recompute=None, fused=True):
    out = models / f"run_tp{tp}_sp{sp}_{recompute}_{fused}.json"
    if not out.exists():
        spawn(_train, tp, tp, sp, str(models), str(out), recompute, fused)
    return json.loads(out.read_text()), torch.load(f"{out}.pt", weights_only=True)


def _max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def _compare(models, **kwargs):
    single, single_t = _run(models, 1, False, **kwargs)
    sp, sp_t = _run(models, 2, True, **kwargs)
    logits = max(float((a - b).abs().max()) for a, b in zip(sp_t["logits"], single_t["logits"]))
    tails = max(float((a - b).abs().max()) for a, b in zip(sp_t["tails"], single_t["tails"]))
    weights = max(float((sp_t["weights"][n] - t).abs().max()) for n, t in single_t["weights"].items())
    print(f"tp2+SP vs tp1 {kwargs}: teacher logits {logits:.3g}, tails {tails:.3g}, "
          f"losses {_max_diff(sp['losses'], single['losses']):.3g}, "
          f"grad norms {_max_diff(sp['grad_norms'], single['grad_norms']):.3g}, weights {weights:.3g}")
    print("losses tp1:", single["losses"], "tp2+SP:", sp["losses"])
    assert single["losses"][-1] < single["losses"][0]  # it learns
    assert logits <= 1e-5 and tails <= 1e-5
    assert _max_diff(sp["losses"], single["losses"]) <= 1e-5
    assert _max_diff(sp["grad_norms"], single["grad_norms"]) <= 1e-5
    assert weights <= 1e-5


@pytest.mark.timeout(300)
def test_tp2_sequence_parallel_teacher_and_training_match_tp1(models):
    _compare(models)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tp2_sequence_parallel_with_full_recompute_and_logits_head_matches_tp1(models):
    _compare(models, recompute="full", fused=False)


def _steps(strategy, steps):
    from distill_trainer.strategies.base import MicroBatch

    norms = []
    sft = LossConfig(distill_loss_weight=0.0)
    for step in steps:
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(2, TOKENIZER_VOCAB, (2, 9), generator=g)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, 2:-1] = ids[:, 3:]
        strategy.forward_backward([MicroBatch(ids, torch.ones_like(ids), labels)],
                                  make_loss_fn(sft, float((labels != IGNORE_INDEX).sum())))
        norms.append(strategy.optimizer_step().grad_norm)
    return norms


def _resume(rank, world, root):
    from distill_trainer.strategies import megatron_bridge as mb
    from distill_trainer.strategies.megatron import MegatronTrainStrategy

    config = fake_config(f"{root}/student", max_steps=6)
    config.student.strategy_args.sequence_parallel = True
    ctx = rank_context(rank, world, 2, 1)
    first = MegatronTrainStrategy(config, ctx, VOCAB)
    _steps(first, [0, 1])
    first.save(f"{root}/checkpoint-2")
    uninterrupted = _steps(first, [2, 3, 4])
    final = mb.export_hf_state_dict(first.bridge, first.module)
    del first

    resumed = MegatronTrainStrategy(config, ctx, VOCAB)
    resumed.load(f"{root}/checkpoint-2")
    again = _steps(resumed, [2, 3, 4])
    assert again == uninterrupted, (again, uninterrupted)
    after = mb.export_hf_state_dict(resumed.bridge, resumed.module)
    assert all(torch.equal(after[name], final[name]) for name in final), "resumed weights differ"

    prompts = [[5, 9, 13], [7, 3, 2, 8], [11, 12, 4]]  # odd lengths: padded under SP at every step
    generated = resumed.generate(prompts, max_new_tokens=6, eos_token_id=VOCAB.eos_token_id, pad_token_id=0)
    resumed.save(f"{root}/checkpoint-5")
    if rank == 0:
        assert_generate_equals_transformers(generated, prompts, f"{root}/checkpoint-5/student", VOCAB.eos_token_id)
        with open(f"{root}/result.json", "w") as f:
            json.dump({"grad_norms": again}, f)
    dist.barrier()


@pytest.mark.timeout(240)
def test_resume_is_bit_exact_and_generate_equals_transformers_at_tp2_sequence_parallel(tmp_path):
    write_tiny_model(str(tmp_path / "student"), "qwen2", tied=True, seed=7, layers=2, hidden=32)
    spawn(_resume, 2, str(tmp_path))
    assert (tmp_path / "result.json").exists()
