#!/usr/bin/env python
"""The GPU check: one script that measures, on one GPU, what the CPU test suite cannot.

1. ``ipc``: the teacher -> student hand-off through ``channel.CudaIpc`` between two processes on one GPU, for
   [8, 2048, 64] top-k (fp32 values + int32 indices) and [8, 2048, 151936] full fp32 logits: publish time (copy
   into the ring slot + stream sync), open time (first open rebuilds the export, later ones are views), time for
   the student to read the tensors once, and the evidence that it is zero-copy (the student's allocated CUDA
   memory does not grow, its views keep one address across steps, every step's new contents are visible).
   For comparison, the shared-memory path (GPU -> /dev/shm -> GPU) on the same tensors, where /dev/shm is big
   enough.
2. ``megatron``: a few ``megatron_train`` steps of a Qwen2-shaped student (0.5B shape, random bf16 weights) with
   a ``megatron_infer`` teacher of the same shape in another process, targets handed over by CUDA IPC, as the
   Ray workers do it (top-k 64 by default): tokens/s, peak memory of each process, and model FLOPs utilization
   = (student forward+backward + teacher forward model FLOPs) / wall time / peak (``--peak-tflops``, default
   989 TFLOP/s: H200 dense bf16). Model FLOPs per token: ``forward_flops_per_token`` below.
3. ``kd``: ``losses.kd_loss`` (chunked, gradient computed in the forward pass) against the straightforward
   version (both log-softmaxes materialised, autograd) on [8·2048, 151936] logits, full vocabulary and top-64:
   time and peak memory of loss + backward, and how far apart their losses and gradients are.

No Ray: the strategies and the channel run in plain processes (``multiprocessing`` spawn). The GPU machine has
torch, transformers and safetensors but not megatron-core, mbridge, einops or pydantic: their wheels travel with
the working tree (5.4 MB). On a machine with network access:

    tests/gpu/fetch_wheels.sh                       # -> tests/gpu/wheels/*.whl (git-ignored)

then on the GPU machine (the device tool: carry ["tests/gpu/wheels"]):

    python tests/gpu/gpu_check.py                   # all three parts; --only ipc,kd  --json out.json

The script unpacks the wheels into ``<wheels>/site`` and puts it on sys.path (after the machine's own
packages); a missing wheel stops it before any GPU work, naming the wheel and the command that fetches it.
``--smoke`` runs the same code on tiny shapes (on CPU when there is no GPU, shared memory instead of CUDA IPC):
a check that the script itself works, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_WHEELS = Path(__file__).resolve().parent / "wheels"
H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H200 SXM, dense BF16 tensor-core peak (1979 is with 2:4 sparsity)
# Module the script imports -> the wheel that provides it (fetch_wheels.sh downloads them all).
WHEEL_MODULES = {
    "megatron.core": "megatron-core==0.16.1",
    "mbridge": "mbridge==0.15.1",
    "einops": "einops",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic-core",
    "annotated_types": "annotated-types",
    "typing_inspection": "typing-inspection",
}
PARTS = ("ipc", "megatron", "kd")


# ------------------------------------------------------------------------------------------------ set-up


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run, of {','.join(PARTS)}")
    parser.add_argument("--wheels", type=Path, default=Path(os.environ.get("KUBEDISTILL_GPU_WHEELS", DEFAULT_WHEELS)),
                        help="folder of the carried wheels (default tests/gpu/wheels, or $KUBEDISTILL_GPU_WHEELS)")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                        help="the GPU's dense bf16 peak for MFU (default: H200, 989)")
    parser.add_argument("--repeats", type=int, default=5, help="hand-offs / KD runs per case (median shown)")
    parser.add_argument("--steps", type=int, default=5, help="megatron_train steps (the first is warm-up)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch (megatron)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence (megatron)")
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step (megatron)")
    parser.add_argument("--topk", type=int, default=64, help="teacher top-k in the megatron steps (0: full vocab)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, measures nothing")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")
    return args


def unpack_wheels(wheel_dir: Path) -> Path | None:
    """Unpack every ``*.whl`` of ``wheel_dir`` into ``wheel_dir/site`` (once per wheel); None if there are none."""
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    if not wheels:
        return None
    site = wheel_dir / "site"
    site.mkdir(exist_ok=True)
    for wheel in wheels:
        marker = site / f".{wheel.name}.unpacked"
        if not marker.exists():
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
            marker.touch()
    return site


def setup_paths(wheel_dir: Path) -> list[str]:
    """The repository's trainer package first, the wheels' site last; returns the wheels still missing."""
    import importlib.util

    trainer = str(REPO / "trainer")
    if trainer not in sys.path:
        sys.path.insert(0, trainer)
    site = unpack_wheels(wheel_dir)
    if site is not None and str(site) not in sys.path:
        sys.path.append(str(site))  # after the machine's packages: the wheels only fill what is missing
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (trainer, str(site or ""), os.environ.get("PYTHONPATH")) if p)
    missing = []
    for module, wheel in WHEEL_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package of a dotted name is missing
            found = False
        if not found:
            missing.append(wheel)
    return missing


# ------------------------------------------------------------------------------------------------ model FLOPs


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


QWEN2_0_5B = ModelShape(hidden=896, layers=24, heads=14, kv_heads=2, ffn=4864, vocab=151936, tied=True)
TINY = ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, vocab=512, tied=True)


def matmul_params(shape: ModelShape) -> int:
    """Weights that take part in a matrix multiply per token: attention (q, k, v, o), the gated MLP (gate, up,
    down) and the output layer; not the embedding lookup, norms or biases."""
    q_and_o = 2 * shape.hidden * shape.heads * shape.head_dim
    k_and_v = 2 * shape.hidden * shape.kv_heads * shape.head_dim
    mlp = 3 * shape.hidden * shape.ffn
    return shape.layers * (q_and_o + k_and_v + mlp) + shape.hidden * shape.vocab


def forward_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Model FLOPs of one token's forward pass: 2 per matmul weight, plus attention scores and the weighted sum of
    values, 2·2·layers·seq·heads·head_dim (counted over the whole sequence, as in PaLM's MFU, Chowdhery et al.
    2022, appendix B; a causal kernel does about half of that part). A training step is 3x (backward = 2x)."""
    return 2.0 * matmul_params(shape) + 4.0 * shape.layers * seq_len * shape.heads * shape.head_dim


