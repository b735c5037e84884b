"""The Ray actors of a distillation run, one teacher and one student per device, and where they are placed.

``create_workers`` makes one placement-group bundle per entry of ``device_mapping`` (one CPU bundle when it is
empty; CPU bundles too when the Ray cluster has no GPU, so the indices then name CPU ranks). Teacher rank i and
student rank i share bundle i, hence the device and host, so the teacher's targets reach the student by CUDA IPC
(same GPU) or shared memory (CPU ranks): ``channel.choose_transport`` decides from where the two actors really are.
A GPU rank works on the GPU Ray assigned it, made its current CUDA device (``local_cuda_index`` finds its index,
also when Ray leaves ``CUDA_VISIBLE_DEVICES`` alone), and may reserve only its side's share of that GPU
(``config.gpu_memory_fraction``; it empties its allocator's cache once its model is built). Each side's ranks form a torch.distributed group (gloo on
CPU, nccl on GPU, bound to the rank's device) through a TCPStore that rank 0 serves on a port it binds and keeps;
the strategy of each rank (``strategies.STRATEGIES[strategy_name]``) is built once the group is up.
``Workers.shutdown`` closes and kills the students before it closes the teachers, whose close frees the buffers
the students map.

``TeacherWorker.forward`` runs its strategy over one micro-batch of a step (the driver makes one call per
micro-batch) and publishes its targets as a ``LogitsHandle``; the driver passes those results (ObjectRefs)
straight to ``StudentWorker.train_step`` of the same rank, which opens them and runs ``forward_backward`` +
``optimizer_step`` of its strategy with the run's one loss (``distill_loss``). Both are plain classes (usable
without Ray).

With ``overlap_teacher`` the driver gives a teacher rank step k+1's micro-batches while its student rank trains
on step k (Ray runs an actor's calls in order: the teacher is at most one step ahead), and a student whose
strategy streams its micro-batches (``TrainStrategy.streams_micro_batches``: the torch strategies) takes each
micro-batch's targets only when it starts that micro-batch and frees its channel slot when it takes the next.
The channel is then a bounded queue of ``channel_slots`` = 2 micro-batches: the teacher computes micro-batch
k+1 while the student trains on k, and waits (in ``publish``) rather than run further ahead. A student that
takes a step's micro-batches all at once (Megatron's schedule; or without the overlap, when the two take turns)
holds a step's worth of slots, and its teacher gets another step's worth to work a step ahead in.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .channel import DeviceIdentity, LogitsHandle, LogitsReceiver, TransportKind, choose_transport, make_transport
from .config import (
    DistillConfig,
    gpu_memory_fraction,
    logits_transport,
    reads_teacher_cache,
    runs_live_teacher,
    worker_env,
)
from .data import IGNORE_INDEX, Example, collate, eval_batches
from .distill_loss import LossConfig, TeacherTargets, make_loss_fn
from .models import VocabInfo
from .node_network import bind_gloo_to
from .rank_failures import NoRoomError, no_room_message, waiting_for_room_message
from .sampling import SAMPLER_STUDENT, SAMPLER_TEACHER, SamplingParams, sampled_micro_batch
from .shared_names import ENV_NUM_THREADS, ENV_PLACEMENT_TIMEOUT
from .strategies import strategy_class
from .strategies.base import MicroBatch, OptimizerStepResult, RankContext, StepStats
from .teacher_cache.reader import CacheFeeder, CachedFeed, TeacherCache
from .teacher_cache.store import ShardInfo

log = logging.getLogger(__name__)


def streams_teacher_targets(config: DistillConfig) -> bool:
    """Whether the student takes each micro-batch's teacher targets as they arrive (see the module docstring)."""
    return config.overlap_teacher and strategy_class(config.student.strategy_args.strategy_name).streams_micro_batches


def channel_slots(config: DistillConfig) -> int:
    """Slots of a teacher rank's channel, one per micro-batch whose targets may be in flight at once: streaming,
    the one the student trains on + the one the teacher writes; otherwise the step the student holds + the
    next step, which the teacher computes meanwhile."""
    if streams_teacher_targets(config):
        return 2
    return 2 * config.student.training_args.gradient_accumulation_steps


# How long the run waits for the cluster to have room for every rank (a node restarting after a loss, an autoscaler
# adding one) before it gives up with what is missing; KUBEDISTILL_PLACEMENT_TIMEOUT_SECONDS overrides.
PLACEMENT_TIMEOUT_S = 300.0
# How long the placement may take before the driver logs that it is waiting (and for what).
QUIET_PLACEMENT_WAIT_S = 5.0


