"""Megatron settings that only matter on a GPU, checked on CPU ranks with the CPU-shim switch turned off where
the GPU path is what is tested: sequence parallel follows the config (mbridge turns it on whenever tp > 1), and
is refused on a GPU without TransformerEngine (CPU ranks run it with their own torch norms, see
test_megatron_sequence_parallel.py); an fp16 student learns (its loss is scaled by the optimizer's loss scale,
which the optimizer divides out again)."""

import pytest
import torch

from distill_trainer.models import VocabInfo

from .megatron_helpers import TOKENIZER_VOCAB, fake_config, rank_context, spawn, tiny_config, write_tiny_model


def _bridge_configs(rank, world, results):
    from distill_trainer.strategies import megatron_bridge as mb
    from distill_trainer.strategies.megatron import init_megatron

    init_megatron(rank_context(rank, world, 2, 1), seed=0)
    hf_config = tiny_config("qwen2", tied=False)
    # The GPU path of make_bridge (no CPU overrides); only the TransformerConfig is built, never a CUDA model.
    mb.needs_cpu_shims = lambda: False
    seen = {}
    for te in (False, True):
        mb.have_transformer_engine = lambda te=te: te
        bridge = mb.make_bridge(hf_config, dtype=torch.float32, padded_vocab=256, sequence_parallel=False)
        seen[f"te={te} configured=False"] = bridge.config.sequence_parallel
    bridge = mb.make_bridge(hf_config, dtype=torch.float32, padded_vocab=256, sequence_parallel=True)
    seen["te=True configured=True"] = bridge.config.sequence_parallel
    mb.have_transformer_engine = lambda: False
    try:
        mb.make_bridge(hf_config, dtype=torch.float32, padded_vocab=256, sequence_parallel=True)
    except ValueError as error:
        seen["te=False configured=True"] = str(error)
    if rank == 0:
        with open(results, "w") as out:
            out.write(repr(seen))


def test_sequence_parallel_follows_the_config_at_tp2_and_is_refused_without_transformer_engine(tmp_path):
    results = tmp_path / "seen.txt"
    spawn(_bridge_configs, 2, str(results))
    seen = eval(results.read_text())
    assert seen["te=False configured=False"] is False  # mbridge alone would say True (tp = 2)
    assert seen["te=True configured=False"] is False
    assert seen["te=True configured=True"] is True
    assert "sequence_parallel needs TransformerEngine" in seen["te=False configured=True"]


LR = 1e-2


def _fp16_step(rank, world, root, results):
    from distill_trainer.data import IGNORE_INDEX
    from distill_trainer.distill_loss import LossConfig, make_loss_fn
    from distill_trainer.strategies.base import MicroBatch
    from distill_trainer.strategies.megatron import MegatronTrainStrategy

    vocab = VocabInfo(size=TOKENIZER_VOCAB, eos_token_id=1, pad_token_id=0)
    config = fake_config(root, dtype="fp16", lr=LR, warmup_steps=0)
    config.student.training_args.weight_decay = 0.0
    config.student.training_args.max_grad_norm = 0.0
    strategy = MegatronTrainStrategy(config, rank_context(rank, world, 1, 1), vocab)
    before = {n: p.detach().float().clone() for n, p in strategy.module.named_parameters()}
    ids = torch.randint(2, TOKENIZER_VOCAB, (4, 12), generator=torch.Generator().manual_seed(5))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    batch = MicroBatch(ids, torch.ones_like(ids), labels)
    loss_fn = make_loss_fn(LossConfig(distill_loss_weight=0.0), float((labels != IGNORE_INDEX).sum()))
    strategy.forward_backward([batch], loss_fn)
    update = strategy.optimizer_step()
    moved = {n: (p.detach().float() - before[n]).abs() for n, p in strategy.module.named_parameters()}
    with open(results, "w") as out:
        out.write(repr({"applied": update.applied, "overflow": update.loss_scale_overflow,
                        "dtype": str(next(strategy.module.parameters()).dtype),
                        "median_move": {n: float(m.median()) for n, m in moved.items()
                                        if m.dim() == 2 and "word_embeddings" not in n}}))  # most rows unused


@pytest.mark.timeout(240)
def test_an_fp16_student_step_moves_the_weights_by_the_learning_rate(tmp_path):
    # Adam's first step moves every weight whose gradient is well above eps by lr·sign(gradient). Without the loss
    # scale on the loss, fp16 gradients arrive divided by it (2^16 here; Megatron's default is 2^32) and many fall
    # to Adam's eps or below: those weights move by less (measured without the fix: medians 0.47-0.95 lr).
    write_tiny_model(str(tmp_path / "model"), "qwen2", tied=False, seed=3)
    spawn(_fp16_step, 1, str(tmp_path / "model"), str(tmp_path / "seen.txt"))
    seen = eval((tmp_path / "seen.txt").read_text())
    assert seen["dtype"] == "torch.float16" and seen["applied"] and not seen["overflow"]
    for name, move in seen["median_move"].items():
        assert 0.9 * LR < move < 1.1 * LR, f"{name}: median |change| {move:.3g}, expected about lr = {LR}"