def model_flops_utilization(flops: float, seconds: float, peak_tflops: float) -> float:
    return flops / seconds / (peak_tflops * 1e12)


# ------------------------------------------------------------------------------------------------ helpers


def _device():
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device) -> int:
    import torch

    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _peak(device) -> int:
    import torch

    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _targets_to_tensors(targets) -> dict:
    """What the teacher worker publishes for a TeacherTargets."""
    if hasattr(targets, "tensors"):
        return targets.tensors()
    tensors = {"values": targets.values}
    if targets.indices is not None:
        tensors["indices"] = targets.indices.int()
    return tensors


def _targets_from_tensors(tensors: dict):
    from distill_trainer.distill_loss import TeacherTargets

    if hasattr(TeacherTargets, "from_tensors"):
        return TeacherTargets.from_tensors(tensors)
    return TeacherTargets(tensors["values"], tensors.get("indices"))


# ------------------------------------------------------------------------------------------------ 1. ipc


def _ipc_tensors(shape: tuple[int, ...], topk: bool, device):
    import torch

    generator = torch.Generator(device=device).manual_seed(0)
    values = torch.randn(shape, device=device, generator=generator)
    tensors = {"values": values}
    if topk:
        tensors["indices"] = torch.randint(0, 151936, shape, device=device, dtype=torch.int32, generator=generator)
    return tensors


def _ipc_teacher(kind, shape, topk, repeats, handles, acks):
    import torch
    from distill_trainer.channel import make_transport

    device = _device()
    tensors = _ipc_tensors(shape, topk, device)
    transport = make_transport(kind, slots=2)
    publish = []
    for step in range(repeats):
        tensors["values"].add_(1.0)  # new contents every step: the student must see them
        checksum = float(tensors["values"].sum(dtype=torch.float64))
        _sync(device)
        start = time.perf_counter()
        handle = transport.publish(tensors)
        publish.append(time.perf_counter() - start)
        handles.put((handle, checksum))
    handles.put(None)
    acks.get()  # the student is done: the buffers may go
    transport.close()
    handles.put({"publish": publish, "teacher_peak": _peak(device)})


