"""``kubedistill cache-teacher``: the teacher alone over a distill config's training data, its targets written once.

The driver (``CacheTeacherRun``) checks everything a training run would (models, shared vocabulary, data,
layout), fingerprints what the targets depend on, and compares it with the manifest of a cache already in
``teacher_cache_dir`` (a different one is refused field by field; the same one is continued). Shards that
already read back whole are kept, the others are (re)written. It then starts the teacher ranks only, with the
same strategy and TP/PP/DP layout as a live teacher, and hands each data-parallel replica one shard at a time
(the next free replica takes the next missing shard). Each replica's writing rank (TP rank 0 of the last
pipeline stage, which holds the whole targets: ``InferStrategy.whole_targets``) streams its shard to disk and
renames it into place. The manifest is marked complete, with every shard's checksum, only once all are there.

Within a shard the records are batched by length (``infer_batch_size`` of the teacher, else
per_device_train_batch_size), which wastes less compute on padding than the training order would; the targets
of a record do not depend on which records share its batch beyond float rounding of the padded matmuls (equal
bit for bit when the shapes match, e.g. at batch size 1).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..config import ConfigError, DistillConfig
from ..data import IGNORE_INDEX, Example, collate
from ..distill_loss import TeacherTargets
from .encoding import RowCodec
from .store import (
    FORMAT_VERSION,
    RecordTargets,
    ShardInfo,
    read_manifest,
    shard_name,
    shard_plan,
    verify_shard,
    write_manifest,
    write_shard,
)

log = logging.getLogger(__name__)


def write_records(directory: Path, shard: int, records: Sequence[int], examples: Sequence[Example],
                  targets: Callable[[dict[str, torch.Tensor]], TeacherTargets | None], codec: RowCodec,
                  batch_size: int, pad_token_id: int, *, writes: bool) -> ShardInfo | None:
    """The teacher's targets of ``examples`` (records ``records``), batched by length; written as shard
    ``shard`` when ``writes`` (the other ranks of the replica run the same forwards for their collectives)."""
    order = sorted(range(len(records)), key=lambda i: (len(examples[i].input_ids), records[i]))

    def encoded() -> Iterator[RecordTargets]:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = collate([examples[i] for i in chunk], pad_token_id)
            whole = targets(batch)
            if whole is None or not writes:
                continue
            rows = codec.encode(whole)
            counts = (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
            for i, part in zip(chunk, np.split(rows, np.cumsum(counts)[:-1])):
                yield RecordTargets(records[i], np.asarray(examples[i].input_ids, dtype=np.int32), part)

    if not writes:
        for _ in encoded():
            pass
        return None
    return write_shard(directory / shard_name(shard), encoded(), codec.row_bytes)


def codec_of(config: DistillConfig, vocab_size: int) -> RowCodec:
    topk = config.logits_topk
    return RowCodec(config.teacher_cache_dtype, topk, vocab_size, tail=bool(topk) and config.topk_tail)


@dataclass
class CacheResult:
    directory: str
    records: int
    shards: int
    written: int  # shards written by this run (the others were there already)
    seconds: float


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class CacheTeacherRun:
    """One ``kubedistill cache-teacher``: validate, plan, write the missing shards, complete the manifest."""

    def __init__(self, config: DistillConfig, *, num_threads: int | None = None):
        self.config = config
        self.num_threads = num_threads

    def run(self) -> CacheResult:
        lock = _lock_writer(self.config.teacher_cache_dir)
        try:
            return self._run()
        finally:
            lock.close()

    def _run(self) -> CacheResult:
        import ray

        from ..pipeline import ensure_ray
        from ..workers import create_workers, default_num_threads

        config = self.config
        prepared = prepare_cache(config)
        started = time.perf_counter()
        if not prepared.todo:
            log.info("the teacher cache in %s is complete already (%d records, %d shards); nothing to write",
                     config.teacher_cache_dir, prepared.records, len(prepared.plan))
            self._complete(prepared, {})
            return CacheResult(config.teacher_cache_dir, prepared.records, len(prepared.plan), 0, 0.0)
        devices = set(config.teacher.device_mapping) | set(config.student.device_mapping)
        started_ray = ensure_ray(min_cpus=len(devices))
        workers = None
        try:
            threads = self.num_threads if self.num_threads is not None else default_num_threads(1)
            workers = create_workers(config, prepared.vocab, (), None, threads, teachers_only=True)
            written = self._write(workers, prepared)
        finally:
            if workers is not None:
                workers.shutdown()
            if started_ray:
                ray.shutdown()
        self._complete(prepared, written)
        seconds = time.perf_counter() - started
        return CacheResult(config.teacher_cache_dir, prepared.records, len(prepared.plan), len(written), seconds)

    def _write(self, workers, prepared: "PreparedCache") -> dict[int, ShardInfo]:
        import ray

        config = self.config
        layout = workers.layout
        replicas: list[list[int]] = [[] for _ in range(layout.dp_size)]
        for rank in range(len(workers.teachers)):
            replicas[layout.of_rank(rank).dp_rank].append(rank)
        batch_size = config.teacher.infer_batch_size or config.train_args.per_device_train_batch_size
        directory = str(config.teacher_cache_dir)
        queue = deque(prepared.todo)
        todo_records = sum(len(prepared.plan[s]) for s in prepared.todo)
        running: dict[int, tuple[int, list]] = {}  # replica -> (shard, its ranks' calls)
        written: dict[int, ShardInfo] = {}
        records_done, start = 0, time.perf_counter()
        sinks = _progress_sinks(config, len(prepared.plan))
        from ..tracking import Tracker

        with Tracker(config.logging_dir, max_steps=len(prepared.plan), start_step=0, exp_name=config.exp_name,
                     console=False, sinks=sinks) as tracker:
            while queue or running:
                for replica, ranks in enumerate(replicas):
                    if replica not in running and queue:
                        shard = queue.popleft()
                        records = list(prepared.plan[shard])
                        examples = [prepared.train[i] for i in records]
                        calls = [workers.teachers[r].write_cache_shard.remote(
                            shard, records, examples, directory, prepared.codec.describe(), batch_size)
                            for r in ranks]
                        running[replica] = (shard, calls)
                first_calls = {calls[0]: replica for replica, (_, calls) in running.items()}
                ready, _ = ray.wait(list(first_calls), num_returns=1)
                replica = first_calls[ready[0]]
                shard, calls = running.pop(replica)
                infos = [info for info in ray.get(calls) if info is not None]
                if len(infos) != 1:
                    raise RuntimeError(f"shard {shard}: {len(infos)} ranks wrote it, expected exactly one")
                written[shard] = infos[0]
                records_done += infos[0].records
                elapsed = time.perf_counter() - start
                rate = records_done / elapsed
                done = len(prepared.plan) - len(queue) - len(running)
                print(f"cache-teacher: shard {shard_name(shard)} written ({infos[0].records} records, "
                      f"{infos[0].rows:,} label tokens, {infos[0].bytes / infos[0].rows if infos[0].rows else 0:.0f} "
                      f"B/token); {done}/{len(prepared.plan)} shards, {rate:.1f} records/s, ETA "
                      f"{_eta((todo_records - records_done) / rate) if rate else '?'}", flush=True)
                tracker.log(done, {"cache/records_per_second": rate, "cache/records_written": records_done,
                                   "cache/shards_done": done, "cache/shards": len(prepared.plan),
                                   "cache/eta_seconds": (todo_records - records_done) / rate if rate else 0.0})
                tracker.advance(done)
        return written

    def _complete(self, prepared: "PreparedCache", written: dict[int, ShardInfo]) -> None:
        infos = {**prepared.existing, **written}
        missing = [s for s in range(len(prepared.plan)) if s not in infos]
        if missing:
            raise RuntimeError(f"shards {missing} were not written")
        manifest = prepared.manifest(complete=True, shard_files=[vars(infos[s]) for s in range(len(prepared.plan))])
        write_manifest(prepared.directory, manifest)
        tokens = sum(info.rows for info in infos.values())
        size = sum(info.bytes for info in infos.values())
        log.info("teacher cache complete: %s, %d records, %d label tokens, %.1f MiB (%.0f B per label token)",
                 prepared.directory, prepared.records, tokens, size / 2**20, size / max(tokens, 1))


def _lock_writer(directory: str | None):
    """An exclusive lock on ``<teacher_cache_dir>/.writer.lock`` (released when the process ends, also by kill -9):
    two writers of one cache would rewrite each other's shards. Removes the temporary files of an interrupted
    writer, which only the lock's holder may do."""
    import fcntl

    if not directory:
        raise ConfigError("teacher_cache_dir is not set: name the directory the teacher cache goes to, e.g. "
                          "teacher_cache_dir=/data/cache/qwen7b-top64")
    Path(directory).mkdir(parents=True, exist_ok=True)
    handle = open(Path(directory) / ".writer.lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"another `kubedistill cache-teacher` is writing {directory} now; wait for it, or stop "
                          f"it first") from None
    for stale in Path(directory).glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)
    return handle


