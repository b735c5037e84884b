"""Start-up checks of the teacher/student pair: shared vocabulary, padded teacher embeddings, paths."""

import pytest

from distill_trainer.config import ConfigError
from distill_trainer.demo.tiny_models import build_causal_lm, build_tokenizer
from distill_trainer.models import check_shared_vocab


def test_padded_teacher_embedding_is_accepted_and_cut_to_tokenizer(tiny_setup):
    import json

    teacher_rows = json.loads((tiny_setup.teacher / "config.json").read_text())["vocab_size"]
    info = check_shared_vocab(str(tiny_setup.student), str(tiny_setup.teacher))
    assert teacher_rows > info.size  # the fixture's teacher is padded to a multiple of 64
    assert info.eos_token_id is not None and info.pad_token_id is not None


def test_teacher_with_other_vocabulary_is_refused(tiny_setup, tmp_path):
    other = build_tokenizer(["completely different text, other merges " * 20], None, vocab_size=300)
    build_causal_lm(other, tmp_path / "other", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=0)
    with pytest.raises(ConfigError, match="teacher and student vocabularies differ"):
        check_shared_vocab(str(tiny_setup.student), str(tmp_path / "other"))


def test_missing_model_directory_is_named(tiny_setup, tmp_path):
    with pytest.raises(ConfigError, match=r"teacher_pretrain: model directory '.*missing' does not exist"):
        check_shared_vocab(str(tiny_setup.student), str(tmp_path / "missing"))


def test_directory_without_config_is_named(tiny_setup, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="student_pretrain: .* has no config.json"):
        check_shared_vocab(str(tmp_path / "empty"), str(tiny_setup.teacher))