def placement_timeout_s() -> float:
    return float(os.environ.get(ENV_PLACEMENT_TIMEOUT, "") or PLACEMENT_TIMEOUT_S)


# How long a rank waits for the others: to join the group (rank 0's store, the group's first handshake) and then in
# each collective. Ranks build models of several GB in between; a too-short wait kills a healthy run.
GROUP_TIMEOUT = datetime.timedelta(minutes=10)


def _setup_process(seed: int, num_threads: int) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)


def local_cuda_index(gpu_ids: Sequence[int | str], visible_devices: str | None) -> int:
    """The CUDA index, in this process, of the one GPU Ray assigned to it.

    ``gpu_ids``: ``ray.get_gpu_ids()``, the GPU's id as the node's ``CUDA_VISIBLE_DEVICES`` names it (its physical
    index when the node sets none). ``visible_devices``: this process's ``CUDA_VISIBLE_DEVICES`` (None: unset).
    Ray usually narrows that to the actor's GPU, which is then index 0; but with
    ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1``, or an actor that sees several GPUs, assuming index 0 puts
    every rank on GPU 0 (NCCL: "Duplicate GPU detected"). CUDA numbers the visible GPUs in the order listed.
    """
    ids = [str(gpu_id).strip() for gpu_id in gpu_ids]
    found = f"Ray GPU ids {ids}, CUDA_VISIBLE_DEVICES={visible_devices!r}"
    if len(ids) != 1:  # none: the actor asked for no GPU; several: which one would this rank's be?
        raise RuntimeError(f"a rank needs exactly one GPU of its own; this actor has {found}")
    (gpu,) = ids
    not_visible = RuntimeError(f"GPU {gpu}, assigned by Ray, is not visible to this process ({found})")
    if visible_devices is None:  # unset: CUDA sees every GPU of the node, numbered as Ray numbers them
        if not gpu.isdigit():
            raise not_visible
        return int(gpu)
    visible = [device.strip() for device in visible_devices.split(",")]
    if gpu not in visible:
        raise not_visible
    return visible.index(gpu)


def _assigned_cuda_device() -> torch.device:
    """The GPU Ray assigned to this actor, made the current CUDA device (where allocations without an explicit
    index, CUDA IPC buffers among them, land)."""
    import ray

    gpu_ids, visible_devices = ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")
    index = local_cuda_index(gpu_ids, visible_devices)
    if index >= torch.cuda.device_count():  # e.g. the node has more GPUs than this container sees
        raise RuntimeError(f"Ray GPU ids {gpu_ids} make CUDA device {index}, but this process sees only "
                           f"{torch.cuda.device_count()} GPU(s) (CUDA_VISIBLE_DEVICES={visible_devices!r})")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _rank_device(on_gpu: bool) -> torch.device:
    """The device of a rank; on CPU without asking Ray anything, so that the plain classes work without Ray."""
    if on_gpu and torch.cuda.is_available():
        return _assigned_cuda_device()
    return torch.device("cpu")


def _micro_batch(batch: dict[str, torch.Tensor], teacher: TeacherTargets | None = None) -> MicroBatch:
    # position_ids: packed rows (use_sequence_packing); teacher and student get the same batch dict. Sampled
    # completions (sampling.sampled_micro_batch) say who sampled them and carry the sampler's log-probs, kept at
    # the label positions in the order of the teacher's targets.
    behaviour = batch.get("behaviour_logprobs")
    if behaviour is not None:
        behaviour = behaviour[batch["labels"] != IGNORE_INDEX]
    return MicroBatch(batch["input_ids"], batch["attention_mask"], batch["labels"], teacher, batch.get("position_ids"),
                      int(batch["sampler"]) if "sampler" in batch else 0, behaviour)


