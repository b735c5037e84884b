"""DistillPipeline: the driver of a distillation run.

Per optimizer step: draw the global batch (``gradient_accumulation_steps`` micro-batches of
``per_device_train_batch_size`` for each data-parallel rank), count its label tokens (the normalizer of both
loss terms), and hand each data-parallel rank its slice: teacher rank r computes its targets and the result goes
straight to student rank r, which runs forward/backward and the optimizer step; the driver only adds up the
ranks' sums. With ``overlap_teacher`` (the default) the driver hands the teacher step k+1's batches as soon as the
student has step k's, one call per micro-batch, so the teacher computes the next micro-batch's targets while the
student trains on the current one (a bounded queue: ``workers.channel_slots``), the same batches in the same
order, hence the same losses and weights bit for bit as with the two taking turns. Evaluation every
``eval_steps``, an atomic checkpoint every ``save_steps``, and both at the last step.
With ``use_sequence_packing`` a micro-batch is ``per_device_train_batch_size`` packed rows of records
(``data.PackedBatches``); its one batch dict, ``position_ids`` included, goes to the teacher and the student alike.
The driver owns the trainer state (step, data position) and the checkpoint directory; each student rank writes
its own model and optimizer state into it.

Everything the user can get wrong (config, model paths, vocabularies, data, writable output directories,
another run's checkpoints in ``output_dir``) is checked before Ray starts and before anything is written.
A step whose loss or gradient norm is NaN/inf is never applied: the run stops there (or skips the step,
if configured), so no checkpoint is written from a non-finite state. An fp16 student's loss-scale overflow
(finite loss, gradients too large for the current scale) is skipped with a warning and the run goes on: the
optimizer has lowered its scale, as mixed-precision training does.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoint
from .channel import SLOT_HEADROOM, ring_bytes
from .config import (
    ConfigError,
    DistillConfig,
    check_runtime_support,
    data_files,
    evaluates_onpolicy_rkl,
    reads_teacher_cache,
    runs_live_teacher,
    resolve_max_steps,
    samples_completions,
    startup_warnings,
)
from .data import IGNORE_INDEX, DataCursor, Example, PackedBatches, ShuffledBatches, load_examples
from .flops import ModelFlops, peak_flops_per_second
from .layout import check_parallel_layout
from .models import VocabInfo, check_shared_vocab, load_tokenizer
from .on_policy import check_prompts_fit, micro_batch_sources, prompts_of
from .sampling import SAMPLER_STUDENT, SamplingParams, sampling_seed
from .rank_failures import RankLostError, dead_nodes_of, get_all, lost_rank_cause, lost_rank_message
from .run_identity import RunIdentity, identity_of
from .tracking import Tracker
from .workers import StudentStepResult, Workers, channel_slots, create_workers, default_num_threads

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient norm and the run stopped; the message names the step."""


@dataclass
class RunResult:
    """What a finished run reports back (the demo prints these)."""

    final_step: int
    last_checkpoint: str | None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    last_train_metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    vocab: VocabInfo
    train: list[Example]
    eval: list[Example]
    resume_from: Path | None
    identity: RunIdentity


@dataclass(frozen=True)
class StepWork:
    """One step's work as handed out: each data-parallel rank's slice of the global batch (in the object store),
    the label and input tokens of the global batch (and Σ tokens·width over its micro-batches, for the attention
    FLOPs), each teacher rank's pending targets (a list of ObjectRefs, one per micro-batch; none in SFT-only
    runs), and the data position after this step's batches (what a checkpoint of this step records)."""

    slices: list[Any]
    label_tokens: int
    input_tokens: int
    token_positions: int
    teacher_outputs: list[Any]
    cursor: DataCursor
    sample_seconds: float = 0.0  # sampling completions (on-policy, seq_kd): the slowest replica's total


def check_writable_dir(path: str, field_name: str) -> None:
    """Create ``path`` if needed and prove a file can be written there, or raise ConfigError naming the field.

    Done before Ray starts: otherwise a bad ``output_dir`` is only found at the first save, after the work.
    """
    target = Path(path)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{field_name}={path!r} is an existing file, not a directory; choose a directory") from None
    except OSError as error:
        raise ConfigError(f"{field_name}={path!r} cannot be created: {error.strerror} ({error.filename})") from None
    if not target.is_dir():
        raise ConfigError(f"{field_name}={path!r} is not a directory; choose a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".kubedistill-write-test-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"{field_name}={path!r} is not writable: {error.strerror}; choose a directory this user can write to"
        ) from None


