#!/usr/bin/env python
"""The GPU check: one script that measures, on one GPU, what the CPU test suite cannot.

1. ``ipc``: the teacher -> student hand-off through ``channel.CudaIpc`` between two processes on one GPU, for
   [8, 2048, 64] top-k (fp32 values + int32 indices) and [8, 2048, 151936] full fp32 logits, with each of the
   two release modes (``release="event"``, the default, and ``"stream"``): publish time without the wait for a
   free slot (the wait is shown apart), first open (after a CUDA warm-up in the student, so without its context
   creation) and later opens, one full read by the student, and the evidence that it is zero-copy: every view's
   address is the rebuilt buffer's address (``LogitsReceiver.buffer_of``) plus the tensor's offset, one address
   per ring slot across steps, device-wide free memory (``mem_get_info``) does not drop by the tensors' size at
   the first open, and every step's new contents are visible. Then a synthetic student step per release mode:
   GPU work, a read of the targets queued behind it, ``release``, more GPU work: the host time of ``release``,
   the step's time, and whether the read saw the right contents (the teacher rewrites the slot as soon as the
   release lets it). For comparison, the shared-memory path (GPU -> /dev/shm -> GPU) on the same tensors, where
   /dev/shm is big enough.
2. ``megatron``: ``megatron_train`` steps of a Qwen2-shaped student (0.5B shape, random bf16 weights) with a
   ``megatron_infer`` teacher of the same weights in another process, targets handed over by CUDA IPC one
   micro-batch per handle as the workers do (2 x micro-batches ring slots), the same batch every step:
   a. top-k 64, 2 micro-batches of [4, 2048]: tokens/s, MFU, memory of each process, the bf16 checks (loss and
      grad norm finite at every step, a student parameter changed by step 1, the loss falls). The teacher runs
      two steps more than the student so that it never runs out of work; both processes record the start and
      end of each teacher forward and student step on the system-wide clock (``time.monotonic``, CLOCK_MONOTONIC),
      and the teacher's FLOPs are credited to a student step in proportion to the part of each teacher forward
      that fell inside it. MFU = (3 x student forward FLOPs + credited teacher forward FLOPs) / wall time of
      steps 2.. / peak (``--peak-tflops``, default 989 TFLOP/s: H200 dense bf16); the student-only MFU and how
      busy the teacher was are shown next to it. The teacher's forward alone is timed after the student's loop,
      while the student process idles.
   b. full vocabulary (top-k 0) at gradient accumulation 4 (``--full-vocab-seq``, default 1024 tokens: the
      teacher's 8 slots of [4 x 1023, 151646] fp32 logits take 23 GiB; at 2048 they would take 46 GiB): the
      memory each process reserves, device-wide free memory, and the channel's share (slots x slot size).
   Each process gets ``torch.cuda.set_per_process_memory_fraction`` (``--teacher-memory-fraction``,
   ``--student-memory-fraction``, 0.45 each by default).
   Then (2b) the trained student samples on its rank as on-policy distillation does (``sample``: Megatron-Core's
   static-batch inference with its KV cache): 16 prompts of 256 tokens, 128 new tokens at temperature 1, tokens/s,
   the same seed twice draws the same tokens (asserted); and 32 greedy steps of the KV-cached stepper against the
   no-cache one (a whole forward of the sequence so far each step) fed the same tokens: both times, the largest
   logit difference (bf16: a figure; non-finite fails) and how many greedy picks agree.
3. ``kd``: ``losses.kd_loss`` (chunked, gradient computed in the forward pass) against the straightforward
   version (both log-softmaxes materialised, autograd) on [8·2048, 151936] logits, full vocabulary and top-64:
   time and peak memory (allocated and reserved) of loss + backward, and how far apart their losses and
   gradients are.
4. ``sample``: on-policy distillation's sampler (``sampling.sample_with_kv_cache``: transformers' KV cache,
   Gumbel-max draws from a CUDA generator) on the Qwen2 0.5B shape in bf16: 32 prompts of 249-256 tokens (left
   padded), 128 new tokens at temperature 1: sampled tokens per second, that the same seed draws the same tokens
   twice (asserted), and how many rows of a greedy decode equal transformers' greedy ``generate`` (a figure: bf16
   near-ties may flip a token).

Each part runs on its own: a part that fails prints its traceback, is recorded as failed and the next part
runs; the exit status is 1 if any part failed (``--fail-part PART`` makes one fail on purpose: a check of that
isolation). Figures go to the JSON file (``--json``; by default ``$OUT/gpu_check.json`` when ``OUT`` is set,
which the device tool returns) as each part or sub-case finishes. Every wait has a deadline within
``--time-limit`` (540 s) of the start. Expected run time on an H200: about 3 minutes (never measured: no GPU
has run it yet).

No Ray: the strategies and the channel run in plain processes (``multiprocessing`` spawn, each with its own
resource tracker, as a Ray actor has). The GPU machine has torch, transformers and safetensors but not
megatron-core, mbridge, einops or pydantic: their wheels travel with the working tree (8 wheels, 5.1 MB by
``du -sh``; once unpacked into ``wheels/site`` by a run, 25 MB in all, within the device tool's 64 MiB carry).
On a machine with network access:

    tests/gpu/fetch_wheels.sh                       # -> tests/gpu/wheels/*.whl (git-ignored)

then on the GPU machine (the device tool: carry ["tests/gpu/wheels"]):

    python3 tests/gpu/gpu_check.py                  # all three parts; --only ipc,kd  --json out.json

(README.md, "The GPU check", gives the device tool call and what each figure means.)

The script unpacks the wheels into ``<wheels>/site`` and appends it to ``sys.path`` (after the machine's own
packages: a carried typing-extensions never replaces the machine's); spawned processes get the same
``sys.path``, and ``PYTHONPATH`` gets only the trainer package. A missing wheel stops it before any GPU work,
naming the wheel and the command that fetches it; a requirement of a carried wheel in use that the machine's
package does not meet (pydantic 2.11.9 needs typing-extensions >= 4.12.2, megatron-core packaging >= 24.2) is
named at start.

transformers: the trainer needs >= 4.45 (pyproject.toml). mbridge 0.15.1 imports ``AutoConfig``,
``PreTrainedModel`` and ``transformers.utils.hub.cached_file`` (>= 4.22) when it is imported, and tries the GLM-4V
vision modules inside ``try`` (any version passes). With transformers 4.45.2, 4.57.6, 5.0.0 and 5.25.0 mbridge
imports and tests/unit/test_megatron_bridge.py (HF -> Megatron logits and back at tp 1, tp 2, pp 2, on CPU)
passes; the ``--smoke`` megatron part ran with 4.45.2 and 5.25.0. Before any GPU work the script checks the
machine's version (>= 4.45) and imports pydantic and mbridge; if that fails the megatron part is recorded as
failed with the reason, and the other parts still run.

``--smoke`` runs the same code on tiny shapes (on CPU when there is no GPU, shared memory instead of CUDA IPC):
a check that the script itself works, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue as queues
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
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
    "einops": "einops==0.8.2",
    "pydantic": "pydantic==2.11.9",
    "pydantic_core": "pydantic-core==2.33.2",
    "annotated_types": "annotated-types==0.8.0",
    "typing_inspection": "typing-inspection==0.4.2",
}
PARTS = ("ipc", "megatron", "kd", "sample")
# transformers for the Megatron path: the trainer's floor (pyproject.toml); mbridge 0.15.1 alone needs 4.22
# (transformers.utils.hub.cached_file). Versions the Megatron CPU tests (test_megatron_bridge.py) passed with:
TRANSFORMERS_MIN = (4, 45)
TRANSFORMERS_VERIFIED = ("4.45.2", "4.57.6", "5.0.0", "5.25.0")
TIME_LIMIT_S = 540.0  # every wait of the script ends within this many seconds of its start
SLOT_WAIT_S = 240.0  # how long a publish waits for the student to release a slot (the channel's default: 600 s)
GPU_WORK_CYCLES = 10_000_000  # torch.cuda._sleep cycles of each synthetic GPU work item (about 5 ms at 2 GHz)
STANDALONE_FORWARDS = 3  # teacher forwards timed while the student idles


# ------------------------------------------------------------------------------------------------ set-up


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run, of {','.join(PARTS)}")
    parser.add_argument("--wheels", type=Path, default=Path(os.environ.get("KUBEDISTILL_GPU_WHEELS", DEFAULT_WHEELS)),
                        help="folder of the carried wheels (default tests/gpu/wheels, or $KUBEDISTILL_GPU_WHEELS)")
    default_json = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None
    parser.add_argument("--json", type=Path, default=default_json,
                        help="write every figure to this JSON file as each part finishes (default: "
                             "$OUT/gpu_check.json when OUT is set, else none)")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                        help="the GPU's dense bf16 peak for MFU (default: H200, 989)")
    parser.add_argument("--repeats", type=int, default=5, help="hand-offs / KD runs per case (median shown)")
    parser.add_argument("--steps", type=int, default=5, help="megatron_train steps (the first is warm-up)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch (megatron)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence (megatron)")
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step (megatron)")
    parser.add_argument("--topk", type=int, default=64, help="teacher top-k in the megatron steps (0: full vocab)")
    parser.add_argument("--lr", type=float, default=5e-4,
                        help="student learning rate (constant, no warm-up), large enough for the loss to fall "
                             "visibly within --steps on the repeated batch")
    parser.add_argument("--full-vocab-seq", type=int, default=1024,
                        help="tokens per sequence of the megatron full-vocabulary sub-case (top-k 0, 4 micro-batches, "
                             "2 steps); 0 leaves it out")
    parser.add_argument("--teacher-memory-fraction", type=float, default=0.45,
                        help="torch.cuda.set_per_process_memory_fraction of the megatron teacher (0: unset)")
    parser.add_argument("--student-memory-fraction", type=float, default=0.45,
                        help="the same for the megatron student")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S,
                        help="seconds from the start within which every wait ends (a part still running then fails, "
                             "later parts are skipped)")
    parser.add_argument("--fail-part", choices=PARTS,
                        help="make this part fail on purpose (a check that a failed part is recorded and the others "
                             "still run); ipc and megatron fail in their student process, kd and sample in this one")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, measures nothing")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")
    for name in ("teacher_memory_fraction", "student_memory_fraction"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 1")
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
    """The repository's trainer package first, the wheels' site last; returns the wheels still missing.

    Spawned processes (``multiprocessing`` spawn) start from this ``sys.path`` as it is, so they see the same
    order. ``PYTHONPATH`` (for any other child) gets the trainer only: its entries go *before* site-packages,
    where the wheels' site would shadow the machine's own packages.
    """
    import importlib.util

    trainer = str(REPO / "trainer")
    if trainer not in sys.path:
        sys.path.insert(0, trainer)
    site = unpack_wheels(wheel_dir)
    if site is not None and str(site) not in sys.path:
        sys.path.append(str(site))  # after the machine's packages: the wheels only fill what is missing
    existing = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != trainer]
    os.environ["PYTHONPATH"] = os.pathsep.join([trainer, *existing])
    missing = []
    for module, wheel in WHEEL_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package of a dotted name is missing
            found = False
        if not found:
            missing.append(wheel)
    return missing


def unmet_requirements(site: Path | None) -> list[str]:
    """Requirements of the carried wheels in use (unpacked in ``site``, and not shadowed by the machine's own copy)
    that the distribution Python finds first does not meet. The machine's packages come first on ``sys.path``, so
    an older typing-extensions or packaging of the machine is the one imported even where a wheel needs a newer
    one; this names each such case."""
    if site is None or not site.is_dir():
        return []
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement

    problems = []
    for info in sorted(site.glob("*.dist-info")):
        carried = metadata.Distribution.at(info)
        try:
            first = metadata.distribution(carried.metadata["Name"])
        except metadata.PackageNotFoundError:  # not found by name (an odd folder name): count it as in use
            first = carried
        if Path(first.locate_file("")).resolve() != site.resolve():
            continue  # the machine has this package itself: the carried one is never imported
        for line in carried.requires or []:
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            who = f"{carried.metadata['Name']} {carried.version} needs {requirement}"
            try:
                found = metadata.version(requirement.name)  # the first on sys.path: what an import gets
            except metadata.PackageNotFoundError:
                problems.append(f"{who}; it is missing")
                continue
            if requirement.specifier and not requirement.specifier.contains(found, prereleases=True):
                problems.append(f"{who}; Python finds {requirement.name} {found} first")
    return problems


def _version_tuple(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as "4.57.6" or "5.0.0rc1" (the leading numbers)."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    return tuple(int(n) for n in match.groups() if n is not None) if match else ()


def transformers_problem(version: str) -> str | None:
    """Why the Megatron path cannot run with transformers ``version`` (None if it can)."""
    if _version_tuple(version) < TRANSFORMERS_MIN:
        return (f"transformers {version} is older than {'.'.join(map(str, TRANSFORMERS_MIN))}, the trainer's floor "
                f"(mbridge 0.15.1 works with {', '.join(TRANSFORMERS_VERIFIED)} here)")
    return None


def megatron_preflight(unmet: list[str]) -> str | None:
    """Before any GPU work: the machine's transformers fits mbridge 0.15.1, and pydantic and mbridge import
    (None: fine). ``unmet``: the carried wheels' unmet requirements, named if an import fails."""
    import transformers

    problem = transformers_problem(transformers.__version__)
    if problem:
        return problem
    if transformers.__version__ not in TRANSFORMERS_VERIFIED:
        print(f"gpu_check: transformers {transformers.__version__} is newer than or between the versions the "
              f"Megatron path was run with ({', '.join(TRANSFORMERS_VERIFIED)}); trying it")
    for module in ("pydantic", "mbridge"):  # mbridge imports AutoConfig, PreTrainedModel, utils.hub.cached_file
        try:
            __import__(module)
        except Exception as error:  # noqa: BLE001 - any import failure: report it, run the other parts
            return (f"{module} does not import (transformers {transformers.__version__}): {type(error).__name__}: "
                    f"{error}" + (f"; unmet requirements of the carried wheels: {'; '.join(unmet)}" if unmet else ""))
    return None


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


def teacher_credit(forwards: list[tuple[float, float]], start: float, end: float) -> tuple[float, float]:
    """How much teacher work fell inside [start, end]: (forwards credited, busy seconds). A forward counts in
    proportion to the part of its own duration that lies inside the interval (the same clock in both processes)."""
    credited = busy = 0.0
    for f_start, f_end in forwards:
        overlap = max(0.0, min(end, f_end) - max(start, f_start))
        busy += overlap
        if f_end > f_start:
            credited += overlap / (f_end - f_start)
    return credited, busy


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


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _free(device) -> int:
    """Device-wide free bytes (every process's memory counts); 0 on CPU."""
    import torch

    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0


def _memory(device) -> dict:
    """This process's CUDA memory and the device's free memory now (zeros on CPU), with the time."""
    import torch

    figures = {"at": time.monotonic(), "reserved": 0, "max_reserved": 0, "allocated": 0, "max_allocated": 0,
               "device_free": 0, "device_total": 0}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        figures.update(reserved=torch.cuda.memory_reserved(device), max_reserved=torch.cuda.max_memory_reserved(device),
                       allocated=torch.cuda.memory_allocated(device),
                       max_allocated=torch.cuda.max_memory_allocated(device), device_free=free, device_total=total)
    return figures


def _empty_cache(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()


def _warm_up(device) -> None:
    """Create the CUDA context (and load a first kernel) before anything is timed."""
    import torch

    if device.type == "cuda":
        torch.ones(1, device=device).add_(1).sum().item()


def _gpu_work(device, cycles: int) -> None:
    """Queue ``cycles`` of busy GPU work on the current stream without stalling the host (nothing on CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda._sleep(cycles)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _median(values, default=float("nan")) -> float:
    values = list(values)
    return statistics.median(values) if values else default


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def _table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _make_transport(kind: str, slots: int, release: str | None = None):
    """The teacher's side of ``kind``; ``release`` (CUDA IPC only) as the channel takes it; waits capped."""
    from distill_trainer.channel import make_transport

    transport = make_transport(kind, slots, release=release or "event")
    if hasattr(transport, "wait_seconds"):
        transport.wait_seconds = min(transport.wait_seconds, SLOT_WAIT_S)
    return transport


def _channel_bytes(transport) -> int:
    """Bytes the teacher's ring slots hold now (CUDA buffers or shared-memory segments)."""
    buffers = getattr(transport, "_buffers", None)
    if buffers is not None:
        return sum(b.numel() * b.element_size() for b in buffers if b is not None)
    segments = getattr(transport, "_segments", None) or []
    return sum(s.size for s in segments if s is not None)


def _tensor_bytes(tensors: dict) -> list[int]:
    return [t.numel() * t.element_size() for t in tensors.values()]


def _ring_bytes(tensors: dict, slots: int) -> int:
    """What the channel's ring of ``slots`` takes for ``tensors``."""
    from distill_trainer.channel import ring_bytes

    return ring_bytes(tensors, slots)


# ------------------------------------------------------------------------------------------------ processes


def _use_own_resource_tracker() -> None:
    """Give this (spawned) process its own multiprocessing resource tracker, as a Ray actor has one.

    Spawned children share their parent's tracker, whose registry of shared-memory names is one set: the
    student's unregistering of the teacher's segments (``channel._attach_segment``: the reader must not unlink
    them at exit) would remove the teacher's own registrations, and the teacher's ``unlink`` then makes the
    tracker print a KeyError traceback. The module-level ``register``/``unregister`` are bound methods of the
    module's tracker instance, so they are rebound too (replacing the instance alone changes nothing).
    """
    from multiprocessing import resource_tracker

    tracker = resource_tracker.ResourceTracker()
    resource_tracker._resource_tracker = tracker
    for name in ("ensure_running", "register", "unregister", "getfd"):
        setattr(resource_tracker, name, getattr(tracker, name))


@dataclass
class _Link:
    """The queues between the two processes of a part and this one: handles (teacher -> student), to_teacher
    (student -> teacher: "go on"), results (both -> parent: (role, key, payload), or ("error", role, traceback))."""

    handles: object
    to_teacher: object
    results: object


def _quiet_known_warnings() -> None:
    """Megatron's and mbridge's import-time notes that Apex / TransformerEngine are absent (known here; they would
    push the figures out of the device tool's 12,000-character output tail)."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine)( and Apex)? (is|are) not installed.*")


def _child(role: str, target, fail: bool, link: _Link, *args) -> None:
    """A process of the check: own resource tracker; a failure is reported to the parent, then re-raised."""
    _use_own_resource_tracker()
    _quiet_known_warnings()
    try:
        if fail:
            raise RuntimeError(f"deliberate failure of the {role} process (--fail-part)")
        target(link, *args)
    except BaseException:
        link.results.put(("error", role, traceback.format_exc()))
        raise


class _Pair:
    """A teacher and a student process; ``get(role, key)`` waits for one of their results, failing as soon as
    either reports an error or dies, or at the deadline."""

    def __init__(self, teacher, student, teacher_args: tuple, student_args: tuple, deadline: float,
                 fail_student: bool = False):
        ctx = mp.get_context("spawn")
        self.link = _Link(ctx.Queue(), ctx.Queue(), ctx.Queue())
        self.deadline = deadline
        self.pending: dict = {}
        self.processes = [
            ctx.Process(target=_child, args=("teacher", teacher, False, self.link, *teacher_args), name="teacher"),
            ctx.Process(target=_child, args=("student", student, fail_student, self.link, *student_args),
                        name="student"),
        ]

    def __enter__(self) -> "_Pair":
        for process in self.processes:
            process.start()
        return self

    def get(self, role: str, key: str):
        while (role, key) not in self.pending:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {role} result for {key!r} within the time limit (--time-limit)")
            try:
                item = self.link.results.get(timeout=min(1.0, remaining))
            except queues.Empty:
                ended = [p for p in self.processes if p.exitcode is not None]
                if any(p.exitcode != 0 or p.name == role for p in ended):
                    states = ", ".join(f"{p.name} exit {p.exitcode}" for p in ended)
                    raise RuntimeError(f"a process ended before sending its {key!r} result ({states}); its "
                                       f"traceback is above") from None
                continue
            if item[0] == "error":
                raise RuntimeError(f"the {item[1]} process failed:\n{item[2]}")
            self.pending[(item[0], item[1])] = item[2]
        return self.pending.pop((role, key))

    def __exit__(self, exc_type, exc, tb) -> None:
        for process in reversed(self.processes):  # student first
            # On an error, a moment for a failed process to finish printing its traceback; the other, waiting on
            # it, is then stopped.
            process.join(timeout=max(1.0, min(60.0, self.deadline - time.monotonic())) if exc_type is None else 2.0)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)


# ------------------------------------------------------------------------------------------------ 1. ipc


def _ipc_tensors(shape: tuple[int, ...], topk: bool, device):
    import torch

    generator = torch.Generator(device=device).manual_seed(0)
    values = torch.randn(shape, device=device, generator=generator)
    tensors = {"values": values}
    if topk:
        tensors["indices"] = torch.randint(0, 151936, shape, device=device, dtype=torch.int32, generator=generator)
    return tensors


def _ipc_teacher(link: _Link, runs: list[dict], cases: list[tuple]) -> None:
    import torch

    device = _device()
    _warm_up(device)
    current, tensors = None, None
    for run in runs:
        if run["case"] != current:
            tensors = None
            _empty_cache(device)
            _, shape, topk = cases[run["case"]]
            tensors, current = _ipc_tensors(shape, topk, device), run["case"]
        _reset_peak(device)
        transport = _make_transport(run["kind"], 2, run["release"])
        publish, waits = [], []
        for step in range(run["publishes"]):
            tensors["values"].add_(1.0)  # new contents every step: the student must see them
            checksum = float(tensors["values"].sum(dtype=torch.float64))  # (a host sync)
            start = time.monotonic()
            handle = transport.publish(tensors)
            publish.append(time.monotonic() - start)
            waits.append(transport.last_wait_seconds)
            link.handles.put((handle, checksum))
            if step == 0:
                link.to_teacher.get()  # the student has measured its first open while nothing else allocated
        link.to_teacher.get()  # the student is done with this run and has closed its receiver
        channel = _channel_bytes(transport)
        memory = _memory(device)
        transport.close()
        link.results.put(("teacher", run["key"], {"publish": publish, "wait": waits, "channel_bytes": channel,
                                                  "memory": memory}))


def _ipc_student(link: _Link, runs: list[dict], cycles: int) -> None:
    import torch
    from distill_trainer.channel import LogitsReceiver

    device = _device()
    _warm_up(device)  # the CUDA context exists before the first open is timed
    gpu_work_s = 0.0
    if device.type == "cuda":
        _gpu_work(device, cycles)  # loads the kernel
        _sync(device)
        start = time.monotonic()
        _gpu_work(device, cycles)
        _sync(device)
        gpu_work_s = time.monotonic() - start
    for run in runs:
        _reset_peak(device)
        receiver = LogitsReceiver()
        opened, read, correct, zero_copy, by_slot, free_drop = [], [], [], [], {}, 0
        for step in range(run["repeats"]):
            handle, checksum = link.handles.get()
            free_before = _free(device) if step == 0 else 0
            start = time.monotonic()
            tensors = receiver.open(handle)
            if handle.transport != "cuda_ipc":
                tensors = {n: t.to(device) for n, t in tensors.items()}  # what the worker does: targets to its device
            _sync(device)
            opened.append(time.monotonic() - start)
            if step == 0:
                free_drop = free_before - _free(device)
                link.to_teacher.put("opened")
            buffer = receiver.buffer_of(handle) if hasattr(receiver, "buffer_of") else None
            if buffer is not None:  # CUDA IPC: every view lies in the rebuilt buffer, at its tensor's offset
                zero_copy.append(all(tensors[spec.name].data_ptr() == buffer.data_ptr() + spec.offset
                                     for spec in handle.tensors))
                by_slot.setdefault(handle.slot, set()).add(tensors["values"].data_ptr())
            start = time.monotonic()
            total = float(tensors["values"].sum(dtype=torch.float64))  # one full read of the teacher's values
            read.append(time.monotonic() - start)
            correct.append(_same(total, checksum))
            del tensors
            receiver.release(handle)
        steps = []
        for _ in range(run["repeats"] if run["synthetic"] else 0):
            handle, checksum = link.handles.get()
            _sync(device)
            start = time.monotonic()
            tensors = receiver.open(handle)
            if handle.transport != "cuda_ipc":
                tensors = {n: t.to(device) for n, t in tensors.items()}
            _gpu_work(device, cycles)  # the student's forward, still running when its loss reads the targets
            total = tensors["values"].sum(dtype=torch.float64)  # the read, queued behind that work
            del tensors
            before = time.monotonic()
            receiver.release(handle)  # the teacher may rewrite the slot from now on
            release_s = time.monotonic() - before
            _gpu_work(device, cycles)  # the rest of the step (backward, optimizer), launched after the release
            launched_s = time.monotonic() - start
            _sync(device)
            steps.append({"release": release_s, "launch": launched_s, "wall": time.monotonic() - start,
                          "correct": _same(float(total), checksum)})
        receiver.close()
        link.results.put(("student", run["key"], {
            "open": opened, "read": read, "correct": correct, "zero_copy": zero_copy,
            "addresses_per_slot": {slot: len(ptrs) for slot, ptrs in by_slot.items()}, "free_drop": free_drop,
            "steps": steps, "gpu_work_s": gpu_work_s, "memory": _memory(device)}))
        link.to_teacher.put("done")


def ipc_check(args, part: "_PartRecord") -> None:
    device = _device()
    cases = [("top-k [8,2048,64] fp32+int32", (8, 2048, 64), True),
             ("full [8,2048,151936] fp32", (8, 2048, 151936), False)]
    if args.smoke:
        cases = [("top-k [2,16,8]", (2, 16, 8), True), ("full [2,16,512]", (2, 16, 512), False)]
    modes = [("cuda_ipc", "event"), ("cuda_ipc", "stream"), ("shared_memory", None)] if device.type == "cuda" \
        else [("shared_memory", None)]
    runs, skipped = [], []
    for index, (name, shape, topk) in enumerate(cases):
        nbytes = math.prod(shape) * (8 if topk else 4)
        for kind, release in modes:
            key = f"{name} / {kind}" + (f" / release={release}" if release else "")
            free_shm = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
            if kind == "shared_memory" and free_shm < 2.6 * nbytes:
                skipped.append([name, kind, f"skipped: /dev/shm has {_gib(free_shm)} free, needs {_gib(2.6 * nbytes)}"])
                part.record(key, {"skipped": skipped[-1][-1]})
                continue
            # The synthetic step runs on CUDA IPC (both release modes); in a CPU smoke run on shared memory, so
            # that its code runs somewhere.
            synthetic = kind == "cuda_ipc" or device.type != "cuda"
            # Shared memory moves GBs through the host at a few GB/s: three hand-offs of the big case are enough.
            repeats = min(args.repeats, 3) if kind == "shared_memory" and nbytes > 2**30 else args.repeats
            runs.append({"key": key, "case": index, "kind": kind, "release": release, "bytes": nbytes,
                         "synthetic": synthetic, "repeats": repeats, "publishes": repeats * (2 if synthetic else 1)})
    hand_off_rows, step_rows = [], []
    try:
        with _Pair(_ipc_teacher, _ipc_student, (runs, cases), (runs, GPU_WORK_CYCLES), args.deadline,
                   fail_student=args.fail_part == "ipc") as pair:
            for run in runs:
                student = pair.get("student", run["key"])
                teacher = pair.get("teacher", run["key"])
                figure = _ipc_figures(run, teacher, student)
                part.record(run["key"], figure)
                name = cases[run["case"]][0]
                mode = run["kind"] + (f"/{run['release']}" if run["release"] else "")
                hand_off = figure["publish_s"] + figure["open_s"]
                hand_off_rows.append([
                    name, mode, _ms(figure["publish_s"]), _ms(figure["slot_wait_s"]), _ms(figure["first_open_s"]),
                    _ms(figure["open_s"]), f"{run['bytes'] / hand_off / 1e9:.0f} GB/s", _ms(figure["read_s"]),
                    _na(figure["zero_copy"]), _na(figure["one_address_per_slot"]), _gib(figure["free_drop_bytes"]),
                    figure["contents_ok"], _gib(figure["teacher_max_reserved"]), _gib(figure["student_max_reserved"])])
                if figure["step"]:
                    step = figure["step"]
                    step_rows.append([name, mode, _ms(figure["gpu_work_s"]), _ms(step["release_s"]),
                                      _ms(step["launch_s"]), _ms(step["wall_s"]), step["contents_ok"]])
    finally:
        if hand_off_rows or skipped:
            _table(f"1. teacher -> student hand-off, two processes, one GPU (median of {args.repeats}; 3 for shared memory "
                   f"above 1 GiB)",
                   ["tensors", "transport", "publish", "slot wait", "1st open", "open", "rate", "student read",
                    "zero-copy", "1 addr/slot", "free drop", "contents ok", "teacher rsv", "student rsv"],
                   hand_off_rows + skipped)
            print("  publish = teacher copy into its ring slot + stream sync, without waiting for a free slot (slot wait:\n"
                  "  how long it waited for the student's release); 1st open = first open of a run, after the student's\n"
                  "  CUDA warm-up (CUDA IPC: rebuilds the slot's export); open = later opens (CUDA IPC: views; shared\n"
                  "  memory: includes the copy to the GPU); rate = bytes / (publish + open); zero-copy = every view at the\n"
                  "  rebuilt buffer's address + its offset; 1 addr/slot = each of the 2 ring slots showed one address;\n"
                  "  free drop = fall of device-wide free memory (mem_get_info) over the first open (CUDA IPC: ~0, shared\n"
                  "  memory: the tensors' size); rsv = each process's max_memory_reserved")
        if step_rows:
            _table(f"1b. synthetic student step: GPU work, read of the targets, release, GPU work (median of {args.repeats})",
                   ["tensors", "transport/release", "GPU work", "release()", "launch", "step", "contents ok"], step_rows)
            print("  release() = host time of the student's release call (event: records an event; stream: waits for its\n"
                  "  stream, i.e. for the GPU work and the read); launch = host time to queue the whole step; step = until\n"
                  "  the GPU finished it; contents ok = the read saw its own step's contents although the teacher rewrites\n"
                  "  the slot as soon as the release lets it")


def _na(value) -> str:
    return "n/a" if value is None else str(value)


def _ipc_figures(run: dict, teacher: dict, student: dict) -> dict:
    cuda, repeats = run["kind"] == "cuda_ipc", run["repeats"]
    phase_a = slice(0, repeats)  # the hand-off publishes; the synthetic steps' publishes wait on the GPU too
    publish = [p - w for p, w in zip(teacher["publish"][phase_a], teacher["wait"][phase_a])]
    slots = student["addresses_per_slot"]
    figure = {
        "bytes": run["bytes"],
        "repeats": repeats,
        "publish_s": _median(publish),
        "slot_wait_s": _median(teacher["wait"][phase_a]),
        "first_open_s": student["open"][0],
        "open_s": _median(student["open"][1:] or student["open"]),
        "read_s": _median(student["read"]),
        "zero_copy": all(student["zero_copy"]) and len(student["zero_copy"]) == repeats if cuda else None,
        "one_address_per_slot": (len(slots) == min(2, repeats) and all(n == 1 for n in slots.values())) if cuda else None,
        "addresses_per_slot": slots,
        "free_drop_bytes": student["free_drop"],
        "contents_ok": all(student["correct"]),
        "channel_bytes": teacher["channel_bytes"],
        "teacher_max_reserved": teacher["memory"]["max_reserved"],
        "student_max_reserved": student["memory"]["max_reserved"],
        "device_free_at_end": student["memory"]["device_free"],
        "gpu_work_s": student["gpu_work_s"],
        "step": None,
    }
    if student["steps"]:
        figure["step"] = {
            "release_s": _median(s["release"] for s in student["steps"]),
            "launch_s": _median(s["launch"] for s in student["steps"]),
            "wall_s": _median(s["wall"] for s in student["steps"]),
            "contents_ok": all(s["correct"] for s in student["steps"]),
        }
    return figure


# ------------------------------------------------------------------------------------------------ 2. megatron


def _write_model(directory: Path, shape: ModelShape) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=32768,
        tie_word_embeddings=shape.tied, rms_norm_eps=1e-6, rope_theta=1000000.0, attention_dropout=0.0,
    )
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar in the output
    torch.manual_seed(0)
    # transformers < 4.56 names the argument torch_dtype.
    dtype_arg = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_config(config, **{dtype_arg: torch.bfloat16})
    model.save_pretrained(directory)


class _Fields:
    """Config fields as given; any other field of ``model`` (a pydantic class of ``distill_trainer.config``, by
    name) is that class's default, so fields the strategies start to read later need no change here."""

    def __init__(self, model: str, **fields):
        self.__dict__.update(fields, _model=model)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        from distill_trainer import config

        fields = getattr(config, self._model).model_fields
        if name not in fields:
            raise AttributeError(name)
        return fields[name].get_default(call_default_factory=True)


def _fake_config(model_dir: str, topk: int, steps: int, dtype: str, lr: float):
    # A constant learning rate without warm-up: step 1 already changes the weights.
    training_args = _Fields("TrainingArgs", learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
                            weight_decay=0.01, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999)
    model_args = _Fields("ModelArgs", dtype=dtype)
    strategy_args = _Fields("StrategyArgs", sequence_parallel=False)
    return _Fields("DistillConfig", student_pretrain=model_dir, teacher_pretrain=model_dir, seed=0, logits_topk=topk,
                   max_steps=steps,
                   student=_Fields("WorkerConfig", model_args=model_args, training_args=training_args,
                                   strategy_args=strategy_args),
                   teacher=_Fields("WorkerConfig", model_args=model_args, strategy_args=strategy_args))


def _batches(case: dict, tokenizer_vocab: int) -> list[dict]:
    """A step's micro-batches, the same in both processes and in every step: random tokens, labels = the next token."""
    import torch

    generator = torch.Generator().manual_seed(1000)
    out = []
    for _ in range(case["micro_batches"]):
        ids = torch.randint(0, tokenizer_vocab, (case["batch"], case["seq"]), generator=generator)
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _megatron_rank(settings: dict, memory_fraction: float):
    import torch
    from distill_trainer.models import VocabInfo
    from distill_trainer.strategies.base import RankContext

    device = _device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if memory_fraction > 0:
            torch.cuda.set_per_process_memory_fraction(memory_fraction, device)
        _warm_up(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    config = _fake_config(settings["model_dir"], settings["cases"][0]["topk"], settings["cases"][0]["steps"],
                          settings["dtype"], settings["lr"])
    vocab = VocabInfo(size=settings["tokenizer_vocab"], eos_token_id=0, pad_token_id=0)
    return device, config, vocab, RankContext(device=device)


def _megatron_teacher(link: _Link, settings: dict) -> None:
    from distill_trainer.strategies.base import MicroBatch
    from distill_trainer.strategies.megatron import MegatronInferStrategy

    device, config, vocab, rank = _megatron_rank(settings, settings["teacher_memory_fraction"])
    strategy = MegatronInferStrategy(config, rank, vocab)
    for case in settings["cases"]:
        strategy.topk = case["topk"]
        batches = [MicroBatch(b["input_ids"], b["attention_mask"], b["labels"])
                   for b in _batches(case, settings["tokenizer_vocab"])]
        slots = 2 * case["micro_batches"]  # channel_slots of a Megatron student: the step it holds + the next
        _empty_cache(device)
        _reset_peak(device)
        transport = _make_transport(settings["kind"], slots)
        forwards, publish, waits, memory, tensor_bytes, ring = [], [], [], [], [], 0
        for _ in range(case["steps"] + 2):  # two steps more than the student takes: it never runs out of work
            for batch in batches:
                _sync(device)
                start = time.monotonic()
                target = strategy.forward(batch)
                _sync(device)
                forwards.append((start, time.monotonic()))
                tensors = target.tensors()
                tensor_bytes, ring = _tensor_bytes(tensors), _ring_bytes(tensors, slots)
                start = time.monotonic()
                handle = transport.publish(tensors)
                publish.append(time.monotonic() - start)
                waits.append(transport.last_wait_seconds)
                memory.append(_memory(device))
                link.handles.put((handle, target.rows))
                del target, tensors
        link.to_teacher.get()  # the student's loop is over: it idles while the teacher's forward is timed alone
        standalone = []
        for _ in range(STANDALONE_FORWARDS):
            _sync(device)
            start = time.monotonic()
            strategy.forward(batches[0])
            _sync(device)
            standalone.append(time.monotonic() - start)
        channel = _channel_bytes(transport)
        end_memory = _memory(device)
        transport.close()
        link.results.put(("teacher", case["name"], {
            "forwards": forwards, "publish": publish, "wait": waits, "memory": memory, "end_memory": end_memory,
            "standalone": standalone, "slots": slots, "channel_bytes": channel, "tensor_bytes": tensor_bytes,
            "ring_bytes": ring}))


def _probe_parameter(module):
    """A student weight matrix whose change after a step shows that the optimizer wrote the model's weights."""
    named = [(n, p) for n, p in module.named_parameters() if p.dim() == 2 and "embedding" not in n]
    return named[0] if named else next(iter(module.named_parameters()))


def _megatron_student(link: _Link, settings: dict) -> None:
    from distill_trainer.channel import LogitsReceiver
    from distill_trainer.distill_loss import LossConfig, TeacherTargets, make_loss_fn
    from distill_trainer.strategies.base import MicroBatch
    from distill_trainer.strategies.megatron import MegatronTrainStrategy

    device, config, vocab, rank = _megatron_rank(settings, settings["student_memory_fraction"])
    strategy = MegatronTrainStrategy(config, rank, vocab)
    probe_name, probe = _probe_parameter(strategy.module)
    for case in settings["cases"]:
        batches = _batches(case, settings["tokenizer_vocab"])
        loss_config = LossConfig(distill_loss_weight=0.5, logits_topk=case["topk"])
        normalizer = float(sum(int((b["labels"] != -100).sum()) for b in batches))
        receiver = LogitsReceiver()
        _empty_cache(device)
        _reset_peak(device)
        steps = []
        previous_end = time.monotonic()
        for step in range(case["steps"]):
            items = [link.handles.get() for _ in batches]
            start = time.monotonic()
            targets = [TeacherTargets.from_tensors(receiver.open(handle)).to(device) for handle, _ in items]
            micro = [MicroBatch(b["input_ids"], b["attention_mask"], b["labels"], t) for b, t in zip(batches, targets)]
            if step == 0:
                before = probe.detach().float().clone()
            stats = strategy.forward_backward(micro, make_loss_fn(loss_config, normalizer))
            for handle, _ in items:
                receiver.release(handle)  # as the worker: after forward_backward, before the optimizer step
            update = strategy.optimizer_step()
            _sync(device)
            end = time.monotonic()
            record = {"wall_start": previous_end, "start": start, "end": end, "loss": stats.loss,
                      "ce": stats.ce_sum / max(stats.label_tokens, 1), "kd": stats.kd_sum / max(stats.label_tokens, 1),
                      "loss_finite": stats.loss_finite, "grad_norm": update.grad_norm, "applied": update.applied,
                      "lr": update.lr, "memory": _memory(device)}
            if step == 0:
                record["probe_max_change"] = float((probe.detach().float() - before).abs().max())
                del before
            steps.append(record)
            previous_end = end
            del targets, micro
        for _ in range(2 * len(batches)):  # the handles of the teacher's two extra steps
            link.handles.get()
        receiver.close()
        link.results.put(("student", case["name"], {"steps": steps, "probe": probe_name,
                                                     "end_memory": _memory(device)}))
        link.to_teacher.put("done")
    _empty_cache(device)
    link.results.put(("student", "sample", _megatron_sample_figures(strategy, settings, device)))


def _megatron_sample_figures(strategy, settings: dict, device) -> dict:
    """On-policy sampling on the trained student's rank: ``sample`` (Megatron's static-batch inference with its KV
    cache) at temperature 1, twice with one seed (the same tokens?), its tokens/s; then greedy decoding with the
    KV-cached stepper against the no-cache stepper (a whole forward of the sequence so far each step) fed the same
    tokens: the largest logit difference over the steps, whether their greedy picks agree, and both times."""
    import torch
    from distill_trainer.sampling import SamplingParams
    from distill_trainer.strategies.megatron import _MegatronKVStepper, _MegatronStepper

    rows, width, new_tokens, compared = settings["sample"]
    generator = torch.Generator().manual_seed(0)
    # Ids from 1: id 0 is the EOS here, rarely drawn by a random model, so rows run to new_tokens.
    prompts = [torch.randint(1, settings["tokenizer_vocab"], (width,), generator=generator).tolist()
               for _ in range(rows)]

    def draw(seed: int, params: SamplingParams):
        _sync(device)
        start = time.monotonic()
        completions = strategy.sample(prompts, params, 0, 0, seed)
        _sync(device)
        return completions, time.monotonic() - start

    draw(0, SamplingParams(2))  # warm-up
    first, seconds = draw(7, SamplingParams(new_tokens))
    second, _ = draw(7, SamplingParams(new_tokens))
    same = [c.tokens for c in first] == [c.tokens for c in second]
    tokens = sum(len(c.tokens) for c in first)

    model = strategy._sampling_model()
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ids = torch.tensor(prompts, dtype=torch.long, device=device)
            _sync(device)
            start = time.monotonic()
            cached = _MegatronKVStepper(strategy, model, ids, compared)
            logits, picks = [cached.start()], []
            for _ in range(compared - 1):
                picks.append(logits[-1].argmax(-1))
                logits.append(cached.step(picks[-1]))
            _sync(device)
            cached_seconds = time.monotonic() - start
            del cached
            start = time.monotonic()
            plain = _MegatronStepper(strategy, model, ids)
            reference = [plain.start()] + [plain.step(pick) for pick in picks]
            _sync(device)
            plain_seconds = time.monotonic() - start
            diffs = [float((a - b).abs().max()) for a, b in zip(logits, reference)]
            agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(logits, reference))
    finally:
        model.train(training)
    return {"rows": rows, "prompt_tokens": width, "new_tokens": new_tokens, "sampled_tokens": tokens,
            "seconds": seconds, "tokens_per_second": tokens / seconds, "same_seed_same_tokens": same,
            "compared_steps": compared, "kv_seconds": cached_seconds, "no_cache_seconds": plain_seconds,
            "max_logit_diff": max(diffs), "logit_diff_by_step": diffs, "greedy_picks_agree": agree,
            "greedy_picks": rows * compared}


def _megatron_cases(args) -> list[dict]:
    batch, seq, micro = (2, 32, 2) if args.smoke else (args.batch, args.seq, args.micro_batches)
    cases = [dict(name=f"top-k {args.topk}" if args.topk else "full vocabulary", topk=args.topk, batch=batch, seq=seq,
                  micro_batches=micro, steps=args.steps, mfu=True)]
    full_seq = (16 if args.smoke else args.full_vocab_seq)
    if full_seq:
        cases.append(dict(name="full vocabulary, 4 micro-batches", topk=0, batch=batch, seq=full_seq, micro_batches=4,
                          steps=2, mfu=False))
    return cases


def megatron_check(args, part: "_PartRecord") -> None:
    shape = TINY if args.smoke else QWEN2_0_5B
    device = _device()
    cases = _megatron_cases(args)
    fractions = (args.teacher_memory_fraction, args.student_memory_fraction) if device.type == "cuda" else (0.0, 0.0)
    with tempfile.TemporaryDirectory(prefix="gpu_check_model_") as model_dir:
        start = time.monotonic()
        _write_model(Path(model_dir), shape)
        part.record("model_write_s", time.monotonic() - start)
        print(f"\n(random Qwen2-shaped model {asdict(shape)} written in {time.monotonic() - start:.0f} s; memory "
              f"fractions: teacher {fractions[0]:g}, student {fractions[1]:g} of "
              f"{_gib(_total_memory(device))}; student lr {args.lr:g} constant; the same batch every step)")
        part.record("memory_fraction", {"teacher": fractions[0], "student": fractions[1]})
        settings = dict(model_dir=model_dir, cases=cases, lr=args.lr,
                        tokenizer_vocab=shape.vocab - 290 if shape.vocab > 1000 else shape.vocab,
                        dtype="bf16" if device.type == "cuda" else "fp32",
                        kind="cuda_ipc" if device.type == "cuda" else "shared_memory",
                        teacher_memory_fraction=fractions[0], student_memory_fraction=fractions[1],
                        sample=(2, 8, 6, 4) if args.smoke else (16, 256, 128, 32))
        with _Pair(_megatron_teacher, _megatron_student, (settings,), (settings,), args.deadline,
                   fail_student=args.fail_part == "megatron") as pair:
            for case in cases:
                student = pair.get("student", case["name"])
                teacher = pair.get("teacher", case["name"])
                figures = _megatron_figures(case, shape, teacher, student, settings, args.peak_tflops)
                part.record(case["name"], figures)
                _print_megatron(case, figures, shape, settings, args)
            sample = pair.get("student", "sample")
        part.record("sample", sample)
        _table(f"2b. Megatron sampling on the student's rank ({settings['dtype']}): {sample['rows']} prompts of "
               f"{sample['prompt_tokens']} tokens, {sample['new_tokens']} new tokens at temperature 1, Megatron's "
               f"KV cache; then {sample['compared_steps']} greedy steps, KV cache against a whole forward per step",
               ["sample", "tokens/s", "same seed, same tokens", "KV cache", "no cache", "max |logit diff|",
                "greedy picks agree"],
               [[_ms(sample["seconds"]), f"{sample['tokens_per_second']:,.0f}", str(sample["same_seed_same_tokens"]),
                 _ms(sample["kv_seconds"]), _ms(sample["no_cache_seconds"]), f"{sample['max_logit_diff']:.3g}",
                 f"{sample['greedy_picks_agree']}/{sample['greedy_picks']}"]])
        if not sample["same_seed_same_tokens"]:
            raise AssertionError("Megatron sampling: the same seed drew different tokens on this device")
        if not all(math.isfinite(d) for d in sample["logit_diff_by_step"]):
            raise AssertionError(f"Megatron sampling: non-finite logits ({sample['logit_diff_by_step']})")


def _total_memory(device) -> int:
    import torch

    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0


def _megatron_figures(case, shape, teacher, student, settings, peak_tflops) -> dict:
    steps = student["steps"]
    tokens = case["batch"] * case["seq"] * case["micro_batches"]
    forward = forward_flops_per_token(shape, case["seq"])
    student_flops = 3 * forward * tokens
    teacher_flops = forward * case["batch"] * case["seq"]  # one micro-batch forward
    ends = [s["end"] for s in steps]
    per_step, credited_total, busy_total = [], 0.0, 0.0
    for k in range(1, len(steps)):  # steps 2..: step k's wall time runs from the end of step k-1
        credited, busy = teacher_credit(teacher["forwards"], ends[k - 1], ends[k])
        credited_total += credited
        busy_total += busy
        per_step.append({"wall_s": ends[k] - ends[k - 1], "student_s": steps[k]["end"] - steps[k]["start"],
                         "teacher_forwards": credited, "teacher_busy_share": busy / (ends[k] - ends[k - 1])})
    window = ends[-1] - ends[0] if len(ends) > 1 else float("nan")
    counted = len(steps) - 1
    flops = counted * student_flops + credited_total * teacher_flops
    # The teacher's forward while the student trains: the forwards that ran within steps 2.. (all, if none did).
    shared = [e - s for s, e in teacher["forwards"] if len(ends) > 1 and ends[0] <= s and e <= ends[-1]]
    shared = shared or [e - s for s, e in teacher["forwards"]]
    # The teacher's memory when student step 1 ended: its last sample before then (it samples after each publish).
    teacher_at_step1 = [m for m in teacher["memory"] if m["at"] <= ends[0]] or teacher["memory"][:1]
    samples = [m["device_free"] for m in teacher["memory"]] + [s["memory"]["device_free"] for s in steps]
    loss = [s["loss"] for s in steps]
    grad_norms = [s["grad_norm"] for s in steps]
    figures = {
        "topk": case["topk"], "batch": case["batch"], "seq": case["seq"], "micro_batches": case["micro_batches"],
        "tokens_per_step": tokens, "transport": settings["kind"], "dtype": settings["dtype"], "steps": len(steps),
        "step_wall_s": _median(p["wall_s"] for p in per_step),
        "student_step_s": _median(p["student_s"] for p in per_step),
        "tokens_per_s": counted * tokens / window,
        "teacher_forward_shared_s": _median(shared),
        "teacher_forward_alone_s": _median(teacher["standalone"]),
        "teacher_forwards_credited": credited_total, "teacher_forwards_needed": counted * case["micro_batches"],
        "teacher_busy_share": busy_total / window,
        "per_step": per_step,
        "model_tflops_per_step": (student_flops + case["micro_batches"] * teacher_flops) / 1e12,
        "mfu": model_flops_utilization(flops, window, peak_tflops),
        "mfu_student_only": model_flops_utilization(counted * student_flops, window, peak_tflops),
        "peak_tflops_used": peak_tflops,
        "publish_s": _median(p - w for p, w in zip(teacher["publish"], teacher["wait"])),
        "slot_wait_s": _median(teacher["wait"]),
        "memory_after_step1": {"student": steps[0]["memory"], "teacher": teacher_at_step1[-1]},
        "student_max_reserved": student["end_memory"]["max_reserved"],
        "student_max_allocated": student["end_memory"]["max_allocated"],
        "teacher_max_reserved": teacher["end_memory"]["max_reserved"],
        "teacher_max_allocated": teacher["end_memory"]["max_allocated"],
        "device_free_min_sampled": min(samples) if samples else 0,
        "device_total": steps[0]["memory"]["device_total"],
        "channel": {"slots": teacher["slots"], "tensor_bytes": sum(teacher["tensor_bytes"]),
                    "slot_bytes": teacher["ring_bytes"] // teacher["slots"], "share_bytes": teacher["ring_bytes"],
                    "measured_bytes": teacher["channel_bytes"]},
        "loss": loss, "ce": [s["ce"] for s in steps], "kd": [s["kd"] for s in steps], "grad_norm": grad_norms,
        "applied": [s["applied"] for s in steps], "lr": [s["lr"] for s in steps],
        "loss_and_grad_finite": all(math.isfinite(x) for x in loss + grad_norms) and all(s["loss_finite"] for s in steps),
        "probe_parameter": student["probe"], "probe_max_change_step1": steps[0]["probe_max_change"],
        "parameter_changed": steps[0]["probe_max_change"] > 0,
        "loss_falls": len(loss) > 1 and loss[-1] < loss[0],
    }
    return figures


def _print_megatron(case, figures, shape, settings, args) -> None:
    title = (f"2. megatron_train: Qwen2 {'tiny' if args.smoke else '0.5B'} shape, {case['micro_batches']} x "
             f"[{case['batch']}, {case['seq']}] per step, {case['name']}, teacher (megatron_infer) in another process, "
             f"{settings['kind']}, {figures['steps']} steps")
    step1 = figures["memory_after_step1"]
    channel = figures["channel"]
    if case["mfu"]:
        _table(title + " (median of steps 2..)",
               ["step wall", "student step", "tokens/s", "model TFLOP/step", "MFU", "student-only MFU",
                "teacher busy", "teacher fwd alone", "teacher fwd shared"],
               [[_ms(figures["step_wall_s"]), _ms(figures["student_step_s"]), f"{figures['tokens_per_s']:,.0f}",
                 f"{figures['model_tflops_per_step']:.1f}", f"{figures['mfu']:.1%}", f"{figures['mfu_student_only']:.1%}",
                 f"{figures['teacher_busy_share']:.0%}", _ms(figures["teacher_forward_alone_s"]),
                 _ms(figures["teacher_forward_shared_s"])]])
        print(f"  MFU = (3 x student forward FLOPs x steps + credited teacher micro-batch forwards x their FLOPs) / wall "
              f"time of steps 2..{figures['steps']} / {args.peak_tflops:g} TFLOP/s; forward = "
              f"{forward_flops_per_token(shape, case['seq']) / 1e9:.2f} GFLOP/token (2 x "
              f"{matmul_params(shape) / 1e6:.0f}M matmul weights + attention over {case['seq']} tokens)")
        print(f"  teacher forwards inside steps 2..: {figures['teacher_forwards_credited']:.2f} of "
              f"{figures['teacher_forwards_needed']} needed (per step: "
              + ", ".join(f"{p['teacher_forwards']:.2f}" for p in figures["per_step"])
              + "); teacher busy = share of the wall time in which a teacher forward ran; fwd alone = one micro-batch "
                "forward while the student idles, shared = while the student trains")
    else:
        print(f"\n{title}")
        print(f"  step 2..: wall {_ms(figures['step_wall_s'])}, student step {_ms(figures['student_step_s'])}; teacher "
              f"micro-batch forward alone {_ms(figures['teacher_forward_alone_s'])}, while the student trains "
              f"{_ms(figures['teacher_forward_shared_s'])}")
    _table("  memory (GiB)", ["", "reserved after step 1", "allocated after step 1", "max reserved", "max allocated"],
           [["student", _gib(step1["student"]["reserved"]), _gib(step1["student"]["allocated"]),
             _gib(figures["student_max_reserved"]), _gib(figures["student_max_allocated"])],
            ["teacher", _gib(step1["teacher"]["reserved"]), _gib(step1["teacher"]["allocated"]),
             _gib(figures["teacher_max_reserved"]), _gib(figures["teacher_max_allocated"])]])
    print(f"  device: {_gib(step1['student']['device_free'])} free of {_gib(figures['device_total'])} after student step 1 "
          f"(mem_get_info), lowest sampled {_gib(figures['device_free_min_sampled'])}; channel (teacher side): "
          f"{channel['slots']} slots x {_gib(channel['slot_bytes'])} = {_gib(channel['share_bytes'])} "
          f"(slot = 1.25 x {_gib(channel['tensor_bytes'])} of one micro-batch's targets; its buffers hold "
          f"{_gib(channel['measured_bytes'])})")
    if not case["mfu"] and case["seq"] != 2048:
        import torch

        rows = torch.empty(case["batch"] * 2047, settings["tokenizer_vocab"], device="meta")
        full_2048 = _ring_bytes({"values": rows}, 2 * case["micro_batches"])
        print(f"  (at seq 2048 the channel would hold {_gib(full_2048)})")
    print("  loss, CE, KD, grad norm per step: " + ", ".join(
        f"({l:.4f}, {c:.4f}, {k:.4f}, {g:.3f})" for l, c, k, g in
        zip(figures["loss"], figures["ce"], figures["kd"], figures["grad_norm"])))
    print(f"  {settings['dtype']} checks: loss and grad norm finite at every step: {figures['loss_and_grad_finite']}; "
          f"{figures['probe_parameter']} changed by step 1: {figures['parameter_changed']} (max |change| "
          f"{figures['probe_max_change_step1']:.3g}); loss falls (last < first): {figures['loss_falls']}; every step "
          f"applied: {all(figures['applied'])}")
    print(f"  publish = {_ms(figures['publish_s'])} per micro-batch without the slot wait "
          f"(wait {_ms(figures['slot_wait_s'])})")


# ------------------------------------------------------------------------------------------------ 3. kd


def straightforward_kd_loss(student, teacher, topk_indices=None):
    """Forward KL the usual way (as bench/kd_loss.py): both log-softmaxes materialised in fp32, autograd."""
    import torch.nn.functional as F

    if topk_indices is not None:
        student = student.gather(-1, topk_indices)
    student_log_probs = F.log_softmax(student.float(), dim=-1)
    teacher_log_probs = F.log_softmax(teacher.float(), dim=-1)
    return F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1).mean()


def kd_check(args, part: "_PartRecord") -> None:
    import torch
    from distill_trainer.losses import TopK, kd_loss

    if args.fail_part == "kd":
        raise RuntimeError("deliberate failure of the kd part (--fail-part)")
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
    rows, reference = [], {}
    for (case, impl), run in runs.items():
        times, peaks, reserved = [], [], []
        student.grad = None
        _empty_cache(device)  # each implementation's reserved peak starts from what the inputs hold
        for _ in range(args.repeats):
            student.grad = None
            _sync(device)
            _reset_peak(device)
            base = _allocated(device)
            start = time.monotonic()
            loss = run()
            loss.backward()
            _sync(device)
            times.append(time.monotonic() - start)
            peaks.append(_peak(device) - base)
            reserved.append(_memory(device)["max_reserved"])
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
        part.record(f"{case} / {impl}", {"seconds": statistics.median(times), "peak_extra_bytes": max(peaks),
                                         "max_reserved_bytes": max(reserved), "loss": float(loss.detach()),
                                         "loss_rel_diff": loss_diff, "grad_max_abs_diff": grad_diff})
        rows.append([case, impl, _ms(statistics.median(times)), _gib(max(peaks)), _gib(max(reserved)),
                     f"{float(loss.detach()):.6f}", f"{loss_diff:.1e}", f"{grad_diff:.1e}"])
    figures = part.figures
    for case in ("full", "top-k"):
        a, b = figures[f"{case} / straightforward"], figures[f"{case} / kubedistill"]
        rows.append([case, "ratio straightforward / kubedistill", f"{a['seconds'] / b['seconds']:.2f}x",
                     f"{a['peak_extra_bytes'] / max(b['peak_extra_bytes'], 1):.2f}x",
                     f"{a['max_reserved_bytes'] / max(b['max_reserved_bytes'], 1):.2f}x", "", "", ""])
    part.record("device_free_at_end", _memory(device)["device_free"])
    _table(f"3. KD loss (forward_kl) + backward on [{tokens}, {vocab}] {str(dtype).removeprefix('torch.')} student "
           f"logits, fp32 teacher, top-k {k} (median of {args.repeats})",
           ["case", "implementation", "time", "peak extra", "max reserved", "loss", "loss rel diff", "grad max diff"], rows)
    print("  peak extra = peak CUDA allocation during loss + backward above the inputs (includes the [N, V] gradient);\n"
          "  max reserved = the allocator's peak reservation in that run, inputs included")
    runs.clear()  # the inputs go before the cache is emptied (the next part's memory starts clean)
    student = teacher = top = None
    _empty_cache(device)


def sample_check(args, part: "_PartRecord") -> None:
    import torch
    from distill_trainer.sampling import SamplingParams, sample_with_kv_cache
    from transformers import AutoModelForCausalLM

    if args.fail_part == "sample":
        raise RuntimeError("deliberate failure of the sample part (--fail-part)")
    device = _device()
    shape = TINY if args.smoke else QWEN2_0_5B
    rows, width, new_tokens = (4, 16, 8) if args.smoke else (32, 256, 128)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory(prefix="gpu_check_sampler_") as model_dir:
        _write_model(Path(model_dir), shape)
        model = AutoModelForCausalLM.from_pretrained(model_dir).to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, shape.vocab, (width - row % 8,), generator=generator).tolist() for row in range(rows)]
    eos, pad = shape.vocab - 1, 0  # a random model rarely draws the last id: rows run to max_new_tokens

    def draw(seed: int, params: SamplingParams):
        _sync(device)
        start = time.monotonic()
        completions = sample_with_kv_cache(model, prompts, params, eos, pad, seed, shape.vocab, device)
        _sync(device)
        return completions, time.monotonic() - start

    draw(0, SamplingParams(2))  # warm-up: kernels, allocator
    first, seconds = draw(7, SamplingParams(new_tokens))
    second, _ = draw(7, SamplingParams(new_tokens))
    same = [a.tokens for a in first] == [b.tokens for b in second]
    tokens = sum(len(c.tokens) for c in first)
    greedy, greedy_seconds = draw(0, SamplingParams(new_tokens, temperature=0.0))
    left = torch.full((rows, width), pad, dtype=torch.long)
    mask = torch.zeros_like(left)
    for row, prompt in enumerate(prompts):
        left[row, width - len(prompt):], mask[row, width - len(prompt):] = torch.tensor(prompt), 1
    with torch.no_grad():
        reference = model.generate(input_ids=left.to(device), attention_mask=mask.to(device), do_sample=False,
                                   max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad)[:, width:].tolist()
    equal_rows = sum(c.tokens == r[: len(c.tokens)] for c, r in zip(greedy, reference))
    figures = {"rows": rows, "prompt_tokens": width, "new_tokens": new_tokens, "sampled_tokens": tokens,
               "seconds": seconds, "tokens_per_second": tokens / seconds, "same_seed_same_tokens": same,
               "greedy_seconds": greedy_seconds, "greedy_rows_equal_to_generate": equal_rows}
    for key, value in figures.items():
        part.record(key, value)
    _table(f"4. sampling ({str(dtype).removeprefix('torch.')}, {shape.layers} layers, vocab {shape.vocab}): {rows} "
           f"prompts of {width - 7}-{width} tokens, {new_tokens} new tokens, KV cache",
           ["temperature 1", "tokens/s", "same seed, same tokens", "greedy", "greedy rows = generate"],
           [[_ms(seconds), f"{tokens / seconds:,.0f}", str(same), _ms(greedy_seconds), f"{equal_rows}/{rows}"]])
    model = None
    _empty_cache(device)
    if not same:
        raise AssertionError("the same seed drew different tokens: sampling is not reproducible on this device")


