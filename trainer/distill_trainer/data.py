"""Question/answer records -> tokenized, prompt-masked, padded batches.

A record is one JSON object with the prompt under ``question_key`` and the answer under ``answer_key``,
in a JSON array file or a JSONL file (one object per line; only ``\n`` ends a line), in UTF-8 with or
without a BOM; several files are read one after the other. Every record is validated and tokenized before
training starts, so a bad line (not JSON, a duplicate key, a missing or non-string field, a prompt longer than
``sequence_length``) stops the run with its file and line number and nothing is written.

Labels are stored already shifted: ``labels[t]`` is the token that position ``t`` predicts
(``input_ids[t + 1]``), or -100 where nothing is learned (the prompt, unless ``distill_on_prompt``,
and padding). Cross-entropy and the KD term therefore select exactly the same positions:
``labels != -100``. Models are called without labels so that they do not shift a second time.

Sequence packing (``use_sequence_packing``, ``PackedBatches``): each epoch's shuffled records are laid first-fit,
in that order, into rows of at most ``sequence_length`` tokens (``pack_first_fit``), whole (a record is never
split; none is longer than ``sequence_length``, see ``tokenize_record``), and a micro-batch is
``per_device_train_batch_size`` such rows. ``collate_packed`` concatenates a row's records with their own labels
(shifted within each record, -100 at each record's last token, so no position learns the next record's first
token) and adds ``position_ids`` restarting at 0 at every record: the models attend within a record only
(``strategies.torch.model_inputs``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .textfiles import read_utf8

IGNORE_INDEX = -100


class DataError(ValueError):
    """The user's data file is unusable; the message names the file, the line or record, and the problem."""


