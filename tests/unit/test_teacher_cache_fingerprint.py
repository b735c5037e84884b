"""The teacher cache's fingerprint: what its targets depend on, and the refusal of a run that differs.

Tiny HF teacher/student directories (tests/conftest.py's ``tiny_setup``, copied per test so that a test may edit
them) and a small JSONL file. Every field is changed on its own and must be named in the refusal with both values;
what must not refuse (the same data under another path, a temperature without a tail) is checked too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from distill_trainer.config import ConfigError, DistillConfig, config_from_dict
from distill_trainer.teacher_cache.encoding import RowCodec
from distill_trainer.teacher_cache.fingerprint import (
    CacheMismatchError,
    Fingerprint,
    check_matches,
    check_student_matches_cache,
    differences,
    effective_chat_template,
    fingerprint_of,
    hash_model_weights,
    hash_tokenizer,
    hash_vocabulary,
    tokenizer_vocabulary,
)
from tests.conftest import tiny_config_dict

RECORDS = 6


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@dataclass
class Env:
    root: Path
    teacher: Path
    student: Path
    data: Path
    overrides: dict
    encoding: dict

    def config(self, **overrides) -> DistillConfig:
        merged = {**self.overrides, **overrides}
        data_args = merged.pop("data_args", {})
        config = tiny_config_dict_for(self, **merged)
        config["student"]["data_args"].update(data_args)
        return config_from_dict(config)

    def fingerprint(self, encoding: dict | None = None, **overrides) -> Fingerprint:
        return fingerprint_of(self.config(**overrides), encoding=encoding or self.encoding)


def tiny_config_dict_for(env: Env, **overrides) -> dict:
    config = tiny_config_dict(_Setup(env), env.root, **overrides)
    config["student"]["data_args"] = {"file_name": str(env.data)}
    return config


class _Setup:
    """The parts of conftest's TinySetup that ``tiny_config_dict`` reads, pointing at this test's copies."""

    def __init__(self, env: Env):
        self.teacher, self.student, self.train_file, self.eval_file = env.teacher, env.student, env.data, env.data


@pytest.fixture
def env(tiny_setup, tmp_path) -> Env:
    teacher = Path(shutil.copytree(tiny_setup.teacher, tmp_path / "teacher"))
    student = Path(shutil.copytree(tiny_setup.student, tmp_path / "student"))
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("".join(tiny_setup.train_file.read_text().splitlines(keepends=True)[:RECORDS]))
    _, vocab = hash_vocabulary(str(teacher))
    encoding = RowCodec("compact", 16, vocab, tail=True).describe()
    return Env(tmp_path, teacher, student, data, {}, encoding)


def refusal(cache: Fingerprint, run: Fingerprint, cache_dir: str = "/caches/c1") -> str:
    with pytest.raises(CacheMismatchError) as refused:
        check_matches(cache, run, cache_dir)
    return str(refused.value)


def line_of(message: str, field: str) -> str:
    lines = [line for line in message.splitlines() if line.startswith(f"  - {field}: ")]
    assert len(lines) == 1, (field, message)
    return lines[0]


def test_the_same_config_gives_equal_fingerprints_that_survive_json(env):
    a, b = env.fingerprint(), env.fingerprint()
    assert a == b and differences(a, b) == []
    check_matches(a, b, "/caches/c1")  # no refusal
    stored = Fingerprint.from_json(json.loads(json.dumps(a.to_json())))
    assert stored == a and differences(stored, a) == []
    fields = a.fields
    assert fields["data file sha256"] == [sha256(env.data.read_bytes())]
    assert fields["student.data_args.file_name"] == [str(env.data)]
    assert fields["teacher tokenizer.json sha256"] == sha256((env.teacher / "tokenizer.json").read_bytes())
    assert fields["teacher chat template sha256"] is None  # the tiny tokenizer has none
    assert fields["teacher vocabulary rows (padded)"] == 320  # the teacher's embedding, padded to a multiple of 64
    assert fields["vocabulary size"] < 320


# Each case: (id, change(env) -> (cache fingerprint, run fingerprint), expected {field: (cache value, run value)}
# as the message shows them; other fields that must differ with it, and nothing else).
Case = Callable[[Env], tuple[Fingerprint, Fingerprint, dict[str, tuple[str, str]]]]


def _edit_data(env: Env):
    cache = env.fingerprint()
    before = env.data.read_bytes()
    lines = env.data.read_text().splitlines(keepends=True)
    record = json.loads(lines[2])
    record["answer"] += "0"
    lines[2] = json.dumps(record) + "\n"
    env.data.write_text("".join(lines))
    return cache, env.fingerprint(), {"data file sha256": (f"[{sha256(before)}]", f"[{sha256(env.data.read_bytes())}]")}


def _setting(name: str, before, after, field: str, shown: tuple[str, str], **base):
    def case(env: Env):
        env.overrides.update(base)
        cache = env.fingerprint(**{name: before}) if before is not None else env.fingerprint()
        return cache, env.fingerprint(**{name: after}), {field: shown}
    return case


def _question_key(env: Env):
    return env.fingerprint(), env.fingerprint(data_args={"question_key": "prompt"}), \
        {"question_key": ("'question'", "'prompt'")}


def _template(env: Env):
    return env.fingerprint(), env.fingerprint(data_args={"template": "qwen2_5"}), {"template": ("none", "'qwen2_5'")}


def _topk_tail(env: Env):
    cache, run = env.fingerprint(), env.fingerprint(topk_tail=False)
    return cache, run, {"topk_tail": ("true", "false"),
                        "teacher temperature (kd_temperature x teacher_temperature)":
                            ("1 (kd_temperature 1 x teacher_temperature 1)", "not used (no top-k tail)")}


def _encoding(env: Env):
    other = RowCodec("float32", 16, env.encoding["vocab_size"], tail=True).describe()
    return env.fingerprint(), env.fingerprint(encoding=other), \
        {"encoding": ('{"encoding":"compact"', '{"encoding":"float32"')}


def _teacher_weights(env: Env):
    cache = env.fingerprint()
    before = hash_model_weights(str(env.teacher))
    weights = env.teacher / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    after = hash_model_weights(str(env.teacher))
    return cache, env.fingerprint(), {"teacher_pretrain (weights sha256)": (before, after)}


def _teacher_tokenizer_json(env: Env):
    cache = env.fingerprint()
    path = env.teacher / "tokenizer.json"
    before = sha256(path.read_bytes())
    data = json.loads(path.read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] = False  # same vocabulary, other tokens
    path.write_text(json.dumps(data))
    return cache, env.fingerprint(), {"teacher tokenizer.json sha256": (before, sha256(path.read_bytes()))}


TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


def _teacher_chat_template(env: Env):
    cache = env.fingerprint()
    path = env.teacher / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data["chat_template"] = TEMPLATE
    path.write_text(json.dumps(data))
    return cache, env.fingerprint(), {"teacher chat template sha256": ("none", sha256(TEMPLATE))}


def _student_chat_template(env: Env):
    cache = env.fingerprint()
    (env.student / "chat_template.jinja").write_text(TEMPLATE)
    return cache, env.fingerprint(), {"student chat template sha256 (formats the prompts)": ("none", sha256(TEMPLATE))}


TEMPERATURE = "teacher temperature (kd_temperature x teacher_temperature)"
CASES: dict[str, Case] = {
    "data file content edited": _edit_data,
    "question_key": _question_key,
    "template": _template,
    "sequence_length": _setting("sequence_length", None, 24, "sequence_length", ("32", "24")),
    "distill_on_prompt": _setting("distill_on_prompt", None, True, "distill_on_prompt", ("false", "true")),
    "logits_topk": _setting("logits_topk", None, 8, "logits_topk", ("16", "8")),
    "topk_tail": _topk_tail,
    "kd_temperature": _setting(
        "kd_temperature", None, 2.0, TEMPERATURE,
        ("1 (kd_temperature 1 x teacher_temperature 1)", "2 (kd_temperature 2 x teacher_temperature 1)")),
    "teacher_temperature": _setting(
        "teacher_temperature", 2.0, 0.5, TEMPERATURE,
        ("2 (kd_temperature 1 x teacher_temperature 2)", "0.5 (kd_temperature 1 x teacher_temperature 0.5)")),
    "encoding": _encoding,
    "teacher weights (one bit)": _teacher_weights,
    "teacher tokenizer.json edited": _teacher_tokenizer_json,
    "teacher chat template": _teacher_chat_template,
    "student chat template": _student_chat_template,
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_each_differing_field_is_refused_naming_it_with_both_values(env, case):
    cache, run, expected = case(env)
    message = refusal(cache, run, "/caches/c1")
    assert len(differences(cache, run)) == len(expected), message  # that field only (and what it implies)
    for field, (was, now) in expected.items():
        assert was != now
        line = line_of(message, field)
        assert f"cache {was}" in line and f"this run {now}" in line, line
    assert "/caches/c1" in message and "kubedistill cache-teacher" in message and "back" in message
    assert isinstance(CacheMismatchError(message), ConfigError)  # the CLI's user error (exit 2)


def test_every_difference_is_listed_at_once(env):
    cache = env.fingerprint()
    run = env.fingerprint(sequence_length=24, logits_topk=8, distill_on_prompt=True)
    message = refusal(cache, run)
    assert "3 field(s) differ" in message
    for field in ("sequence_length", "logits_topk", "distill_on_prompt"):
        line_of(message, field)


def test_the_same_data_under_another_path_still_matches(env):
    cache = env.fingerprint()
    moved = env.root / "elsewhere" / "renamed.jsonl"
    moved.parent.mkdir()
    shutil.move(env.data, moved)
    run = env.fingerprint(data_args={"file_name": str(moved)})
    assert run.fields["student.data_args.file_name"] == [str(moved)]  # the path is recorded ...
    assert differences(cache, run) == []  # ... but only the content counts
    check_matches(cache, run, "/caches/c1")


def test_the_data_files_order_and_number_count(env):
    second = env.root / "data" / "more.jsonl"
    second.write_text(env.data.read_text().splitlines(keepends=True)[0])
    cache = env.fingerprint(data_args={"file_name": [str(env.data), str(second)]})
    swapped = env.fingerprint(data_args={"file_name": [str(second), str(env.data)]})
    line = line_of(refusal(cache, swapped), "data file sha256")
    assert str(second) in line and str(env.data) in line  # the files are named too
    one = env.fingerprint()
    assert [line.split(":")[0] for line in differences(cache, one)] == ["data file sha256"]


def test_a_moved_teacher_with_the_same_weights_hashes_the_same(env):
    copy = shutil.copytree(env.teacher, env.root / "teacher-copy")
    assert hash_model_weights(str(copy)) == hash_model_weights(str(env.teacher))
    (Path(copy) / "model.safetensors").rename(Path(copy) / "model-00001-of-00001.safetensors")
    assert hash_model_weights(str(copy)) != hash_model_weights(str(env.teacher))  # names are hashed too
    config = json.loads((Path(copy) / "config.json").read_text())
    shutil.rmtree(copy)
    empty = env.root / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="no weight files"):
        hash_model_weights(str(empty))


def test_the_teacher_config_counts_as_part_of_its_weights(env):
    before = hash_model_weights(str(env.teacher))
    path = env.teacher / "config.json"
    config = json.loads(path.read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 10
    path.write_text(json.dumps(config))
    assert hash_model_weights(str(env.teacher)) != before


def test_a_precomputed_weights_hash_is_used_as_given(env):
    given = fingerprint_of(env.config(), encoding=env.encoding, teacher_weights_hash="abc123")
    assert given.fields["teacher_pretrain (weights sha256)"] == "abc123"
    assert env.fingerprint().fields["teacher_pretrain (weights sha256)"] == hash_model_weights(str(env.teacher))


def test_the_temperature_counts_as_a_product_and_only_with_a_tail(env):
    # T x tau is what the tail's log-mass was computed at: the same product from other settings matches.
    cache = env.fingerprint(kd_temperature=0.1, teacher_temperature=3.0)
    assert differences(cache, env.fingerprint(kd_temperature=0.3, teacher_temperature=1.0)) == []
    assert differences(cache, env.fingerprint(kd_temperature=0.3, teacher_temperature=1.01)) != []
    # Without a tail (full vocabulary, or topk_tail false) the targets are raw logits: no temperature in them.
    full = env.fingerprint(logits_topk=0)
    assert full.fields["topk_tail"] is False  # as the codec has it: a full-vocabulary row has no tail
    assert differences(full, env.fingerprint(logits_topk=0, kd_temperature=2.0)) == []
    no_tail = env.fingerprint(topk_tail=False)
    assert differences(no_tail, env.fingerprint(topk_tail=False, teacher_temperature=4.0)) == []


def test_a_field_the_cache_did_not_record_is_a_difference(env):
    run = env.fingerprint()
    older = Fingerprint({name: value for name, value in run.fields.items() if name != "sequence_length"})
    assert line_of(refusal(older, run), "sequence_length") == \
        "  - sequence_length: cache (not recorded), this run 32"
    newer_format = Fingerprint({**run.fields, "fingerprint format": 2})
    assert "another version of kubedistill" in line_of(refusal(newer_format, run), "fingerprint format")


def test_an_unreadable_fingerprint_is_a_config_error():
    with pytest.raises(ConfigError, match="cache-teacher"):
        Fingerprint.from_json({"weights": "x"})


def test_a_student_with_the_teachers_vocabulary_is_accepted_and_another_is_refused(env, tmp_path):
    from distill_trainer.demo.tiny_models import build_causal_lm, build_tokenizer

    cache = env.fingerprint()
    check_student_matches_cache(cache, str(env.student))  # the tiny student shares the teacher's tokenizer

    tokenizer = build_tokenizer(["completely different text, other merges: xyzzy plugh"] * 4, None, vocab_size=300)
    other = tmp_path / "other-student"
    build_causal_lm(tokenizer, other, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=3)
    teacher_hash, teacher_size = hash_vocabulary(str(env.teacher))
    student_hash, student_size = hash_vocabulary(str(other))
    assert student_size != teacher_size
    with pytest.raises(CacheMismatchError) as refused:
        check_student_matches_cache(cache, str(other), "/caches/c1")
    message = str(refused.value)
    assert str(other) in message and "/caches/c1" in message
    assert f"cache (teacher) {teacher_size}, student {student_size}" in message
    assert teacher_hash in message and student_hash in message


def test_a_student_with_the_same_size_but_other_ids_is_refused(env):
    cache = env.fingerprint()
    path = env.student / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(token for token, index in vocab.items() if index in (100, 101))
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids
    path.write_text(json.dumps(data))
    with pytest.raises(CacheMismatchError, match="vocabulary sha256") as refused:
        check_student_matches_cache(cache, str(env.student))
    assert "vocabulary size" not in str(refused.value)  # only the mapping differs


def test_the_vocabulary_read_from_tokenizer_json_is_the_tokenizers(env):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(env.teacher))
    assert tokenizer_vocabulary(str(env.teacher)) == tokenizer.get_vocab()
    # A token added after training is in tokenizer.json's added_tokens only, not in its model's vocab.
    tokenizer.add_tokens(["<|tool_call|>"])
    saved = env.root / "added"
    tokenizer.save_pretrained(str(saved))
    assert "<|tool_call|>" not in json.loads((saved / "tokenizer.json").read_text())["model"]["vocab"]
    vocabulary = tokenizer_vocabulary(str(saved))
    assert vocabulary == AutoTokenizer.from_pretrained(str(saved)).get_vocab()
    assert vocabulary["<|tool_call|>"] == len(vocabulary) - 1
    assert hash_vocabulary(str(saved))[1] == hash_vocabulary(str(env.teacher))[1] + 1


def test_the_chat_template_hashed_is_the_one_transformers_loads(env):
    from transformers import AutoTokenizer

    assert effective_chat_template(str(env.teacher)) is None and hash_tokenizer(str(env.teacher))["chat_template"] is None
    tokenizer = AutoTokenizer.from_pretrained(str(env.teacher))
    tokenizer.chat_template = TEMPLATE
    saved = env.root / "with-template"
    tokenizer.save_pretrained(str(saved))  # transformers 5 writes chat_template.jinja
    loaded = AutoTokenizer.from_pretrained(str(saved)).chat_template
    assert loaded == TEMPLATE and effective_chat_template(str(saved)) == loaded
    assert hash_tokenizer(str(saved))["chat_template"] == sha256(TEMPLATE)
    # The .jinja file wins over tokenizer_config.json's entry, as in transformers.
    config = json.loads((saved / "tokenizer_config.json").read_text())
    config["chat_template"] = "ignored"
    (saved / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(str(saved)).chat_template == TEMPLATE == effective_chat_template(str(saved))


def test_a_tokenizer_without_tokenizer_json_is_hashed_by_its_vocabulary_files(tmp_path):
    directory = tmp_path / "slow"
    directory.mkdir()
    (directory / "vocab.json").write_text('{"a": 0, "b": 1}')
    (directory / "merges.txt").write_text("#version: 0.2\na b\n")
    first = hash_tokenizer(str(directory))["tokenizer_json"]
    assert first is not None
    (directory / "merges.txt").write_text("#version: 0.2\nb a\n")
    assert hash_tokenizer(str(directory))["tokenizer_json"] not in (None, first)