def _ipc_student(kind, handles, results):
    import torch
    from distill_trainer.channel import LogitsReceiver

    device = _device()
    receiver = LogitsReceiver()
    base = _allocated(device)
    opened, read, grown, pointers, correct = [], [], [], [], []
    while (item := handles.get()) is not None:
        handle, checksum = item
        start = time.perf_counter()
        tensors = receiver.open(handle)
        if kind != "cuda_ipc":
            tensors = {n: t.to(device) for n, t in tensors.items()}  # what the worker does: targets to its device
        _sync(device)
        opened.append(time.perf_counter() - start)
        grown.append(_allocated(device) - base)
        pointers.append(tensors["values"].data_ptr())
        start = time.perf_counter()
        total = float(tensors["values"].sum(dtype=torch.float64))  # one full read of the teacher's values
        read.append(time.perf_counter() - start)
        correct.append(total == checksum)
        del tensors
        receiver.release(handle)
    receiver.close()
    results.put({"open": opened, "read": read, "grown": grown, "same_address": len(set(pointers)) == 1,
                 "all_correct": all(correct)})


def _child(target, *args):
    """A process of the check: its own multiprocessing resource tracker, as a Ray actor has (a shared one would
    see the student's unregistering of the teacher's segments as the teacher's own)."""
    from multiprocessing import resource_tracker

    resource_tracker._resource_tracker = resource_tracker.ResourceTracker()
    target(*args)


def _result(queue, processes, seconds: float = 1800):
    """The next item of ``queue``; fails as soon as one of ``processes`` has died instead."""
    import queue as queues

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=1.0)
        except queues.Empty:
            dead = [f"{p.name} (exit {p.exitcode})" for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"process failed: {', '.join(dead)}; its traceback is above")
    raise TimeoutError(f"no result after {seconds:g} s")


def _run_pair(ctx, teacher_args, student_args, teacher, student):
    handles, acks, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    t = ctx.Process(target=_child, args=(teacher, *teacher_args, handles, acks), name="teacher")
    t.start()
    s = ctx.Process(target=_child, args=(student, *student_args, handles, results), name="student")
    s.start()
    try:
        student_result = _result(results, [t, s])
        acks.put("done")
        teacher_result = _result(handles, [t])
    finally:
        for process in (s, t):
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    return teacher_result, student_result


def ipc_check(args) -> dict:
    import torch

    ctx = mp.get_context("spawn")
    device = _device()
    cases = [("top-k [8,2048,64] fp32+int32", (8, 2048, 64), True), ("full [8,2048,151936] fp32", (8, 2048, 151936), False)]
    if args.smoke:
        cases = [("top-k [2,16,8]", (2, 16, 8), True), ("full [2,16,512]", (2, 16, 512), False)]
    kinds = ["cuda_ipc", "shared_memory"] if device.type == "cuda" else ["shared_memory"]
    rows, figures = [], {}
    for name, shape, topk in cases:
        nbytes = math.prod(shape) * (8 if topk else 4)
        for kind in kinds:
            if kind == "shared_memory" and shutil.disk_usage("/dev/shm").free < 2.6 * nbytes:
                rows.append([name, kind, f"skipped: /dev/shm has {_gib(shutil.disk_usage('/dev/shm').free)} free"])
                continue
            teacher, student = _run_pair(ctx, (kind, shape, topk, args.repeats), (kind,), _ipc_teacher, _ipc_student)
            steady_open = statistics.median(student["open"][1:] or student["open"])
            figure = {
                "bytes": nbytes,
                "publish_s": statistics.median(teacher["publish"]),
                "first_open_s": student["open"][0],
                "open_s": steady_open,
                "read_s": statistics.median(student["read"]),
                "student_extra_bytes": max(student["grown"]),
                "same_address": student["same_address"],
                "all_correct": student["all_correct"],
            }
            figures[f"{name} / {kind}"] = figure
            hand_off = figure["publish_s"] + figure["open_s"]
            rows.append([name, kind, _ms(figure["publish_s"]), _ms(figure["first_open_s"]), _ms(figure["open_s"]),
                         _ms(hand_off), f"{nbytes / hand_off / 1e9:.0f} GB/s", _ms(figure["read_s"]),
                         _gib(figure["student_extra_bytes"]), figure["same_address"], figure["all_correct"]])
    _table("1. teacher -> student hand-off, two processes, one GPU (median of %d)" % args.repeats,
           ["tensors", "transport", "publish", "1st open", "open", "hand-off", "rate", "student read",
            "student alloc", "one address", "contents ok"], rows)
    print("  publish = teacher copy into its ring slot + stream sync; open = student gets usable tensors on the GPU "
          "(CUDA IPC: views; shared memory: includes the copy to the GPU); student alloc = growth of the student's "
          "own CUDA allocations while it holds the tensors (0: zero-copy)")
    return figures