def _progress_sinks(config: DistillConfig, shards: int) -> list:
    """Under a DistillJob: status.progress counts shards (step/maxSteps). With metrics_port: the Prometheus
    endpoint (step and max_steps count shards; the kubedistill_trainer_cache_* gauges)."""
    from .. import k8s_progress

    sinks = []
    progress = k8s_progress.from_env(max_steps=shards)
    if progress is not None:
        sinks.append(progress)
    if config.metrics_port:
        from ..prometheus_sink import PrometheusSink

        try:
            sinks.append(PrometheusSink.from_config(config, max_steps=shards))
        except OSError as error:  # e.g. the port is taken: metrics are a side channel, the write goes on
            log.warning("cannot serve Prometheus metrics on %s:%d (%s); writing the cache without them",
                        config.metrics_bind_address, config.metrics_port, error)
    return sinks


@dataclass
class PreparedCache:
    directory: Path
    vocab: object
    train: list[Example]
    codec: RowCodec
    fingerprint: object
    plan: list[range]
    existing: dict[int, ShardInfo]  # shards already written and whole
    todo: list[int]
    records_per_shard: int

    @property
    def records(self) -> int:
        return len(self.train)

    def manifest(self, *, complete: bool, shard_files: list[dict] | None = None) -> dict:
        return {
            "format": FORMAT_VERSION,
            "complete": complete,
            "records": self.records,
            "records_per_shard": self.records_per_shard,
            "shards": len(self.plan),
            "codec": self.codec.describe(),
            "fingerprint": self.fingerprint.to_json(),
            "shard_files": shard_files or [],
        }


