"""Five training steps of a tiny student distilled from a tiny teacher (top-k KD + CE) through
``MegatronTrainStrategy.forward_backward`` / ``optimizer_step`` give the same losses with the same global
batch at tp=1, tp=2, pp=2 and dp=2 (gloo CPU ranks), and match an HF transformers + AdamW loop (what the
torch strategy runs)."""

import json
import math

import pytest
import torch
import torch.distributed as dist

from distill_trainer.data import IGNORE_INDEX
from distill_trainer.distill_loss import LossConfig, TeacherTargets, make_loss_fn
from distill_trainer.losses import topk_teacher_logits
from distill_trainer.models import VocabInfo

from .megatron_helpers import TOKENIZER_VOCAB, distill_step, fake_config, rank_context, spawn, write_tiny_model

STEPS, GLOBAL_BATCH, MICRO, SEQ, TOPK = 5, 8, 2, 10, 5
LOSS = LossConfig(distill_loss_weight=0.5, kd_objective="forward_kl", kd_temperature=2.0, logits_topk=TOPK)
VOCAB = VocabInfo(size=TOKENIZER_VOCAB, eos_token_id=1, pad_token_id=0)


def _global_batch(step: int):
    """[GLOBAL_BATCH, SEQ] right-padded sequences of varying length, labels on the answer part (the same
    batch every step, so that the loss must fall)."""
    g = torch.Generator().manual_seed(100)
    input_ids = torch.randint(2, TOKENIZER_VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row in range(GLOBAL_BATCH):
        length = SEQ - row % 3
        prompt = 3 + row % 2
        input_ids[row, length:] = VOCAB.pad_token_id
        attention_mask[row, length:] = 0
        labels[row, prompt - 1 : length - 1] = input_ids[row, prompt:length]
    return input_ids, attention_mask, labels


def _teacher_logits(teacher_dir: str, input_ids, labels) -> torch.Tensor:
    """The teacher's logits at the label positions [N_label, TOKENIZER_VOCAB]."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        logits = teacher(input_ids).logits[..., :TOKENIZER_VOCAB]
    return logits[labels != IGNORE_INDEX]


def _targets(rows: torch.Tensor, tp: int, tp_rank: int, padded: int) -> TeacherTargets:
    """What teacher TP rank ``tp_rank`` ships: its shard's top-k with global indices."""
    from distill_trainer.parallel_losses import shard_topk

    full = torch.full((rows.shape[0], padded), -float("inf"))
    full[:, :TOKENIZER_VOCAB] = rows
    width = padded // tp
    top = shard_topk(full[:, tp_rank * width : (tp_rank + 1) * width], TOPK, tp_rank * width)
    # and the teacher's log mass outside the global top-k at the loss's T·τ (the same on every teacher rank)
    tail = topk_teacher_logits(rows, TOPK, tail_temperature=LOSS.kd_temperature * LOSS.teacher_temperature)
    return TeacherTargets(top.values, top.indices, tail.tail_logmass)


def _train(rank, world, tp, pp, root, out, recompute=None):
    from distill_trainer.strategies.base import MicroBatch
    from distill_trainer.strategies.megatron import MegatronTrainStrategy

    ctx = rank_context(rank, world, tp, pp)
    strategy = MegatronTrainStrategy(fake_config(f"{root}/student", f"{root}/teacher", recompute=recompute), ctx,
                                     VOCAB)
    assert strategy.bridge.config.recompute_granularity == recompute  # what Megatron runs with
    per_rank = GLOBAL_BATCH // ctx.dp_size
    losses, norms = [], []
    for step in range(STEPS):
        input_ids, attention_mask, labels = _global_batch(step)
        normalizer = float((labels != IGNORE_INDEX).sum())
        rows = slice(ctx.dp_rank * per_rank, (ctx.dp_rank + 1) * per_rank)
        micro_batches = []
        for start in range(rows.start, rows.stop, MICRO):
            part = slice(start, start + MICRO)
            teacher = _targets(
                _teacher_logits(f"{root}/teacher", input_ids[part], labels[part]), tp, ctx.tp_rank, strategy.padded_vocab
            )
            micro_batches.append(MicroBatch(input_ids[part], attention_mask[part], labels[part], teacher))
        loss, grad_norm = distill_step(strategy, micro_batches, LOSS, normalizer)
        losses.append(loss)
        norms.append(grad_norm)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "grad_norms": norms}, f)