# ------------------------------------------------------------------------------------------------ main


class _PartRecord:
    """One part's entry of the report: its figures, saved to the JSON file whenever one is added."""

    def __init__(self, report: "_Report", name: str):
        self.report, self.name = report, name
        self.entry = report.data["parts"].setdefault(name, {"status": "running", "figures": {}})
        self.figures = self.entry["figures"]

    def record(self, key: str, value) -> None:
        self.figures[key] = value
        self.report.save()


class _Report:
    def __init__(self, path: Path | None, header: dict):
        self.path = path
        self.data = {**header, "parts": {}}

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.data, indent=2, default=str))
        temporary.replace(self.path)


def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    try:
        sys.stdout.reconfigure(line_buffering=True)  # in order with the children's output when piped
    except (AttributeError, ValueError):
        pass
    args.deadline = started + args.time_limit
    _quiet_known_warnings()
    missing = setup_paths(args.wheels)
    if missing:
        print(f"gpu_check: missing wheel(s) {', '.join(missing)} in {args.wheels}. Fetch them on a machine with network "
              f"access with tests/gpu/fetch_wheels.sh and carry that folder with the working tree.", file=sys.stderr)
        return 2
    unmet = unmet_requirements(args.wheels / "site")
    for problem in unmet:
        print(f"gpu_check: warning: {problem} (the machine's packages come first on sys.path)", file=sys.stderr)
    import torch

    device = _device()
    if device.type != "cuda" and not args.smoke:
        print("gpu_check: no CUDA device here; use --smoke to check the script itself on CPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    import transformers

    print(f"gpu_check on {name}; torch {torch.__version__}; transformers {transformers.__version__}; parts "
          f"{','.join(args.parts)}" + ("; SMOKE RUN (tiny shapes, no meaningful figures)" if args.smoke else "")
          + (f"; --fail-part {args.fail_part}" if args.fail_part else "") + (f"; figures to {args.json}" if args.json else ""))
    report = _Report(args.json, {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
                                 "smoke": args.smoke, "argv": list(argv if argv is not None else sys.argv[1:]),
                                 "unmet_wheel_requirements": unmet})
    preflight = {"megatron": megatron_preflight(unmet)} if "megatron" in args.parts else {}
    failed = []
    for part_name, check in (("ipc", ipc_check), ("megatron", megatron_check), ("kd", kd_check),
                             ("sample", sample_check)):
        if part_name not in args.parts:
            continue
        part = _PartRecord(report, part_name)
        part_start = time.monotonic()
        if preflight.get(part_name):
            part.entry.update(status="failed", error=preflight[part_name], seconds=0.0)
            print(f"\ngpu_check: part {part_name} not run: {preflight[part_name]}", file=sys.stderr)
            failed.append(part_name)
            report.save()
            continue
        if args.deadline - part_start < 10:
            part.entry.update(status="skipped", error="time limit reached before it started", seconds=0.0)
            print(f"\ngpu_check: part {part_name} skipped: the time limit (--time-limit {args.time_limit:g} s) is "
                  f"reached")
            failed.append(part_name)
            report.save()
            continue
        try:
            check(args, part)
        except Exception:  # noqa: BLE001 - one part's failure must not stop the others
            part.entry.update(status="failed", error=traceback.format_exc())
            print(f"\ngpu_check: part {part_name} FAILED:", file=sys.stderr)
            traceback.print_exc()
            failed.append(part_name)
        else:
            part.entry["status"] = "ok"
        part.entry["seconds"] = time.monotonic() - part_start
        report.save()
        print(f"[part {part_name}: {part.entry['status']} in {part.entry['seconds']:.1f} s]", flush=True)
    report.data["seconds"] = time.monotonic() - started
    report.data["failed"] = failed
    report.save()
    print(f"\ngpu_check: {time.monotonic() - started:.0f} s in all; "
          + (f"FAILED: {', '.join(failed)}" if failed else "every part ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