def prepare_cache(config: DistillConfig) -> PreparedCache:
    """Every check before any teacher runs; the manifest (incomplete) written; the shards still to write."""
    from ..models import check_shared_vocab, load_tokenizer
    from ..config import check_runtime_support, data_files
    from ..data import load_examples
    from ..layout import check_parallel_layout
    from ..pipeline import check_writable_dir
    from .fingerprint import Fingerprint, check_matches, fingerprint_of, hash_model_weights

    if not config.teacher_cache_dir:
        raise ConfigError("teacher_cache_dir is not set: name the directory the teacher cache goes to, e.g. "
                          "teacher_cache_dir=/data/cache/qwen7b-top64")
    if config.distill_loss_weight == 0:
        raise ConfigError("distill_loss_weight is 0 (SFT only): such a run reads no teacher targets, so there is no "
                          "cache to write for it")
    vocab = check_shared_vocab(config.student_pretrain, config.teacher_pretrain)
    if config.logits_topk > vocab.size:
        raise ConfigError(f"logits_topk={config.logits_topk} exceeds the vocabulary size {vocab.size}; use 0 for all")
    check_runtime_support(config)
    check_parallel_layout(config, sides=("teacher",))
    tokenizer = load_tokenizer(config.student_pretrain, "student_pretrain")
    args = config.data_args
    train = load_examples(data_files(args.file_name), tokenizer, question_key=args.question_key,
                          answer_key=args.answer_key, sequence_length=config.sequence_length,
                          distill_on_prompt=config.distill_on_prompt)
    directory = Path(config.teacher_cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    check_writable_dir(str(directory), "teacher_cache_dir")
    codec = codec_of(config, vocab.size)
    log.info("hashing the teacher's weights in %s (the cache's fingerprint)", config.teacher_pretrain)
    fingerprint = fingerprint_of(config, encoding=codec.describe(),
                                 teacher_weights_hash=hash_model_weights(config.teacher_pretrain))
    per_shard = config.teacher_cache_records_per_shard
    plan = shard_plan(len(train), per_shard)
    prepared = PreparedCache(directory, vocab, train, codec, fingerprint, plan, {}, [], per_shard)
    manifest = read_manifest(directory)
    if manifest is not None:
        check_matches(Fingerprint.from_json(manifest["fingerprint"]), fingerprint, str(directory))
        if (manifest["records"], manifest["records_per_shard"]) != (len(train), per_shard):
            raise ConfigError(
                f"the teacher cache in {directory} was planned as {manifest['records']} records in shards of "
                f"{manifest['records_per_shard']}; this config makes {len(train)} records in shards of {per_shard} "
                f"(teacher_cache_records_per_shard). Use the cache's setting, or another teacher_cache_dir")
    for shard in range(len(plan)):
        path = directory / shard_name(shard)
        if not path.exists():
            prepared.todo.append(shard)
            continue
        sha = verify_shard(path)
        if sha is None:
            log.warning("teacher cache shard %s does not read back whole (cut off or corrupted): writing it again", path)
            prepared.todo.append(shard)
            continue
        info = next((ShardInfo(**s) for s in (manifest or {}).get("shard_files", []) if s["name"] == path.name), None)
        prepared.existing[shard] = info if info is not None and info.sha256 == sha else _info_of(path, sha)
    if prepared.todo:
        write_manifest(directory, prepared.manifest(complete=False))
        if prepared.existing:
            log.info("teacher cache %s: %d of %d shards are written already; writing the other %d", directory,
                     len(prepared.existing), len(plan), len(prepared.todo))
    return prepared


def _info_of(path: Path, sha: str) -> ShardInfo:
    """A kept shard's manifest entry, read from the shard itself (the manifest of an interrupted write lists none)."""
    from .store import Shard

    shard = Shard(path, verify=False)
    tokens = sum(t for t, _, _ in shard.table.values())
    rows = sum(n for _, n, _ in shard.table.values())
    records = len(shard.table)
    shard.close()
    return ShardInfo(path.name, records, tokens, rows, path.stat().st_size, sha)