def prepare(config: DistillConfig) -> Prepared:
    """All user-facing checks: model dirs, shared vocabulary, data files, output directories, run identity,
    the resume checkpoint. Only with ``overwrite_output_dir`` does it change anything (another run's
    checkpoints are deleted), and only once every other check has passed."""
    vocab = check_shared_vocab(config.student_pretrain, config.teacher_pretrain)
    if config.logits_topk > vocab.size:
        raise ConfigError(f"logits_topk={config.logits_topk} exceeds the vocabulary size {vocab.size}; use 0 for all")
    check_runtime_support(config)
    check_parallel_layout(config)
    check_channel_memory(config, vocab)
    tokenizer = load_tokenizer(config.student_pretrain, "student_pretrain")
    for warning in startup_warnings(config, has_chat_template=bool(getattr(tokenizer, "chat_template", None))):
        log.warning(warning)
    data_args = config.data_args
    options = dict(
        question_key=data_args.question_key,
        answer_key=data_args.answer_key,
        sequence_length=config.sequence_length,
        distill_on_prompt=config.distill_on_prompt,
    )
    train = load_examples(data_files(data_args.file_name), tokenizer, **options)
    if reads_teacher_cache(config):  # before anything is written: a cache that does not fit this run is refused
        from .teacher_cache.reader import check_cache_for_training

        check_cache_for_training(config, len(train))
    eval_files = data_files(data_args.eval_file_name)
    eval_examples = load_examples(eval_files, tokenizer, **options) if eval_files else []
    if samples_completions(config):  # every prompt must leave room for a sampled completion
        check_prompts_fit(config, train, "training")
    if eval_examples and evaluates_onpolicy_rkl(config):
        check_prompts_fit(config, eval_examples, "evaluation")
    packed_rows = None
    if config.student.use_sequence_packing:
        rows = training_batches(config, train).rows(0)
        packed_rows = len(rows)
        tokens = sum(len(example.input_ids) for example in train)
        log.info("sequence packing: epoch 0's %d records fill %d rows of at most %d tokens (%.1f%% of their room)",
                 len(train), packed_rows, config.sequence_length, 100 * tokens / (packed_rows * config.sequence_length))
    derived = resolve_max_steps(config, len(train), packed_rows)  # num_train_epochs instead of max_steps
    if derived:
        log.info(derived)
    check_writable_dir(config.output_dir, "output_dir")
    check_writable_dir(config.logging_dir, "logging_dir")

    identity = identity_of(config)
    resume = config.resume_from_checkpoint
    # An explicit checkpoint path is checked first, so that overwrite_output_dir never deletes what it names.
    resume_from = checkpoint.resolve_resume_checkpoint(resume, config.output_dir, identity) if resume is not True else None
    checkpoint.claim_output_dir(config.output_dir, identity, overwrite=config.overwrite_output_dir)
    if resume is True:
        resume_from = checkpoint.resolve_resume_checkpoint(True, config.output_dir, identity)
    return Prepared(vocab, train, eval_examples, resume_from, identity)


def training_batches(config: DistillConfig, train: list[Example], cursor: DataCursor | None = None) -> ShuffledBatches:
    """The run's micro-batch sampler: shuffled records, or with ``use_sequence_packing`` packed rows of them."""
    args = config.train_args
    if config.student.use_sequence_packing:
        return PackedBatches(train, args.per_device_train_batch_size, config.seed, config.sequence_length, cursor)
    return ShuffledBatches(train, args.per_device_train_batch_size, config.seed, cursor)


