"""The strategy seam: how a model runs on the ranks of one side (teacher or student).

A strategy owns a model, its parallel layout, (for training) its optimizer and schedule, and saving and
loading its own state. It knows nothing about Ray, the channel or the driver; the workers (workers.py)
give it micro-batches and a loss function and add up what it returns. Two families implement it:
``torch_*`` (HF transformers, data parallel only) and ``megatron_*`` (Megatron-Core, DP×TP×PP).

Ranks. A side has ``world_size`` ranks, one per entry of ``device_mapping`` (one CPU rank when it is
empty; on a machine without GPUs each entry names a CPU rank). Teacher rank r and student rank r share
placement-group bundle r (the same device), and rank r of the student reads the targets of rank r of the
teacher. Ranks are ordered like Megatron's default ``tp-cp-ep-dp-pp``, TP fastest:

    rank = tp_rank + tp_size · (dp_rank + dp_size · pp_rank),    dp_size = world_size / (tp_size · pp_size)

so ranks with the same ``dp_rank`` form one model replica, and both sides have the same layout.

One training step, as the worker runs it on every student rank:

    stats = strategy.forward_backward(micro_batches, loss_fn)     # this DP rank's slice of the global batch
    update = strategy.optimizer_step()                            # reduce gradients, clip, step (or not)

``micro_batches`` are the ``gradient_accumulation_steps`` micro-batches of this rank's data-parallel index
(every TP/PP rank of that replica gets the same ones), each with the teacher's targets for its label
positions (``MicroBatch.teacher``, opened from the teacher rank with the same rank number; on ranks that
have no logits, e.g. a first PP stage, it may be None). ``loss_fn(logits, micro_batch, shard=None)`` is
``distill_loss.make_loss_fn(...)``: the one ``(1 − w)·CE + w·KD`` of the run, already divided by the label
tokens of the *global* batch, so the strategy just runs backward on what it returns, once per micro-batch,
and sums the gradients (no averaging over micro-batches or DP ranks: the normalizer did that). Under TP it
is called with this rank's vocabulary slice of the logits and ``shard=VocabShard(group, start, size)``;
under PP only the last stage calls it (from inside Megatron's schedule, which then runs the backward).

Teacher side: ``forward(micro_batch) -> TeacherTargets | None``: the teacher's raw logits at the label
positions (rows in row-major order of ``labels != IGNORE_INDEX``), with columns beyond the tokenizer's
vocabulary cut off or set to −inf; ``logits_topk`` > 0 keeps the top-k with global indices (under TP: the
top-k of this rank's shard, global indices; the loss picks the global top-k of all shards' candidates).
Only the last PP stage returns targets; other stages return None and publish nothing.

Statistics: ``forward_backward``/``eval_forward`` return this rank's sums (``StepStats``). Ranks whose
numbers would be counted twice (TP ranks other than 0, PP stages other than the last) return zeros with
``counted=False``, so the driver can add up every rank's stats.

Checkpoints: ``save(directory)`` writes this rank's part of a checkpoint being assembled (checkpoint.py
owns the directory, its atomic commit, the trainer state and the run identity): the weights as one HF
model directory under ``directory/student/`` (merged across TP/PP by whichever ranks hold them), and the
optimizer, scheduler and RNG state of this rank. A strategy must refuse (``checkpoint.CheckpointError``,
via ``checkpoint.refuse_nonfinite_parameters``) to save weights that hold NaN/inf, before writing anything.
``load(directory)`` restores all of it, RNG last, so resuming reproduces the uninterrupted run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Optional, Sequence

import torch

from ..distill_loss import LossTerms, TeacherTargets, VocabShard

if TYPE_CHECKING:
    import torch.distributed as dist

    from ..sampling import Completion, SamplingParams

    from ..config import DistillConfig
    from ..models import VocabInfo

__all__ = [
    "InferStrategy",
    "LossFn",
    "LossTerms",
    "MicroBatch",
    "OptimizerStepResult",
    "RankContext",
    "StepStats",
    "TeacherTargets",
    "TrainStrategy",
    "VocabShard",
]


@dataclass(frozen=True)
class RankContext:
    """Where a strategy runs: its rank among its side's ranks, the layout, the device and the side's group.

    ``group`` is the default torch.distributed group of this side's processes (gloo on CPU, nccl on GPU),
    None when ``world_size`` is 1. A strategy builds its TP/DP/PP sub-groups from it.
    """

    rank: int = 0
    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    device: torch.device = torch.device("cpu")
    group: Optional["dist.ProcessGroup"] = None

    def __post_init__(self):
        if self.world_size % (self.tp_size * self.pp_size):
            raise ValueError(f"world_size {self.world_size} is not a multiple of tp_size*pp_size")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside [0, {self.world_size})")

    def of_rank(self, rank: int) -> "RankContext":
        """The same layout seen from another rank (no device or group: for placing work, e.g. on the driver)."""
        return RankContext(rank, self.world_size, self.tp_size, self.pp_size)

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp_size * self.pp_size)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size % self.dp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp_size * self.dp_size)

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def counted(self) -> bool:
        """Whether this rank's loss sums count (TP rank 0 of the last PP stage; one per DP replica)."""
        return self.tp_rank == 0 and self.is_last_stage


