"""Benchmark: bytes per label token of the teacher cache's row encodings, the KD loss error of ``compact``, and
encode/decode throughput (``distill_trainer.teacher_cache.encoding.RowCodec``). Prints, never asserts.

For V (default 151,936, Qwen2.5) and k ∈ --topk (default 64, 128, 256) and the full vocabulary:
  bytes   row_bytes of ``float32`` (what the live teacher hands over) and ``compact`` (the default), with the tail;
  error   the relative error |kd(compact) / kd(float32) − 1| of the KD loss of a step (--tokens label tokens,
          default 256) over --steps synthetic steps (default 12; 20 takes ~3 min), worst and median, per objective (forward_kl,
          reverse_kl, adaptive_kl; top-k with the tail bucket), for two kinds of teacher logits:
            zipf  LM-like: c·log of a Zipf prior over a random order of the vocabulary + N(0, 0.5²) noise,
                  c ∈ U[1.5, 4.5] per row (top-1 probability ≈ 0.3–0.95);
            gauss uniform-random: N(0, 2²) i.i.d. (flat: the top-k hold little mass);
          the student is the teacher + N(0, σ²) noise (--sigma, default 1: about 0.2 nats/token at T = 1, close to
          the teacher, where quantisation shows most); T·τ = --temperature (default 1; the tail is at that
          temperature). Top-k losses are computed on the k + 1 outcomes (the k tokens and the tail bucket), exactly
          the distributions ``losses.kd_loss`` forms with the tail, without re-reading the student's whole
          vocabulary per codec; full-vocabulary rows (--full-tokens per step, few: 600 KB a row) go through kd_loss.
  rows/s  encode and decode throughput of one step's rows, this process's threads (--threads).

    python bench/teacher_cache_bytes.py                      # ~1-2 min on 2 cores
    python bench/teacher_cache_bytes.py --steps 5 --temperature 2 --sigma 0.5
    python bench/teacher_cache_bytes.py --value-bits 8       # a cheaper (less exact) compact variant
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

OBJECTIVES = ("forward_kl", "reverse_kl", "adaptive_kl")


def teacher_logits(kind: str, rows: int, vocab: int, g):
    import torch

    if kind == "gauss":
        return torch.randn(rows, vocab, generator=g) * 2
    c = torch.empty(rows, 1).uniform_(1.5, 4.5, generator=g)
    ranked = -c * torch.arange(1, vocab + 1, dtype=torch.float32).log() + 0.5 * torch.randn(rows, vocab, generator=g)
    perm = torch.randperm(vocab, generator=g)
    shift = torch.randint(0, vocab, (rows, 1), generator=g)
    out = torch.empty_like(ranked).scatter_(1, perm[(torch.arange(vocab) + shift) % vocab], ranked)
    return out + 20 + 5 * torch.randn(rows, 1, generator=g)


def reduced_kd(student, outside_lse, targets, objective, temperature):
    """Σ of the per-token KD over the k + 1 outcomes (k tokens, tail bucket), kd_temperature = ``temperature``:
    the student's "logits" (z_K, T·lse_{∉K}(z/T)), the teacher's (v, T·(log P_tail + lse(v/T) − log(1 − P_tail)))
    have the softmaxes q̃ and p̃ of losses.py's tail form."""
    import torch

    from distill_trainer.losses import kd_loss

    t = temperature
    s = torch.cat([student.gather(1, targets.indices), (t * outside_lse)[:, None]], 1)
    head = torch.log(-torch.expm1(targets.tail.double()))
    tail_logit = targets.tail.double() + torch.logsumexp(targets.values.double() / t, 1) - head
    v = torch.cat([targets.values, (t * tail_logit).float()[:, None]], 1)
    return kd_loss(s, v, objective=objective, kd_temperature=t, normalizer=1.0).item()


