"""Sequence packing through the whole pipeline (Ray, teacher and student actors) with the tiny models."""

import json
import logging
import shutil

import pytest
import torch

from distill_trainer.config import config_from_dict
from distill_trainer.pipeline import DistillPipeline
from tests.conftest import checkpoint_weights, logged_metrics, tiny_config_dict


def packed_config(setup, out, **overrides):
    data = tiny_config_dict(setup, out, **overrides)
    data["student"]["use_sequence_packing"] = True  # the teacher follows
    data["student"]["training_args"]["num_train_epochs"] = 1
    data.pop("max_steps")
    return config_from_dict(data)


@pytest.fixture(scope="module")
def straight(tiny_setup, tmp_path_factory, local_ray):
    out = tmp_path_factory.mktemp("packed")
    # 64 records of 13 tokens, sequence_length 32: two records a row, 32 rows; 4 rows x 2 micro-batches a step.
    config = packed_config(tiny_setup, out)
    handler, logger = _Lines(), logging.getLogger("distill_trainer.pipeline")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        result = DistillPipeline(config, num_threads=1, console=False).run()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, config, result, "\n".join(handler.lines)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_packed_run_counts_epochs_in_rows_and_trains_teacher_and_student(straight):
    out, config, result, log = straight
    assert config.teacher.use_sequence_packing
    assert config.max_steps == result.final_step == 4
    assert "max_steps=4: num_train_epochs=1 x 32 packed rows (of 64 records, use_sequence_packing)" in log
    assert "sequence packing: epoch 0's 64 records fill 32 rows of at most 32 tokens" in log
    train = [line for line in logged_metrics(out) if "train/loss" in line]
    assert [line["step"] for line in train] == [1, 2, 3, 4]
    for line in train:
        assert line["train/distill_loss"] > 0
        assert line["train/loss"] == pytest.approx(0.5 * line["train/student_loss"] + 0.5 * line["train/distill_loss"],
                                                   rel=1e-5)
    assert "val/loss" in result.eval_metrics
    state = json.loads((out / "output" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["data_cursor"] == {"epoch": 0, "index": 16}  # 2 steps x 2 micro-batches x 4 rows


# 4 s alone, ~20 s on a loaded machine; the sampler's own resume is in tests/unit/test_sequence_packing.py.
@pytest.mark.slow
def test_packed_run_resumes_bit_for_bit(straight, tiny_setup, tmp_path):
    out, _, _, _ = straight
    # Resumed from step 2: the data cursor counts packed rows, so steps 3 and 4 see the same rows.
    shutil.copytree(out / "output" / "checkpoint-2", tmp_path / "output" / "checkpoint-2")
    resumed = packed_config(tiny_setup, tmp_path, resume_from_checkpoint=True)
    assert DistillPipeline(resumed, num_threads=1, console=False).run().final_step == 4
    straight_weights, again = checkpoint_weights(out, 4), checkpoint_weights(tmp_path, 4)
    for name in straight_weights:
        assert torch.equal(straight_weights[name], again[name]), name
