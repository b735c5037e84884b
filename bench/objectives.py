"""Which KD objective? The demo task, the six objectives and SFT only, several student seeds, the same budget.

The demo's task and models (``kubedistill demo``, trainer/distill_trainer/demo/): 3-digit addition written
least-significant digit first, a 1.1M-parameter teacher trained by SFT on 20,000 clean records, a 0.22M-parameter
student trained on 1,000 transfer records with 20% answer-digit noise; held-out set 500 clean questions. Every
student run is an ordinary pipeline run of ``examples/tiny/distill.yaml`` (top-64 teacher logits with the tail
bucket, ``distill_loss_weight`` 0.5, T = 1, cosine schedule) with only ``kd_objective`` changed, or with
``distill_loss_weight=0`` for SFT only; each seed has its own student initialization and data order, shared by
every objective. All runs have the same number of steps (``--steps``; the demo's is 800).

Prints, per objective: the median held-out exact match and cross-entropy per answer token over the seeds, with
the spread (min–max), and the median wall time of a run. Figures only; it never passes or fails on them.

  .venv/bin/python bench/objectives.py                         # 5 seeds x 7 runs x 800 steps (~1 h on 2 cores)
  .venv/bin/python bench/objectives.py --steps 300 --seeds 0 1 2 3 4
  .venv/bin/python bench/objectives.py --quick                 # smoke run: 2 seeds, 20 steps, 2 objectives
  .venv/bin/python bench/objectives.py --on-policy             # on-policy distillation against off-policy KD
  .venv/bin/python bench/objectives.py --on-policy --warm-start  # the same from a student that does the task

``--on-policy`` (issue 20) compares, at the same steps, off-policy KD (forward and reverse KL, at
``distill_loss_weight`` 0.5 and 1: sampled micro-batches get the KD term alone, so w = 1 is off-policy KD without
the noisy answers' cross-entropy too) with on-policy distillation, GKD's mix: λ = ``on_policy_fraction`` 0.5 and 1 with each of the two divergences (the student samples
6 tokens per prompt at temperature 1, the teacher scores them), and ROLL's sampled reverse KL as a policy gradient
at λ = 1. Every row reports ``eval/onpolicy_rkl`` too: the teacher's per-token reverse KL on the student's own
greedy answers to the held-out questions (lower: the student's own generations are closer to the teacher's), and
the median seconds per step (the cost of sampling).

``--warm-start`` asks the same question where GKD's, Qwen3's and ROLL's recipes ask it: from a student that already
does the task (each seed's off-policy forward-KL student after ``--steps`` steps), ``--warm-steps`` more steps of
off-policy KD or of on-policy distillation, pure KD in every row.

The teacher and the data are the demo's (``--workdir``, default the demo's artifacts): built and trained once,
reused afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer"))
# Ray's worker processes import distill_trainer too: from this checkout, whatever else is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "trainer"), os.environ.get("PYTHONPATH")]))

OBJECTIVES = ("forward_kl", "reverse_kl", "skewed_forward_kl", "skewed_reverse_kl", "js_divergence", "adaptive_kl")


# Sampling of the on-policy rows: the demo's answers are at most 4 digits + EOS; unfiltered (temperature 1).
SAMPLING = "generation: max_new_tokens 6, temperature 1, top_p 1; 1 sample per prompt"
_SAMPLING = ["generation.max_new_tokens=6", "eval_onpolicy_rkl=true"]


def on_policy_rows(only: list[str] | None) -> list[tuple[str, list[str]]]:
    """The --on-policy rows: (name, overrides of examples/tiny/distill.yaml)."""
    rows = [("SFT only", ["distill_loss_weight=0"])]
    for objective in ("forward_kl", "reverse_kl"):
        rows.append((f"off-policy {objective}", [f"kd_objective={objective}", *_SAMPLING]))
        # Pure KD: like the sampled micro-batches, no cross-entropy on the (noisy) dataset answers.
        rows.append((f"off-policy {objective} w=1", [f"kd_objective={objective}", "distill_loss_weight=1", *_SAMPLING]))
        for fraction in (0.5, 1):
            rows.append((f"on-policy λ={fraction:g} {objective}",
                         [f"kd_objective={objective}", f"on_policy_fraction={fraction}", *_SAMPLING]))
    rows.append(("on-policy λ=1 sampled rkl (ROLL)",
                 ["on_policy_fraction=1", "on_policy_loss=sampled_reverse_kl", *_SAMPLING]))
    return [row for row in rows if only is None or row[0] in only]


# --warm-start: every row continues WARM_BASE's student of the same seed (trained --steps steps) for --warm-steps more.
WARM_BASE = "off-policy forward_kl"
_ROLL_LR = "student.training_args.learning_rate=3.0e-4"  # ROLL's one-sample gradient needs 10x below the demo's 3e-3


def warm_start_rows(only: list[str] | None) -> list[tuple[str, list[str]]]:
    """The --warm-start rows: (name, overrides) of the continuation runs; pure KD everywhere (w = 1 off-policy,
    like the sampled micro-batches), and the ROLL row's learning rate also given to an off-policy row."""
    rows = []
    for objective in ("forward_kl", "reverse_kl"):
        rows.append((f"off-policy {objective} w=1", [f"kd_objective={objective}", "distill_loss_weight=1", *_SAMPLING]))
        rows.append((f"on-policy λ=1 {objective}",
                     [f"kd_objective={objective}", "on_policy_fraction=1", *_SAMPLING]))
    rows.append(("off-policy reverse_kl w=1 lr 3e-4",
                 ["kd_objective=reverse_kl", "distill_loss_weight=1", _ROLL_LR, *_SAMPLING]))
    rows.append(("on-policy λ=1 ROLL lr 3e-4",
                 ["on_policy_fraction=1", "on_policy_loss=sampled_reverse_kl", _ROLL_LR, *_SAMPLING]))
    return [row for row in rows if only is None or row[0] in only]