class _Rank:
    """One rank of a side: its process setup, its place in the side's torch.distributed group, its strategy."""

    def __init__(self, config: DistillConfig, side: str, rank: int, world_size: int, on_gpu: bool, num_threads: int):
        self.config = config
        self.side = side
        self.rank = rank
        self.world_size = world_size
        self.on_gpu = on_gpu
        _setup_process(config.seed, num_threads)
        self.device = _rank_device(on_gpu)
        if self.device.type == "cuda":
            # Teacher and student share the GPU, and each caching allocator keeps the blocks it freed: cap each.
            torch.cuda.set_per_process_memory_fraction(gpu_memory_fraction(config, side), self.device)
        self.group = None
        self._store = None  # the group's TCPStore (rank 0: the server), from rendezvous / init_group to close

    def device_identity(self) -> DeviceIdentity:
        """This rank's host and GPU, from which the channel's transport is chosen."""
        return DeviceIdentity.of(self.device)

    def place(self) -> "RankPlace":
        """Where this rank runs: its Ray node and its device."""
        import ray

        return RankPlace(self.device_identity(), ray.get_runtime_context().get_node_id(),
                         ray.util.get_node_ip_address(), socket.gethostname())

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: the address of this host and the port of the side's group store, which this rank now serves.

        The store binds a free port and keeps it: a port found free and then closed could be taken by another
        process before the group binds it.
        """
        import ray
        import torch.distributed as dist

        address = ray.util.get_node_ip_address()
        # wait_for_workers=False: the other ranks connect only in init_group, after this call has returned.
        self._store = dist.TCPStore(address, 0, self.world_size, is_master=True, timeout=GROUP_TIMEOUT,
                                    wait_for_workers=False)
        return address, self._store.port

    def init_group(self, address: str, port: int) -> None:
        """Join the side's process group through rank 0's store (every rank of the side calls this at the same
        time; rank 0 after its ``rendezvous``)."""
        import ray
        import torch.distributed as dist

        # Gloo groups (the CPU ranks', and Megatron's helper groups) on the interface other nodes reach us at.
        bind_gloo_to(ray.util.get_node_ip_address())
        if self.rank != 0:
            self._store = dist.TCPStore(address, port, self.world_size, is_master=False, timeout=GROUP_TIMEOUT)
        elif self._store is None:
            raise RuntimeError("rank 0 serves the group's store: call rendezvous before init_group")
        nccl = self.device.type == "cuda"
        # device_id binds the NCCL communicator to this rank's GPU, rather than to whichever device is current.
        bound = {"device_id": self.device} if nccl else {}
        dist.init_process_group("nccl" if nccl else "gloo", store=self._store, rank=self.rank,
                                world_size=self.world_size, timeout=GROUP_TIMEOUT, **bound)
        self.group = dist.group.WORLD

    def _release_cached_memory(self) -> None:
        """Give the blocks this rank's allocator cached while it built its model (weight loading, conversion)
        back to the GPU the other side shares. Only then: in steady state the cap bounds the cache, and emptying
        it on every micro-batch would stall this rank each time (freeing device memory synchronizes)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def sample(self, prompts: Sequence[Sequence[int]], record_ids: Sequence[int], seed: int,
               params: SamplingParams) -> list[dict[str, torch.Tensor]]:
        """[the micro-batch of ``prompts`` and their completions sampled by this rank's model, as it is now]
        (``sampling.sampled_micro_batch``; a list of one, as ``TeacherWorker.forward`` takes batches). Every rank of
        a replica is called with the same arguments and returns the same batch. ``sample_seconds`` says how long
        sampling took."""
        start = time.perf_counter()
        completions = self.strategy.sample([list(p) for p in prompts], params, self.vocab.eos_token_id,
                                           self.vocab.pad_token_id, seed)
        sampler = SAMPLER_STUDENT if self.side == "student" else SAMPLER_TEACHER
        batch = sampled_micro_batch(prompts, completions, self.vocab.pad_token_id, sampler, record_ids)
        batch["sample_seconds"] = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
        return [batch]

    def rank_context(self) -> RankContext:
        args = getattr(self.config, self.side).strategy_args
        return RankContext(self.rank, self.world_size, args.tp_size, args.pp_size, self.device, self.group)

    def close(self) -> None:
        import torch.distributed as dist

        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group()
            self.group = None
        self._store = None  # rank 0: the last reference, once the group is gone; the store's server stops with it


@dataclass(frozen=True)
class RankPlace:
    """Where one rank's actor runs: its Ray node (id, address, host name) and its device."""

    device: DeviceIdentity
    node_id: str
    node_ip: str
    hostname: str

    def __str__(self) -> str:
        gpu = f", GPU {self.device.gpu}" if self.device.gpu else ""
        return f"{self.hostname} ({self.node_ip}{gpu})"


@dataclass(frozen=True)
class RankInfo:
    """A rank of a run, as messages name it: its side, its rank and where it runs."""

    side: str
    rank: int
    place: RankPlace

    def __str__(self) -> str:
        return f"{self.side} rank {self.rank}"


@dataclass(frozen=True)
class TeacherOutput:
    """Targets of one teacher rank for one or more micro-batches: a handle to their concatenated rows (None on
    ranks that have no logits), how many rows each micro-batch has, and how long it took."""

    handle: LogitsHandle | None
    rows: tuple[int, ...]
    forward_seconds: float
    publish_seconds: float


