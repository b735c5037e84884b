"""Benchmark: time and peak extra memory of the KD loss (forward_kl), forward + backward, on CPU.

Compares, for the full vocabulary and for top-k teacher logits:
  (a) straightforward: log_softmax of both sides materialised, F.kl_div, autograd does the rest
      (what TRL's GKD trainer and torchtune's KD losses do);
  (b) kubedistill: ``distill_trainer.losses.kd_loss`` (chunked, gradient computed in the forward pass);
and a floor: allocating and zeroing the dense [N, V] fp32 gradient that both must return.

Then the output layer + loss (``head`` rows; the student's hidden states [N, hidden] and LM head [V, hidden]
are the inputs, the gradients of both the outputs):
  (a) straightforward: logits = hidden @ Wᵀ materialised, then (a) above, autograd for the backward;
  (b) kubedistill fused: ``distill_loss.fused_head_distill_loss`` (``fused_head``: chunk by chunk, never the
      [N, V] logits or their gradient; w = 1; top-k renormalised over the k like (a), topk_tail false, so its
      backward only touches the k columns).

Method. Every measurement runs in a fresh subprocess (``--worker``), and the cases take turns
within each round of repeats, so a burst of load from other processes on a shared machine hits
all cases alike rather than one. The worker allocates the inputs (student logits [N, V] fp32
requiring grad; teacher logits [N, V], or the teacher's top-k values/indices already selected, as the
teacher worker ships them), then resets the kernel's peak-RSS counter (writes 5 to
/proc/self/clear_refs, which sets VmHWM to the current RSS, forgetting the peaks of input creation),
reads VmRSS as the baseline, runs loss + backward, and reads VmHWM. Peak extra memory = VmHWM −
baseline: everything the loss and its backward allocate, including the [N, V] gradient of the
student logits. Without a writable clear_refs the memory column is left empty. (Allocations under
glibc's mmap threshold, ≤ 32 MiB, may reuse heap pages that RSS already counts, so tiny sizes
under-report; at the default size every [N, V] buffer is far above it.) Time is wall-clock
(time.perf_counter) of loss + backward; the table shows medians over the repeats. Other processes
may share the machine: compare ratios, and rerun when in doubt.

    python bench/kd_loss.py                        # N=4096, V=151,936, hidden 896, top-k=64, 3 repeats, 1 thread
    python bench/kd_loss.py --tokens 512 --vocab 32000 --repeats 5
    python bench/kd_loss.py --only head --repeats 1   # the output layer + loss rows only (~3 min a round)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = (
    ("full", "straightforward"),
    ("full", "kubedistill"),
    ("topk", "straightforward"),
    ("topk", "kubedistill"),
    ("topk", "floor"),
)
HEAD_CASES = (
    ("head_full", "straightforward"),
    ("head_full", "kubedistill"),
    ("head_topk", "straightforward"),
    ("head_topk", "kubedistill"),
)


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
    """One measurement of one case; prints {"seconds", "peak_extra_mib", "loss"} as JSON."""
    import torch

    from distill_trainer.losses import kd_loss, topk_teacher_logits

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode.startswith("head"):
        return head_worker(args)
    g = torch.Generator().manual_seed(0)
    # The floor case allocates the same inputs as the top-k cases, so that it starts from their state.
    student = torch.randn(args.tokens, args.vocab, generator=g).mul_(4).requires_grad_()
    teacher = torch.randn(args.tokens, args.vocab, generator=g).mul_(4)
    kept = topk_teacher_logits(teacher, args.topk) if args.mode == "topk" else None
    if kept is not None:
        del teacher
    measured = _reset_peak()
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    loss = None
    if args.impl == "floor":
        grad = torch.zeros(args.tokens, args.vocab)
    elif args.impl == "straightforward":
        if kept is None:
            loss = straightforward_kd_loss(student, teacher)
        else:
            loss = straightforward_kd_loss(student, kept.values, kept.indices)
        loss.backward()
    else:
        loss = kd_loss(student, teacher if kept is None else kept, objective="forward_kl")
        loss.backward()
    seconds = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - baseline) / 1024 if measured else None
    print(json.dumps({"seconds": seconds, "peak_extra_mib": peak, "loss": None if loss is None else float(loss)}))


def head_worker(args) -> None:
    """One measurement of the output layer + loss: inputs hidden [N, hidden], W [V, hidden] (both requiring grad)
    and the teacher's targets; loss, backward into hidden and W."""
    import torch

    from distill_trainer.distill_loss import LossConfig, TeacherTargets, fused_head_distill_loss
    from distill_trainer.losses import topk_teacher_logits

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_()
    weight = torch.randn(args.vocab, args.hidden, generator=g).mul_(4 / args.hidden**0.5).requires_grad_()  # logits ~ 4·N(0, 1)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    teacher = torch.randn(args.tokens, args.vocab, generator=g).mul_(4)
    kept = topk_teacher_logits(teacher, args.topk) if args.mode == "head_topk" else None
    if kept is not None:
        del teacher
    measured = _reset_peak()
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    if args.impl == "straightforward":
        logits = hidden @ weight.t()
        loss = straightforward_kd_loss(logits, teacher) if kept is None else straightforward_kd_loss(logits, kept.values, kept.indices)
        loss.backward()
        del logits
    else:
        targets = TeacherTargets(teacher) if kept is None else TeacherTargets(kept.values, kept.indices)
        cfg = LossConfig(distill_loss_weight=1.0, logits_topk=0 if kept is None else args.topk, topk_tail=False)
        loss = fused_head_distill_loss(hidden, weight, None, labels, targets, cfg, normalizer=float(args.tokens)).loss
        loss.backward()
    seconds = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - baseline) / 1024 if measured else None
    print(json.dumps({"seconds": seconds, "peak_extra_mib": peak, "loss": float(loss.detach())}))


