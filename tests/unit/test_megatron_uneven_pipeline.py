"""An uneven pipeline (Megatron-Core's num_layers_in_first/last_pipeline_stage) on gloo CPU ranks: 3-layer models
at pp=2, split 2 | 1 automatically (pp does not divide the layers) or 1 | 2 as set. HF -> Megatron -> HF gives
the original tensors bit for bit and transformers' logits (mbridge maps each stage's local layers through
Megatron's layer offset); five distillation steps (teacher targets from the pp=2 teacher) give the pp=1 losses,
gradient norms and weights; resuming at pp=2 is bit for bit."""

import json

import pytest
import torch
import torch.distributed as dist

from distill_trainer.data import IGNORE_INDEX
from distill_trainer.distill_loss import LossConfig
from distill_trainer.models import VocabInfo

from .megatron_helpers import (
    TOKENIZER_VOCAB, distill_step, fake_config, rank_context, reset_megatron, spawn, write_tiny_model,
)

LAYERS, STEPS, TOPK, MICRO, SEQ = 3, 5, 5, 4, 10
LOSS = LossConfig(distill_loss_weight=0.5, kd_objective="forward_kl", kd_temperature=2.0, logits_topk=TOPK)
VOCAB = VocabInfo(size=TOKENIZER_VOCAB, eos_token_id=1, pad_token_id=0)


def _micro_batches():
    """MICRO right-padded micro-batches [2, SEQ] with labels on the answer part (the same every step)."""
    from distill_trainer.strategies.base import MicroBatch

    g = torch.Generator().manual_seed(100)
    batches = []
    for index in range(MICRO):
        ids = torch.randint(2, TOKENIZER_VOCAB, (2, SEQ), generator=g)
        mask = torch.ones_like(ids)
        length = SEQ - index % 3
        ids[1, length:], mask[1, length:] = VOCAB.pad_token_id, 0
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, 2:-1] = ids[:, 3:]
        labels[mask == 0] = IGNORE_INDEX
        labels[1, length - 1:] = IGNORE_INDEX
        batches.append(MicroBatch(ids, mask, labels))
    return batches


def _config(root, first=None, last=None):
    config = fake_config(f"{root}/student", f"{root}/teacher", topk=TOPK, max_steps=STEPS + 1)
    config.kd_temperature = LOSS.kd_temperature
    for side in (config.student, config.teacher):
        side.strategy_args.num_layers_in_first_pipeline_stage = first
        side.strategy_args.num_layers_in_last_pipeline_stage = last
    return config


def _steps(student, micro_batches, targets, count):
    from distill_trainer.strategies.base import MicroBatch

    normalizer = float(sum(int((m.labels != IGNORE_INDEX).sum()) for m in micro_batches))
    losses, norms = [], []
    for _ in range(count):
        batches = [MicroBatch(m.input_ids, m.attention_mask, m.labels, t) for m, t in zip(micro_batches, targets)]
        loss, grad_norm = distill_step(student, batches, LOSS, normalizer)
        losses.append(loss)
        norms.append(grad_norm)
    return losses, norms