@dataclass(frozen=True)
class Example:
    """One tokenized record: ids of prompt + answer + EOS, and its shifted labels."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    answer: str  # the reference answer text, for exact-match evaluation
    where: str = field(default="", compare=False)  # "file:line" of its record, for messages (not its content)


@dataclass(frozen=True)
class Record:
    question: str
    answer: str
    where: str  # "file:N" (JSONL) or "file:N: record M" (JSON array), for error messages


_JSON_WHITESPACE = " \t\r\n"


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _object_without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys without a word; a record with two answers is a mistake.
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(key)
        record[key] = value
    return record


_DECODER = json.JSONDecoder(object_pairs_hook=_object_without_duplicate_keys)


def _duplicate_key_error(where: str, key: str) -> DataError:
    return DataError(
        f"{where}: duplicate key {key!r} in one record; JSON would keep only the last value without a word, so "
        "remove or rename one of them"
    )


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


_WHITESPACE_RUN = re.compile(r"[ \t\r\n]*")


def _skip_whitespace(text: str, position: int) -> int:
    return _WHITESPACE_RUN.match(text, position).end()


def _array_items(text: str, path: Path) -> list[tuple[str, Any]]:
    """The elements of a JSON array file, each with ``file:line: record N`` (the line where it starts)."""
    items: list[tuple[str, Any]] = []

    def fail(position: int, problem: str) -> DataError:
        column = position - text.rfind("\n", 0, position)
        return DataError(f"{path}:{_line_of(text, position)}: not valid JSON ({problem} at column {column})")

    position = _skip_whitespace(text, text.index("[") + 1)
    line, counted = 1, 0  # line number at position `counted`, advanced incrementally (not quadratic in records)
    while position < len(text) and text[position] != "]":
        line, counted = line + text.count("\n", counted, position), position
        where = f"{path}:{line}: record {len(items)}"
        try:
            item, position = _DECODER.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})") from None
        except _DuplicateKey as error:
            raise _duplicate_key_error(where, error.key) from None
        items.append((where, item))
        position = _skip_whitespace(text, position)
        if position < len(text) and text[position] == ",":
            position = _skip_whitespace(text, position + 1)
            if position < len(text) and text[position] == "]":
                raise fail(position, "trailing comma before ']'")
        elif position < len(text) and text[position] != "]":
            raise fail(position, "expected ',' or ']' after a record")
    if position >= len(text):
        raise fail(len(text), "the array is not closed with ']'")
    end = _skip_whitespace(text, position + 1)
    if end < len(text):
        raise fail(end, "extra data after the closing ']'")
    return items


def _jsonl_items(text: str, path: Path) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    # Only "\n" ends a record: str.splitlines() would also split inside strings holding U+2028, U+0085, ...
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip(_JSON_WHITESPACE):
            continue
        try:
            items.append((f"{path}:{number}", _DECODER.decode(line)))
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno}); "
                "each line of a JSONL file must be one JSON object"
            ) from None
        except _DuplicateKey as error:
            raise _duplicate_key_error(f"{path}:{number}", error.key) from None
    return items


def read_records(path: str | Path, question_key: str, answer_key: str) -> list[Record]:
    """Read and validate every record of a JSON array or JSONL file (UTF-8, with or without a BOM)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found (check data_args.file_name / eval_file_name)")
    text = read_utf8(path, DataError)
    if not text.strip(_JSON_WHITESPACE):
        raise DataError(f"{path}: the file is empty; it needs at least one {{{question_key!r}, {answer_key!r}}} record")

    raw = _array_items(text, path) if text.lstrip(_JSON_WHITESPACE).startswith("[") else _jsonl_items(text, path)
    if not raw:
        raise DataError(f"{path}: no records found")

    records = []
    for where, item in raw:
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
        values = []
        for key in (question_key, answer_key):
            if key not in item:
                raise DataError(
                    f"{where}: missing key {key!r} (has {sorted(item)}); set data_args.question_key/answer_key "
                    "to the keys your records use"
                )
            if not isinstance(item[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(item[key]).__name__}")
            values.append(item[key])
        if not values[1].strip():
            raise DataError(f"{where}: {answer_key!r} is empty; every record needs an answer to learn")
        records.append(Record(question=values[0], answer=values[1], where=where))
    return records


def prompt_ids(tokenizer, question: str) -> list[int]:
    """Token ids of the prompt: the chat template's user turn when the tokenizer has one, else the text."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding here, 4.x a list.
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(question, add_special_tokens=True)["input_ids"]


# Tokenizing a 10 MB record whole takes gigabytes and half a minute, only to keep ``sequence_length`` tokens of
# it. A text longer than this many characters per token needed is tokenized a prefix at a time (see _bounded_ids).
_CHARS_PER_TOKEN_GUESS = 8


def _bounded_ids(encode, text: str, needed: int) -> tuple[list[int], int]:
    """``encode(text)``, or ``encode`` of a prefix of ``text`` that already gives at least ``2 * needed`` tokens.

    Returns the ids and how many characters of ``text`` they cover. A cut can change the tokens just before it
    (a BPE merge or a pre-tokenizer rule may span it), never ``needed`` of them, so the prefix must give twice the
    tokens we keep: the first ``needed`` lie far from the cut and are those of the whole text, and a prompt whose
    prefix alone is ``2 * needed`` tokens is certainly over ``needed``. A tokenizer that packs more characters
    into a token than guessed only costs more rounds (prefixes grow 4x, the last one being the whole text);
    nothing is ever refused on the guess. A text shorter than the first prefix, i.e. every ordinary record, is
    tokenized whole, exactly as before.
    """
    size = max(1024, _CHARS_PER_TOKEN_GUESS * 2 * needed)
    while size < len(text):
        ids = encode(text[:size])
        if len(ids) >= 2 * needed:
            return ids, size
        size *= 4
    return encode(text), len(text)


def tokenize_record(
    record: Record, tokenizer, *, sequence_length: int, distill_on_prompt: bool
) -> Example:
    """Prompt ids + answer ids + EOS, truncated to ``sequence_length``, with shifted labels.

    Work and memory follow ``sequence_length``, not the size of the record: a huge question is refused and a
    huge answer truncated after tokenizing only a prefix of it (about 16 characters per token of
    ``sequence_length`` for tokenizers averaging under 8 characters a token; denser ones take more rounds).
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; set one in its tokenizer_config.json")
    prompt, covered = _bounded_ids(lambda text: prompt_ids(tokenizer, text), record.question, sequence_length)
    if len(prompt) >= sequence_length:
        measured = (
            f"is {len(prompt)} tokens" if covered == len(record.question)
            else f"is more than {sequence_length} tokens (its first {covered} of {len(record.question)} characters "
            f"alone are {len(prompt)} tokens)"
        )
        raise DataError(
            f"{record.where}: the prompt {measured}, which leaves no room for an answer within "
            f"sequence_length={sequence_length}; raise sequence_length or shorten the question"
        )
    room = sequence_length - len(prompt)
    answer, _ = _bounded_ids(
        lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], record.answer, room
    )
    input_ids = (prompt + answer + [tokenizer.eos_token_id])[:sequence_length]
    # Position t predicts token t+1; the last position predicts nothing.
    labels = input_ids[1:] + [IGNORE_INDEX]
    if not distill_on_prompt:
        for t in range(len(prompt) - 1):
            labels[t] = IGNORE_INDEX
    return Example(input_ids=input_ids, labels=labels, prompt_length=len(prompt), answer=record.answer,
                   where=record.where)