class TeacherWorker(_Rank):
    """Teacher rank: its strategy's forward over a step's micro-batches, published on the channel."""

    def __init__(
        self,
        config: DistillConfig,
        vocab: VocabInfo,
        transport: TransportKind,
        num_threads: int = 0,
        rank: int = 0,
        world_size: int = 1,
        on_gpu: bool = False,
    ):
        super().__init__(config, "teacher", rank, world_size, on_gpu, num_threads)
        self.vocab = vocab
        self.publisher = make_transport(transport, channel_slots(config))
        self.evaluation_publisher = make_transport("object_store")
        self.strategy = None

    def use_transport(self, kind: TransportKind) -> None:
        """Publish through ``kind`` from now on (set once the student rank's place is known)."""
        if kind != self.publisher.kind:
            self.publisher.close()
            self.publisher = make_transport(kind, channel_slots(self.config))

    def build(self) -> None:
        self.strategy = strategy_class(self.config.teacher.strategy_args.strategy_name)(
            self.config, self.rank_context(), self.vocab
        )
        self._release_cached_memory()

    def forward(self, batches: Sequence[dict[str, torch.Tensor]], index: int | None = None,
                object_store: bool = False) -> TeacherOutput:
        """The targets of ``batches`` (or only of ``batches[index]``), published on this rank's channel; waits
        for a free slot when the student still holds every one. ``object_store``: through the Ray object store
        instead, which has no slots: evaluation's targets, asked for while the next step's targets may hold every
        slot of the ring (``overlap_teacher``) and the student would only free them in that step."""
        start = time.perf_counter()
        if index is not None:
            batches = [batches[index]]
        parts = [self.strategy.forward(_micro_batch(batch)) for batch in batches]
        forward_done = time.perf_counter()
        if any(part is None for part in parts):  # a rank without logits (not the last pipeline stage)
            return TeacherOutput(None, (), forward_done - start, 0.0)
        targets = TeacherTargets.cat(parts)
        publisher = self.evaluation_publisher if object_store else self.publisher
        handle = publisher.publish(targets.tensors())  # values (+ indices, tail) by name
        return TeacherOutput(handle, tuple(p.rows for p in parts), forward_done - start,
                             time.perf_counter() - forward_done)

    def write_cache_shard(self, shard: int, records: Sequence[int], examples: Sequence[Example], directory: str,
                          codec_description: dict, batch_size: int) -> ShardInfo | None:
        """Run the teacher over one shard's records and, on the rank that holds its replica's whole targets
        (TP rank 0 of the last pipeline stage), write the shard (``teacher_cache.writer.write_records``). Every
        rank of the replica calls it with the same records; the others return None."""
        from .teacher_cache.encoding import RowCodec
        from .teacher_cache.writer import write_records

        context = self.rank_context()
        writes = context.is_last_stage and context.tp_rank == 0

        def targets(batch: dict[str, torch.Tensor]) -> TeacherTargets | None:
            part = self.strategy.forward(_micro_batch(batch))
            return None if part is None else self.strategy.whole_targets(part)

        return write_records(Path(directory), shard, records, examples, targets, RowCodec.from_description(
            codec_description), batch_size, self.vocab.pad_token_id, writes=writes)

    def close(self) -> None:
        self.publisher.close()
        super().close()


@dataclass(frozen=True)
class StudentStepResult:
    """What one student rank reports for one optimizer step."""

    stats: StepStats
    update: OptimizerStepResult
    teacher_seconds: float  # the paired teacher rank's forward
    transfer_seconds: float  # publish (teacher) + open (student)
    student_seconds: float  # forward, backward, optimizer step


@dataclass(frozen=True)
class EvalSums:
    """One student rank's evaluation sums (zeros with counted=False where they would be counted twice)."""

    ce_sum: float = 0.0
    label_tokens: int = 0
    correct: int = 0
    examples: int = 0
    counted: bool = True