def _reference(root: str) -> dict:
    """The same run as HF transformers + AdamW + transformers' schedule + clipping (torch_train's math)."""
    from transformers import AutoModelForCausalLM, get_scheduler

    from distill_trainer.strategies import torch as torch_strategy  # noqa: F401  (same optimizer setup)

    torch.manual_seed(0)
    args = fake_config(f"{root}/student").student.training_args
    model = AutoModelForCausalLM.from_pretrained(f"{root}/student").train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
    )
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=STEPS)
    losses, norms = [], []
    for step in range(STEPS):
        input_ids, attention_mask, labels = _global_batch(step)
        normalizer = float((labels != IGNORE_INDEX).sum())
        loss_fn = make_loss_fn(LOSS, normalizer)
        total = 0.0
        for start in range(0, GLOBAL_BATCH, MICRO):
            part = slice(start, start + MICRO)
            from distill_trainer.strategies.base import MicroBatch

            teacher = _targets(_teacher_logits(f"{root}/teacher", input_ids[part], labels[part]), 1, 0, TOKENIZER_VOCAB)
            logits = model(input_ids=input_ids[part], attention_mask=attention_mask[part]).logits[..., :TOKENIZER_VOCAB]
            terms = loss_fn(logits, MicroBatch(input_ids[part], attention_mask[part], labels[part], teacher))
            terms.loss.backward()
            total += float(terms.loss.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return {"losses": losses, "grad_norms": norms}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_training")
    write_tiny_model(str(root / "student"), "qwen2", tied=False, seed=5, layers=2, hidden=32)
    write_tiny_model(str(root / "teacher"), "qwen2", tied=False, seed=6, layers=2, hidden=64)
    return root


def _run(models, world, tp, pp, recompute=None) -> dict:
    out = models / f"losses_w{world}_tp{tp}_pp{pp}_{recompute}.json"
    if not out.exists():
        spawn(_train, world, tp, pp, str(models), str(out), recompute)
    return json.loads(out.read_text())


def _max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.mark.timeout(300)
def test_tp2_training_matches_one_rank_and_transformers(models):
    single = _run(models, 1, 1, 1)
    tp2 = _run(models, 2, 2, 1)
    reference = _reference(str(models))
    print("losses tp=1:", single["losses"])
    print("losses tp=2:", tp2["losses"])
    print("losses transformers:", reference["losses"])
    print(f"max |tp2 - tp1| = {_max_diff(tp2['losses'], single['losses']):.3g}, "
          f"max |tp1 - transformers| = {_max_diff(single['losses'], reference['losses']):.3g}, "
          f"grad norms max diff tp2-tp1 {_max_diff(tp2['grad_norms'], single['grad_norms']):.3g}")
    assert all(math.isfinite(x) for x in single["losses"])
    assert single["losses"][-1] < single["losses"][0]  # it learns
    assert _max_diff(tp2["losses"], single["losses"]) <= 1e-5
    assert _max_diff(single["losses"], reference["losses"]) <= 1e-3
    assert _max_diff(tp2["grad_norms"], single["grad_norms"]) <= 1e-4


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp, pp", [(1, 2), (1, 1)], ids=["pp2", "dp2"])
def test_pp2_and_dp2_training_match_one_rank(models, tp, pp):
    single = _run(models, 1, 1, 1)
    other = _run(models, 2, tp, pp)
    print(f"losses tp={tp} pp={pp} world=2:", other["losses"])
    print(f"max |this - tp1| = {_max_diff(other['losses'], single['losses']):.3g}")
    assert _max_diff(other["losses"], single["losses"]) <= 1e-5
    assert _max_diff(other["grad_norms"], single["grad_norms"]) <= 1e-4


@pytest.mark.timeout(300)
@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_activation_recompute_gives_the_same_losses_and_gradients(models, recompute):
    # Megatron recomputes in the backward what it did not keep: the same ops on the same inputs.
    plain = _run(models, 1, 1, 1)
    again = _run(models, 1, 1, 1, recompute)
    print(f"recompute={recompute}: max loss diff {_max_diff(again['losses'], plain['losses']):.3g}")
    assert again["losses"] == plain["losses"]
    assert again["grad_norms"] == plain["grad_norms"]



def _ragged_step(rank, world, tp, pp, root, out):
    """One step over micro-batches of different widths and row counts (each padded only to its own longest
    record, as the trainer's collate does)."""
    from distill_trainer.strategies.base import MicroBatch
    from distill_trainer.strategies.megatron import MegatronTrainStrategy

    ctx = rank_context(rank, world, tp, pp)
    strategy = MegatronTrainStrategy(fake_config(f"{root}/student"), ctx, VOCAB)
    # Stages tell each other each activation's shape before sending it (mbridge's setting), so buffers match
    # micro-batches of any size on NCCL too.
    assert strategy.bridge.config.variable_seq_lengths
    input_ids, attention_mask, labels = _global_batch(0)
    cuts = [(slice(0, 2), SEQ), (slice(2, 3), SEQ - 2), (slice(3, 6), SEQ - 1)]  # rows 2, 1, 3; widths 10, 8, 9
    micro_batches = [MicroBatch(input_ids[r, :w], attention_mask[r, :w], labels[r, :w]) for r, w in cuts]
    normalizer = float(sum((mb.labels != IGNORE_INDEX).sum() for mb in micro_batches))
    stats = strategy.forward_backward(micro_batches, make_loss_fn(LossConfig(distill_loss_weight=0.0), normalizer))
    update = strategy.optimizer_step()
    sums = torch.tensor([stats.ce_sum, stats.label_tokens], dtype=torch.float64)
    dist.all_reduce(sums)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"ce": float(sums[0]), "tokens": float(sums[1]), "grad_norm": update.grad_norm}, f)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pp2_takes_micro_batches_of_different_widths_and_rows_as_pp1_does(models):
    results = {}
    for world, pp in ((1, 1), (2, 2)):
        out = models / f"ragged_pp{pp}.json"
        spawn(_ragged_step, world, 1, pp, str(models), str(out))
        results[pp] = json.loads(out.read_text())
    print(results)
    assert results[2]["tokens"] == results[1]["tokens"]
    assert results[2]["ce"] == pytest.approx(results[1]["ce"], rel=1e-6)
    assert results[2]["grad_norm"] == pytest.approx(results[1]["grad_norm"], rel=1e-5)