@dataclass
class MicroBatch:
    """One micro-batch of this rank's data-parallel slice: [B, T] tensors, and the teacher's targets at its
    label positions (None in SFT-only runs and on ranks that do not compute the loss).

    ``position_ids`` is set for packed rows (``use_sequence_packing``, ``data.collate_packed``): several records
    per row, positions restarting at 0 at each record, and attention must stay within a record; the
    ``attention_mask`` then only marks the real tokens (for counting). None: one record per row, right-padded."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    teacher: Optional[TeacherTargets] = None
    position_ids: Optional[torch.Tensor] = None
    # Sampled completions (on-policy distillation, seq_kd): who sampled them (``sampling.SAMPLER_STUDENT`` /
    # ``SAMPLER_TEACHER``; 0: the dataset's answers), and the log-prob of each label token under the distribution
    # it was drawn from, [N_label] in row-major order of ``labels != IGNORE_INDEX`` (as the teacher's targets).
    sampler: int = 0
    behaviour_logprobs: Optional[torch.Tensor] = None


# loss_fn(logits, micro_batch, shard=None) -> LossTerms; see distill_loss.make_loss_fn.
LossFn = Callable[..., LossTerms]


@dataclass(frozen=True)
class StepStats:
    """Sums over this rank's micro-batches (zeros with ``counted=False`` on ranks that would double count)."""

    loss: float = 0.0  # Σ of loss_fn's ``loss`` over the micro-batches: this rank's share of the step's loss
    ce_sum: float = 0.0  # Σ cross-entropy over label tokens
    kd_sum: float = 0.0  # Σ per-token KD divergence (0 with distill_loss_weight 0)
    label_tokens: int = 0
    input_tokens: int = 0  # non-padding tokens fed to the model
    loss_finite: bool = True  # False: some micro-batch's loss was NaN/inf (its backward was not run)
    counted: bool = True


@dataclass(frozen=True)
class OptimizerStepResult:
    grad_norm: float  # global norm before clipping (all ranks); NaN/inf when the gradients were not finite
    lr: float  # the learning rate this step used
    applied: bool  # False: the loss or gradient norm was NaN/inf and the weights were left unchanged
    # fp16 only: the gradients overflowed at the current loss scale (the loss was finite). The step was skipped
    # and the scale lowered, as mixed-precision training does routinely; not an error of the run.
    loss_scale_overflow: bool = False


