"""Sequence packing (``use_sequence_packing``): the packer, packed collation, and the torch strategies on packed rows
(the loss and gradients of a packed micro-batch equal those of the same records padded one per row)."""

import copy
import json
import random

import pytest
import torch
from transformers import AutoTokenizer

from distill_trainer.data import (
    IGNORE_INDEX,
    DataCursor,
    PackedBatches,
    collate,
    collate_packed,
    load_examples,
    pack_first_fit,
)

SEQUENCE_LENGTH = 48


@pytest.fixture(scope="module")
def tokenizer(tiny_setup):
    return AutoTokenizer.from_pretrained(tiny_setup.student)


@pytest.fixture(scope="module")
def examples(tiny_setup, tokenizer, tmp_path_factory):
    """24 records of the tiny task, their answers repeated 1 to 16 times: 13 to 48 tokens, some truncated at 48."""
    rng = random.Random(3)
    records = [json.loads(line) for line in tiny_setup.train_file.read_text().splitlines()][:24]
    path = tmp_path_factory.mktemp("packing") / "varied.jsonl"
    repeats = [rng.choice([1, 1, 1, 2, 2, 3, 5, 8, 16]) for _ in records]
    path.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"] * n}) + "\n"
                            for r, n in zip(records, repeats)))
    return load_examples(path, tokenizer, question_key="question", answer_key="answer",
                         sequence_length=SEQUENCE_LENGTH, distill_on_prompt=False)


def naive_first_fit(lengths, capacity):
    rows, room = [], []
    for index, length in enumerate(lengths):
        for r, free in enumerate(room):
            if length <= free:
                rows[r].append(index)
                room[r] -= length
                break
        else:
            rows.append([index])
            room.append(capacity - length)
    return rows


# ------------------------------------------------------------------------------------------------ the packer


def test_first_fit_puts_each_record_in_order_into_the_first_row_with_room():
    assert pack_first_fit([5, 3, 4, 2, 6, 1, 8], 8) == [[0, 1], [2, 3, 5], [4], [6]]
    rng = random.Random(0)
    for _ in range(20):
        lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 300))]
        assert pack_first_fit(lengths, 50) == naive_first_fit(lengths, 50)


def test_a_record_longer_than_a_row_is_refused_and_records_are_truncated_before_packing(examples):
    with pytest.raises(ValueError, match="record 1 has 9 tokens; a packed row holds 1 to 8"):
        pack_first_fit([3, 9], 8)
    # What reaches the packer: answers longer than sequence_length were truncated at loading, as without packing.
    lengths = [len(e.input_ids) for e in examples]
    assert max(lengths) == SEQUENCE_LENGTH and min(lengths) < SEQUENCE_LENGTH // 3


