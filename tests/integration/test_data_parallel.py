"""Data-parallel torch ranks on CPU (gloo): two ranks per side train exactly what one rank does on the same global
batch, and a two-rank run resumes bit for bit. Real local Ray, tiny models."""

import shutil

import pytest
import torch

from distill_trainer.config import config_from_dict
from distill_trainer.pipeline import DistillPipeline
from tests.conftest import checkpoint_weights, logged_metrics, tiny_config_dict


def run(setup, out, *, ranks, per_device, accumulation, **overrides):
    data = tiny_config_dict(setup, out, max_steps=3, save_steps=2, eval_steps=3, **overrides)
    data["student"]["training_args"].update(per_device_train_batch_size=per_device,
                                            gradient_accumulation_steps=accumulation)
    data["student"]["device_mapping"] = data["teacher"]["device_mapping"] = list(range(ranks))  # CPU ranks: no GPU
    return DistillPipeline(config_from_dict(data), num_threads=1, console=False).run()


@pytest.fixture(scope="module")
def two_ranks(tiny_setup, tmp_path_factory, local_ray):
    out = tmp_path_factory.mktemp("dp2")
    return out, run(tiny_setup, out, ranks=2, per_device=4, accumulation=1)


def test_two_data_parallel_ranks_equal_one_rank_on_the_same_global_batch(two_ranks, tiny_setup, tmp_path):
    # Global batch 8 either way: 1 rank × 2 micro-batches of 4, or 2 ranks × 1 micro-batch of 4 (the same draws).
    dp2_out, dp2 = two_ranks
    dp1 = run(tiny_setup, tmp_path, ranks=1, per_device=4, accumulation=2)
    assert dp1.final_step == dp2.final_step == 3
    one, two = logged_metrics(tmp_path), logged_metrics(dp2_out)
    assert [line["step"] for line in one] == [line["step"] for line in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for tag in ("train/loss", "train/student_loss", "train/distill_loss", "train/grad_norm", "student/lr"):
            assert b[tag] == pytest.approx(a[tag], rel=1e-5, abs=1e-7), (a["step"], tag)
    assert two[-1]["val/loss"] == pytest.approx(one[-1]["val/loss"], rel=1e-5)
    single, double = checkpoint_weights(tmp_path, 3), checkpoint_weights(dp2_out, 3)
    assert single.keys() == double.keys()
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=1e-5, atol=1e-6, msg=name)


def test_two_data_parallel_ranks_resume_bit_for_bit(two_ranks, tiny_setup, tmp_path):
    dp2_out, _ = two_ranks
    shutil.copytree(dp2_out / "output" / "checkpoint-2", tmp_path / "output" / "checkpoint-2")
    assert (tmp_path / "output" / "checkpoint-2" / "rng_state_1.pt").is_file()  # rank 1's generators too
    result = run(tiny_setup, tmp_path, ranks=2, per_device=4, accumulation=1, resume_from_checkpoint=True)
    assert result.final_step == 3
    straight, resumed = checkpoint_weights(dp2_out, 3), checkpoint_weights(tmp_path, 3)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
