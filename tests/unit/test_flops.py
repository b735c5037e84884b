"""Model FLOPs per token and MFU (distill_trainer.flops): counted as the GPU check counts them."""

import importlib.util
import sys
from pathlib import Path

import pytest

from distill_trainer.flops import ModelFlops, ModelShape, peak_flops_per_second

SCRIPT = Path(__file__).resolve().parents[1] / "gpu" / "gpu_check.py"


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_for_flops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_matmul_weights_and_attention_match_the_gpu_checks_formula(tmp_path):
    from transformers import Qwen2Config

    check = gpu_check()
    shape = check.TINY
    Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, intermediate_size=shape.ffn,
                tie_word_embeddings=True).save_pretrained(tmp_path)
    ours = ModelShape.of(str(tmp_path))
    assert ours.matmul_params == check.matmul_params(shape)  # the tied output layer counts, the lookup does not
    seq = 128
    assert 2 * ours.matmul_params + ours.attention_flops_per_position * seq == check.forward_flops_per_token(shape, seq)


def test_a_step_counts_three_student_passes_and_one_teacher_pass():
    student, teacher = ModelShape(1000, 10), ModelShape(5000, 40)
    flops = ModelFlops(student, teacher, peak_flops_per_second=1e6)
    # 6·N_s·tokens + 2·N_t·tokens + (3·A_s + A_t)·Σ tokens·seq
    assert flops.step_flops(tokens=100, token_positions=3200) == 6 * 1000 * 100 + 2 * 5000 * 100 + (30 + 40) * 3200
    assert flops.utilization(100, 3200, seconds=2.0) == pytest.approx(flops.step_flops(100, 3200) / 2.0 / 1e6)
    sft = ModelFlops(student, None, 1e6)
    assert sft.step_flops(100, 3200) == 6 * 1000 * 100 + 30 * 3200


def test_no_peak_means_no_mfu(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.delenv("KUBEDISTILL_PEAK_TFLOPS", raising=False)
    assert peak_flops_per_second(SimpleNamespace(device_peak_tflops=None)) is None
    monkeypatch.setenv("KUBEDISTILL_PEAK_TFLOPS", "989")
    assert peak_flops_per_second(SimpleNamespace(device_peak_tflops=None)) == 989e12
    assert peak_flops_per_second(SimpleNamespace(device_peak_tflops=312.0)) == 312e12  # the config wins
