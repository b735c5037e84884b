"""The two Ray actors of a distillation run and where they are placed.

``TeacherWorker`` runs the teacher forward (no grad), keeps the logits of the positions that are learned
(top-k of them, or all) and publishes them on the channel. ``StudentWorker`` opens them, computes
``(1 - w)·CE + w·KD`` and owns the optimizer, evaluation and checkpoints. Both are plain classes (unit
testable without Ray); ``create_workers`` turns them into actors co-located in one placement-group
bundle, on one GPU when ``device_mapping`` names one, on CPU otherwise.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from . import checkpoint
from .channel import LogitsHandle, LogitsPublisher, LogitsReceiver, Transport
from .config import DistillConfig
from .data import IGNORE_INDEX, Example, eval_batches, collate
from .losses import TopK, kd_loss, topk_teacher_logits
from .models import VocabInfo
from .run_identity import RunIdentity
from .strategies.torch import TorchInferStrategy, TorchTrainStrategy


def _setup_process(seed: int, num_threads: int, on_gpu: bool) -> torch.device:
    import transformers

    transformers.logging.set_verbosity_error()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    return torch.device("cuda", 0) if on_gpu and torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class TeacherOutput:
    handle: LogitsHandle
    forward_seconds: float
    publish_seconds: float


class TeacherWorker:
    """Teacher forward + logits publication for the positions the student learns."""

    def __init__(self, config: DistillConfig, vocab: VocabInfo, transport: Transport, num_threads: int = 0):
        self.config = config
        device = _setup_process(config.seed, num_threads, bool(config.teacher.device_mapping))
        self.strategy = TorchInferStrategy(config.teacher_pretrain, config.teacher.model_args, device, vocab.size)
        self.publisher = LogitsPublisher(transport)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def forward(self, batch: dict[str, torch.Tensor]) -> TeacherOutput:
        start = time.perf_counter()
        logits = self.strategy.logits(batch["input_ids"], batch["attention_mask"])
        rows = logits[(batch["labels"] != IGNORE_INDEX).to(logits.device)].float()  # [N_label, V]
        if self.config.logits_topk:
            top = topk_teacher_logits(rows, self.config.logits_topk)
            tensors = {"values": top.values, "indices": top.indices.to(torch.int32)}
        else:
            tensors = {"logits": rows}
        forward_done = time.perf_counter()
        handle = self.publisher.publish(tensors)
        return TeacherOutput(handle, forward_done - start, time.perf_counter() - forward_done)

    def close(self) -> None:
        self.publisher.close()


@dataclass(frozen=True)
class OptimizerStepStats:
    grad_norm: float  # before clipping; NaN/inf when the gradients were not finite
    lr: float
    seconds: float
    applied: bool  # False: the loss or gradient norm was not finite and the weights were left unchanged


@dataclass(frozen=True)
class MicroBatchStats:
    ce_sum: float  # summed cross-entropy over this micro-batch's label tokens
    kd_sum: float  # summed per-token KD divergence (0 when distill_loss_weight is 0)
    label_tokens: int
    input_tokens: int
    open_seconds: float
    compute_seconds: float


class StudentWorker:
    """Student forward/backward on (1 - w)·CE + w·KD, optimizer steps, evaluation and checkpoints."""

    def __init__(
        self,
        config: DistillConfig,
        vocab: VocabInfo,
        eval_examples: Sequence[Example] = (),
        resume_from: str | None = None,
        num_threads: int = 0,
        identity: RunIdentity | None = None,
    ):
        from transformers import AutoTokenizer

        self.config = config
        self.identity = identity
        self.vocab = vocab
        self.eval_examples = list(eval_examples)
        self.device = _setup_process(config.seed, num_threads, bool(config.student.device_mapping))
        model_path = str(Path(resume_from) / "student") if resume_from else config.student_pretrain
        self.tokenizer = AutoTokenizer.from_pretrained(config.student_pretrain)
        self.strategy = TorchTrainStrategy(
            model_path,
            config.student.model_args,
            config.student.training_args,
            config.max_steps,
            self.device,
            vocab.size,
        )
        self.trainer_state: dict = {}
        if resume_from:
            self.trainer_state = checkpoint.load_checkpoint(
                resume_from, optimizer=self.strategy.optimizer, scheduler=self.strategy.scheduler
            )
        self.receiver = LogitsReceiver()
        self._loss_finite = True  # of the micro-batches accumulated since the last optimizer step

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def get_trainer_state(self) -> dict:
        return self.trainer_state

    def _teacher_targets(self, handle: LogitsHandle | None) -> torch.Tensor | TopK | None:
        if handle is None:
            return None
        tensors = self.receiver.open(handle)
        if "logits" in tensors:
            return tensors["logits"].to(self.device)
        return TopK(values=tensors["values"].to(self.device), indices=tensors["indices"].to(self.device).long())

    def train_micro_batch(
        self, batch: dict[str, torch.Tensor], teacher: TeacherOutput | None, global_label_tokens: int
    ) -> MicroBatchStats:
        """Accumulate gradients of one micro-batch; losses are sums divided by the global label-token count."""
        config = self.config
        start = time.perf_counter()
        targets = self._teacher_targets(teacher.handle if teacher else None)
        opened = time.perf_counter()

        labels = batch["labels"].to(self.device)
        mask = labels != IGNORE_INDEX
        logits = self.strategy.logits(batch["input_ids"], batch["attention_mask"])
        rows = logits[mask]  # [N_label, V], the positions both terms are computed on
        ce_sum = F.cross_entropy(rows.float(), labels[mask], reduction="sum")
        weight = config.distill_loss_weight
        # Only terms with a non-zero weight enter the loss: 0·inf is NaN, and pure KD must not stop on the CE.
        loss = (1.0 - weight) * ce_sum / global_label_tokens if weight < 1 else ce_sum.new_zeros(())
        kd_sum = torch.zeros(())
        if weight > 0:
            if targets is None:
                raise RuntimeError("distill_loss_weight > 0 but no teacher logits were passed to the student")
            kd_mean = kd_loss(
                rows,
                targets,
                objective=config.kd_objective,
                kd_temperature=config.kd_temperature,
                teacher_temperature=config.teacher_temperature,
                skew_lambda=config.skew_lambda,
                adaptive_kl_alpha=config.adaptive_kl_alpha,
                normalizer=float(global_label_tokens),
            )
            loss = loss + weight * kd_mean
            kd_sum = kd_mean.detach() * global_label_tokens
        if torch.isfinite(loss.detach()):
            loss.backward()
        else:  # its gradients would be NaN/inf everywhere; optimizer_step will not apply this step
            self._loss_finite = False
        return MicroBatchStats(
            ce_sum=float(ce_sum.detach()),
            kd_sum=float(kd_sum),
            label_tokens=int(mask.sum()),
            input_tokens=int(batch["attention_mask"].sum()),
            open_seconds=opened - start,
            compute_seconds=time.perf_counter() - opened,
        )

    def optimizer_step(self) -> OptimizerStepStats:
        """Apply the accumulated gradients, unless the loss or the gradient norm was NaN/inf."""
        start = time.perf_counter()
        grad_norm, lr, applied = self.strategy.optimizer_step(loss_finite=self._loss_finite)
        self._loss_finite = True
        return OptimizerStepStats(grad_norm, lr, time.perf_counter() - start, applied)

    def evaluate(self) -> dict[str, float]:
        """Held-out cross-entropy per answer token, and exact match of greedy answers when configured."""
        config = self.config
        batch_size = config.student.training_args.per_device_eval_batch_size
        ce_total, tokens = 0.0, 0
        for examples in eval_batches(self.eval_examples, batch_size):
            batch = collate(examples, self.vocab.pad_token_id)
            labels = batch["labels"].to(self.device)
            mask = labels != IGNORE_INDEX
            logits = self.strategy.eval_logits(batch["input_ids"], batch["attention_mask"])
            ce_total += float(F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum"))
            tokens += int(mask.sum())
        metrics = {"val/loss": ce_total / max(tokens, 1)}
        if config.eval_exact_match:
            metrics["val/exact_match"] = self.exact_match()
        return metrics

    def exact_match(self) -> float:
        batch_size = self.config.student.training_args.per_device_eval_batch_size
        correct = 0
        for examples in eval_batches(self.eval_examples, batch_size):
            outputs = self.strategy.generate(
                [e.input_ids[: e.prompt_length] for e in examples],
                self.config.eval_max_new_tokens,
                self.vocab.eos_token_id,
                self.vocab.pad_token_id,
            )
            for example, output in zip(examples, outputs):
                text = self.tokenizer.decode(output, skip_special_tokens=True)
                correct += text.strip() == example.answer.strip()
        return correct / max(len(self.eval_examples), 1)

    def save_checkpoint(self, step: int, trainer_state: dict) -> str:
        path = checkpoint.save_checkpoint(
            self.config.output_dir,
            step,
            model=self.strategy.model,
            tokenizer=self.tokenizer,
            optimizer=self.strategy.optimizer,
            scheduler=self.strategy.scheduler,
            trainer_state=trainer_state,
            config=self.config.model_dump(mode="json"),
            identity=self.identity,
            max_to_keep=self.config.max_ckpt_to_keep,
        )
        return str(path)

    def close(self) -> None:
        self.receiver.close()


@dataclass
class Workers:
    """Actor handles of one run. ``teacher`` is None when distill_loss_weight is 0 (plain SFT)."""

    student: object
    teacher: object | None
    placement_group: object

    def shutdown(self) -> None:
        import ray

        for actor in (self.teacher, self.student):
            if actor is None:
                continue
            try:
                ray.get(actor.close.remote(), timeout=30)
            except Exception:  # the actor may already be dead; we are tearing down anyway
                pass
            ray.kill(actor)
        ray.util.remove_placement_group(self.placement_group)


def create_workers(
    config: DistillConfig,
    vocab: VocabInfo,
    eval_examples: Sequence[Example],
    resume_from: str | None,
    num_threads: int,
    identity: RunIdentity | None = None,
) -> Workers:
    """Co-locate teacher and student in one placement-group bundle (same node; same GPU when one is mapped)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    on_gpu = bool(config.student.device_mapping)
    bundle = {"CPU": 1, "GPU": 1} if on_gpu else {"CPU": 1}
    group = placement_group([bundle], strategy="STRICT_PACK")
    ray.get(group.ready(), timeout=300)
    # Half of the bundle each: the two actors share the device, as the hand-off requires.
    options = dict(
        num_cpus=0.5,
        num_gpus=0.5 if on_gpu else 0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
    )
    student = ray.remote(StudentWorker).options(**options).remote(
        config, vocab, eval_examples, resume_from, num_threads, identity
    )
    teacher = None
    if config.distill_loss_weight > 0:
        teacher = ray.remote(TeacherWorker).options(**options).remote(config, vocab, "shared_memory", num_threads)
        teacher_node = ray.get(teacher.node_id.remote())
        if teacher_node != ray.get(student.node_id.remote()):
            # Cannot happen with STRICT_PACK, but a custom cluster setup might split them: stay correct.
            ray.kill(teacher)
            teacher = ray.remote(TeacherWorker).options(**options).remote(config, vocab, "object_store", num_threads)
    ray.get(student.node_id.remote())  # surfaces construction errors (bad checkpoint, OOM) here
    return Workers(student=student, teacher=teacher, placement_group=group)


def default_num_threads() -> int:
    """Torch threads per actor: half the cores each (``KUBEDISTILL_NUM_THREADS`` overrides).

    Teacher and student take turns, but giving each every core is a trap on CPU: OpenMP threads of the
    idle actor spin-wait, and an oversubscribed parallel region waits for descheduled threads. Measured on
    2 loaded cores, a 1M-parameter training step took 4.4 s with 2 threads and 0.13 s with 1.
    """
    return int(os.environ.get("KUBEDISTILL_NUM_THREADS", "0")) or max(1, (os.cpu_count() or 2) // 2)