class _TeacherFeed:
    """The teacher's targets of one step's micro-batches, as the student takes them: each fetched (its ObjectRef
    resolved, its handle opened) on first use and released once; with the seconds spent on each part."""

    def __init__(self, receiver: LogitsReceiver, outputs: Sequence | None, count: int, device: torch.device):
        """``outputs``: one per micro-batch (a ``TeacherOutput`` or the ObjectRef of one), or None (no teacher)."""
        self.receiver, self.device = receiver, device
        self.outputs = [None] * count if outputs is None else outputs
        if len(self.outputs) != count:
            raise ValueError(f"{len(self.outputs)} teacher outputs for {count} micro-batches")
        self._targets: dict[int, TeacherTargets | None] = {}
        self._held: dict[int, LogitsHandle] = {}  # opened and not yet released, by micro-batch
        self.forward_seconds = self.publish_seconds = self.open_seconds = self.wait_seconds = 0.0

    def targets(self, index: int) -> TeacherTargets | None:
        if index in self._targets:
            return self._targets[index]
        output = self.outputs[index]
        if output is not None and not isinstance(output, TeacherOutput):  # an ObjectRef: wait for the teacher
            import ray

            start = time.perf_counter()
            output = ray.get(output)
            self.wait_seconds += time.perf_counter() - start
        targets = None
        if output is not None and output.handle is not None:  # None: a rank without logits (not the last stage)
            self.forward_seconds += output.forward_seconds
            self.publish_seconds += output.publish_seconds
            start = time.perf_counter()
            self._held[index] = output.handle
            (targets,) = TeacherTargets.from_tensors(self.receiver.open(output.handle)).to(self.device).split(
                list(output.rows))
            self.open_seconds += time.perf_counter() - start
        self._targets[index] = targets
        return targets

    def release(self, index: int) -> None:
        handle = self._held.pop(index, None)
        if handle is not None:
            self.receiver.release(handle)

    def release_all(self) -> None:
        for key in list(self._held):
            self.release(key)


class _StreamedMicroBatches(Sequence[MicroBatch]):
    """A step's micro-batches for a strategy that streams them (``TrainStrategy.streams_micro_batches``): each
    waits for its teacher targets only when taken, and taking the next frees the previous one's channel slot."""

    def __init__(self, batches: Sequence[dict[str, torch.Tensor]], feed: _TeacherFeed):
        self.batches, self.feed = batches, feed

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index):
        if not isinstance(index, int):
            raise TypeError("streamed micro-batches are taken one at a time, in order")
        return _micro_batch(self.batches[index], self.feed.targets(index))

    def __iter__(self):
        for index in range(len(self.batches)):
            if index:
                self.feed.release(index - 1)  # its forward, loss and backward are done
            yield self[index]