# ------------------------------------------------------------------------------------------------ 2. megatron


def _write_model(directory: Path, shape: ModelShape) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=32768,
        tie_word_embeddings=shape.tied, rms_norm_eps=1e-6, rope_theta=1000000.0, attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)


class _Config:
    """The DistillConfig fields the strategies read, as given; any other top-level field is DistillConfig's default."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def __getattr__(self, name):
        from distill_trainer.config import DistillConfig

        if name not in DistillConfig.model_fields:
            raise AttributeError(name)
        return DistillConfig.model_fields[name].get_default(call_default_factory=True)


def _fake_config(model_dir: str, topk: int, steps: int, dtype: str):
    from types import SimpleNamespace

    training_args = SimpleNamespace(learning_rate=1e-5, lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.01,
                                    max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999)
    model_args = SimpleNamespace(dtype=dtype)
    return _Config(student_pretrain=model_dir, teacher_pretrain=model_dir, seed=0, logits_topk=topk, max_steps=steps,
                   student=SimpleNamespace(model_args=model_args, training_args=training_args),
                   teacher=SimpleNamespace(model_args=model_args))


def _batches(step: int, settings: dict) -> list[dict]:
    """The step's micro-batches, the same in both processes: random tokens, labels = the next token."""
    import torch

    generator = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(settings["micro_batches"]):
        ids = torch.randint(0, settings["tokenizer_vocab"], (settings["batch"], settings["seq"]), generator=generator)
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _megatron_rank(settings: dict):
    import torch
    from distill_trainer.models import VocabInfo
    from distill_trainer.strategies.base import RankContext

    device = _device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    config = _fake_config(settings["model_dir"], settings["topk"], settings["steps"], settings["dtype"])
    vocab = VocabInfo(size=settings["tokenizer_vocab"], eos_token_id=0, pad_token_id=0)
    return device, config, vocab, RankContext(device=device)


def _megatron_teacher(settings, handles, acks):
    from distill_trainer.channel import make_transport
    from distill_trainer.distill_loss import TeacherTargets
    from distill_trainer.strategies.base import MicroBatch
    from distill_trainer.strategies.megatron import MegatronInferStrategy

    device, config, vocab, rank = _megatron_rank(settings)
    strategy = MegatronInferStrategy(config, rank, vocab)
    transport = make_transport(settings["kind"], slots=2)
    forward = []
    for step in range(settings["steps"]):
        batches = _batches(step, settings)
        _sync(device)
        start = time.perf_counter()
        parts = [strategy.forward(MicroBatch(b["input_ids"], b["attention_mask"], b["labels"])) for b in batches]
        _sync(device)
        forward.append(time.perf_counter() - start)
        handle = transport.publish(_targets_to_tensors(TeacherTargets.cat(parts)))
        handles.put((handle, [p.rows for p in parts]))
    acks.get()
    transport.close()
    handles.put({"forward": forward, "teacher_peak": _peak(device)})