def measure_topk(args, k, kind, g):
    """(float32 bytes, compact bytes, {objective: [relative errors]}, encode rows/s, decode rows/s)."""
    import torch

    from distill_trainer.distill_loss import TeacherTargets
    from distill_trainer.losses import topk_teacher_logits
    from distill_trainer.teacher_cache.encoding import RowCodec

    exact = RowCodec("float32", k, args.vocab, True)
    compact = RowCodec("compact", k, args.vocab, True, value_bits=args.value_bits)
    errors = {name: [] for name in OBJECTIVES}
    enc_s = dec_s = 0.0
    for _ in range(args.steps):
        teacher = teacher_logits(kind, args.tokens, args.vocab, g)
        student = teacher + args.sigma * torch.randn(teacher.shape, generator=g)
        top = topk_teacher_logits(teacher, k, args.temperature)
        live = TeacherTargets(top.values, top.indices, top.tail_logmass)
        assert torch.equal(exact.decode(exact.encode(live)).values, live.values)
        start = time.perf_counter()
        rows = compact.encode(live)
        enc_s += time.perf_counter() - start
        start = time.perf_counter()
        cached = compact.decode(rows)
        dec_s += time.perf_counter() - start
        x = student / args.temperature
        outside = torch.logsumexp(x.scatter(1, top.indices, -math.inf), 1)
        for name in OBJECTIVES:
            reference = reduced_kd(student, outside, live, name, args.temperature)
            errors[name].append(abs(reduced_kd(student, outside, cached, name, args.temperature) / reference - 1))
    n = args.steps * args.tokens
    return exact.row_bytes, compact.row_bytes, errors, n / enc_s, n / dec_s


def measure_full(args, kind, g):
    import torch

    from distill_trainer.distill_loss import TeacherTargets
    from distill_trainer.losses import kd_loss
    from distill_trainer.teacher_cache.encoding import RowCodec

    exact, compact = RowCodec("float32", 0, args.vocab, False), RowCodec("compact", 0, args.vocab, False)
    errors = {name: [] for name in OBJECTIVES}
    enc_s = dec_s = 0.0
    for _ in range(args.full_steps):
        teacher = teacher_logits(kind, args.full_tokens, args.vocab, g)
        student = teacher + args.sigma * torch.randn(teacher.shape, generator=g)
        start = time.perf_counter()
        rows = compact.encode(TeacherTargets(teacher))
        enc_s += time.perf_counter() - start
        start = time.perf_counter()
        cached = compact.decode(rows).values
        dec_s += time.perf_counter() - start
        for name in OBJECTIVES:
            options = dict(objective=name, kd_temperature=args.temperature, normalizer=1.0)
            reference = kd_loss(student, teacher, **options).item()
            errors[name].append(abs(kd_loss(student, cached, **options).item() / reference - 1))
    n = args.full_steps * args.full_tokens
    return exact.row_bytes, compact.row_bytes, errors, n / enc_s, n / dec_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--topk", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--steps", type=int, default=12, help="synthetic steps per (k, kind)")
    parser.add_argument("--tokens", type=int, default=256, help="label tokens per step")
    parser.add_argument("--full-steps", type=int, default=3)
    parser.add_argument("--full-tokens", type=int, default=32, help="label tokens per full-vocabulary step")
    parser.add_argument("--sigma", type=float, default=1.0, help="student = teacher + N(0, sigma²)")
    parser.add_argument("--temperature", type=float, default=1.0, help="T·τ (kd_temperature; tail at it)")
    parser.add_argument("--value-bits", type=int, default=None, help="compact top-k value bits (default: the codec's)")
    parser.add_argument("--kinds", nargs="+", default=["zipf", "gauss"], choices=["zipf", "gauss"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from distill_trainer.teacher_cache.encoding import DEFAULT_VALUE_BITS

    if args.threads:
        torch.set_num_threads(args.threads)
    args.value_bits = args.value_bits or DEFAULT_VALUE_BITS
    g = torch.Generator().manual_seed(args.seed)
    print(f"V = {args.vocab:,}, compact value_bits = {args.value_bits}, tail on (top-k), T·τ = {args.temperature}, "
          f"student = teacher + N(0, {args.sigma}²), {torch.get_num_threads()} threads")
    print(f"KD error: |kd(compact)/kd(float32) − 1| per step, worst / median over the steps")
    header = (f"{'k':>6} {'logits':>6} {'float32 B':>10} {'compact B':>10} "
              + " ".join(f"{name + ' worst/median':>26}" for name in OBJECTIVES)
              + f" {'enc rows/s':>11} {'dec rows/s':>11}")
    print(header)
    print("-" * len(header))
    for k in args.topk + [0]:
        for kind in args.kinds:
            if k:
                exact_b, compact_b, errors, enc, dec = measure_topk(args, k, kind, g)
                label, steps = str(k), f"{args.steps}x{args.tokens}"
            else:
                exact_b, compact_b, errors, enc, dec = measure_full(args, kind, g)
                label, steps = "full", f"{args.full_steps}x{args.full_tokens}"
            cells = " ".join(f"{max(e):>12.2e} / {statistics.median(e):<11.2e}" for e in errors.values())
            print(f"{label:>6} {kind:>6} {exact_b:>10,} {compact_b:>10,} {cells} {enc:>11,.0f} {dec:>11,.0f}"
                  f"   ({steps} tokens)", flush=True)


if __name__ == "__main__":
    main()