def check_channel_memory(config: DistillConfig, vocab: VocabInfo) -> None:
    """Refuse (ConfigError, before Ray starts) a teacher channel larger than ``channel_memory_limit_gb``: its
    slots each hold one micro-batch's targets, at most per_device_train_batch_size x sequence_length rows."""
    if not runs_live_teacher(config):  # SFT only, or targets read from a teacher cache: no channel
        return
    import torch

    from .distill_loss import TeacherTargets

    args = config.train_args
    # A sampled micro-batch has samples_per_prompt rows per record.
    rows = args.per_device_train_batch_size * config.samples_per_prompt * config.sequence_length
    tp = config.teacher.strategy_args.tp_size
    if config.logits_topk:
        k, what = config.logits_topk, f"top-{config.logits_topk} values and indices"
    elif tp == 1:
        k, what = vocab.size, f"full-vocabulary logits ({vocab.size:,} columns)"
    else:  # each TP rank ships its slice of the padded vocabulary
        from .strategies.megatron import shared_padded_vocab

        k = shared_padded_vocab(config, tp) // tp
        what = f"full-vocabulary logits ({k:,} columns of each of {tp} TP ranks)"
    indices = torch.empty(rows, k, dtype=torch.int32, device="meta") if config.logits_topk else None
    tail = torch.empty(rows, device="meta") if config.logits_topk and config.topk_tail else None
    targets = TeacherTargets(torch.empty(rows, k, device="meta"), indices, tail)
    slots = channel_slots(config)
    why_slots = ("the micro-batch the student trains on and the one the teacher writes" if slots == 2 else
                 f"2 x gradient_accumulation_steps: the student holds a step's micro-batches at once")
    needed = ring_bytes(targets.tensors(), slots)
    limit = config.channel_memory_limit_gb * 2**30
    if needed > limit:
        raise ConfigError(
            f"the teacher's channel needs {needed / 2**30:.1f} GiB per teacher rank, over channel_memory_limit_gb="
            f"{config.channel_memory_limit_gb:g}: {slots} slots ({why_slots}) x {needed / slots / 2**30:.2f} GiB "
            f"(one micro-batch each: per_device_train_batch_size {args.per_device_train_batch_size} x sequence_length "
            f"{config.sequence_length} = {rows:,} rows of fp32 {what}, {SLOT_HEADROOM:g}x headroom). Set "
            f"logits_topk (e.g. 64), lower per_device_train_batch_size or sequence_length, or raise "
            f"channel_memory_limit_gb if the GPU (CUDA IPC) or /dev/shm (shared memory) has room for it beside both "
            f"models."
        )


