"""Torch threads per actor: teacher and student share the cores; the student of an SFT-only run gets them all."""

from distill_trainer.shared_names import ENV_NUM_THREADS
from distill_trainer.workers import default_num_threads


def test_sft_only_student_gets_every_core_and_kd_actors_half_each(monkeypatch):
    monkeypatch.delenv(ENV_NUM_THREADS, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert default_num_threads(actors_per_device=1) == 8
    assert default_num_threads() == default_num_threads(actors_per_device=2) == 4
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert default_num_threads() == 1
    monkeypatch.setenv(ENV_NUM_THREADS, "3")
    assert default_num_threads(actors_per_device=1) == 3