def test_packed_rows_keep_records_whole_with_their_own_positions_and_labels(examples, tokenizer):
    rows = [[examples[i] for i in row] for row in pack_first_fit([len(e.input_ids) for e in examples], SEQUENCE_LENGTH)]
    assert any(len(row) >= 3 for row in rows)
    batch = collate_packed(rows, tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    assert width == max(sum(len(e.input_ids) for e in row) for row in rows) <= SEQUENCE_LENGTH
    for r, row in enumerate(rows):
        start = 0
        for example in row:  # each record whole, in order, its positions from 0 and its labels as loaded
            end = start + len(example.input_ids)
            assert batch["input_ids"][r, start:end].tolist() == example.input_ids
            assert batch["labels"][r, start:end].tolist() == example.labels
            assert batch["position_ids"][r, start:end].tolist() == list(range(len(example.input_ids)))
            start = end
        assert batch["attention_mask"][r].tolist() == [1] * start + [0] * (width - start)
        assert batch["labels"][r, start:].eq(IGNORE_INDEX).all()
        assert batch["position_ids"][r, start:].tolist() == list(range(width - start))  # padding: a segment apart
        # Every learned position predicts the next token of its own record: no label crosses a record boundary.
        for t in (batch["labels"][r] != IGNORE_INDEX).nonzero().flatten().tolist():
            assert batch["labels"][r, t] == batch["input_ids"][r, t + 1]
            assert batch["position_ids"][r, t + 1] == batch["position_ids"][r, t] + 1
    # The same label tokens as the records padded one per row.
    flat = collate([e for row in rows for e in row], tokenizer.pad_token_id)
    assert torch.equal(batch["labels"][batch["labels"] != IGNORE_INDEX], flat["labels"][flat["labels"] != IGNORE_INDEX])


def test_packed_batches_serve_every_record_once_an_epoch_and_resume_exactly(examples):
    batches = PackedBatches(examples, batch_size=2, seed=5, sequence_length=SEQUENCE_LENGTH)
    rows = batches.rows(0)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    assert all(sum(len(examples[i].input_ids) for i in row) <= SEQUENCE_LENGTH for row in rows)
    assert len(rows) < len(examples)  # short records share rows
    order = PackedBatches(examples, 2, 5, SEQUENCE_LENGTH)._order(0)
    assert rows == [[order[j] for j in row] for row in naive_first_fit([len(examples[i].input_ids) for i in order],
                                                                        SEQUENCE_LENGTH)]
    assert batches.rows(1) != rows  # reshuffled each epoch

    served = [batches.next_batch() for _ in range(len(rows))]  # beyond one epoch: continues into epoch 1
    assert [[e for e in row] for batch in served[: len(rows) // 2] for row in batch] == \
        [[examples[i] for i in row] for row in rows[: 2 * (len(rows) // 2)]]
    straight = PackedBatches(examples, 2, 5, SEQUENCE_LENGTH)
    for _ in range(3):
        straight.next_batch()
    saved = DataCursor(**vars(straight.cursor))
    resumed = PackedBatches(examples, 2, 5, SEQUENCE_LENGTH, cursor=saved)
    for _ in range(len(rows)):
        assert resumed.next_batch() == straight.next_batch()
    assert straight.cursor.epoch >= 1 and resumed.cursor == straight.cursor


def test_step_count_from_epochs_counts_packed_rows():
    from distill_trainer.config import config_from_dict, resolve_max_steps

    data = {"student_pretrain": "s", "teacher_pretrain": "t",
            "student": {"data_args": {"file_name": "x"}, "use_sequence_packing": True,
                        "training_args": {"num_train_epochs": 2, "per_device_train_batch_size": 4,
                                          "gradient_accumulation_steps": 2}}}
    config = config_from_dict(data)
    line = resolve_max_steps(config, 1000, packed_rows=300)
    assert config.max_steps == 2 * 300 // 8
    assert "300 packed rows (of 1000 records, use_sequence_packing)" in line


# ------------------------------------------------------------------------------------- the torch strategies


def strategies(tiny_setup, tmp_path, attn="sdpa", **overrides):
    from distill_trainer.config import DistillConfig
    from distill_trainer.models import check_shared_vocab
    from distill_trainer.strategies.base import RankContext
    from distill_trainer.strategies.torch import TorchInferStrategy, TorchTrainStrategy
    from tests.conftest import tiny_config_dict

    data = tiny_config_dict(tiny_setup, tmp_path, sequence_length=SEQUENCE_LENGTH, distill_loss_weight=0.5, **overrides)
    data["student"]["use_sequence_packing"] = True
    data["student"]["model_args"] = {"attn_implementation": attn}
    data["teacher"]["model_args"] = {"attn_implementation": attn}
    config = DistillConfig.model_validate(data)
    vocab = check_shared_vocab(str(tiny_setup.student), str(tiny_setup.teacher))
    teacher, student = TorchInferStrategy(config, RankContext(), vocab), TorchTrainStrategy(config, RankContext(), vocab)
    return config, vocab, teacher, student


def layouts(examples, pad_token_id):
    """The same records as two micro-batches of packed rows and as four of padded ones, in the same order (so the
    label positions, hence the teacher's target rows, come in the same order)."""
    from distill_trainer.strategies.base import MicroBatch

    rows = [[examples[i] for i in row] for row in pack_first_fit([len(e.input_ids) for e in examples], SEQUENCE_LENGTH)]
    half = len(rows) // 2
    packed = [collate_packed(part, pad_token_id) for part in (rows[:half], rows[half:])]
    ordered = [e for row in rows for e in row]
    quarter = -(-len(ordered) // 4)
    padded = [collate(ordered[i : i + quarter], pad_token_id) for i in range(0, len(ordered), quarter)]
    as_micro = lambda batches: [  # noqa: E731
        MicroBatch(b["input_ids"], b["attention_mask"], b["labels"], None, b.get("position_ids")) for b in batches]
    return as_micro(packed), as_micro(padded)


def step(teacher, student, config, micro_batches, normalizer):
    from distill_trainer.distill_loss import LossConfig, make_loss_fn

    for mb in micro_batches:
        mb.teacher = teacher.forward(mb)
    student.model.zero_grad(set_to_none=True)
    stats = student.forward_backward(micro_batches, make_loss_fn(LossConfig.from_config(config), normalizer))
    grads = {name: p.grad.clone() for name, p in student.model.named_parameters()}
    targets = [mb.teacher for mb in micro_batches]
    return stats, grads, targets


def assert_same_step(packed_step, padded_step):
    (p_stats, p_grads, p_targets), (u_stats, u_grads, u_targets) = packed_step, padded_step
    assert p_stats.label_tokens == u_stats.label_tokens and p_stats.input_tokens == u_stats.input_tokens
    for name in ("loss", "ce_sum", "kd_sum"):
        assert getattr(p_stats, name) == pytest.approx(getattr(u_stats, name), rel=1e-5, abs=1e-5), name
    for name in u_grads:
        torch.testing.assert_close(p_grads[name], u_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    values = lambda targets: torch.cat([t.values for t in targets])
    torch.testing.assert_close(values(p_targets), values(u_targets), rtol=1e-5, atol=1e-5)
    if u_targets[0].tail is not None:
        torch.testing.assert_close(torch.cat([t.tail for t in p_targets]), torch.cat([t.tail for t in u_targets]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("topk, fused_head, attn", [(8, True, "sdpa"), (8, False, "eager"), (0, True, "sdpa"),
                                                     (0, False, "sdpa")])
def test_packed_step_equals_the_same_records_padded(tiny_setup, tmp_path, examples, tokenizer, topk, fused_head, attn):
    config, _, teacher, student = strategies(tiny_setup, tmp_path, attn, logits_topk=topk)
    student.fused_head = fused_head
    packed, padded = layouts(examples, tokenizer.pad_token_id)
    normalizer = float(sum(int((mb.labels != IGNORE_INDEX).sum()) for mb in padded))
    packed_step = step(teacher, student, config, packed, normalizer)
    assert_same_step(packed_step, step(teacher, student, config, padded, normalizer))
    # Without the records' positions the same rows attend across records and the results move: the check has teeth.
    blind = [copy.copy(mb) for mb in packed]
    for mb in blind:
        mb.position_ids = None
    _, blind_grads, blind_targets = step(teacher, student, config, blind, normalizer)
    moved = torch.cat([t.values for t in blind_targets]) - torch.cat([t.values for t in packed_step[2]])
    assert moved.abs().max() > 1e-2
    assert max(float((blind_grads[n] - g).abs().max()) for n, g in packed_step[1].items()) > 1e-3


def test_rows_laid_end_to_end_for_flash_attention_give_the_same_step(tiny_setup, tmp_path, examples, tokenizer,
                                                                     monkeypatch):
    # Flash attention reads packed records from the positions of a single row; the flattening is checked here with
    # sdpa, which keeps the records apart in one long row as well (flash attention itself needs a GPU).
    from distill_trainer.strategies import torch as torch_strategies

    config, _, teacher, student = strategies(tiny_setup, tmp_path, logits_topk=8)
    packed, padded = layouts(examples, tokenizer.pad_token_id)
    normalizer = float(sum(int((mb.labels != IGNORE_INDEX).sum()) for mb in padded))
    expected = step(teacher, student, config, padded, normalizer)
    shapes = []
    forward = student.parts.body.forward
    monkeypatch.setattr(student.parts.body, "forward",
                        lambda **kw: shapes.append(kw["input_ids"].shape) or forward(**kw))
    monkeypatch.setattr(torch_strategies, "flattens_packed_rows", lambda module: True)
    assert_same_step(step(teacher, student, config, packed, normalizer), expected)
    assert all(shape[0] == 1 for shape in shapes) and len(shapes) == len(packed)


def test_packing_is_part_of_the_run_identity_and_unpacked_runs_keep_theirs():
    from distill_trainer.run_identity import differences, identity_from_dict

    base = {"student_pretrain": "/s", "teacher_pretrain": "/t", "seed": 1,
            "student": {"data_args": {"file_name": "/train.jsonl"}, "use_sequence_packing": False}}
    unpacked = identity_from_dict(base)
    assert "student.use_sequence_packing" not in unpacked.fields  # as before the field existed: same fingerprint
    assert identity_from_dict({**base, "student": {"data_args": {"file_name": "/train.jsonl"}}}) == unpacked
    packed = identity_from_dict({**base, "student": {**base["student"], "use_sequence_packing": True}})
    assert packed.fingerprint != unpacked.fingerprint
    assert differences(packed, unpacked) == ["student.use_sequence_packing: False (theirs) vs True (this run)"]


def test_attention_flops_count_each_record_over_its_own_length(examples, tokenizer):
    from distill_trainer.pipeline import _token_positions

    rows = [[examples[i] for i in row] for row in pack_first_fit([len(e.input_ids) for e in examples], SEQUENCE_LENGTH)]
    batch = collate_packed(rows, tokenizer.pad_token_id)
    tokens = int(batch["attention_mask"].sum())
    assert _token_positions(tokens, batch) == sum(len(e.input_ids) ** 2 for row in rows for e in row)
    padded = collate(examples[:4], tokenizer.pad_token_id)
    assert _token_positions(int(padded["attention_mask"].sum()), padded) == \
        int(padded["attention_mask"].sum()) * padded["input_ids"].shape[1]
