"""Benchmark: time and peak extra memory of the KD loss, forward + backward, on CPU.

Compares, for the full vocabulary and for top-k teacher logits:
  (a) straightforward: log_softmax of both sides materialised, F.kl_div, autograd does the rest
      (what TRL's GKD trainer and torchtune's KD losses do);
  (b) kubedistill: ``distill_trainer.losses.kd_loss`` (chunked, gradient computed in the forward pass).

Method. Every case runs in a fresh subprocess (``--worker``), so no case inherits another's heap.
The worker allocates the inputs (student logits [N, V] fp32 requiring grad, teacher logits [N, V], or
the teacher's top-k values/indices already selected, as the teacher worker ships them), touches them,
and then, for each repeat: resets the kernel's peak-RSS counter (writes 5 to /proc/self/clear_refs,
which sets VmHWM to the current RSS), reads VmRSS as the baseline, runs loss + backward, and reads
VmHWM. Peak extra memory = VmHWM − baseline: everything the loss and its backward allocate,
including the [N, V] gradient of the student logits (which both implementations must produce).
The student's .grad is dropped between repeats. If clear_refs cannot be written, each repeat gets
its own subprocess instead. Times are wall-clock (time.perf_counter) of loss + backward; the table
shows the median over the repeats. Other processes may share the machine: compare ratios, not
absolute seconds, and rerun when in doubt.

    python bench/kd_loss.py                                  # N=4096, V=151,936, top-k=64, 3 repeats
    python bench/kd_loss.py --tokens 512 --vocab 32000 --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

IMPLEMENTATIONS = ("straightforward", "kubedistill")


def straightforward_kd_loss(student, teacher, topk_indices=None, temperature=1.0):
    """Forward KL the usual way: both log-softmaxes materialised, autograd for the backward."""
    import torch.nn.functional as F

    if topk_indices is not None:
        student = student.gather(-1, topk_indices)
    if temperature != 1.0:
        student, teacher = student / temperature, teacher / temperature
    student_log_probs = F.log_softmax(student, dim=-1)
    teacher_log_probs = F.log_softmax(teacher, dim=-1)
    per_token = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)
    return per_token.mean()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args) -> None:
    import torch

    from distill_trainer.losses import kd_loss, topk_teacher_logits

    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(args.tokens, args.vocab, generator=g) * 4).requires_grad_()
    teacher = torch.randn(args.tokens, args.vocab, generator=g) * 4
    kept = topk_teacher_logits(teacher, args.topk) if args.mode == "topk" else None
    if kept is not None:
        del teacher
        teacher = kept.values.contiguous()
    gc.collect()

    results = []
    for _ in range(args.repeats):
        if not _reset_peak() and results:
            break  # the parent starts a fresh process for each further repeat
        baseline = _status_kib("VmRSS")
        start = time.perf_counter()
        if args.impl == "straightforward":
            loss = straightforward_kd_loss(student, teacher, None if kept is None else kept.indices)
        else:
            loss = kd_loss(student, kept if kept is not None else teacher, objective="forward_kl")
        loss.backward()
        seconds = time.perf_counter() - start
        peak_kib = _status_kib("VmHWM") - baseline
        results.append({"seconds": seconds, "peak_extra_mib": peak_kib / 1024, "loss": float(loss)})
        del loss
        student.grad = None
        gc.collect()
    print(json.dumps(results))


def run_case(args, impl: str, mode: str) -> list[dict]:
    runs: list[dict] = []
    while len(runs) < args.repeats:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            f"--impl={impl}",
            f"--mode={mode}",
            f"--tokens={args.tokens}",
            f"--vocab={args.vocab}",
            f"--topk={args.topk}",
            f"--repeats={args.repeats - len(runs)}",
            f"--threads={args.threads}",
        ]
        env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1" if args.thp else "0")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        runs += json.loads(out.strip().splitlines()[-1])
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case (0 = torch's default)")
    parser.add_argument(
        "--thp",
        action="store_true",
        help="run the cases with THP_MEM_ALLOC_ENABLE=1 (PyTorch backs large CPU tensors with transparent huge pages)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("full", "topk"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    threads = args.threads or torch.get_num_threads()
    pages = "transparent huge pages (THP_MEM_ALLOC_ENABLE=1)" if args.thp else "default 4 KiB pages"
    print(
        f"KD loss (forward_kl) forward+backward on CPU, fp32, N={args.tokens} tokens, V={args.vocab:,}, "
        f"{threads} thread(s), {pages}, median of {args.repeats} runs"
    )
    medians: dict[tuple[str, str], tuple[float, float]] = {}
    rows = []
    for mode in ("full", "topk"):
        for impl in IMPLEMENTATIONS:
            runs = run_case(args, impl, mode)
            seconds = statistics.median(r["seconds"] for r in runs)
            mib = statistics.median(r["peak_extra_mib"] for r in runs)
            medians[mode, impl] = (seconds, mib)
            rows.append((mode, impl, seconds, mib, runs[0]["loss"]))

    label = {"full": "full vocab", "topk": f"top-k={args.topk}"}
    header = f"{'teacher':<11} {'implementation':<16} {'time s':>8} {'peak extra MiB':>15} {'time ×':>7} {'memory ×':>9}  loss"
    print(header)
    print("-" * len(header))
    for mode, impl, seconds, mib, loss in rows:
        base_s, base_mib = medians[mode, "straightforward"]
        print(
            f"{label[mode]:<11} {impl:<16} {seconds:8.2f} {mib:15.0f} {seconds / base_s:7.2f} "
            f"{mib / base_mib:9.2f}  {loss:.6f}"
        )
    full_s, topk_s = medians["full", "kubedistill"][0], medians["topk", "kubedistill"][0]
    print(f"(× columns: relative to straightforward with the same teacher; the [N, V] fp32 gradient alone is "
          f"{args.tokens * args.vocab * 4 / 2**20:.0f} MiB)")
    print(f"kubedistill top-k={args.topk} is {full_s / topk_s:.1f}× faster than kubedistill full vocab")


if __name__ == "__main__":
    main()