def _final_eval(out: Path) -> dict | None:
    """The last evaluation record of a finished run's metrics.jsonl, or None."""
    path = out / "logs" / "metrics.jsonl"
    if not path.is_file():
        return None
    evals = [record for record in map(json.loads, path.read_text().splitlines()) if "val/exact_match" in record]
    return evals[-1] if evals else None


def step_seconds(out: str, workdir: Path) -> float:
    """Median seconds between consecutive logged training steps of a run (evaluation steps excluded)."""
    path = Path(out.replace("examples/tiny/artifacts", str(workdir))) / "logs" / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    times = [(line["step"], line["time"], "val/loss" in line) for line in lines if "train/loss" in line]
    gaps = [(t1 - t0) / (s1 - s0) for (s0, t0, _), (s1, t1, evaluated) in zip(times, times[1:]) if not evaluated]
    return statistics.median(gaps) if gaps else float("nan")


def _warm_base(workdir: Path, seed: int, init: str, budget: list[str], steps: int) -> tuple[str, dict]:
    """The warm-start student of ``seed`` (the WARM_BASE row's run, in its own directory so that other bench runs
    do not replace it), trained unless a finished run is there; its path for student_pretrain and final eval."""
    from distill_trainer.demo import run as demo

    name = f"warm_base_{steps}_steps_s{seed}"
    out = f"{demo.ARTIFACTS}/bench_objectives/{name}"
    checkpoint = f"{out}/checkpoint-{steps}/student"
    evaluated = _final_eval(workdir / "bench_objectives" / name)
    if not ((workdir / "bench_objectives" / name / f"checkpoint-{steps}" / "student" / "model.safetensors").is_file()
            and evaluated and evaluated.get("step") == steps):
        overrides = dict(on_policy_rows([WARM_BASE]))[WARM_BASE]
        config = demo._config("distill", workdir, [
            f"seed={seed}", f"student_pretrain={init}", f"exp_name={name}", f"output_dir={out}",
            f"logging_dir={out}/logs", *budget, *overrides])
        result, _ = demo._run(f"warm-start base ({WARM_BASE}), seed {seed}", config)
        evaluated = {"step": steps, **result.eval_metrics}
    return checkpoint, evaluated