def _round_trip(rank, world, root, first, last, expected_layers):
    """The teacher strategy at pp=2: layers per stage, transformers' logits, export == the HF files."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from distill_trainer.strategies import megatron_bridge as mb
    from distill_trainer.strategies.megatron import MegatronInferStrategy

    config = _config(root, first, last)
    config.teacher_pretrain = f"{root}/student"  # the 3-layer student model, loaded as a teacher
    teacher = MegatronInferStrategy(config, rank_context(rank, world, 1, 2), VOCAB)
    layers = teacher.module.decoder.layers
    assert len(layers) == expected_layers[rank], (len(layers), expected_layers)
    offset = sum(expected_layers[:rank])
    assert [layer.layer_number for layer in layers] == list(range(offset + 1, offset + len(layers) + 1))
    ids = torch.randint(0, TOKENIZER_VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    logits = teacher.logits(ids)
    diff = None
    if rank == world - 1:
        with torch.no_grad():
            expected = AutoModelForCausalLM.from_pretrained(f"{root}/student").eval()(ids).logits
        diff = float((logits[..., : expected.shape[-1]] - expected).abs().max())
        assert diff <= 1e-4, diff
    exported = mb.export_hf_state_dict(teacher.bridge, teacher.module)
    original = load_file(f"{root}/student/model.safetensors")
    assert set(exported) == set(original), set(exported) ^ set(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), f"{name} differs after HF -> Megatron -> HF"
    del teacher
    reset_megatron()
    return diff


def _round_trips(rank, world, root, out):
    diffs = [_round_trip(rank, world, root, None, None, [2, 1]), _round_trip(rank, world, root, 1, 2, [1, 2])]
    if rank == world - 1:
        with open(out, "w") as f:
            json.dump(diffs, f)
    dist.barrier()


def _models(root):
    write_tiny_model(str(root / "student"), "qwen2", tied=False, seed=5, layers=LAYERS, hidden=32)
    write_tiny_model(str(root / "teacher"), "qwen2", tied=False, seed=6, layers=LAYERS, hidden=64)


@pytest.mark.timeout(240)
def test_uneven_pp2_loads_hf_weights_gives_transformers_logits_and_exports_them_back(tmp_path):
    _models(tmp_path)
    spawn(_round_trips, 2, str(tmp_path), str(tmp_path / "diffs.json"))
    auto, explicit = json.loads((tmp_path / "diffs.json").read_text())
    print(f"pp=2, 3 layers: max |megatron - transformers| logits {auto:.3g} (2 | 1, chosen), "
          f"{explicit:.3g} (1 | 2, set)")


def _run(rank, world, root, out):
    from distill_trainer.strategies import megatron_bridge as mb
    from distill_trainer.strategies.megatron import MegatronInferStrategy, MegatronTrainStrategy

    pp = world
    ctx = rank_context(rank, world, 1, pp)
    config = _config(root)
    teacher = MegatronInferStrategy(config, ctx, VOCAB)
    micro_batches = _micro_batches()
    targets = [teacher.forward(m) for m in micro_batches]  # None on the first stage
    del teacher
    student = MegatronTrainStrategy(config, ctx, VOCAB)
    assert len(student.module.decoder.layers) == ([LAYERS] if pp == 1 else [2, 1])[rank]
    losses, norms = _steps(student, micro_batches, targets, 2)
    if pp == 2:
        student.save(f"{root}/checkpoint-2")
    more_losses, more_norms = _steps(student, micro_batches, targets, STEPS - 2)
    weights = mb.export_hf_state_dict(student.bridge, student.module)
    if pp == 2:  # resume at step 2: the remaining steps bit for bit
        del student
        resumed = MegatronTrainStrategy(config, ctx, VOCAB)
        resumed.load(f"{root}/checkpoint-2")
        again_losses, again_norms = _steps(resumed, micro_batches, targets, STEPS - 2)
        assert (again_losses, again_norms) == (more_losses, more_norms), (again_norms, more_norms)
        after = mb.export_hf_state_dict(resumed.bridge, resumed.module)
        assert all(torch.equal(after[name], weights[name]) for name in weights), "resumed weights differ"
    if rank == world - 1:
        torch.save(weights, f"{out}.pt")
        with open(out, "w") as f:
            json.dump({"losses": losses + more_losses, "grad_norms": norms + more_norms}, f)
    dist.barrier()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_uneven_pp2_trains_as_pp1_and_resumes_bit_exact(tmp_path):
    _models(tmp_path)
    spawn(_run, 1, str(tmp_path), str(tmp_path / "pp1.json"))
    spawn(_run, 2, str(tmp_path), str(tmp_path / "pp2.json"))
    single, uneven = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("pp1", "pp2"))
    single_w, uneven_w = (torch.load(tmp_path / f"{name}.json.pt", weights_only=True) for name in ("pp1", "pp2"))
    losses = max(abs(a - b) for a, b in zip(uneven["losses"], single["losses"]))
    norms = max(abs(a - b) for a, b in zip(uneven["grad_norms"], single["grad_norms"]))
    weights = max(float((uneven_w[name] - tensor).abs().max()) for name, tensor in single_w.items())
    print(f"pp=2 (2 | 1) vs pp=1, 5 steps: max |difference| losses {losses:.3g}, grad norms {norms:.3g}, "
          f"weights {weights:.3g}")
    print("losses pp=1:", single["losses"], "pp=2:", uneven["losses"])
    assert single["losses"][-1] < single["losses"][0]  # it learns
    assert losses <= 1e-5 and norms <= 1e-5 and weights <= 1e-5
