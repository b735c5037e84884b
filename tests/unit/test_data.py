"""Data loading: formats, masking/shift, truncation, and bad input stopped with file and line."""

import json

import pytest
from transformers import AutoTokenizer

from distill_trainer.data import (
    IGNORE_INDEX,
    DataCursor,
    DataError,
    ShuffledBatches,
    collate,
    load_examples,
    read_records,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_setup):
    return AutoTokenizer.from_pretrained(tiny_setup.student)


def write(path, text):
    path.write_text(text)
    return path


def load(path, tokenizer, sequence_length=32, distill_on_prompt=False, **keys):
    return load_examples(path, tokenizer, question_key=keys.get("q", "question"), answer_key=keys.get("a", "answer"),
                         sequence_length=sequence_length, distill_on_prompt=distill_on_prompt)


def test_jsonl_and_json_array_give_the_same_examples(tmp_path, tokenizer):
    records = [{"question": "12+34=", "answer": "64"}, {"question": "1+1=", "answer": "2"}]
    jsonl = write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    array = write(tmp_path / "a.json", json.dumps(records, indent=2))
    assert load(jsonl, tokenizer) == load(array, tokenizer)


def test_labels_are_shifted_and_cover_exactly_the_answer_and_eos(tmp_path, tokenizer):
    path = write(tmp_path / "a.jsonl", json.dumps({"question": "12+34=", "answer": "64"}))
    [example] = load(path, tokenizer)
    prompt = tokenizer("12+34=")["input_ids"]
    answer = tokenizer("64", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example.input_ids == prompt + answer
    learned = [(t, label) for t, label in enumerate(example.labels) if label != IGNORE_INDEX]
    # Position t predicts token t + 1: the last prompt position predicts the first answer token.
    assert learned == [(len(prompt) - 1 + i, token) for i, token in enumerate(answer)]
    assert example.labels[-1] == IGNORE_INDEX


def test_distill_on_prompt_learns_every_next_token(tmp_path, tokenizer):
    path = write(tmp_path / "a.jsonl", json.dumps({"question": "12+34=", "answer": "64"}))
    [example] = load(path, tokenizer, distill_on_prompt=True)
    assert example.labels == example.input_ids[1:] + [IGNORE_INDEX]


def test_long_answer_is_truncated_to_sequence_length(tmp_path, tokenizer):
    path = write(tmp_path / "a.jsonl", json.dumps({"question": "1+1=", "answer": "2" * 50}))
    [example] = load(path, tokenizer, sequence_length=10)
    assert len(example.input_ids) == len(example.labels) == 10


def test_collate_pads_right_and_masks_padding(tmp_path, tokenizer):
    path = write(tmp_path / "a.jsonl", "\n".join(json.dumps({"question": q, "answer": "7"}) for q in ["1+6=", "100+200="]))
    batch = collate(load(path, tokenizer), tokenizer.pad_token_id)
    short = batch["attention_mask"][0]
    assert short.sum() < short.numel()
    assert (batch["labels"][0][short == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0][short == 0] == tokenizer.pad_token_id).all()


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"question": "1+1=", "answer": "2"}\n{"question": "2+2=", "answer": \n', r"bad\.jsonl:2: not valid JSON"),
        ('{"question": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n', r"bad\.jsonl:2: missing key 'question'"),
        ('{"question": "1+1=", "answer": 2}\n', r"bad\.jsonl:1: 'answer' must be a string, got int"),
        ('{"question": "1+1=", "answer": "  "}\n', r"bad\.jsonl:1: 'answer' is empty"),
        ("", r"bad\.jsonl: the file is empty"),
        ("\n\n", r"bad\.jsonl: the file is empty"),
        ('["not an object"]', r"bad\.jsonl:1: record 0: expected a JSON object"),
        ('{"question": "1+1=", "answer": "2", "answer": "3"}\n', r"bad\.jsonl:1: duplicate key 'answer'"),
        ('[{"question": "1+1=", "answer": "2"},\n {"question": "2+2=", "question": "4"}]',
         r"bad\.jsonl:2: record 1: duplicate key 'question'"),
        ('[{"question": "1+1=", "answer": "2"}\n {"question": "2+2=", "answer": "4"}]',
         r"bad\.jsonl:2: not valid JSON \(expected ',' or '\]'"),
        ('{"question": "' + "9" * 40 + '", "answer": "1"}\n', r"bad\.jsonl:1: the prompt is \d+ tokens.*sequence_length=32"),
    ],
    ids=["unparsable-line", "missing-key", "non-string", "empty-answer", "empty-file", "blank-file",
         "not-an-object", "duplicate-key", "duplicate-key-in-array", "missing-comma-in-array", "prompt-too-long"],
)
def test_bad_data_stops_with_file_line_and_problem(tmp_path, tokenizer, content, expected):
    path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError, match=expected):
        load(path, tokenizer)


