"""The Megatron student's fused output layer + loss (``MegatronTrainStrategy`` with ``fused_lm_head``, the default):
the final hidden states at the label rows through this TP rank's vocabulary shard of the output weight, chunk by
chunk, give the same losses and the same gradients (Megatron's DDP ``main_grad`` buffers, after
``finalize_model_grads``) as the full ``[B, T, V/tp]`` logits followed by the loss, at tp=1, tp=2 and pp=2, tied
and untied, with full-vocabulary and top-k (with and without the tail) teacher targets (gloo CPU ranks)."""

import json

import pytest
import torch
import torch.distributed as dist

from distill_trainer.data import IGNORE_INDEX
from distill_trainer.distill_loss import LossConfig, TeacherTargets, make_loss_fn
from distill_trainer.losses import topk_teacher_logits
from distill_trainer.models import VocabInfo

from .megatron_helpers import TOKENIZER_VOCAB, fake_config, rank_context, spawn, write_tiny_model

MICRO, BATCH, SEQ, TOPK = 2, 4, 12, 5
VOCAB = VocabInfo(size=TOKENIZER_VOCAB, eos_token_id=1, pad_token_id=0)
# (teacher targets, loss): CE + KD over the full vocabulary, over the top-k with the tail, pure KD over the top-k
# renormalised (the sparse gradient), and SFT (no teacher).
CASES = {
    "full_w0.5": ("full", LossConfig(distill_loss_weight=0.5, kd_objective="forward_kl", kd_temperature=2.0)),
    "topk_tail_w0.5": ("topk_tail", LossConfig(distill_loss_weight=0.5, kd_objective="reverse_kl", kd_temperature=2.0,
                                               logits_topk=TOPK, topk_tail=True)),
    "topk_w1": ("topk", LossConfig(distill_loss_weight=1.0, kd_objective="forward_kl", logits_topk=TOPK,
                                   topk_tail=False)),
    "sft": (None, LossConfig(distill_loss_weight=0.0)),
}