def measure(args, mode: str, impl: str) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        f"--impl={impl}",
        f"--mode={mode}",
        f"--tokens={args.tokens}",
        f"--vocab={args.vocab}",
        f"--topk={args.topk}",
        f"--hidden={args.hidden}",
        f"--threads={args.threads}",
    ]
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1" if args.thp else "0")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=896, help="hidden size of the head rows (Qwen2.5-0.5B: 896)")
    parser.add_argument("--only", choices=("loss", "head"), help="run only the loss rows or only the head rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case (0 = torch's default)")
    parser.add_argument(
        "--thp",
        action="store_true",
        help="run with THP_MEM_ALLOC_ENABLE=1 (PyTorch backs large CPU tensors with transparent huge pages)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=("straightforward", "kubedistill", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("full", "topk", "head_full", "head_topk"), help=argparse.SUPPRESS)
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
    cases = (CASES if args.only != "head" else ()) + (HEAD_CASES if args.only != "loss" else ())
    runs: dict[tuple[str, str], list[dict]] = {case: [] for case in cases}
    for _ in range(args.repeats):
        for mode, impl in cases:
            runs[mode, impl].append(measure(args, mode, impl))

    def median(case, key):
        values = [r[key] for r in runs[case] if r[key] is not None]
        return statistics.median(values) if values else float("nan")

    label = {"full": "full vocab", "topk": f"top-k={args.topk}"}
    header_label = {"head_full": "full vocab", "head_topk": f"top-k={args.topk}"}
    header = f"{'teacher':<11} {'implementation':<16} {'time s':>8} {'peak extra MiB':>15} {'time ×':>7} {'memory ×':>9}  loss"
    print(header)
    if args.only != "head":
        print("-" * len(header))
        print_loss_rows(args, runs, median, label, len(header))
    if args.only != "loss":
        print(f"output layer + loss: hidden {args.hidden}, W [V, hidden] fp32; gradients of hidden and W")
        print("-" * len(header))
        for mode, impl in HEAD_CASES:
            seconds, mib = median((mode, impl), "seconds"), median((mode, impl), "peak_extra_mib")
            base_s, base_mib = median((mode, "straightforward"), "seconds"), median((mode, "straightforward"), "peak_extra_mib")
            name = "head + loss" if impl == "straightforward" else "fused head+loss"
            print(
                f"{header_label[mode]:<11} {name:<16} {seconds:8.2f} {mib:15.0f} {seconds / base_s:7.2f} "
                f"{mib / base_mib:9.2f}  {runs[mode, impl][0]['loss']:.6f}"
            )
        print("-" * len(header))
        print("× columns: relative to the straightforward head + loss with the same teacher (target: memory ≤ 0.10×).")


def print_loss_rows(args, runs, median, label, header_width: int) -> None:
    for mode, impl in CASES[:4]:
        seconds, mib = median((mode, impl), "seconds"), median((mode, impl), "peak_extra_mib")
        base_s, base_mib = median((mode, "straightforward"), "seconds"), median((mode, "straightforward"), "peak_extra_mib")
        print(
            f"{label[mode]:<11} {impl:<16} {seconds:8.2f} {mib:15.0f} {seconds / base_s:7.2f} "
            f"{mib / base_mib:9.2f}  {runs[mode, impl][0]['loss']:.6f}"
        )
    floor_s, floor_mib = median(("topk", "floor"), "seconds"), median(("topk", "floor"), "peak_extra_mib")
    print(f"{'(floor)':<11} {'zeros([N, V])':<16} {floor_s:8.2f} {floor_mib:15.0f}")
    print("-" * header_width)
    print("× columns: relative to straightforward with the same teacher.")
    print("floor: allocating and zeroing the dense [N, V] fp32 gradient both must return (on CPU mostly page faults).")
    full_s, topk_s = median(("full", "kubedistill"), "seconds"), median(("topk", "kubedistill"), "seconds")
    above = (
        f"{(full_s - floor_s) / (topk_s - floor_s):.1f}× faster above the floor"
        if topk_s > 1.25 * floor_s  # closer than that, the difference is noise
        else "the top-k time is (nearly) all floor"
    )
    print(f"kubedistill top-k={args.topk} vs full vocab: {full_s / topk_s:.1f}× faster; {above}")


if __name__ == "__main__":
    main()