def test_json_array_with_a_utf8_bom_is_read_as_an_array(tmp_path, tokenizer):
    records = [{"question": "12+34=", "answer": "64"}, {"question": "1+1=", "answer": "2"}]
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, indent=2).encode())
    assert [(r.question, r.answer) for r in read_records(path, "question", "answer")] == [
        ("12+34=", "64"), ("1+1=", "2")]


def test_jsonl_with_a_utf8_bom_is_read(tmp_path, tokenizer):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"question": "1+1=", "answer": "2"}\r\n{"question": "2+2=", "answer": "4"}\r\n')
    assert [r.answer for r in read_records(path, "question", "answer")] == ["2", "4"]


@pytest.mark.parametrize(
    "encoding, offset, hint",
    [("latin-1", 15, "iconv -f latin1 -t utf-8"), ("cp1252", 15, "iconv -f cp1252 -t utf-8"),
     ("utf-16", 0, "iconv -f utf-16 -t utf-8")],
)
def test_file_that_is_not_utf8_is_named_with_offset_and_how_to_convert(tmp_path, encoding, offset, hint):
    path = tmp_path / "data.jsonl"
    text = '{"question": "1+1=", "answer": "2"}\n{"question": "caf\u00e9 \u201c1+1\u201d", "answer": "2"}\n'
    if encoding == "latin-1":
        text = text.replace("\u201c", '\\"').replace("\u201d", '\\"')
    path.write_bytes(text.encode(encoding))
    with pytest.raises(DataError) as error:
        read_records(path, "question", "answer")
    message = str(error.value)
    line = 1 if encoding == "utf-16" else 2
    byte_offset = offset if encoding == "utf-16" else text.encode(encoding).index(b"\xe9")
    assert message.startswith(f"{path}:{line}: the file is not UTF-8 (byte 0x")
    assert f"byte offset {byte_offset}" in message
    assert f"{hint} {path} > {tmp_path / 'data.utf8.jsonl'}" in message


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_strings_holding_unicode_line_separators_stay_one_record(tmp_path, separator):
    # JSON allows these raw inside strings; str.splitlines() would cut the record there.
    record = {"question": f"a{separator}b", "answer": f"c{separator}d"}
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    records = read_records(path, "question", "answer")
    assert [(r.question, r.answer, r.where) for r in records] == [
        (record["question"], record["answer"], f"{path}:1"), (record["question"], record["answer"], f"{path}:2")]