class StudentWorker(_Rank):
    """Student rank: its strategy's training step on ``distill_loss``, evaluation, and its part of checkpoints."""

    def __init__(
        self,
        config: DistillConfig,
        vocab: VocabInfo,
        eval_examples: Sequence[Example] = (),
        num_threads: int = 0,
        rank: int = 0,
        world_size: int = 1,
        on_gpu: bool = False,
    ):
        from transformers import AutoTokenizer

        super().__init__(config, "student", rank, world_size, on_gpu, num_threads)
        self.vocab = vocab
        self.eval_examples = list(eval_examples)
        self.tokenizer = AutoTokenizer.from_pretrained(config.student_pretrain)
        self.loss_config = LossConfig.from_config(config)
        self.receiver = LogitsReceiver()
        self.cache_feeder: CacheFeeder | None = None  # reading a teacher cache instead of a live teacher
        self.strategy = None

    def build(self, resume_from: str | None = None) -> None:
        """Build the strategy from student_pretrain; resuming, restore its state from the checkpoint."""
        self.strategy = strategy_class(self.config.student.strategy_args.strategy_name)(
            self.config, self.rank_context(), self.vocab
        )
        if resume_from:
            self.strategy.load(resume_from)
        if reads_teacher_cache(self.config):
            # Only the ranks that compute the loss (the last pipeline stage) read targets, as only those get
            # them from a live teacher.
            needed = self.rank_context().is_last_stage
            self.cache_feeder = CacheFeeder(TeacherCache(self.config.teacher_cache_dir),
                                            self.strategy.local_targets if needed else None)
        self._release_cached_memory()

    def _feed(self, batches, teacher: Sequence | None, read_ahead: Sequence | None):
        """Where this step's targets come from: the teacher cache, or the live teacher rank's outputs (None: SFT
        only). Both feeds give each micro-batch's targets on first use and free them once released."""
        if self.cache_feeder is None:
            return _TeacherFeed(self.receiver, teacher, len(batches), self.device)
        feed = CachedFeed(self.cache_feeder.start(batches), self.device)
        if read_ahead:  # the next step's slice: decode its targets while this step trains
            self.cache_feeder.read_ahead(read_ahead[0])
        return feed

    def train_step(
        self, batches: Sequence[dict[str, torch.Tensor]], teacher: Sequence | None, normalizer: float,
        read_ahead: Sequence | None = None,
    ) -> StudentStepResult:
        """One optimizer step on this rank's micro-batches; ``normalizer`` = label tokens of the global batch.

        ``teacher``: None (SFT only, or a teacher cache), or one output per micro-batch, each a ``TeacherOutput``
        or the ObjectRef of one (what ``TeacherWorker.forward`` returns), taken when its micro-batch starts.
        ``read_ahead``: with a teacher cache, [the ObjectRef of the next step's slice], whose targets are decoded
        while this step trains.
        """
        start = time.perf_counter()
        feed = self._feed(batches, teacher, read_ahead)
        try:
            if (teacher is not None or self.cache_feeder) and streams_teacher_targets(self.config):
                micro_batches: Sequence[MicroBatch] = _StreamedMicroBatches(batches, feed)
            else:
                micro_batches = [_micro_batch(batch, feed.targets(i)) for i, batch in enumerate(batches)]
            stats = self.strategy.forward_backward(micro_batches, make_loss_fn(self.loss_config, normalizer))
        finally:
            feed.release_all()  # done reading: the teacher may rewrite those slots
        update = self.strategy.optimizer_step()
        if not self.rank_context().counted:
            stats = StepStats(counted=False)
        return StudentStepResult(
            stats,
            update,
            feed.forward_seconds,
            feed.publish_seconds + feed.open_seconds,
            time.perf_counter() - start - feed.open_seconds - feed.wait_seconds,
        )

    def evaluate(self) -> EvalSums:
        """Held-out cross-entropy sums of this data-parallel rank's share of the eval set, and exact matches."""
        context = self.rank_context()
        examples = self.eval_examples[context.dp_rank :: context.dp_size]
        batch_size = self.config.student.training_args.per_device_eval_batch_size
        loss_fn = make_loss_fn(LossConfig(distill_loss_weight=0.0), normalizer=1.0)
        ce_sum, tokens = 0.0, 0
        for chunk in eval_batches(examples, batch_size):
            stats = self.strategy.eval_forward([_micro_batch(collate(chunk, self.vocab.pad_token_id))], loss_fn)
            ce_sum += stats.ce_sum
            tokens += stats.label_tokens
        correct = self._exact_matches(examples) if self.config.eval_exact_match else 0
        if not context.counted:
            return EvalSums(counted=False)
        return EvalSums(ce_sum, tokens, correct, len(examples))

    def sample_eval(self, params: SamplingParams) -> list[dict[str, torch.Tensor]]:
        """Greedy completions of this data-parallel rank's share of the held-out prompts, one micro-batch per
        ``per_device_eval_batch_size`` of them (for ``onpolicy_rkl``)."""
        context = self.rank_context()
        examples = self.eval_examples[context.dp_rank :: context.dp_size]
        batches = []
        for chunk in eval_batches(examples, self.config.student.training_args.per_device_eval_batch_size):
            prompts = [e.input_ids[: e.prompt_length] for e in chunk]
            batches += self.sample(prompts, [-1] * len(prompts), 0, params.greedy())
        return batches

    def onpolicy_rkl(self, batches: Sequence[dict[str, torch.Tensor]], teacher: Sequence) -> EvalSums:
        """Σ per-token reverse KL(student ‖ teacher) over ``batches`` (``sample_eval``'s) with the teacher's targets
        for each (``teacher``, as ``train_step`` takes them), and the token count; in ``EvalSums.ce_sum``."""
        feed = _TeacherFeed(self.receiver, teacher, len(batches), self.device)
        config = dataclasses.replace(self.loss_config, kd_objective="reverse_kl", on_policy_loss="kd")
        loss_fn = make_loss_fn(config, normalizer=1.0)
        rkl_sum, tokens = 0.0, 0
        try:
            for index, batch in enumerate(batches):
                stats = self.strategy.eval_forward([_micro_batch(batch, feed.targets(index))], loss_fn)
                feed.release(index)
                rkl_sum += stats.kd_sum
                tokens += stats.label_tokens
        finally:
            feed.release_all()
        if not self.rank_context().counted:
            return EvalSums(counted=False)
        return EvalSums(rkl_sum, tokens)

    def _exact_matches(self, examples: list[Example]) -> int:
        batch_size = self.config.student.training_args.per_device_eval_batch_size
        correct = 0
        for chunk in eval_batches(examples, batch_size):
            outputs = self.strategy.generate(
                [e.input_ids[: e.prompt_length] for e in chunk],
                self.config.eval_max_new_tokens,
                self.vocab.eos_token_id,
                self.vocab.pad_token_id,
            )
            for example, output in zip(chunk, outputs):
                text = self.tokenizer.decode(output, skip_special_tokens=True)
                correct += text.strip() == example.answer.strip()
        return correct

    def save(self, directory: str) -> None:
        """This rank's part of the checkpoint being assembled in ``directory`` (rank 0 adds the tokenizer)."""
        self.strategy.save(directory)
        if self.rank == 0:
            self.tokenizer.save_pretrained(Path(directory) / checkpoint.STUDENT_DIR)

    def close(self) -> None:
        self.receiver.close()
        if self.cache_feeder is not None:
            self.cache_feeder.close()
        super().close()