def _median_or_dash(values: list[float], fmt: str, unit: str = "") -> str:
    """The median, or – where a row has no such figure (the warm-start base: trained before, not timed here)."""
    values = [v for v in values if v == v]
    return format(statistics.median(values), fmt) + unit if values else "–"


def _spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(REPO / "examples" / "tiny" / "artifacts"))
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps of every student run (demo: 800)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--teacher-steps", type=int, default=1000, help="teacher SFT steps (the demo's: 1000)")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--quick", action="store_true", help="smoke run: seeds 0 1, 20 steps, two objectives")
    parser.add_argument("--on-policy", action="store_true",
                        help="rows: SFT, off-policy and on-policy (λ 0.5, 1) forward/reverse KL, ROLL's sampled "
                        "reverse KL; all with eval/onpolicy_rkl")
    parser.add_argument("--rows", nargs="+", default=None, help="with --on-policy: only these rows (by name)")
    parser.add_argument("--warm-start", action="store_true",
                        help="with --on-policy: continue each seed's off-policy forward-KL student (--steps steps, "
                        "trained once into bench_objectives/warm_base_<steps>_steps_s<seed> and reused) for --warm-steps more "
                        "with each of the warm-start rows")
    parser.add_argument("--warm-steps", type=int, default=200, help="steps of each --warm-start continuation")
    args = parser.parse_args(argv)
    if args.warm_start and not args.on_policy:
        parser.error("--warm-start goes with --on-policy")
    if args.quick:
        args.steps, args.seeds, args.objectives = 20, [0, 1], ["forward_kl", "reverse_kl"]

    from distill_trainer.demo import run as demo
    from distill_trainer.pipeline import ensure_ray

    began = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    demo.build_artifacts(workdir, seed=0)
    started_ray = ensure_ray()
    results: dict[str, list[tuple[float, float, float]]] = {}  # row -> [(exact match, loss, seconds)] by seed
    try:
        teacher_dir = workdir / "models" / "teacher"
        if not (teacher_dir / "config.json").is_file():
            result, _ = demo._run("teacher SFT", demo._config("teacher_sft", workdir, [
                "seed=0", f"max_steps={args.teacher_steps}", f"logging_steps={max(1, args.teacher_steps // 10)}"]))
            demo._install(result.last_checkpoint, teacher_dir)
            (workdir / "models" / "teacher_eval.json").write_text(json.dumps(result.eval_metrics))
        # --on-policy logs every 1/16 of the run, for the step time; logging does not change training.
        logging = max(1, args.steps // 16) if args.on_policy else args.steps
        budget = [f"max_steps={args.steps}", f"save_steps={args.steps}", f"eval_steps={args.steps}",
                  f"logging_steps={logging}", "max_ckpt_to_keep=1"]
        for seed in args.seeds:
            sft_config, _ = demo._student_runs(workdir, 0, seed)  # builds this seed's student initialization
            init = sft_config.student_pretrain.replace(str(workdir), demo.ARTIFACTS)
            rows = [("SFT only", ["distill_loss_weight=0"])] + [(o, [f"kd_objective={o}"]) for o in args.objectives]
            if args.on_policy:
                rows = on_policy_rows(args.rows)
            row_budget = budget
            if args.warm_start:
                init, base_eval = _warm_base(workdir, seed, init, budget, args.steps)
                results.setdefault(f"start: {WARM_BASE}, {args.steps} steps", []).append(
                    (base_eval["val/exact_match"], base_eval["val/loss"], float("nan"),
                     base_eval.get("eval/onpolicy_rkl"), float("nan")))
                row_budget = [f"max_steps={args.warm_steps}", f"save_steps={args.warm_steps}",
                              f"eval_steps={args.warm_steps}", f"logging_steps={max(1, args.warm_steps // 16)}",
                              "max_ckpt_to_keep=1"]
                rows = [(f"+{args.warm_steps} {row}", overrides) for row, overrides in warm_start_rows(args.rows)]
            for row, overrides in rows:
                name = re.sub(r"[^A-Za-z0-9_.-]+", "_", row.replace("λ", "lambda")) + f"_s{seed}"  # Hydra-safe
                out = f"{demo.ARTIFACTS}/bench_objectives/{name}"
                config = demo._config("distill", workdir, [
                    f"seed={seed}", f"student_pretrain={init}", f"exp_name={name}", f"output_dir={out}",
                    f"logging_dir={out}/logs", *row_budget, *overrides])
                result, seconds = demo._run(f"{row}, seed {seed}", config)
                metrics = result.eval_metrics
                results.setdefault(row, []).append((metrics["val/exact_match"], metrics["val/loss"], seconds,
                                                    metrics.get("eval/onpolicy_rkl"), step_seconds(out, workdir)))
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    teacher_eval = json.loads((workdir / "models" / "teacher_eval.json").read_text())
    if args.warm_start:
        print(f"\nWarm start: each seed's {WARM_BASE} student after {args.steps} steps (examples/tiny/distill.yaml, "
              f"w 0.5), continued {args.warm_steps} steps per row (cosine schedule from the demo's lr 3e-3 with its "
              f"warm-up, unless the row says otherwise), pure KD (w = 1 off-policy). {SAMPLING}.")
    print(f"\nDemo task (held-out: 500 clean questions); teacher {args.teacher_steps} SFT steps: exact match "
          f"{teacher_eval['val/exact_match']:.1%}, loss {teacher_eval['val/loss']:.3f}; students: 0.22M parameters, 1,000 transfer records with 20% "
          f"answer-digit noise, {args.steps} steps each, batch 64; KD rows: examples/tiny/distill.yaml "
          f"(top-64 with tail, distill_loss_weight 0.5, T 1); KUBEDISTILL_NUM_THREADS="
          f"{os.environ.get('KUBEDISTILL_NUM_THREADS', 'default')}. Seeds {' '.join(map(str, args.seeds))}; median "
          f"(min–max) over seeds.")
    if args.on_policy:
        print(f"On-policy rows: {SAMPLING}; onpolicy rkl: the teacher's per-token reverse KL on the student's greedy "
              "answers to the held-out questions (not defined for SFT only, which has no teacher); s/step: median "
              "seconds per training step (evaluation steps excluded).")
        width = max(28, *(len(row) for row in results))
        print(f"| {'row':<{width}} | {'exact match':<22} | {'held-out loss':<24} | {'onpolicy rkl':<24} | "
              f"{'s/step':>6} | {'run time':>8} |")
        print(f"|{'-' * (width + 2)}|{'-' * 24}|{'-' * 26}|{'-' * 26}|{'-' * 8}|{'-' * 10}|")
        for row, values in results.items():
            rkl = [v[3] for v in values if v[3] is not None]
            print(f"| {row:<{width}} | {_spread([100 * v[0] for v in values], '.1f') + ' %':<22} | "
                  f"{_spread([v[1] for v in values], '.3f'):<24} | {(_spread(rkl, '.4f') if rkl else '–'):<24} | "
                  f"{_median_or_dash([v[4] for v in values], '.3f'):>6} | "
                  f"{_median_or_dash([v[2] for v in values], '.0f', ' s'):>8} |")
        print(f"total wall time: {time.perf_counter() - began:.0f} s")
        return 0
    print(f"| {'objective':<18} | {'exact match':<22} | {'held-out loss':<24} | {'run time':>8} |")
    print(f"|{'-' * 20}|{'-' * 24}|{'-' * 26}|{'-' * 10}|")
    for row, values in results.items():
        matches = [100 * v[0] for v in values]
        losses = [v[1] for v in values]
        seconds = statistics.median(v[2] for v in values)
        print(f"| {row:<18} | {_spread(matches, '.1f') + ' %':<22} | {_spread(losses, '.3f'):<24} | {seconds:>6.0f} s |")
    print(f"total wall time: {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