class CountingTokenizer:
    """Wraps a tokenizer and remembers the longest text it was asked to tokenize."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.inner(text, **kwargs)

    def apply_chat_template(self, messages, **kwargs):
        self.longest = max(self.longest, sum(len(m["content"]) for m in messages))
        return self.inner.apply_chat_template(messages, **kwargs)


HUGE = 10_000_000  # characters: the 10 MB record that took 4.3 GB and 31 s to refuse


def test_huge_question_is_refused_after_tokenizing_only_a_bounded_prefix(tmp_path, tokenizer):
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"question": "12+34=" * (HUGE // 6), "answer": "64"}) + "\n")
    counting = CountingTokenizer(tokenizer)
    with pytest.raises(DataError, match=r"huge\.jsonl:1: the prompt is more than 32 tokens \(its first \d+ of "
                                        rf"{HUGE // 6 * 6} characters alone are \d+ tokens\).*sequence_length=32"):
        load(path, counting, sequence_length=32)
    assert 0 < counting.longest <= 64 * 32


def test_huge_answer_is_truncated_after_tokenizing_only_a_bounded_prefix(tmp_path, tokenizer):
    answer = "1234567890+" * (HUGE // 11)
    huge, moderate = tmp_path / "huge.jsonl", tmp_path / "moderate.jsonl"
    huge.write_text(json.dumps({"question": "1+1=", "answer": answer}) + "\n")
    moderate.write_text(json.dumps({"question": "1+1=", "answer": answer[:500]}) + "\n")
    counting = CountingTokenizer(tokenizer)
    [example] = load(huge, counting, sequence_length=32)
    assert counting.longest <= 64 * 32
    # The same tokens as tokenizing the text whole (done here on a prefix that is cheap to tokenize whole).
    [reference] = load(moderate, tokenizer, sequence_length=32)
    assert example.input_ids == reference.input_ids and example.labels == reference.labels
    assert len(example.input_ids) == 32


def test_missing_file_is_named(tmp_path, tokenizer):
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        read_records(tmp_path / "nope.jsonl", "question", "answer")


def test_custom_keys(tmp_path, tokenizer):
    path = write(tmp_path / "a.jsonl", json.dumps({"instruction": "1+1=", "output": "2"}))
    assert len(load(path, tokenizer, q="instruction", a="output")) == 1


def test_batches_resume_from_cursor_exactly(tmp_path, tokenizer):
    lines = [json.dumps({"question": f"{i}+0=", "answer": str(i)}) for i in range(10)]
    examples = load(write(tmp_path / "a.jsonl", "\n".join(lines)), tokenizer)
    straight = ShuffledBatches(examples, batch_size=3, seed=5)
    first = [straight.next_batch() for _ in range(3)]
    saved = DataCursor(**vars(straight.cursor))
    rest = [straight.next_batch() for _ in range(4)]  # crosses an epoch boundary
    resumed = ShuffledBatches(examples, batch_size=3, seed=5, cursor=saved)
    assert [resumed.next_batch() for _ in range(4)] == rest
    assert first != rest[:3]


@pytest.mark.parametrize("case", ["latin-1", "huge-question"])
def test_kubedistill_train_reports_bad_data_in_one_line_with_exit_status_2(tiny_setup, tmp_path, case):
    import subprocess
    import sys

    import yaml

    from tests.conftest import tiny_config_dict

    data = tmp_path / "train.jsonl"
    if case == "latin-1":
        data.write_bytes('{"question": "caf\u00e9 1+1=", "answer": "2"}\n'.encode("latin-1"))
        expected = f"error: {data}:1: the file is not UTF-8 (byte 0xe9 at byte offset 17, column 18)"
    else:
        data.write_text(json.dumps({"question": "1+2=" * (HUGE // 4), "answer": "3"}) + "\n")
        expected = f"error: {data}:1: the prompt is more than 32 tokens (its first "
    config = tiny_config_dict(tiny_setup, tmp_path)
    config["student"]["data_args"] = {"file_name": str(data)}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))

    done = subprocess.run([sys.executable, "-m", "distill_trainer.cli", "train", str(tmp_path / "run.yaml")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml", "train.jsonl"]  # nothing written


def test_several_files_are_read_in_order_as_one_training_set(tmp_path, tokenizer):
    first = write(tmp_path / "a.jsonl", json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    records = [{"question": "2+2=", "answer": "4"}, {"question": "3+3=", "answer": "6"}]
    second = write(tmp_path / "b.json", json.dumps(records))
    examples = load_examples([first, second], tokenizer, question_key="question", answer_key="answer",
                             sequence_length=32, distill_on_prompt=False)
    assert [e.answer for e in examples] == ["2", "4", "6"]
    assert examples == load(first, tokenizer) + load(second, tokenizer)


def test_an_error_in_the_second_of_several_files_names_that_file_and_line(tmp_path, tokenizer):
    good = write(tmp_path / "good.jsonl", json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    bad = write(tmp_path / "bad.jsonl", '{"question": "1+1=", "answer": "2"}\n{"question": "2+2="}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing key 'answer'"):
        load_examples([good, bad], tokenizer, question_key="question", answer_key="answer", sequence_length=32,
                      distill_on_prompt=False)
    with pytest.raises(DataError, match=r"missing\.jsonl: data file not found"):
        load_examples([good, tmp_path / "missing.jsonl"], tokenizer, question_key="question", answer_key="answer",
                      sequence_length=32, distill_on_prompt=False)
