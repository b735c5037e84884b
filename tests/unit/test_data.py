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
        ('["not an object"]', r"bad\.jsonl: record 0: expected a JSON object"),
        ('{"question": "' + "9" * 40 + '", "answer": "1"}\n', r"bad\.jsonl:1: the prompt is \d+ tokens.*sequence_length=32"),
    ],
    ids=["unparsable-line", "missing-key", "non-string", "empty-answer", "empty-file", "blank-file",
         "not-an-object", "prompt-too-long"],
)
def test_bad_data_stops_with_file_line_and_problem(tmp_path, tokenizer, content, expected):
    path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError, match=expected):
        load(path, tokenizer)


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