def load_examples(
    paths: str | Path | Sequence[str | Path],
    tokenizer,
    *,
    question_key: str,
    answer_key: str,
    sequence_length: int,
    distill_on_prompt: bool,
) -> list[Example]:
    """Read, validate and tokenize a file, or several files one after the other (``data_args.file_name`` may be a
    list); errors name the file and line and stop before anything is trained or written."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DataError("no data file given (data_args.file_name is an empty list)")
    return [
        tokenize_record(record, tokenizer, sequence_length=sequence_length, distill_on_prompt=distill_on_prompt)
        for path in paths
        for record in read_records(path, question_key, answer_key)
    ]


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(rows: Sequence[Sequence[Example]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Packed rows (each a list of examples laid end to end) into right-padded ``input_ids``, ``attention_mask``,
    ``labels`` and ``position_ids`` tensors.

    Each example keeps its own labels (shifted within the record, -100 on its last token), and its positions run
    0, 1, ... from its first token: a model given these ``position_ids`` (and no 2D padding mask) attends within
    each record only. The padding after a row's last record gets positions 0, 1, ... too, a segment of its own
    that no record attends to, with labels -100 and attention_mask 0 (which counts real tokens only).
    """
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            n = len(example.input_ids)
            input_ids[r, start : start + n] = torch.tensor(example.input_ids)
            labels[r, start : start + n] = torch.tensor(example.labels)
            position_ids[r, start : start + n] = torch.arange(n)
            start += n
        attention_mask[r, :start] = 1
        position_ids[r, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "position_ids": position_ids}


def pack_first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of at most ``capacity`` tokens: each length, in the given order, goes into the first row (the one opened
    earliest) with room for it, or opens a new row. Returns each row's indices into ``lengths``, in order.

    Deterministic, and O(n log n): a tree over the rows holds the largest free space of each subtree, so the first
    row with room is found by one descent. A length over ``capacity`` (which ``tokenize_record`` never makes) is a
    ValueError.
    """
    for index, length in enumerate(lengths):
        if not 0 < length <= capacity:
            raise ValueError(f"record {index} has {length} tokens; a packed row holds 1 to {capacity} "
                             "(sequence_length)")
    leaves = 1
    while leaves < len(lengths):
        leaves *= 2
    free = [capacity] * (2 * leaves)  # node i: the most free space of a row below it; rows not opened are empty
    rows: list[list[int]] = []
    for index, length in enumerate(lengths):
        node = 1
        while node < leaves:  # the leftmost row with room: rows are opened left to right
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        row = node - leaves
        if row == len(rows):
            rows.append([])
        rows[row].append(index)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


@dataclass
class DataCursor:
    """Where the sampler is: epoch and index into that epoch's shuffled order (saved in checkpoints)."""

    epoch: int = 0
    index: int = 0


