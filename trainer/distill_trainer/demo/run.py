"""The CPU demo, end to end: build everything offline, train a teacher, compare SFT with distillation.

1. Generate the task's splits and a tokenizer; randomly initialize a teacher and a smaller student.
2. Train the teacher by SFT on the large split (the pipeline with ``distill_loss_weight=0``).
3. Train the student on the small transfer split twice, for the same steps and hyperparameters:
   SFT only (``distill_loss_weight=0``) and distilled from the teacher (``examples/tiny/distill.yaml``).
4. Print held-out exact match and loss of all three.

Every phase is an ordinary pipeline run from the YAML files in ``examples/tiny/``; the same distillation
runs alone with ``kubedistill train examples/tiny/distill.yaml`` once the artifacts exist.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from ..config import DistillConfig, compose_config
from ..pipeline import DistillPipeline, RunResult, ensure_ray
from .task import make_splits, write_jsonl
from .tiny_models import build_causal_lm, build_tokenizer

EXAMPLE_DIR = Path(__file__).resolve().parents[3] / "examples" / "tiny"
ARTIFACTS = "examples/tiny/artifacts"  # what the YAML files point at, relative to the repository root

# The task and model sizes (hyperparameters of the training runs live in the YAML files). The student's
# transfer set is small and noisy (20% of its answer digits replaced at random, as in scraped data); the
# teacher learned from a large clean set. Distillation hands the student the teacher's corrected targets.
SPLIT_SIZES = dict(n_train=20000, n_transfer=1000, n_eval=500)
LABEL_NOISE = 0.2
TEACHER_SIZE = dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512)
# A small RoPE base shortens the early loss plateau of this tiny student (measured in bench/demo_sweep.py).
STUDENT_SIZE = dict(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=256, rope_theta=100.0)


def build_artifacts(workdir: Path, seed: int) -> None:
    """Data splits, tokenizer, initial teacher and student: deterministic, skipped when already built."""
    stamp = workdir / "artifacts.json"
    spec = {"seed": seed, "splits": SPLIT_SIZES, "noise": LABEL_NOISE, "teacher": TEACHER_SIZE, "student": STUDENT_SIZE}
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        print(f"[demo] reusing data and initial models in {workdir}")
        return
    print(f"[demo] generating task data and models in {workdir}")
    splits = make_splits(seed=seed, **SPLIT_SIZES, label_noise=LABEL_NOISE, noisy_splits=("transfer",))
    for name, records in splits.items():
        write_jsonl(records, workdir / "data" / f"{name}.jsonl")
    tokenizer = build_tokenizer([r["question"] + r["answer"] for r in splits["train"]], None)
    build_causal_lm(tokenizer, workdir / "models" / "teacher_init", seed=seed, **TEACHER_SIZE)
    build_causal_lm(tokenizer, workdir / "models" / "student_init", seed=seed + 1, **STUDENT_SIZE)
    stamp.write_text(json.dumps(spec))


def _config(name: str, workdir: Path, overrides: list[str]) -> DistillConfig:
    """Compose an example YAML, re-rooting its artifact paths at ``workdir``."""
    config = compose_config(EXAMPLE_DIR, name, overrides)
    rerooted = {}
    for field in ("student_pretrain", "teacher_pretrain", "output_dir", "logging_dir"):
        rerooted[field] = getattr(config, field).replace(ARTIFACTS, str(workdir))
    data = config.model_dump()
    data.update(rerooted)
    for key in ("file_name", "eval_file_name"):
        value = data["student"]["data_args"][key]
        data["student"]["data_args"][key] = value.replace(ARTIFACTS, str(workdir)) if value else value
    return DistillConfig.model_validate(data)


def _run(title: str, config: DistillConfig) -> tuple[RunResult, float]:
    print(f"\n[demo] {title}: {config.max_steps} steps")
    shutil.rmtree(config.output_dir, ignore_errors=True)  # each phase starts fresh: the demo compares runs
    shutil.rmtree(config.logging_dir, ignore_errors=True)
    start = time.perf_counter()
    result = DistillPipeline(config).run()
    return result, time.perf_counter() - start


def _install(checkpoint: str, destination: Path) -> None:
    """Copy a checkpoint's model to a stable path via a temporary sibling and a rename."""
    tmp = destination.with_name(destination.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(Path(checkpoint) / "student", tmp)
    old = destination.with_name(destination.name + ".old")
    if destination.exists():
        destination.rename(old)
    tmp.rename(destination)
    shutil.rmtree(old, ignore_errors=True)


def _student_runs(workdir: Path, seed: int, student_seed: int) -> tuple[DistillConfig, DistillConfig]:
    """SFT-only and distilled configs of one student seed (its own initialization and data order)."""
    suffix = "" if student_seed == 0 else f"_s{student_seed}"
    init = workdir / "models" / f"student_init{suffix}"
    if not (init / "config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(workdir / "models" / "student_init")
        build_causal_lm(tokenizer, init, seed=seed + 1 + student_seed, **STUDENT_SIZE)
    common = [f"seed={seed + student_seed}", f"student_pretrain={ARTIFACTS}/models/student_init{suffix}"]
    sft = _config("distill", workdir, common + [
        "distill_loss_weight=0", f"exp_name=sft_only{suffix}",
        f"output_dir={ARTIFACTS}/runs/sft_only{suffix}", f"logging_dir={ARTIFACTS}/runs/sft_only{suffix}/logs"])
    kd = _config("distill", workdir, common + [
        f"exp_name=tiny_distill{suffix}",
        f"output_dir={ARTIFACTS}/runs/distill{suffix}", f"logging_dir={ARTIFACTS}/runs/distill{suffix}/logs"])
    return sft, kd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubedistill demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=ARTIFACTS, help="where data, models and runs go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the teacher and the first student")
    parser.add_argument("--student-seeds", type=int, nargs="+", default=[0], metavar="S",
                        help="train both students once per seed S (own init and data order); prints the median")
    parser.add_argument("--reuse-teacher", action="store_true", help="skip teacher SFT if a teacher is present")
    args = parser.parse_args(argv)

    began = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    build_artifacts(workdir, args.seed)
    started_ray = ensure_ray()
    timings: dict[str, float] = {}
    outcomes: list[tuple[int, RunResult, RunResult]] = []
    try:
        teacher_dir = workdir / "models" / "teacher"
        if args.reuse_teacher and (teacher_dir / "config.json").is_file():
            teacher_eval = json.loads((workdir / "models" / "teacher_eval.json").read_text())
            print(f"[demo] reusing the trained teacher in {teacher_dir}")
        else:
            result, timings["teacher SFT"] = _run("teacher SFT", _config("teacher_sft", workdir, [f"seed={args.seed}"]))
            _install(result.last_checkpoint, teacher_dir)
            teacher_eval = result.eval_metrics
            (workdir / "models" / "teacher_eval.json").write_text(json.dumps(teacher_eval))
        for student_seed in args.student_seeds:
            sft_config, kd_config = _student_runs(workdir, args.seed, student_seed)
            sft, timings[f"student SFT only, seed {student_seed}"] = _run(f"student {student_seed}, SFT only", sft_config)
            kd, timings[f"student distilled, seed {student_seed}"] = _run(f"student {student_seed}, distilled", kd_config)
            outcomes.append((student_seed, sft, kd))
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    print(f"\nHeld-out set: {SPLIT_SIZES['n_eval']} clean questions. Teacher: SFT on {SPLIT_SIZES['n_train']} clean "
          f"records. Students: {SPLIT_SIZES['n_transfer']} records with {LABEL_NOISE:.0%} answer-digit noise, "
          f"{kd_config.max_steps} steps each; distilled with kd_objective={kd_config.kd_objective}, "
          f"distill_loss_weight={kd_config.distill_loss_weight}, kd_temperature={kd_config.kd_temperature}, "
          f"logits_topk={kd_config.logits_topk}")
    rows = [("teacher", "", teacher_eval)]
    for student_seed, sft, kd in outcomes:
        rows += [("student, SFT only", student_seed, sft.eval_metrics), ("student, distilled", student_seed, kd.eval_metrics)]
    print(f"{'model':<20} {'seed':>4} {'exact match':>12} {'loss':>8}")
    for name, student_seed, metrics in rows:
        print(f"{name:<20} {student_seed!s:>4} {metrics['val/exact_match']:>11.1%} {metrics['val/loss']:>8.4f}")
    if len(outcomes) > 1:
        for name, index in (("SFT only", 1), ("distilled", 2)):
            scores = sorted(outcome[index].eval_metrics["val/exact_match"] for outcome in outcomes)
            print(f"median exact match, {name}: {statistics.median(scores):.1%} (range {scores[0]:.1%} - {scores[-1]:.1%})")
        wins = sum(kd.eval_metrics["val/exact_match"] > sft.eval_metrics["val/exact_match"] for _, sft, kd in outcomes)
        print(f"distilled beats SFT only on {wins} of {len(outcomes)} seeds")
    for phase, seconds in timings.items():
        print(f"  {phase}: {seconds:.0f} s")
    print(f"total wall time: {time.perf_counter() - began:.0f} s; distilled student: {outcomes[-1][2].last_checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