def _batch():
    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(2, TOKENIZER_VOCAB, (BATCH, SEQ), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row in range(BATCH):
        length, prompt = SEQ - row % 3, 3 + row % 2
        input_ids[row, length:] = VOCAB.pad_token_id
        attention_mask[row, length:] = 0
        labels[row, prompt - 1 : length - 1] = input_ids[row, prompt:length]
    return input_ids, attention_mask, labels


def _targets(kind, n_rows, cfg, tp, tp_rank, padded, seed):
    """What teacher TP rank ``tp_rank`` ships for ``n_rows`` label rows (random teacher logits)."""
    from distill_trainer.parallel_losses import shard_topk

    if kind is None:
        return None
    rows = torch.randn(n_rows, TOKENIZER_VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    full = torch.full((n_rows, padded), -float("inf"))
    full[:, :TOKENIZER_VOCAB] = rows
    width = padded // tp
    mine = full[:, tp_rank * width : (tp_rank + 1) * width] if tp > 1 else rows
    if kind == "full":
        return TeacherTargets(mine.clone())
    top = shard_topk(mine, TOPK, tp_rank * width)
    tail = None
    if kind == "topk_tail":
        tail = topk_teacher_logits(rows, TOPK, cfg.kd_temperature * cfg.teacher_temperature).tail_logmass
    return TeacherTargets(top.values, top.indices, tail)


def _grads(strategy) -> dict:
    """Every parameter's gradient as the optimizer would see it: Megatron's main_grad after finalize_model_grads
    (DP all-reduce, tied embedding between first and last stage); the buffers are zeroed afterwards."""
    from megatron.core.distributed import finalize_model_grads

    from distill_trainer.strategies.megatron_cpu import cpu_device_mode

    with cpu_device_mode():
        finalize_model_grads([strategy.model])
    grads = {name: p.main_grad.detach().clone() for name, p in strategy.module.named_parameters()}
    strategy.model.zero_grad_buffer()
    return grads


def _compare(rank, world, tp, pp, root, out):
    from distill_trainer.strategies.base import MicroBatch
    from distill_trainer.strategies.megatron import MegatronTrainStrategy

    ctx = rank_context(rank, world, tp, pp)
    input_ids, attention_mask, labels = _batch()
    normalizer = float((labels != IGNORE_INDEX).sum())
    report = {}
    for tied in (False, True):
        strategy = MegatronTrainStrategy(fake_config(f"{root}/student_tied{tied}"), ctx, VOCAB)
        assert strategy.fused_head  # the default
        for case, (kind, cfg) in CASES.items():
            micro_batches = []
            for index, start in enumerate(range(0, BATCH, MICRO)):
                part = slice(start, start + MICRO)
                n_rows = int((labels[part] != IGNORE_INDEX).sum())
                teacher = _targets(kind, n_rows, cfg, tp, ctx.tp_rank, strategy.padded_vocab, seed=index)
                micro_batches.append(MicroBatch(input_ids[part], attention_mask[part], labels[part], teacher))
            loss_fn = make_loss_fn(cfg, normalizer)
            head_rows = []
            fused_head = loss_fn.fused_head
            loss_fn.fused_head = lambda hidden, *args: head_rows.append(hidden.shape) or fused_head(hidden, *args)
            results = {}
            for fused in (False, True):
                strategy.fused_head = fused
                stats = strategy.forward_backward(micro_batches, loss_fn)
                grads = _grads(strategy)
                evaluated = strategy.eval_forward(micro_batches, loss_fn)
                results[fused] = (stats, grads, evaluated)
            n_label = [int((m.labels != IGNORE_INDEX).sum()) for m in micro_batches]
            if ctx.is_last_stage:  # the head ran at the label rows only: training, then evaluation
                hidden = strategy.bridge.config.hidden_size
                assert head_rows == [torch.Size([n, hidden]) for n in n_label] * 2, head_rows
            else:
                assert head_rows == []
            (s0, g0, e0), (s1, g1, e1) = results[False], results[True]
            sums = torch.tensor([[s.loss, s.ce_sum, s.kd_sum, e.loss, e.ce_sum] for s, e in ((s0, e0), (s1, e1))],
                                dtype=torch.float64)
            dist.all_reduce(sums)  # the counted rank holds them, the others zeros
            assert s1.label_tokens == s0.label_tokens
            relative = ((sums[1] - sums[0]).abs() / sums[0].abs().clamp(min=1e-12)).max()
            # gradients: the largest difference, absolute and relative to the largest gradient of that parameter
            worst = torch.tensor([0.0, 0.0], dtype=torch.float64)
            for name, expected in g0.items():
                scale = float(expected.abs().max())
                difference = float((g1[name] - expected).abs().max())
                if scale > 0 or difference > 0:
                    this = torch.tensor([difference, difference / max(scale, 1e-30)], dtype=torch.float64)
                    worst = torch.maximum(worst, this)
            nonzero = torch.tensor([float(sum(bool(g.abs().sum() > 0) for g in g0.values()))])
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            dist.all_reduce(nonzero)
            report[f"tied{tied}/{case}"] = {
                "loss": sums[0, 0].item(), "loss_rel": relative.item(), "grad_abs": worst[0].item(),
                "grad_rel": worst[1].item(),
                "params_with_grad": nonzero.item(),
            }
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_fused_head")
    for tied in (False, True):
        write_tiny_model(str(root / f"student_tied{tied}"), "qwen2", tied=tied, seed=5, layers=2, hidden=32)
    return root


def _check(models, world, tp, pp):
    out = models / f"fused_w{world}_tp{tp}_pp{pp}.json"
    spawn(_compare, world, tp, pp, str(models), str(out))
    report = json.loads(out.read_text())
    for name, row in report.items():
        print(f"tp={tp} pp={pp} {name}: loss {row['loss']:.6f}, max relative difference loss {row['loss_rel']:.2g}, "
              f"gradients {row['grad_abs']:.2g} absolute, {row['grad_rel']:.2g} of the parameter's largest")
    assert len(report) == 2 * len(CASES)
    for name, row in report.items():
        assert row["params_with_grad"] > 0, name
        assert row["loss_rel"] <= 1e-6, name
        assert row["grad_abs"] <= 1e-6, name  # float32 rounding: matmuls over other row blocks
        assert row["grad_rel"] <= 1e-5, name


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world, tp, pp", [(1, 1, 1), (2, 2, 1)], ids=["tp1", "tp2"])
def test_fused_head_equals_full_logits_then_loss(models, world, tp, pp):
    _check(models, world, tp, pp)


@pytest.mark.timeout(300)
def test_fused_head_equals_full_logits_then_loss_pp2(models):
    # tied: the last stage's output weight is the first stage's embedding, joined by finalize_model_grads
    _check(models, 2, 1, 2)
