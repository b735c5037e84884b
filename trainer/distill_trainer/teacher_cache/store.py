"""Teacher-cache files: shards of records' targets, and the manifest that makes a directory a cache.

A cache directory holds ``manifest.json`` and ``shard-NNNNN.kdtc`` files. Shard ``s`` holds the records
``[s·R, (s+1)·R)`` of the training data in file order (R = ``teacher_cache_records_per_shard``), whoever wrote
it: the same shards come out of one rank or of several (``shard_plan``), and a rerun after an interruption
writes only the shards that are missing.

A shard file, byte by byte (all integers little-endian)::

    b"KDTC" | u32 format version | payload | table: UTF-8 JSON | u64 table length
    | 32-byte SHA-256 of everything before it | b"KDTE"

The table lists the shard's records, each ``[record, tokens, rows, offset]``: its index in the data, its
``tokens`` input ids (int32, stored so that a reader can check its own tokenisation against the writer's), and
``rows`` label tokens of ``RowCodec.row_bytes`` each, at ``offset`` from the payload's start (ids first, then
rows). The table comes last so that a writer streams records to disk as they are computed (a full-vocabulary
shard may not fit in memory). A shard is written to a temporary name, flushed and fsynced, then renamed: a
reader or a rerun never sees a partial shard under its final name, and a file that was cut or altered
afterwards fails its checksum (``CacheError`` names it).

The manifest records the format, the fingerprint (what the targets depend on), the codec, the plan (records,
shards) and, once every shard is written, ``complete: true`` with each shard's checksum. It is replaced
atomically too. A cache is readable only when complete.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..config import ConfigError

FORMAT_VERSION = 1
MAGIC, END_MAGIC = b"KDTC", b"KDTE"
MANIFEST = "manifest.json"
_PREFIX = struct.Struct("<4sI")  # magic, version
_LENGTH = struct.Struct("<Q")  # the table's length
_DIGEST = 32


class CacheError(ConfigError):
    """A teacher cache that cannot be used as it is (incomplete, corrupted, another config's): the message names
    the file and what to do. A ConfigError: the CLI prints it and exits 2, before any training."""


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.kdtc"


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records of a written shard."""

    name: str
    records: int
    tokens: int
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class RecordTargets:
    """One record as a shard holds it: its input ids and its label tokens' encoded rows (views into the file)."""

    record: int
    input_ids: np.ndarray  # int32 [tokens]
    rows: np.ndarray  # uint8 [label tokens, row_bytes]


def shard_plan(records: int, per_shard: int) -> list[range]:
    """The records of each shard: consecutive ranges of ``per_shard`` (the last one shorter)."""
    return [range(start, min(start + per_shard, records)) for start in range(0, records, per_shard)]


class _AtomicFile:
    """A file written under a temporary name, fsynced and renamed into place by ``commit`` (with its directory
    fsynced); the SHA-256 of what was written is kept. Left uncommitted, the temporary file is removed."""

    def __init__(self, path: Path):
        self.path = path
        self.temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.out = open(self.temporary, "wb")
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.out.write(chunk)
        self.digest.update(chunk)
        self.size += len(chunk)

    def commit(self) -> str:
        self.out.flush()
        os.fsync(self.out.fileno())
        self.out.close()
        os.replace(self.temporary, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return self.digest.hexdigest()

    def abandon(self) -> None:
        self.out.close()
        self.temporary.unlink(missing_ok=True)


def write_shard(path: str | Path, records: Iterable[RecordTargets], row_bytes: int) -> ShardInfo:
    """Write one shard atomically, streaming ``records`` to disk (see the module docstring for the layout)."""
    file = _AtomicFile(Path(path))
    try:
        file.write(_PREFIX.pack(MAGIC, FORMAT_VERSION))
        table, offset = [], 0
        for record in records:
            ids = np.ascontiguousarray(record.input_ids, dtype="<i4")
            rows = np.ascontiguousarray(record.rows, dtype=np.uint8)
            if rows.ndim != 2 or rows.shape[1] != row_bytes:
                raise ValueError(f"record {record.record}: rows of shape {rows.shape}, expected [n, {row_bytes}]")
            table.append([int(record.record), len(ids), int(rows.shape[0]), offset])
            file.write(ids.tobytes())
            file.write(rows.tobytes())
            offset += ids.nbytes + rows.nbytes
        footer = json.dumps({"row_bytes": row_bytes, "records": table}, separators=(",", ":")).encode()
        file.write(footer)
        file.write(_LENGTH.pack(len(footer)))
        file.write(file.digest.digest())
        file.write(END_MAGIC)
        sha = file.commit()
    except BaseException:
        file.abandon()
        raise
    return ShardInfo(Path(path).name, len(table), sum(t[1] for t in table), sum(t[2] for t in table), file.size, sha)


class Shard:
    """A shard file, memory-mapped and verified (magic, version, length, checksum) when opened."""

    def __init__(self, path: str | Path, *, verify: bool = True):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size < _PREFIX.size + _LENGTH.size + _DIGEST + len(END_MAGIC):
                    raise self._bad(f"it is {size} bytes, shorter than an empty shard (cut off while written?)")
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise CacheError(f"teacher cache shard {self.path} is missing; rerun `kubedistill cache-teacher` with "
                             f"the same config to write it") from None
        data = memoryview(self._map)
        magic, version = _PREFIX.unpack_from(data, 0)
        if magic != MAGIC:
            raise self._bad("it does not start as a teacher-cache shard")
        if version != FORMAT_VERSION:
            raise self._bad(f"its format version is {version}; this kubedistill reads version {FORMAT_VERSION}")
        if bytes(data[size - len(END_MAGIC):]) != END_MAGIC:
            raise self._bad("its end marker is missing (cut off while written, or truncated since)")
        end = size - _DIGEST - len(END_MAGIC)  # the checksum covers [0, end)
        (table_length,) = _LENGTH.unpack_from(data, end - _LENGTH.size)
        table_start = end - _LENGTH.size - table_length
        if table_start < _PREFIX.size:
            raise self._bad("its record table does not fit in the file (truncated?)")
        self.sha256 = None  # of the whole file (what the manifest records), when verified
        if verify:
            digest = hashlib.sha256(data[:end])
            if digest.digest() != bytes(data[end : end + _DIGEST]):
                raise self._bad("its checksum does not match its contents (corrupted)")
            digest.update(data[end:])
            self.sha256 = digest.hexdigest()
        try:
            table = json.loads(bytes(data[table_start : end - _LENGTH.size]))
            self.row_bytes = int(table["row_bytes"])
            self.table = {int(r): (int(t), int(n), int(o)) for r, t, n, o in table["records"]}
        except (ValueError, KeyError, TypeError):
            raise self._bad("its record table is not readable") from None
        data.release()
        self._payload_start = _PREFIX.size
        self._buffer = np.frombuffer(self._map, dtype=np.uint8, count=table_start)

    def _bad(self, problem: str) -> CacheError:
        return CacheError(f"teacher cache shard {self.path} is unusable: {problem}. Rerun `kubedistill "
                          f"cache-teacher` with the same config: it rewrites the shards that fail their checksum")

    def __contains__(self, record: int) -> bool:
        return record in self.table

    def get(self, record: int) -> RecordTargets:
        tokens, rows, offset = self.table[record]
        start = self._payload_start + offset
        ids = self._buffer[start : start + 4 * tokens].view("<i4")
        start += 4 * tokens
        encoded = self._buffer[start : start + rows * self.row_bytes].reshape(rows, self.row_bytes)
        return RecordTargets(record, ids, encoded)

    def close(self) -> None:
        self._buffer = None
        try:
            self._map.close()
        except BufferError:  # a view handed out is still alive; the map goes when it does
            pass


def verify_shard(path: str | Path) -> str | None:
    """The SHA-256 of a shard that reads back whole, else None (missing, cut or corrupted): what a rerun of the
    writer keeps."""
    try:
        shard = Shard(path)
    except CacheError:
        return None
    sha = shard.sha256
    shard.close()
    return sha


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    file = _AtomicFile(Path(directory) / MANIFEST)
    file.write(json.dumps(manifest, indent=1).encode() + b"\n")
    file.commit()


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of ``directory``, or None when there is none (no cache there yet)."""
    path = Path(directory) / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise CacheError(f"{path} is not valid JSON ({error}); delete the cache directory and write it again") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CacheError(f"{path}: teacher-cache format {manifest.get('format')!r}, this kubedistill reads "
                         f"format {FORMAT_VERSION}; write the cache again with this version")
    return manifest
