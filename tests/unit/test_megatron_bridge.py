"""HF Qwen2 and Llama (GQA, RoPE, RMSNorm, SwiGLU, Qwen2's QKV bias, tied and untied embeddings) loaded
into Megatron-Core through the bridge give transformers' logits at tp=1, tp=2 and pp=2 (2 gloo CPU ranks),
and exporting back to HF gives the original tensors bit for bit."""

import pytest
import torch
import torch.distributed as dist

from distill_trainer.models import VocabInfo

from .megatron_helpers import (
    TOKENIZER_VOCAB,
    fake_config,
    rank_context,
    reset_megatron,
    spawn,
    write_tiny_model,
)

CASES = [("qwen2", False), ("llama", True)]


def _check(rank, world, root):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from distill_trainer.strategies import megatron_bridge as mb
    from distill_trainer.strategies.megatron import MegatronInferStrategy

    ids = torch.randint(0, TOKENIZER_VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    vocab = VocabInfo(size=TOKENIZER_VOCAB, eos_token_id=1, pad_token_id=0)
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        for family, tied in CASES:
            path = f"{root}/{family}"
            hf = AutoModelForCausalLM.from_pretrained(path).eval()
            with torch.no_grad():
                expected = hf(ids).logits
            teacher = MegatronInferStrategy(fake_config(path), rank_context(rank, world, tp, pp), vocab)
            shard = teacher.logits(ids)
            if pp == 1 or rank == world - 1:  # logits exist on the last stage only
                parts = [torch.empty_like(shard) for _ in range(tp)]
                dist.all_gather(parts, shard, group=teacher.tp_group)
                logits = torch.cat(parts, -1)
                assert logits.shape[-1] == teacher.padded_vocab == mb.padded_vocab_size([96], tp)
                diff = (logits[..., : expected.shape[-1]] - expected).abs().max().item()
                print(f"logits {family} tied={tied} tp={tp} pp={pp}: max |megatron - transformers| = {diff:.3g}")
                assert diff <= 1e-4
                assert (logits[..., expected.shape[-1] :] == 0).all()  # Megatron's padding rows
            else:
                assert shard is None

            exported = mb.export_hf_state_dict(teacher.bridge, teacher.module)
            original = load_file(f"{path}/model.safetensors")
            assert set(exported) == set(original), set(exported) ^ set(original)
            for name, tensor in original.items():
                assert torch.equal(exported[name], tensor), f"{name} differs after HF -> Megatron -> HF"
            del teacher
            reset_megatron()


@pytest.mark.timeout(240)
def test_hf_logits_and_round_trip_at_tp1_tp2_pp2(tmp_path):
    for family, tied in CASES:
        write_tiny_model(str(tmp_path / family), family, tied=tied, seed=3)
    spawn(_check, 2, str(tmp_path))


def test_padded_vocab_is_shared_and_splits_evenly():
    from distill_trainer.strategies.megatron_bridge import padded_vocab_size

    assert padded_vocab_size([151936, 152064], 2) == 152064
    assert padded_vocab_size([100], 1) == 128
    assert padded_vocab_size([100, 96], 2) == 256
    assert padded_vocab_size([129], 4) % (128 * 4) == 0


def test_rope_scaling_is_refused_by_name():
    from distill_trainer.strategies.megatron_bridge import rope_base

    from .megatron_helpers import tiny_config

    config = tiny_config("llama", tied=False)
    assert rope_base(config) == 10000.0
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    with pytest.raises(ValueError, match="llama3"):
        rope_base(config)
