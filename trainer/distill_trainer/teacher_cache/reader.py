"""Reading a teacher cache on a student rank: a micro-batch's targets from the shards, decoded ahead of use.

``check_cache_for_training`` (on the driver, before any rank starts) refuses a cache this run cannot use and
verifies every shard's checksum. ``TeacherCache`` then reads it on a rank (shards memory-mapped when first read,
at most ``OPEN_SHARDS`` open). ``targets_of(batch)`` assembles the targets of a
collated micro-batch from its ``record_ids``: each row's records in order, each record's label tokens in order,
which is exactly the order of the label positions a live teacher's targets follow (also for packed rows). The
record's token ids stored beside its targets are compared with the batch's, so a tokenizer or data change that
slipped past the fingerprint still cannot pair targets with the wrong tokens.

``CachedFeed`` is the student's view of one step (the same interface as the live teacher's feed in
``workers``): the step's micro-batches are decoded in a background thread, in order, while the strategy trains
on the earlier ones; ``read_ahead`` starts the next step's while this one trains. Memory stays bounded by two
steps' targets.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..distill_loss import TeacherTargets
from .encoding import RowCodec
from .store import CacheError, Shard, read_manifest, shard_name

OPEN_SHARDS = 4
log = logging.getLogger(__name__)


def open_manifest(directory: str) -> dict:
    """The manifest of a complete cache; CacheError (naming what to do) for a missing or incomplete one."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise CacheError(f"teacher_cache_dir={directory!r} holds no teacher cache (no manifest.json); write one "
                         f"first with `kubedistill cache-teacher CONFIG` (same config), or unset teacher_cache_dir "
                         f"to run a live teacher")
    if not manifest.get("complete"):
        done = sum(1 for shard in range(manifest["shards"]) if (Path(directory) / shard_name(shard)).exists())
        raise CacheError(f"the teacher cache in {directory} is incomplete ({done} of {manifest['shards']} shards "
                         f"written): its writer was interrupted or is still running. Rerun `kubedistill "
                         f"cache-teacher` with the same config to finish it")
    return manifest


