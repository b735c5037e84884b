"""The Megatron strategies end to end on CPU (gloo): ``megatron_train`` / ``megatron_infer`` with tp_size 2 over two
CPU ranks per side train through the real pipeline (local Ray), write an HF checkpoint that ``from_pretrained``
loads, match the torch strategies' losses, and resume bit for bit."""

import shutil

import pytest
import torch

from distill_trainer.config import config_from_dict
from distill_trainer.pipeline import DistillPipeline
from tests.conftest import checkpoint_weights, logged_metrics, tiny_config_dict


def run(setup, out, *, strategy, ranks, tp, **overrides):
    data = tiny_config_dict(setup, out, max_steps=3, save_steps=2, eval_steps=3, **overrides)
    data["student"]["strategy_args"] = {"strategy_name": f"{strategy}_train", "tp_size": tp}
    data["teacher"]["strategy_args"] = {"strategy_name": f"{strategy}_infer", "tp_size": tp}
    data["student"]["device_mapping"] = data["teacher"]["device_mapping"] = list(range(ranks))  # CPU ranks
    return DistillPipeline(config_from_dict(data), num_threads=1, console=False).run()


@pytest.fixture(scope="module")
def tp2(tiny_setup, tmp_path_factory, local_ray):
    out = tmp_path_factory.mktemp("megatron_tp2")
    return out, run(tiny_setup, out, strategy="megatron", ranks=2, tp=2)


@pytest.mark.timeout(600)
def test_tp2_megatron_run_writes_an_hf_checkpoint_and_matches_the_torch_strategy(tp2, tiny_setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result = tp2
    assert result.final_step == 3
    student = out / "output" / "checkpoint-3" / "student"
    model = AutoModelForCausalLM.from_pretrained(student)
    AutoTokenizer.from_pretrained(student)
    state = model.state_dict()
    for name, tensor in checkpoint_weights(out, 3).items():
        assert torch.equal(state[name], tensor), name

    run(tiny_setup, tmp_path, strategy="torch", ranks=1, tp=1)
    mine, reference = logged_metrics(out), logged_metrics(tmp_path)
    assert [line["step"] for line in mine] == [line["step"] for line in reference] == [1, 2, 3]
    for a, b in zip(reference, mine):
        for tag in ("train/loss", "train/student_loss", "train/distill_loss"):
            assert abs(b[tag] - a[tag]) <= 1e-3, (a["step"], tag, a[tag], b[tag])
    assert abs(mine[-1]["val/loss"] - reference[-1]["val/loss"]) <= 1e-3


@pytest.mark.timeout(600)
def test_tp2_megatron_run_resumes_bit_for_bit(tp2, tiny_setup, tmp_path):
    out, _ = tp2
    shutil.copytree(out / "output" / "checkpoint-2", tmp_path / "output" / "checkpoint-2")
    assert (tmp_path / "output" / "checkpoint-2" / "megatron" / "rank_00001.pt").is_file()
    result = run(tiny_setup, tmp_path, strategy="megatron", ranks=2, tp=2, resume_from_checkpoint=True)
    assert result.final_step == 3
    straight, resumed = checkpoint_weights(out, 3), checkpoint_weights(tmp_path, 3)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