@dataclass
class Workers:
    """Actor handles of one run, by rank. ``teachers`` is empty when distill_loss_weight is 0 (plain SFT)."""

    students: list
    teachers: list
    placement_group: object
    layout: RankContext = field(default_factory=RankContext)  # world size and parallel sizes (rank 0's view)
    ranks: dict[str, RankInfo] = field(default_factory=dict)  # by actor id (hex)

    def shutdown(self, rank_lost: bool = False) -> None:
        """Close and kill the students, then the teachers; then free the bundles.

        Students go first: a teacher's close frees the CUDA IPC buffers its student maps (torch warns that the
        producer terminated, or a student still mid-step after a timeout reads freed memory). A student is killed
        even when its close failed or timed out, so that none holds a mapping when the teachers close.
        After a lost rank (``rank_lost``) the surviving students wait in a collective for it, and a close queued
        behind that call could only time out: they are killed at once, and the teachers get a short close (it
        unlinks their shared-memory segments).
        """
        import ray

        for actors, timeout_s in ((self.students, 0 if rank_lost else 30), (self.teachers, 5 if rank_lost else 30)):
            if timeout_s:
                _close_all(actors, timeout_s=timeout_s)
            for actor in actors:
                ray.kill(actor)
        ray.util.remove_placement_group(self.placement_group)


def _close_all(actors: list, timeout_s: float) -> None:
    """Ask every actor to close at once, then wait up to ``timeout_s`` in all; failures are ignored (an actor may
    already be dead, and we are tearing down anyway: ray.kill follows)."""
    import ray

    deadline = time.monotonic() + timeout_s
    closing = []
    for actor in actors:
        try:
            closing.append(actor.close.remote())
        except Exception:
            pass
    for done in closing:
        try:
            ray.get(done, timeout=max(0.0, deadline - time.monotonic()))
        except Exception:
            pass


def device_bundles(config: DistillConfig, sides: Sequence[str] = ("student", "teacher")) -> dict[str, list[int]]:
    """Each running side's ranks -> the index of their device's placement-group bundle: one bundle per device
    named by the device_mapping of a side in ``sides``, in the order of the device indices (one bundle when the
    lists are empty). A side that does not run (the teacher of a run reading a teacher cache, the student of
    `kubedistill cache-teacher`) reserves no devices."""
    mappings = {side: getattr(config, side).device_mapping for side in sides}
    if not config.student.device_mapping:
        return {side: [0] for side in sides}
    index = {device: i for i, device in enumerate(sorted(set().union(*mappings.values())))}
    return {side: [index[d] for d in mapping] for side, mapping in mappings.items()}


def _actors_by_rank(students: list, teachers: list) -> list[tuple[str, int, object]]:
    return [("student", r, a) for r, a in enumerate(students)] + [("teacher", r, a) for r, a in enumerate(teachers)]


def log_pairing(rank: int, teacher: RankPlace, student: RankPlace, kind: TransportKind, requested: str) -> None:
    """Say where each pair runs and how the teacher's targets reach the student; warn when they cross hosts."""
    if kind == "object_store" and requested != "object_store":
        log.warning("rank %d: teacher on %s, student on %s: different hosts, so the teacher's targets go through "
                    "the Ray object store (over the network) rather than shared memory or CUDA IPC. Give "
                    "teacher.device_mapping the student's devices to keep each pair on one device.",
                    rank, teacher, student)
    else:
        log.info("rank %d: teacher on %s, student on %s: targets by %s", rank, teacher, student, kind)


def _form_group(actors: list) -> None:
    """Rank 0 starts the group's store and names its address; every rank joins at once."""
    import ray

    if len(actors) > 1:
        address, port = ray.get(actors[0].rendezvous.remote())
        ray.get([actor.init_group.remote(address, port) for actor in actors])


