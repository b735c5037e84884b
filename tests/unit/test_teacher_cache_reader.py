"""Reading a teacher cache: a micro-batch's targets are its records' rows in label-position order (padded and
packed rows alike), checked against the batch's token ids; ranks without a loss read nothing."""

import numpy as np
import pytest
import torch

from distill_trainer.data import Example, collate, collate_packed
from distill_trainer.distill_loss import TeacherTargets
from distill_trainer.teacher_cache.encoding import RowCodec
from distill_trainer.teacher_cache.reader import CachedFeed, CacheFeeder, TeacherCache
from distill_trainer.teacher_cache.store import CacheError, RecordTargets, shard_name, shard_plan, write_manifest, \
    write_shard

CODEC = RowCodec("float32", topk=3, vocab_size=50, tail=True)


def example(seed: int) -> Example:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 50, 4 + seed % 3).tolist()
    labels = ids[1:] + [-100]
    labels[0] = -100  # a one-token prompt
    return Example(ids, labels, 1, "")


def labelled(example: Example) -> int:
    return sum(label != -100 for label in example.labels)


def targets_of(record: int, rows: int) -> TeacherTargets:
    """Distinct, recognisable targets: the value of row r of record i is 100·i + r."""
    values = torch.tensor([[100.0 * record + r, -1.0, -2.0] for r in range(rows)])
    indices = torch.tensor([[r % 50, (r + 1) % 50, (r + 2) % 50] for r in range(rows)])
    return TeacherTargets(values, indices, torch.full((rows,), -3.0))


@pytest.fixture
def cache(tmp_path):
    examples = [example(i) for i in range(6)]
    files = []
    for shard, records in enumerate(shard_plan(len(examples), 4)):
        info = write_shard(tmp_path / shard_name(shard), (
            RecordTargets(i, np.array(examples[i].input_ids, dtype=np.int32),
                          CODEC.encode(targets_of(i, labelled(examples[i]))))
            for i in records), CODEC.row_bytes)
        files.append(vars(info))
    write_manifest(tmp_path, {"format": 1, "complete": True, "records": 6, "records_per_shard": 4, "shards": 2,
                              "codec": CODEC.describe(), "fingerprint": {}, "shard_files": files})
    return TeacherCache(str(tmp_path)), examples


def test_padded_rows_get_their_records_targets_in_label_order(cache):
    reader, examples = cache
    batch = collate([examples[5], examples[1]], pad_token_id=0)
    batch["record_ids"] = torch.tensor([[5], [1]])
    got = reader.targets_of(batch)
    expected = TeacherTargets.cat([targets_of(i, labelled(examples[i])) for i in (5, 1)])
    assert got.rows == int((batch["labels"] != -100).sum())
    assert torch.equal(got.values, expected.values) and torch.equal(got.indices, expected.indices)


def test_packed_rows_get_each_records_targets_in_order(cache):
    reader, examples = cache
    batch = collate_packed([[examples[0], examples[4]], [examples[2]]], pad_token_id=0)
    batch["record_ids"] = torch.tensor([[0, 4], [2, -1]])
    got = reader.targets_of(batch)
    expected = TeacherTargets.cat([targets_of(i, labelled(examples[i])) for i in (0, 4, 2)])
    assert torch.equal(got.values, expected.values) and torch.equal(got.tail, expected.tail)


def test_other_token_ids_than_the_cache_holds_are_refused(cache):
    reader, examples = cache
    batch = collate([examples[3]], pad_token_id=0)
    batch["input_ids"][0, 2] += 1
    batch["record_ids"] = torch.tensor([[3]])
    with pytest.raises(CacheError, match="record 3: this run's token ids differ"):
        reader.targets_of(batch)


def test_a_rank_without_a_loss_reads_nothing(cache):
    reader, examples = cache
    batch = collate([examples[0]], pad_token_id=0)
    batch["record_ids"] = torch.tensor([[0]])
    idle, reading = CacheFeeder(reader, None), CacheFeeder(reader, lambda targets: targets)
    assert CachedFeed(idle.start([batch]), torch.device("cpu")).targets(0) is None
    got = CachedFeed(reading.start([batch]), torch.device("cpu")).targets(0)
    assert torch.equal(got.values, targets_of(0, labelled(examples[0])).values)
    idle.close()
    reading.close()