def ensure_ray(min_cpus: int = 1) -> bool:
    """Connect to RAY_ADDRESS if set, else start an embedded local Ray. Returns True if we started it.

    ``min_cpus``: the embedded Ray announces at least this many CPUs (one per device of ``device_mapping``), so that
    a machine with fewer cores still runs the CPU ranks the config asks for; they share its cores."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # otherwise Ray writes a token under ~/.ray
    if os.environ.get("RAY_ADDRESS"):
        # Joining a running cluster: its raylets already chose the workers' niceness (`ray start` reads
        # RAY_worker_niceness from its environment); nothing a client passes changes it.
        ray.init(log_to_driver=True)
    else:
        # Embedded Ray for one machine: loopback only, no dashboard. address="local" always starts a new one
        # rather than joining a cluster someone started on this host with `ray start`.
        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, min_cpus),
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
            _node_ip_address="127.0.0.1",
            # Ray starts worker processes at nice 15 by default; our actors are the training itself, so on a
            # busy machine they must not yield to everything else.
            _system_config={"worker_niceness": 0},
        )
    return True


def _is_due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


class DistillPipeline:
    """Run one distillation described by a validated ``DistillConfig``."""

    def __init__(self, config: DistillConfig, *, num_threads: int | None = None, console: bool = True):
        self.config = config
        # SFT only (no teacher actor): the student alone shares each device, so it gets every core.
        actors_per_device = 2 if runs_live_teacher(config) else 1
        self.num_threads = default_num_threads(actors_per_device) if num_threads is None else num_threads
        self.console = console
        self._step = 0  # the step in progress (for the message of a lost rank)

    def run(self) -> RunResult:
        import ray

        prepared = prepare(self.config)
        devices = set(self.config.student.device_mapping) | set(self.config.teacher.device_mapping)
        started_ray = ensure_ray(min_cpus=len(devices))
        workers = None
        lost = False
        try:
            workers = create_workers(
                self.config,
                prepared.vocab,
                prepared.eval,
                str(prepared.resume_from) if prepared.resume_from else None,
                self.num_threads,
            )
            return self._train(workers, prepared)
        except Exception as error:
            cause = lost_rank_cause(error)
            if cause is None or workers is None:
                raise
            lost = True
            raise self._rank_lost(workers, cause) from error
        finally:
            if workers is not None:
                workers.shutdown(rank_lost=lost)
            if started_ray:
                ray.shutdown()

    def _rank_lost(self, workers: Workers, cause: BaseException) -> RankLostError:
        """The error that stops a run whose rank died: the lost node (or rank), the step, the newest checkpoint."""
        import ray

        failed = workers.ranks.get(getattr(cause, "actor_id", None) or "")
        ours = {info.place.node_id for info in workers.ranks.values()}
        dead = dead_nodes_of(ray.nodes(), ours)
        deadline = time.monotonic() + 3
        # The GCS marks the node dead before it fails the node's actors; allow a moment for the view to agree.
        while failed is not None and failed.place.node_id not in {n.node_id for n in dead} \
                and "node" in str(cause).lower() and time.monotonic() < deadline:
            time.sleep(0.2)
            dead = dead_nodes_of(ray.nodes(), ours)
        ranks_on: dict[str, list[str]] = {}
        for info in workers.ranks.values():
            ranks_on.setdefault(info.place.node_id, []).append(str(info))
        newest = checkpoint.find_latest_checkpoint(self.config.output_dir)
        return RankLostError(lost_rank_message(
            failed=f"{failed} on {failed.place}" if failed else None,
            error_text=str(cause),
            dead_nodes=dead,
            ranks_on=ranks_on,
            step=self._step,
            newest_checkpoint=str(newest) if newest else None,
        ))

    def _sinks(self):
        from . import k8s_progress

        sinks = []
        # Only under a DistillJob (the operator sets the env vars): status.progress on the resource.
        progress = k8s_progress.from_env(max_steps=self.config.max_steps)
        if progress is not None:
            sinks.append(progress)
        if self.config.metrics_port:
            from .prometheus_sink import PrometheusSink

            try:
                sinks.append(PrometheusSink.from_config(self.config))
            except OSError as error:  # e.g. the port is taken: metrics are a side channel, training goes on
                log.warning("cannot serve Prometheus metrics on %s:%d (%s); training goes on without them",
                            self.config.metrics_bind_address, self.config.metrics_port, error)
        return sinks

    def _train(self, workers: Workers, prepared: Prepared) -> RunResult:
        config, args = self.config, self.config.train_args
        state = checkpoint.read_trainer_state(prepared.resume_from) if prepared.resume_from else {}
        start_step = int(state.get("step", 0))
        cursor = DataCursor(**state["data_cursor"]) if "data_cursor" in state else DataCursor()
        if start_step:
            log.info("resuming from %s at step %d", prepared.resume_from, start_step)
        batches = training_batches(config, prepared.train, cursor)
        result = RunResult(final_step=start_step, last_checkpoint=str(prepared.resume_from or "") or None)
        skipped_in_a_row = 0
        pad = prepared.vocab.pad_token_id
        flops = self._model_flops()
        ahead: StepWork | None = None  # the next step's work, already with the teacher (overlap_teacher)

        with Tracker(
            config.logging_dir,
            max_steps=config.max_steps,
            start_step=start_step,
            exp_name=config.exp_name,
            console=self.console,
            sinks=self._sinks(),
        ) as tracker:
            for step in range(start_step + 1, config.max_steps + 1):
                self._step = step
                started = time.perf_counter()
                work, ahead = ahead or self._hand_out(workers, batches, pad, step), None
                if reads_teacher_cache(config) and step < config.max_steps:
                    # Drawn now so that the students decode its cached targets while they train on this step.
                    ahead = self._hand_out(workers, batches, pad, step + 1)
                calls = self._student_steps(workers, work, ahead)
                # Not with sampled completions: step k+1's samples need the weights of step k.
                if ahead is None and config.overlap_teacher and workers.teachers and step < config.max_steps \
                        and not samples_completions(config):
                    # The teacher starts on step k+1 now, while the students train on step k.
                    ahead = self._hand_out(workers, batches, pad, step + 1)
                results = _get(calls)
                metrics, applied = self._step_metrics(results, work, time.perf_counter() - started, flops)
                result.final_step, result.last_train_metrics = step, metrics
                tracker.advance(step)
                overflowed = not applied and all(r.update.loss_scale_overflow for r in results)
                skipped_in_a_row = 0 if applied or overflowed else skipped_in_a_row + 1
                if not applied:
                    tracker.log(step, metrics)  # a step not applied is always on record
                if overflowed:
                    log.warning("step %d: the fp16 gradients overflowed at the current loss scale; the update was "
                                "skipped and the scale lowered", step)
                elif skipped_in_a_row:
                    self._on_nonfinite(step, metrics, skipped_in_a_row, result.last_checkpoint)
                logged = dict(metrics) if _is_due(step, config.logging_steps, config.max_steps) and applied else {}
                if prepared.eval and _is_due(step, config.eval_steps, config.max_steps):
                    result.eval_metrics = self._evaluate(workers)
                    logged.update(result.eval_metrics)
                if logged:  # one record (and one console line) per step, evaluation included
                    tracker.log(step, logged)
                if _is_due(step, config.save_steps, config.max_steps):
                    result.last_checkpoint = self._save(workers, step, work.cursor, prepared.identity)
                    tracker.checkpoint_saved(step, result.last_checkpoint)
        return result

    def _save(self, workers: Workers, step: int, cursor: DataCursor, identity: RunIdentity) -> str:
        """checkpoint-<step>: the driver's trainer state plus what every student rank writes, committed atomically."""
        config = self.config
        with checkpoint.assembling_checkpoint(
            config.output_dir,
            step,
            trainer_state={"data_cursor": vars(cursor).copy()},
            config=config.model_dump(mode="json"),
            identity=identity,
            max_to_keep=config.max_ckpt_to_keep,
        ) as directory:
            _get([student.save.remote(str(directory)) for student in workers.students])
        return str(checkpoint.output_dir_checkpoint(config.output_dir, step))

    def _evaluate(self, workers: Workers) -> dict[str, float]:
        """Held-out cross-entropy per answer token over every data-parallel rank's share, and exact match."""
        sums = [s for s in _get([student.evaluate.remote() for student in workers.students]) if s.counted]
        metrics = {"val/loss": sum(s.ce_sum for s in sums) / max(sum(s.label_tokens for s in sums), 1)}
        if self.config.eval_exact_match:
            metrics["val/exact_match"] = sum(s.correct for s in sums) / max(sum(s.examples for s in sums), 1)
        if evaluates_onpolicy_rkl(self.config) and workers.teachers:
            metrics["eval/onpolicy_rkl"] = self._onpolicy_rkl(workers)
        return metrics

    def _onpolicy_rkl(self, workers: Workers) -> float:
        """The teacher's per-token reverse KL on the student's own greedy completions of the held-out prompts:
        each student rank samples its share, its teacher rank scores them, and it sums KL(student ‖ teacher)."""
        import ray

        params = SamplingParams.of(self.config.generation)
        sampled = _get([student.sample_eval.remote(params) for student in workers.students])
        counts, samples = [len(batches) for batches in sampled], [ray.put(batches) for batches in sampled]
        # Through the object store: the ring's slots may all hold the next step's targets (overlap_teacher).
        outputs = [[teacher.forward.remote(samples[rank], i, True) for i in range(counts[rank])]
                   for rank, teacher in enumerate(workers.teachers)]
        sums = [s for s in _get([student.onpolicy_rkl.remote(samples[rank], outputs[rank])
                                 for rank, student in enumerate(workers.students)]) if s.counted]
        return sum(s.ce_sum for s in sums) / max(sum(s.label_tokens for s in sums), 1)

    def _on_nonfinite(self, step: int, metrics: dict[str, float], in_a_row: int, last_checkpoint: str | None) -> None:
        """A step was not applied (NaN/inf loss or gradient norm): stop, or warn and go on under ``skip``."""
        config = self.config
        shown = ", ".join(
            f"{key}={metrics[key]:.4g}" for key in ("train/loss", "train/student_loss", "train/distill_loss", "train/grad_norm")
            if key in metrics
        )
        if config.on_nonfinite_loss == "skip" and in_a_row < config.max_skipped_steps:
            log.warning("step %d: loss or gradient norm is not finite (%s); step skipped (%d in a row, limit %d)",
                        step, shown, in_a_row, config.max_skipped_steps)
            return
        why = "" if config.on_nonfinite_loss == "stop" else f" for {in_a_row} steps in a row (max_skipped_steps)"
        raise NonFiniteLossError(
            f"step {step}: the loss or gradient norm is NaN/inf{why} ({shown}). The update was not applied and no "
            f"checkpoint was written from this state; the newest checkpoint is {last_checkpoint or 'none'}. "
            f"Lower student.training_args.learning_rate (now {config.train_args.learning_rate:g}), check the data, "
            f"or set on_nonfinite_loss=skip to drop such steps."
        )

    def _hand_out(self, workers: Workers, batches: ShuffledBatches, pad_token_id: int, step: int) -> StepWork:
        """Draw the next global batch and give each teacher rank its slice (it starts at once)."""
        accumulation = self.config.train_args.gradient_accumulation_steps
        # The global batch: data-parallel rank d gets draws [d·accumulation, (d+1)·accumulation).
        micro_batches = [batches.next_micro_batch(pad_token_id) for _ in range(workers.layout.dp_size * accumulation)]
        if samples_completions(self.config):
            return self._hand_out_sampled(workers, batches, micro_batches, step)
        rank_slices = _rank_slices(workers, micro_batches, accumulation)
        # The teacher's results go to the student of the same rank as ObjectRefs (one per micro-batch, in order),
        # not through the driver; the student waits for each when it starts that micro-batch.
        teacher_outputs = [[teacher.forward.remote(rank_slices[rank], i) for i in range(accumulation)]
                           for rank, teacher in enumerate(workers.teachers)]
        return _step_work(micro_batches, rank_slices, teacher_outputs, batches.cursor)

    def _hand_out_sampled(self, workers: Workers, batches: ShuffledBatches, micro_batches: list[dict], step: int) -> StepWork:
        """``_hand_out`` of a run with sampled completions (on_policy_fraction, seq_kd). The ranks of each replica
        sample the prompts of the micro-batches the mix gives them (``on_policy.micro_batch_sources``), one call
        per micro-batch, and each teacher rank scores a sampled micro-batch as soon as it exists: the teacher scores
        micro-batch k while the student samples k + 1. The driver then takes the sampled batches (token ids, a few
        KB: the targets go from teacher to student directly) for the step's label-token count."""
        import ray

        config, layout = self.config, workers.layout
        accumulation = config.train_args.gradient_accumulation_steps
        params = SamplingParams.of(config.generation)
        replicas = [[r for r in range(layout.world_size) if layout.of_rank(r).dp_rank == d] for d in range(layout.dp_size)]
        sources = micro_batch_sources(config, step, len(micro_batches))
        batch_refs: list[Any] = []  # one per global micro-batch: the ObjectRef of [its batch]
        for g, (batch, source) in enumerate(zip(micro_batches, sources)):
            if not source:
                batch_refs.append(ray.put([batch]))
                continue
            side = "student" if source == SAMPLER_STUDENT else "teacher"
            actors = workers.students if side == "student" else workers.teachers
            prompts, record_ids = prompts_of(batch["record_ids"][:, 0].tolist(), batches.examples,
                                             config.samples_per_prompt)
            seed = sampling_seed(config.seed, step, g, side)
            refs = [actors[r].sample.remote(prompts, record_ids, seed, params) for r in replicas[g // accumulation]]
            batch_refs.append(refs[0])  # every rank of the replica samples the same batch
        teacher_outputs = [
            [teacher.forward.remote(batch_refs[layout.of_rank(rank).dp_rank * accumulation + i]) for i in range(accumulation)]
            for rank, teacher in enumerate(workers.teachers)
        ]
        micro_batches = [batch for (batch,) in _get(batch_refs)]
        seconds = [sum(float(b.get("sample_seconds", 0.0)) for b in micro_batches[d * accumulation:(d + 1) * accumulation])
                   for d in range(layout.dp_size)]
        return _step_work(micro_batches, _rank_slices(workers, micro_batches, accumulation), teacher_outputs,
                          batches.cursor, max(seconds))

    def _student_steps(self, workers: Workers, work: StepWork, ahead: StepWork | None = None) -> list[Any]:
        """Start every student rank's training step on its slice and its teacher rank's targets (with a teacher
        cache: and the next step's slice, ``ahead``, whose targets it reads while it trains)."""
        return [
            student.train_step.remote(work.slices[rank], work.teacher_outputs[rank] if work.teacher_outputs else None,
                                      float(work.label_tokens), [ahead.slices[rank]] if ahead else None)
            for rank, student in enumerate(workers.students)
        ]

    def _model_flops(self) -> ModelFlops | None:
        """Model FLOPs per token of the two models, when the device's peak is known (else no MFU is logged)."""
        peak = peak_flops_per_second(self.config)
        if peak is None:
            return None
        teacher = self.config.teacher_pretrain if runs_live_teacher(self.config) else None
        devices = max(1, len(set(self.config.student.device_mapping) | set(self.config.teacher.device_mapping)))
        return ModelFlops.of(self.config.student_pretrain, teacher, peak * devices)

    def _step_metrics(
        self, results: list[StudentStepResult], work: StepWork, elapsed: float, flops: ModelFlops | None
    ) -> tuple[dict[str, float], bool]:
        """One step's metrics from the ranks' results; and whether the update was applied (False: NaN/inf)."""
        label_tokens = work.label_tokens
        counted = [r.stats for r in results if r.stats.counted]
        update = results[0].update  # every rank took the same decision on the same reduced gradients
        input_tokens = sum(s.input_tokens for s in counted)
        metrics = {
            "train/loss": sum(s.loss for s in counted),
            "train/student_loss": sum(s.ce_sum for s in counted) / label_tokens,
            "train/grad_norm": update.grad_norm,
            "student/lr": update.lr,
            "train/tokens_per_second": input_tokens / elapsed,
            "time/teacher_forward": max(r.teacher_seconds for r in results),
            "time/logits_transfer": max(r.transfer_seconds for r in results),
            "time/student_step": max(r.student_seconds for r in results),
        }
        if samples_completions(self.config):
            metrics["time/sample"] = work.sample_seconds
        if flops is not None:
            metrics["train/mfu"] = flops.utilization(work.input_tokens, work.token_positions, elapsed)
        if self.config.distill_loss_weight > 0:  # a live teacher's targets or a teacher cache's
            metrics["train/distill_loss"] = sum(s.kd_sum for s in counted) / label_tokens
        applied = all(r.update.applied for r in results)
        return metrics, applied


def _rank_slices(workers: Workers, micro_batches: list[dict], accumulation: int) -> list[Any]:
    """Each student rank's slice of the global batch in the object store: its data-parallel rank d's micro-batches
    [d·accumulation, (d+1)·accumulation), put once per replica."""
    import ray

    layout = workers.layout
    slices = [ray.put(micro_batches[d * accumulation : (d + 1) * accumulation]) for d in range(layout.dp_size)]
    return [slices[layout.of_rank(rank).dp_rank] for rank in range(len(workers.students))]


def _step_work(micro_batches: list[dict], rank_slices: list[Any], teacher_outputs: list[Any], cursor: DataCursor,
               sample_seconds: float = 0.0) -> StepWork:
    """A step's ``StepWork``: the label and input tokens of its global batch, and the data position after it."""
    label_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
    input_tokens = [int(b["attention_mask"].sum()) for b in micro_batches]
    token_positions = sum(_token_positions(n, b) for n, b in zip(input_tokens, micro_batches))
    return StepWork(rank_slices, label_tokens, sum(input_tokens), token_positions, teacher_outputs,
                    DataCursor(**vars(cursor)), sample_seconds)


def _token_positions(input_tokens: int, batch: dict) -> int:
    """Σ tokens·seq of a micro-batch (attention FLOPs): each token times the length it attends over, the row's
    width; in packed rows its record's length L, and a record's L tokens give Σ_p (2p + 1) = L² over positions p."""
    if "position_ids" not in batch:
        return input_tokens * batch["input_ids"].shape[1]
    return int(((2 * batch["position_ids"] + 1) * batch["attention_mask"]).sum())


def _get(refs: list) -> list:
    """``ray.get`` of every rank's call, the first failure raised as soon as it happens (``get_all``); a
    user-facing error raised in an actor (e.g. refusing NaN weights at save) comes out as itself, not wrapped in a
    RayTaskError whose text is a remote traceback."""
    import ray

    try:
        return get_all(refs)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, checkpoint.CheckpointError):
            raise error.cause from None
        raise
