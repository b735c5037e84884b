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
import os
import shutil
import sys
import time
from pathlib import Path

from ..config import DistillConfig, compose_config
from ..pipeline import DistillPipeline, RunResult, ensure_ray
from .task import make_splits, write_jsonl
from .tiny_models import build_causal_lm, build_tokenizer

EXAMPLE_DIR = Path(__file__).resolve().parents[3] / "examples" / "tiny"
ARTIFACTS = "examples/tiny/artifacts"  # what the YAML files point at, relative to the repository root

# The task and model sizes (hyperparameters of the training runs live in the YAML files).
SPLIT_SIZES = dict(n_train=20000, n_transfer=1000, n_eval=500)
TEACHER_SIZE = dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512)
STUDENT_SIZE = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256)


def build_artifacts(workdir: Path, seed: int) -> None:
    """Data splits, tokenizer, initial teacher and student: deterministic, skipped when already built."""
    stamp = workdir / "artifacts.json"
    spec = {"seed": seed, "splits": SPLIT_SIZES, "teacher": TEACHER_SIZE, "student": STUDENT_SIZE}
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        print(f"[demo] reusing data and initial models in {workdir}")
        return
    print(f"[demo] generating task data and models in {workdir}")
    splits = make_splits(seed=seed, **SPLIT_SIZES)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubedistill demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=ARTIFACTS, help="where data, models and runs go")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initializations and training")
    parser.add_argument("--reuse-teacher", action="store_true", help="skip teacher SFT if a teacher is present")
    args = parser.parse_args(argv)

    began = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    seed = [f"seed={args.seed}"]
    build_artifacts(workdir, args.seed)
    started_ray = ensure_ray()
    try:
        teacher_dir = workdir / "models" / "teacher"
        timings = {}
        if args.reuse_teacher and (teacher_dir / "config.json").is_file():
            teacher_eval = json.loads((workdir / "models" / "teacher_eval.json").read_text())
            print(f"[demo] reusing the trained teacher in {teacher_dir}")
        else:
            result, timings["teacher SFT"] = _run("teacher SFT", _config("teacher_sft", workdir, seed))
            _install(result.last_checkpoint, teacher_dir)
            teacher_eval = result.eval_metrics
            (workdir / "models" / "teacher_eval.json").write_text(json.dumps(teacher_eval))
        sft, timings["student SFT only"] = _run(
            "student, SFT only", _config("distill", workdir, seed + ["distill_loss_weight=0", "exp_name=sft_only",
                                                                   f"output_dir={ARTIFACTS}/runs/sft_only",
                                                                   f"logging_dir={ARTIFACTS}/runs/sft_only/logs"])
        )
        kd_config = _config("distill", workdir, seed)
        kd, timings["student distilled"] = _run("student, distilled", kd_config)
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    rows = [("teacher (SFT on 20k)", teacher_eval), ("student, SFT only", sft.eval_metrics),
            ("student, distilled", kd.eval_metrics)]
    print(f"\nHeld-out set: {SPLIT_SIZES['n_eval']} questions; students trained on {SPLIT_SIZES['n_transfer']} "
          f"records for {kd_config.max_steps} steps (kd_objective={kd_config.kd_objective}, "
          f"distill_loss_weight={kd_config.distill_loss_weight}, kd_temperature={kd_config.kd_temperature}, "
          f"logits_topk={kd_config.logits_topk})")
    print(f"{'model':<24} {'exact match':>12} {'loss':>8}")
    for name, metrics in rows:
        print(f"{name:<24} {metrics['val/exact_match']:>11.1%} {metrics['val/loss']:>8.4f}")
    for phase, seconds in timings.items():
        print(f"  {phase}: {seconds:.0f} s")
    print(f"total wall time: {time.perf_counter() - began:.0f} s; distilled student: {kd.last_checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