class SamplesCompletions:
    """Both sides sample: the student on-policy, the teacher for seq_kd (``on_policy.micro_batch_sources``)."""

    def sample(self, prompts: list[list[int]], params: "SamplingParams", eos_token_id: int, pad_token_id: int,
               seed: int) -> list["Completion"]:
        """Sampled continuations of ``prompts`` with this rank's current weights (``sampling.decode``: up to
        ``params.max_new_tokens`` tokens, EOS kept, each with its log-prob under the sampling distribution),
        drawn from a generator seeded with ``seed``. Called on every rank of a replica with the same arguments;
        each returns the same completions."""
        raise NotImplementedError(f"{type(self).__name__} cannot sample completions")


class TrainStrategy(SamplesCompletions, ABC):
    """The student side. Constructed on every student rank as ``cls(config, rank, vocab)`` from
    ``config.student_pretrain``; ``load`` then restores a checkpoint when resuming."""

    name: ClassVar[str]
    # True when ``forward_backward`` takes its micro-batches one at a time, in order, each done with (forward,
    # loss and backward) before it takes the next, and reads none again: then the worker may hand them over as
    # the teacher's targets arrive and free a micro-batch's channel slot when the next one is taken. False:
    # the worker gives it every micro-batch of the step up front.
    streams_micro_batches: ClassVar[bool] = False

    @abstractmethod
    def __init__(self, config: "DistillConfig", rank: RankContext, vocab: "VocabInfo"): ...

    def local_targets(self, targets: TeacherTargets) -> TeacherTargets:
        """Whole targets (the global top-k, or every column of the vocabulary: what a teacher cache stores) as
        this rank's loss takes them from a live teacher rank of its TP index (its vocabulary shard under tensor
        parallelism; unchanged without it)."""
        return targets

    @abstractmethod
    def forward_backward(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn) -> StepStats:
        """Accumulate the gradients of ``Σ loss_fn(...)`` over ``micro_batches``; a micro-batch whose loss is
        NaN/inf is not backpropagated and makes the next ``optimizer_step`` not apply."""

    @abstractmethod
    def optimizer_step(self) -> OptimizerStepResult:
        """Reduce gradients over data-parallel ranks, clip to ``max_grad_norm``, step and zero them; advance the
        schedule. Not applied (weights untouched, schedule still advances) when any rank's loss or the
        gradient norm was NaN/inf; every rank returns the same result."""

    @abstractmethod
    def eval_forward(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn) -> StepStats:
        """The sums of ``loss_fn`` over ``micro_batches`` without gradients, in eval mode."""

    @abstractmethod
    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int, pad_token_id: int
    ) -> list[list[int]]:
        """Greedy continuations of ``prompts`` (token ids), cut at the first EOS (excluded). Called on every
        rank of a replica with the same prompts; each returns the same continuations."""

    @abstractmethod
    def save(self, directory: str) -> None:
        """Write this rank's part of a checkpoint into ``directory`` (see the module docstring)."""

    @abstractmethod
    def load(self, directory: str) -> None:
        """Restore weights, optimizer, scheduler and RNG from a checkpoint directory (RNG last)."""


class InferStrategy(SamplesCompletions, ABC):
    """The teacher side. Constructed on every teacher rank as ``cls(config, rank, vocab)`` from
    ``config.teacher_pretrain``; forward only, no gradients."""

    name: ClassVar[str]

    @abstractmethod
    def __init__(self, config: "DistillConfig", rank: RankContext, vocab: "VocabInfo"): ...

    def whole_targets(self, targets: TeacherTargets) -> TeacherTargets:
        """What ``forward`` returned, as one rank holding the whole vocabulary would have it: the global top-k
        (not this shard's candidates) or every column; what a teacher cache stores. A collective under tensor
        parallelism (every TP rank of the last stage calls it)."""
        return targets

    @abstractmethod
    def forward(self, micro_batch: MicroBatch) -> Optional[TeacherTargets]:
        """The teacher's targets at ``micro_batch``'s label positions (see the module docstring); None on ranks
        without logits (PP stages other than the last)."""
