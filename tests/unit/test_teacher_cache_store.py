"""Teacher-cache shard files: what is written reads back, and a cut, altered or foreign file is named and refused."""

import numpy as np
import pytest

from distill_trainer.teacher_cache.store import (
    CacheError,
    RecordTargets,
    Shard,
    read_manifest,
    shard_name,
    shard_plan,
    verify_shard,
    write_manifest,
    write_shard,
)


def records(row_bytes=7, count=5, seed=0):
    rng = np.random.default_rng(seed)
    return [RecordTargets(10 + i, rng.integers(0, 1000, 3 + i, dtype=np.int32),
                          rng.integers(0, 256, (2 + i, row_bytes), dtype=np.uint8)) for i in range(count)]


def test_a_shard_reads_back_every_record_and_its_checksum(tmp_path):
    written = records()
    info = write_shard(tmp_path / shard_name(0), iter(written), 7)
    assert (info.records, info.tokens, info.rows) == (5, sum(3 + i for i in range(5)), sum(2 + i for i in range(5)))
    shard = Shard(tmp_path / shard_name(0))
    assert shard.sha256 == info.sha256 == verify_shard(tmp_path / shard_name(0))
    for record in written:
        read = shard.get(record.record)
        assert np.array_equal(read.input_ids, record.input_ids) and np.array_equal(read.rows, record.rows)
    assert 9 not in shard and 10 in shard
    assert not list(tmp_path.glob(".*"))  # no temporary file left


@pytest.mark.parametrize("damage", ["flip a payload bit", "cut the end", "cut to a few bytes", "other file"])
def test_a_damaged_shard_is_named_and_refused(tmp_path, damage):
    path = tmp_path / shard_name(3)
    write_shard(path, iter(records()), 7)
    data = bytearray(path.read_bytes())
    if damage == "flip a payload bit":
        data[12] ^= 0x10
    elif damage == "cut the end":
        data = data[:-5]
    elif damage == "cut to a few bytes":
        data = data[:10]
    else:
        data = b"PK\x03\x04" + data[4:]
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard-00003\.kdtc"):
        Shard(path)
    assert verify_shard(path) is None


def test_a_failed_write_leaves_neither_a_shard_nor_a_temporary_file(tmp_path):
    def failing():
        yield from records(count=2)
        raise RuntimeError("the teacher rank died")

    with pytest.raises(RuntimeError):
        write_shard(tmp_path / shard_name(0), failing(), 7)
    assert list(tmp_path.iterdir()) == []


def test_rows_of_another_width_are_refused(tmp_path):
    with pytest.raises(ValueError, match="record 10"):
        write_shard(tmp_path / shard_name(0), iter(records(row_bytes=6)), 7)


def test_the_shard_plan_depends_only_on_records_and_shard_size():
    assert shard_plan(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert shard_plan(8, 4) == [range(0, 4), range(4, 8)]


def test_manifest_round_trip_and_refusals(tmp_path):
    assert read_manifest(tmp_path) is None
    write_manifest(tmp_path, {"format": 1, "complete": False})
    assert read_manifest(tmp_path) == {"format": 1, "complete": False}
    (tmp_path / "manifest.json").write_text('{"format": 99}')
    with pytest.raises(CacheError, match="format 99"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="not valid JSON"):
        read_manifest(tmp_path)