def _megatron_student(settings, handles, results):
    import torch
    from distill_trainer.channel import LogitsReceiver
    from distill_trainer.distill_loss import LossConfig, make_loss_fn
    from distill_trainer.strategies.base import MicroBatch
    from distill_trainer.strategies.megatron import MegatronTrainStrategy

    device, config, vocab, rank = _megatron_rank(settings)
    strategy = MegatronTrainStrategy(config, rank, vocab)
    receiver = LogitsReceiver()
    loss_config = LossConfig(distill_loss_weight=0.5, logits_topk=settings["topk"])
    ends, student, losses = [], [], []
    _sync(device)
    ends.append(time.perf_counter())
    for step in range(settings["steps"]):
        handle, rows = handles.get()
        start = time.perf_counter()
        batches = _batches(step, settings)
        targets = _targets_from_tensors(receiver.open(handle)).to(device).split(rows)
        micro = [MicroBatch(b["input_ids"], b["attention_mask"], b["labels"], t) for b, t in zip(batches, targets)]
        normalizer = float(sum(int((b["labels"] != -100).sum()) for b in batches))
        stats = strategy.forward_backward(micro, make_loss_fn(loss_config, normalizer))
        update = strategy.optimizer_step()
        receiver.release(handle)
        _sync(device)
        ends.append(time.perf_counter())
        student.append(ends[-1] - start)
        losses.append((stats.loss, update.grad_norm))
    receiver.close()
    results.put({"step_wall": [b - a for a, b in zip(ends, ends[1:])], "student": student, "losses": losses,
                 "student_peak": _peak(device)})


def megatron_check(args) -> dict:
    shape = TINY if args.smoke else QWEN2_0_5B
    batch, seq, micro = (2, 32, 2) if args.smoke else (args.batch, args.seq, args.micro_batches)
    device = _device()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="gpu_check_model_") as model_dir:
        start = time.perf_counter()
        _write_model(Path(model_dir), shape)
        print(f"\n(random Qwen2-shaped model {asdict(shape)} written in {time.perf_counter() - start:.0f} s)")
        settings = dict(model_dir=model_dir, topk=args.topk, steps=args.steps, batch=batch, seq=seq,
                        micro_batches=micro, tokenizer_vocab=shape.vocab - 290 if shape.vocab > 1000 else shape.vocab,
                        dtype="bf16" if device.type == "cuda" else "fp32",
                        kind="cuda_ipc" if device.type == "cuda" else "shared_memory")
        teacher, student = _run_pair(ctx, (settings,), (settings,), _megatron_teacher, _megatron_student)
    tokens = batch * seq * micro
    wall = statistics.median(student["step_wall"][1:])
    flops = tokens * (3 * forward_flops_per_token(shape, seq) + forward_flops_per_token(shape, seq))
    figures = {
        "shape": asdict(shape), "tokens_per_step": tokens, "topk": args.topk, "transport": settings["kind"],
        "step_wall_s": wall, "student_step_s": statistics.median(student["student"][1:]),
        "teacher_forward_s": statistics.median(teacher["forward"][1:]), "tokens_per_s": tokens / wall,
        "model_tflops_per_step": flops / 1e12, "mfu": model_flops_utilization(flops, wall, args.peak_tflops),
        "peak_tflops_used": args.peak_tflops, "student_peak_bytes": student["student_peak"],
        "teacher_peak_bytes": teacher["teacher_peak"], "loss_and_grad_norm": student["losses"],
    }
    _table(f"2. megatron_train steps: Qwen2 {'tiny' if args.smoke else '0.5B'} shape, {micro} x [{batch}, {seq}] per step, top-k {args.topk}, "
           f"teacher (megatron_infer, same shape) in another process, {settings['kind']} (median of steps 2..{args.steps})",
           ["step wall", "student step", "teacher fwd", "tokens/s", "model TFLOP/step", "MFU", "student peak",
            "teacher peak"],
           [[_ms(wall), _ms(figures["student_step_s"]), _ms(figures["teacher_forward_s"]),
             f"{figures['tokens_per_s']:,.0f}", f"{figures['model_tflops_per_step']:.1f}", f"{figures['mfu']:.1%}",
             _gib(figures["student_peak_bytes"]), _gib(figures["teacher_peak_bytes"])]])
    print(f"  MFU = (3 x student + 1 x teacher forward FLOPs) / step wall / {args.peak_tflops:g} TFLOP/s; forward = "
          f"{forward_flops_per_token(shape, seq) / 1e9:.2f} GFLOP/token (2 x {matmul_params(shape) / 1e6:.0f}M matmul "
          f"weights + attention over {seq} tokens)")
    print("  loss, grad norm per step: " + ", ".join(f"({l:.3f}, {g:.2f})" for l, g in student["losses"]))
    return figures


# ------------------------------------------------------------------------------------------------ 3. kd