class ShuffledBatches:
    """Endless micro-batches over a dataset, reshuffled each epoch from ``seed + epoch``.

    The order depends only on (seed, epoch), so a run resumed from a saved cursor sees exactly the batches
    the uninterrupted run would have seen.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int, cursor: DataCursor | None = None):
        if not examples:
            raise DataError("the training set is empty")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.cursor = cursor or DataCursor()
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._orders = {epoch: torch.randperm(len(self.examples), generator=generator).tolist()}
        return self._orders[epoch]

    def next_indices(self) -> list[int]:
        """The records (indices into ``examples``) of the next micro-batch."""
        batch: list[int] = []
        order = self._order(self.cursor.epoch)
        while len(batch) < self.batch_size:
            if self.cursor.index >= len(order):
                self.cursor = DataCursor(self.cursor.epoch + 1, 0)
                order = self._order(self.cursor.epoch)
            batch.append(order[self.cursor.index])
            self.cursor.index += 1
        return batch

    def next_batch(self) -> list[Example]:
        return [self.examples[i] for i in self.next_indices()]

    def next_micro_batch(self, pad_token_id: int) -> dict[str, torch.Tensor]:
        """The next micro-batch, collated, with ``record_ids`` [B, 1]: the record of each row (what a teacher
        cache is keyed by)."""
        indices = self.next_indices()
        batch = collate([self.examples[i] for i in indices], pad_token_id)
        batch["record_ids"] = torch.tensor(indices, dtype=torch.long).unsqueeze(1)
        return batch


class PackedBatches(ShuffledBatches):
    """Endless micro-batches of ``batch_size`` packed rows: each epoch's shuffled order (as ``ShuffledBatches``)
    packed first-fit into rows of at most ``sequence_length`` tokens (``pack_first_fit``); the rows are served in
    the order they were opened, and the cursor's ``index`` counts rows. The rows depend only on (seed, epoch) and
    the records, so a resumed run sees the same micro-batches.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int, sequence_length: int,
                 cursor: DataCursor | None = None):
        super().__init__(examples, batch_size, seed, cursor)
        self.sequence_length = sequence_length
        self._rows: dict[int, list[list[int]]] = {}

    def rows(self, epoch: int) -> list[list[int]]:
        """Epoch ``epoch``'s packed rows, as indices into ``examples``."""
        if epoch not in self._rows:
            order = self._order(epoch)
            packed = pack_first_fit([len(self.examples[i].input_ids) for i in order], self.sequence_length)
            self._rows = {epoch: [[order[j] for j in row] for row in packed]}
        return self._rows[epoch]

    def next_indices(self) -> list[list[int]]:
        """The packed rows of the next micro-batch, each a list of records (indices into ``examples``)."""
        batch: list[list[int]] = []
        rows = self.rows(self.cursor.epoch)
        while len(batch) < self.batch_size:
            if self.cursor.index >= len(rows):
                self.cursor = DataCursor(self.cursor.epoch + 1, 0)
                rows = self.rows(self.cursor.epoch)
            batch.append(list(rows[self.cursor.index]))
            self.cursor.index += 1
        return batch

    def next_batch(self) -> list[list[Example]]:
        return [[self.examples[i] for i in row] for row in self.next_indices()]

    def next_micro_batch(self, pad_token_id: int) -> dict[str, torch.Tensor]:
        """The next packed micro-batch, with ``record_ids`` [B, most records in a row]: each row's records in
        order, -1 after its last."""
        rows = self.next_indices()
        batch = collate_packed([[self.examples[i] for i in row] for row in rows], pad_token_id)
        record_ids = torch.full((len(rows), max(len(row) for row in rows)), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            record_ids[r, : len(row)] = torch.tensor(row)
        batch["record_ids"] = record_ids
        return batch


def eval_batches(examples: Sequence[Example], batch_size: int) -> Iterator[list[Example]]:
    for start in range(0, len(examples), batch_size):
        yield list(examples[start : start + batch_size])