def create_workers(
    config: DistillConfig,
    vocab: VocabInfo,
    eval_examples: Sequence[Example],
    resume_from: str | None,
    num_threads: int,
    *,
    teachers_only: bool = False,
) -> Workers:
    """One bundle per device of ``device_mapping``; teacher rank i and student rank i in the bundles of their
    devices (the same bundle, so the same device and host, when the two sides' lists are the same). Teacher
    ranks only when the run has a live teacher (``config.runs_live_teacher``); ``teachers_only``: no students
    (``kubedistill cache-teacher``)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    mapping = config.student.device_mapping
    world_size = max(1, len(mapping))
    sides = ["teacher"] if teachers_only else ["student"] + (["teacher"] if runs_live_teacher(config) else [])
    bundle_of = device_bundles(config, sides)
    on_gpu = bool(mapping) and ray.cluster_resources().get("GPU", 0) >= 1
    if mapping and not on_gpu:
        log.warning("device_mapping %s: the Ray cluster has no GPU; running %d CPU rank(s) per side", mapping, world_size)
    bundle = {"CPU": 1, "GPU": 1} if on_gpu else {"CPU": 1}
    bundles = max(1, len(set().union(*bundle_of.values())))
    group = placement_group([dict(bundle) for _ in range(bundles)], strategy="PACK")
    waited_s = placement_timeout_s()
    try:
        try:
            ray.get(group.ready(), timeout=min(QUIET_PLACEMENT_WAIT_S, waited_s))
        except ray.exceptions.GetTimeoutError:
            # Not there at once: a host is missing or busy (e.g. a retry while a lost host comes back). Say so, or
            # the run looks hung while it waits.
            log.info("waiting up to %g s for room for the run's ranks: %s", waited_s,
                     waiting_for_room_message(bundles, bundle, ray.available_resources(),
                                              sum(n["Alive"] for n in ray.nodes())))
            ray.get(group.ready(), timeout=max(0.0, waited_s - QUIET_PLACEMENT_WAIT_S))
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(group)
        raise NoRoomError(no_room_message(bundles, bundle, waited_s, ray.cluster_resources(),
                                          ray.available_resources(), sum(n["Alive"] for n in ray.nodes()))) from None

    def options(rank: int, role: str) -> dict:
        # Half of the device's bundle each: a teacher and a student rank may share the device.
        chosen = dict(
            num_cpus=0.5,
            num_gpus=0.5 if on_gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=bundle_of[role][rank]),
        )
        env = worker_env(config, role)  # system_envs
        if env:
            chosen["runtime_env"] = {"env_vars": env}
        return chosen

    side = dict(world_size=world_size, on_gpu=on_gpu)
    students = [] if teachers_only else [
        ray.remote(StudentWorker)
        .options(**options(r, "student"))
        .remote(config, vocab, eval_examples, num_threads, rank=r, **side)
        for r in range(world_size)
    ]
    teachers = []
    if runs_live_teacher(config) or teachers_only:
        teachers = [
            ray.remote(TeacherWorker).options(**options(r, "teacher")).remote(
                config, vocab, "object_store", num_threads, rank=r, **side
            )
            for r in range(world_size)
        ]
    args = (config.teacher if teachers_only else config.student).strategy_args
    workers = Workers(students, teachers, group, RankContext(0, world_size, args.tp_size, args.pp_size))
    try:
        places = ray.get([actor.place.remote() for actor in [*students, *teachers]])
        workers.ranks.update({actor._actor_id.hex(): RankInfo(side, r, place)
                              for (side, r, actor), place in zip(_actors_by_rank(students, teachers), places)})
        if teachers and students:
            # Same GPU -> CUDA IPC, same host -> shared memory, else the object store (logits_transfer_backend: ray
            # asks for the object store always). Within one bundle it is the same device; a teacher placed apart
            # (its own device_mapping) may be on another GPU or host, and this stays correct.
            requested = logits_transport(config)
            student_places, teacher_places = places[:world_size], places[world_size:]
            kinds = [choose_transport(teacher_places[r].device, student_places[r].device, requested)
                     for r in range(world_size)]
            ray.get([teacher.use_transport.remote(kind) for teacher, kind in zip(teachers, kinds)])
            for r, kind in enumerate(kinds):
                log_pairing(r, teacher_places[r], student_places[r], kind, requested)
        for actors in (students, teachers):
            _form_group(actors)
        # Surfaces construction errors (bad checkpoint, OOM) here.
        ray.get([s.build.remote(resume_from) for s in students] + [t.build.remote() for t in teachers])
    except BaseException:
        workers.shutdown()
        raise
    return workers


def default_num_threads(actors_per_device: int = 2) -> int:
    """Torch threads per actor: the cores divided among the actors sharing a device, teacher and student (half
    each), or the student alone in an SFT-only run (all of them); ``KUBEDISTILL_NUM_THREADS`` overrides.

    With ``overlap_teacher`` teacher and student compute at the same time, each on its share; without it they
    take turns, and giving each every core is still a trap on CPU: OpenMP threads of the idle actor spin-wait,
    and an oversubscribed parallel region waits for descheduled threads. Measured on 2 loaded cores, a
    1M-parameter training step took 4.4 s with 2 threads and 0.13 s with 1.
    """
    return int(os.environ.get(ENV_NUM_THREADS, "0")) or max(1, (os.cpu_count() or 2) // max(1, actors_per_device))