def straightforward_kd_loss(student, teacher, topk_indices=None):
    """Forward KL the usual way (as bench/kd_loss.py): both log-softmaxes materialised in fp32, autograd."""
    import torch.nn.functional as F

    if topk_indices is not None:
        student = student.gather(-1, topk_indices)
    student_log_probs = F.log_softmax(student.float(), dim=-1)
    teacher_log_probs = F.log_softmax(teacher.float(), dim=-1)
    return F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1).mean()


def kd_check(args) -> dict:
    import torch
    from distill_trainer.losses import TopK, kd_loss

    device = _device()
    tokens, vocab, k = (64, 512, 8) if args.smoke else (8 * 2048, 151936, 64)
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    student = (torch.randn(tokens, vocab, device=device, generator=generator) * 2).to(dtype).requires_grad_()
    teacher = torch.randn(tokens, vocab, device=device, generator=generator) * 2
    top = torch.topk(teacher, k, dim=-1)
    top = TopK(top.values.contiguous(), top.indices.contiguous())
    runs = {
        ("full", "straightforward"): lambda: straightforward_kd_loss(student, teacher),
        ("full", "kubedistill"): lambda: kd_loss(student, teacher),
        ("top-k", "straightforward"): lambda: straightforward_kd_loss(student, top.values, top.indices),
        ("top-k", "kubedistill"): lambda: kd_loss(student, top),
    }
    rows, figures, reference = [], {}, {}
    for (case, impl), run in runs.items():
        times, peaks = [], []
        for _ in range(args.repeats):
            student.grad = None
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            base = _allocated(device)
            start = time.perf_counter()
            loss = run()
            loss.backward()
            _sync(device)
            times.append(time.perf_counter() - start)
            peaks.append(_peak(device) - base)
        grad = student.grad
        if impl == "straightforward":
            reference[case] = (float(loss.detach()), grad.clone())
            loss_diff = grad_diff = 0.0
        else:
            ref_loss, ref_grad = reference[case]
            loss_diff = abs(float(loss.detach()) - ref_loss) / max(abs(ref_loss), 1e-12)
            grad_diff = float((grad.float() - ref_grad.float()).abs().max())
            reference.pop(case)
        student.grad = None
        figures[f"{case} / {impl}"] = {"seconds": statistics.median(times), "peak_extra_bytes": max(peaks),
                                       "loss": float(loss.detach()), "loss_rel_diff": loss_diff, "grad_max_abs_diff": grad_diff}
        rows.append([case, impl, _ms(statistics.median(times)), _gib(max(peaks)), f"{float(loss.detach()):.6f}",
                     f"{loss_diff:.1e}", f"{grad_diff:.1e}"])
    for case in ("full", "top-k"):
        a, b = figures[f"{case} / straightforward"], figures[f"{case} / kubedistill"]
        rows.append([case, "ratio straightforward / kubedistill", f"{a['seconds'] / b['seconds']:.2f}x",
                     f"{a['peak_extra_bytes'] / max(b['peak_extra_bytes'], 1):.2f}x", "", "", ""])
    _table(f"3. KD loss (forward_kl) + backward on [{tokens}, {vocab}] {str(dtype).removeprefix('torch.')} student "
           f"logits, fp32 teacher, top-k {k} (median of {args.repeats})",
           ["case", "implementation", "time", "peak extra", "loss", "loss rel diff", "grad max diff"], rows)
    print("  peak extra = peak CUDA allocation during loss + backward above the inputs (includes the [N, V] gradient)")
    return figures


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = setup_paths(args.wheels)
    if missing:
        print(f"gpu_check: missing wheel(s) {', '.join(missing)} in {args.wheels}. Fetch them on a machine with network "
              f"access with tests/gpu/fetch_wheels.sh and carry that folder with the working tree.", file=sys.stderr)
        return 2
    import torch

    device = _device()
    if device.type != "cuda" and not args.smoke:
        print("gpu_check: no CUDA device here; use --smoke to check the script itself on CPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    print(f"gpu_check on {name}; torch {torch.__version__}; parts {','.join(args.parts)}"
          + ("; SMOKE RUN (tiny shapes, no meaningful figures)" if args.smoke else ""))
    results = {"device": name, "torch": torch.__version__, "smoke": args.smoke}
    for part, check in (("ipc", ipc_check), ("megatron", megatron_check), ("kd", kd_check)):
        if part in args.parts:
            results[part] = check(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