class TeacherCache:
    """A complete teacher cache, read record by record."""

    def __init__(self, directory: str, manifest: dict | None = None):
        self.directory = Path(directory)
        self.manifest = manifest or open_manifest(directory)
        self.codec = RowCodec.from_description(self.manifest["codec"])
        self.records_per_shard = int(self.manifest["records_per_shard"])
        self.records = int(self.manifest["records"])
        self._open: OrderedDict[int, Shard] = OrderedDict()
        self._lock = threading.Lock()

    def _shard(self, index: int) -> Shard:
        with self._lock:
            if index in self._open:
                self._open.move_to_end(index)
                return self._open[index]
            # The driver verified every shard's checksum before the run (check_cache_for_training).
            shard = Shard(self.directory / shard_name(index), verify=False)
            self._open[index] = shard
            while len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)[1].close()
            return shard

    def targets_of(self, batch: dict[str, torch.Tensor]) -> TeacherTargets:
        """The targets of a collated micro-batch at its label positions (float32 values as the codec decodes)."""
        record_ids, input_ids, labels = batch["record_ids"], batch["input_ids"], batch["labels"]
        parts = []
        for row in range(record_ids.shape[0]):
            start = 0
            for record in record_ids[row].tolist():
                if record < 0:
                    break
                if record >= self.records:
                    raise CacheError(f"record {record} is beyond the {self.records} records of the teacher cache in "
                                     f"{self.directory}")
                stored = self._shard(record // self.records_per_shard).get(record)
                n = len(stored.input_ids)
                ids = input_ids[row, start : start + n]
                if n != ids.shape[0] or not torch.equal(ids, torch.from_numpy(stored.input_ids.astype(np.int64))):
                    raise CacheError(f"record {record}: this run's token ids differ from those the teacher cache in "
                                     f"{self.directory} was written for (tokenizer or data changed); write the cache "
                                     f"again with `kubedistill cache-teacher`")
                labelled = int((labels[row, start : start + n] != -100).sum())
                if labelled != stored.rows.shape[0]:
                    raise CacheError(f"record {record}: {labelled} label tokens in this run, {stored.rows.shape[0]} "
                                     f"in the teacher cache in {self.directory} (distill_on_prompt or the template "
                                     f"changed); write the cache again")
                parts.append(stored.rows)
                start += n
        rows = np.concatenate(parts) if parts else np.zeros((0, self.codec.row_bytes), dtype=np.uint8)
        return self.codec.decode(rows)

    def close(self) -> None:
        with self._lock:
            for shard in self._open.values():
                shard.close()
            self._open.clear()


def _batches_key(batches: Sequence[dict[str, torch.Tensor]]) -> tuple:
    return tuple((b["record_ids"].numpy().tobytes(), tuple(b["input_ids"].shape)) for b in batches)


class CacheFeeder:
    """The reading side of one student rank: a thread that decodes micro-batches' targets ahead of use."""

    def __init__(self, cache: TeacherCache, local: Callable[[TeacherTargets], TeacherTargets] | None):
        """``local``: the rank's share of whole targets (its vocabulary shard under tensor parallelism); None on
        a rank that computes no loss (not the last pipeline stage), which reads nothing."""
        self.cache, self.local = cache, local
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-cache")
        self._ahead: tuple[tuple, list[Future]] | None = None

    def _decode(self, batch) -> TeacherTargets | None:
        return None if self.local is None else self.local(self.cache.targets_of(batch))

    def start(self, batches: Sequence[dict[str, torch.Tensor]]) -> list[Future]:
        """Futures of ``batches``' targets, in order (taken from a read-ahead of the same batches if there was one)."""
        if self._ahead is not None and self._ahead[0] == _batches_key(batches):
            futures = self._ahead[1]
        else:
            futures = [self._pool.submit(self._decode, batch) for batch in batches]
        self._ahead = None
        return futures

    def read_ahead(self, slice_ref) -> None:
        """Start decoding the next step's micro-batches (``slice_ref``: the ObjectRef of its slice) now."""
        import ray

        batches = ray.get(slice_ref)
        self._ahead = (_batches_key(batches), [self._pool.submit(self._decode, batch) for batch in batches])

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.cache.close()


class CachedFeed:
    """One step's targets from the cache, with the interface of the live teacher's feed (``workers``)."""

    def __init__(self, futures: list[Future], device: torch.device):
        self.futures, self.device = futures, device
        self._targets: dict[int, TeacherTargets] = {}
        self.forward_seconds = self.publish_seconds = self.wait_seconds = 0.0
        self.open_seconds = 0.0  # waiting for a micro-batch's decoded targets (0 when read-ahead kept up)

    def targets(self, index: int) -> TeacherTargets | None:
        if index not in self._targets:
            start = time.perf_counter()
            targets = self.futures[index].result()
            self._targets[index] = None if targets is None else targets.to(self.device)
            self.open_seconds += time.perf_counter() - start
        return self._targets[index]

    def release(self, index: int) -> None:
        self._targets.pop(index, None)
        self.futures[index] = None  # its decoded rows can go

    def release_all(self) -> None:
        self._targets.clear()


def check_cache_for_training(config, records: int) -> dict:
    """Refuse (CacheError/ConfigError, before any rank starts) a teacher cache this training run cannot use:
    missing or incomplete; written for another teacher, tokenizer, data, template, sequence_length,
    distill_on_prompt, top-k, tail or temperature (each differing field named, with both values); a student
    whose vocabulary is not the teacher's; another number of records; a shard file missing or of another size
    than its manifest says (found at once, before the checksums); a shard whose checksum fails or that is not
    the one its manifest lists (every shard is read once, here, so ranks open them unverified)."""
    from .fingerprint import Fingerprint, check_matches, check_student_matches_cache, fingerprint_of, \
        hash_model_weights

    directory = config.teacher_cache_dir
    manifest = open_manifest(directory)
    cached = Fingerprint.from_json(manifest["fingerprint"])
    # The cache is read in the encoding it was written with (teacher_cache_dtype only chooses a new cache's).
    run = fingerprint_of(config, encoding=manifest["codec"],
                         teacher_weights_hash=hash_model_weights(config.teacher_pretrain))
    check_matches(cached, run, directory)
    check_student_matches_cache(cached, config.student_pretrain)
    if int(manifest["records"]) != records:
        raise CacheError(f"the teacher cache in {directory} holds {manifest['records']} records; this run's data has "
                         f"{records}. Write the cache again with `kubedistill cache-teacher`")
    for entry in manifest["shard_files"]:
        path = Path(directory) / entry["name"]
        if not path.exists():
            raise CacheError(f"teacher cache shard {path} is missing; rerun `kubedistill cache-teacher` with the same "
                             f"config to write it again")
        if path.stat().st_size != entry["bytes"]:
            raise CacheError(f"teacher cache shard {path} is {path.stat().st_size} bytes, its manifest says "
                             f"{entry['bytes']} (cut off or replaced); rerun `kubedistill cache-teacher` with the "
                             f"same config: it rewrites the shards that fail their checksum")
    # Every checksum, once, here: a damaged shard stops the run before its first step, not in the middle of it.
    total = sum(entry["bytes"] for entry in manifest["shard_files"])
    log.info("verifying the teacher cache's %d shards (%.1f MiB)", len(manifest["shard_files"]), total / 2**20)
    for entry in manifest["shard_files"]:
        shard = Shard(Path(directory) / entry["name"])  # raises CacheError naming the shard
        sha = shard.sha256
        shard.close()
        if sha != entry["sha256"]:
            raise CacheError(f"teacher cache shard {Path(directory) / entry['name']} is not the one its manifest "
                             f"lists (replaced?); rerun `kubedistill cache-teacher` with the same config in an "
                             f"empty teacher_cache_dir")
    return manifest
