"""kubedistill against Hugging Face TRL's GKDTrainer and a minimal PyTorch loop: distillation tokens per second.

The same work for every contender: a Qwen2-architecture teacher and student built here (random weights: speed does
not depend on what they know), a byte-level BPE tokenizer trained on real English prose (the reStructuredText
sources of Debian's ``python3.11-doc``, extracted as ``bench/realtext.py`` does), the same records in the same
batches and order, batch 8, the same sequence length, fp32, AdamW with the same settings, forward KL
KL(p_teacher ‖ q_student) per label token (answer tokens; prompts are not learned), and the same thread budget
(``--threads`` cores in all: the single-process contenders get all of them, kubedistill's teacher and student
actors half each):

- **TRL**: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (never generate on-policy: always the dataset's
  sequences) and ``beta=0`` (its generalized JSD is then ``F.kl_div(student_log_probs, teacher_log_probs,
  log_target=True)`` = forward KL, checked in trl 1.16's source), its loss alone (no CE term), like ours with
  ``distill_loss_weight: 1``. Teacher and student in one process, one after the other.
- **PyTorch loop**: the same math in ~15 lines (teacher forward, student forward, log-softmax of both over the
  vocabulary, KL, backward, clip, AdamW).
- **kubedistill**: ``DistillPipeline`` (teacher and student Ray actors, the teacher's targets through shared
  memory, the overlapped teacher), ``distill_loss_weight: 1``, forward KL, full vocabulary (``logits_topk: 0``,
  the same math) and top-64 (``logits_topk: 64`` with the tail bucket, the default).
- **kubedistill from cache**: the same math as top-64 with the tail, but the teacher's targets read from an
  offline teacher cache (``kubedistill cache-teacher``, ``teacher_cache_dtype: compact``) written once beforehand
  over the same records; no teacher actor runs, so the student actor gets all ``--threads``. The cache's writing
  (the teacher's one-off pass, a Ray run of its own) is timed and printed apart, not in tokens/s.
- **kubedistill top-64, no tail** (``topk_tail: false``): both distributions renormalised over the teacher's 64,
  the original pipeline's math. Not TRL's math, and with ``distill_loss_weight: 1`` the combination the trainer
  warns about (the student's mass outside the 64 is never trained); shown for speed only: the KD gradient lives
  at the 64 indices, so the student's output layer backward is ``[N, 64]``-sparse instead of ``[N, V]``.

Each contender runs ``--warmup`` steps, then ``--steps`` timed steps; tokens/s = non-padding input tokens of the
timed steps / their wall time (start-up, model loading and the warm-up are not counted). Rounds interleave the
contenders (round r: TRL, loop, kubedistill full, top-64, from cache, top-64 without the tail), so load from other
processes on a shared machine falls on all of them alike; the table gives each round, the median, the peak
resident memory (the process's peak RSS; for kubedistill the sum of the teacher's and the student's actor
processes) and the ratio of medians to TRL. Figures only; it never passes or fails on them.

TRL is never a dependency of the trainer. It lives in its own environment, which this script runs as subprocesses:

  python -m venv .venv-bench
  .venv-bench/bin/pip install torch==2.13.0 transformers==5.24.0 trl      # (pip install -e '.[bench]' is the same set)
  .venv/bin/python bench/vs_trl.py                      # 3 rounds x 5 contenders (~5 min on 2 cores)
  .venv/bin/python bench/vs_trl.py --only trl top64     # a subset (trl, loop, full, top64, cache, top64_notail)
  .venv/bin/python bench/vs_trl.py --quick              # smoke run: tiny models, 1 round
  .venv/bin/python bench/vs_trl.py --profile            # kubedistill's step in parts, each alone on one thread

``--trl-python`` names another interpreter that has trl. The PyTorch loop runs in this script's interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SIZES = {
    "full": dict(vocab=8192, q_words=40, a_words=130, seq=256, batch=8,
                 teacher=dict(hidden_size=256, num_layers=6, num_heads=4, intermediate_size=1024),
                 student=dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512)),
    "quick": dict(vocab=1024, q_words=8, a_words=24, seq=64, batch=4,
                  teacher=dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128),
                  student=dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)),
}
LR = 1e-3
CONTENDERS = {"trl": "TRL GKDTrainer", "loop": "PyTorch loop", "full": "kubedistill full vocab",
              "top64": "kubedistill top-64", "cache": "kubedistill from cache",
              "top64_notail": "kubedistill top-64, no tail"}


# --- the single-process contenders (run as subprocesses; TRL's in its own environment) -------------------------


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _load_batches(spec: dict):
    """The timed run's batches, in order: right-padded input_ids, attention_mask and HF-style (unshifted) labels."""
    import torch

    batches = []
    for rows in json.loads(Path(spec["batches"]).read_text()):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), spec["pad_token_id"], dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(r["labels"])
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _models(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32).train()
    return teacher, student


def _timed(step_ends: list[float], batches, warmup: int) -> dict:
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[warmup:])
    seconds = step_ends[-1] - step_ends[warmup - 1]
    return {"tokens_per_second": tokens / seconds, "seconds": seconds, "peak_rss_mib": _peak_rss_mib()}


def run_torch_loop(spec: dict) -> dict:
    """The same math in plain PyTorch: teacher forward, student forward, forward KL over the vocabulary, AdamW."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    teacher, student = _models(spec)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    batches = _load_batches(spec)
    step_ends = []
    for batch in batches:
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        mask = batch["labels"][:, 1:] != -100
        log_p = F.log_softmax(t_logits[mask].float(), dim=-1)
        log_q = F.log_softmax(s_logits[mask].float(), dim=-1)
        loss = (log_p.exp() * (log_p - log_q)).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_ends.append(time.perf_counter())
    return _timed(step_ends, batches, spec["warmup"])


def run_trl(spec: dict) -> dict:
    """TRL's GKDTrainer, lmbda=0 and beta=0 (forward KL on the dataset's sequences), on the same batches in order."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.set_num_threads(spec["threads"])
    teacher, student = _models(spec)
    tokenizer = AutoTokenizer.from_pretrained(spec["student"])
    batches = _load_batches(spec)
    size = len(batches[0]["input_ids"])
    dataset = Dataset.from_list([{"index": i} for i in range(len(batches) * size)])

    def collate(rows):  # the pre-built batch the rows' indices point into (same padding as the other contenders)
        return batches[rows[0]["index"] // size]

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    class InOrder(GKDTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    out = Path(spec["workdir"]) / "trl_out"
    args = GKDConfig(
        output_dir=str(out), per_device_train_batch_size=size, gradient_accumulation_steps=1, max_steps=len(batches),
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta2=0.95,
        max_grad_norm=1.0, lmbda=0.0, beta=0.0, temperature=1.0, max_length=spec["seq"], seq_kd=False,
        logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        remove_unused_columns=False, bf16=False, fp16=False, disable_tqdm=True, seed=0,
    )
    trainer = InOrder(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                      processing_class=tokenizer, data_collator=collate, callbacks=[StepClock()])
    trainer.train()
    return _timed(step_ends, batches, spec["warmup"])


def run_profile(spec: dict) -> dict:
    """kubedistill's step, part by part, each alone on one thread (``--profile``): what bounds the overlapped step.

    On the first timed batch, with the library's own functions (as the torch strategies call them): the teacher's
    transformer body, its output layer at the label rows, its top-64 with and without the tail mass; the
    student's step (body forward + fused head and loss + backward + clip + AdamW) with the tail and without.
    Median of 5 after one warm-up call."""
    import torch

    sys.path.insert(0, str(REPO / "trainer"))
    from distill_trainer.distill_loss import LossConfig, TeacherTargets, fused_head_distill_loss
    from distill_trainer.losses import topk_teacher_logits

    torch.set_num_threads(1)
    teacher, student = _models(spec)
    batch = _load_batches(spec)[spec["warmup"]]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], 1)  # shifted
    at = labels != -100
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    with torch.inference_mode():
        hidden = teacher.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[at]
        logits = teacher.lm_head(hidden).float()
    top = topk_teacher_logits(logits, 64, 1.0)
    targets = TeacherTargets(top.values, top.indices, top.tail_logmass)

    def teacher_body():
        with torch.inference_mode():
            teacher.model(input_ids=ids, attention_mask=mask, use_cache=False)

    def teacher_head():
        with torch.inference_mode():
            teacher.lm_head(hidden)

    def student_step(tail: bool):
        out = student.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[at]
        cfg = LossConfig(distill_loss_weight=1.0, logits_topk=64, topk_tail=tail)
        fused_head_distill_loss(out, student.lm_head.weight, None, labels[at], targets, cfg, float(at.sum())).loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {
        "label_rows": int(at.sum()),
        "tokens": int(mask.sum()),
        "teacher body": median_ms(teacher_body),
        "teacher output layer (label rows)": median_ms(teacher_head),
        "teacher top-64": median_ms(lambda: topk_teacher_logits(logits, 64)),
        "teacher top-64 + tail": median_ms(lambda: topk_teacher_logits(logits, 64, 1.0)),
        "student step, top-64 + tail": median_ms(lambda: student_step(True)),
        "student step, top-64 no tail": median_ms(lambda: student_step(False)),
    }


# --- the driver ------------------------------------------------------------------------------------------------


def _build(workdir: Path, sizes: dict, n_batches: int, threads: int) -> dict:
    """Tokenizer, models, records and the batch order; returns the spec every contender reads."""
    sys.path.insert(0, str(REPO / "trainer"))
    sys.path.insert(0, str(REPO / "bench"))
    import realtext
    from distill_trainer.data import IGNORE_INDEX, ShuffledBatches, load_examples
    from distill_trainer.demo.tiny_models import build_causal_lm, build_tokenizer
    from transformers import AutoTokenizer

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubedistill" / "realtext"
    docs = realtext.fetch_prose(cache)
    window = realtext.Sizes(**{**realtext.FULL.__dict__, "q_words": sizes["q_words"], "a_words": sizes["a_words"],
                               "max_train_records": 100_000, "eval_records": 1})
    train, _ = realtext.make_records(docs, window)
    records = train[: n_batches * sizes["batch"]]
    realtext.write_jsonl(records, workdir / "data" / "train.jsonl")
    tok_dir = workdir / "models" / "tokenizer"
    build_tokenizer([r["question"] + r["answer"] for r in train[:20_000]], tok_dir, vocab_size=sizes["vocab"])
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    for name, seed in (("teacher", 1), ("student", 2)):
        build_causal_lm(tokenizer, workdir / "models" / name, seed=seed, max_position_embeddings=sizes["seq"],
                        **sizes[name])
    examples = load_examples(workdir / "data" / "train.jsonl", tokenizer, question_key="question",
                             answer_key="answer", sequence_length=sizes["seq"], distill_on_prompt=False)
    order = ShuffledBatches(examples, sizes["batch"], seed=0)  # kubedistill's order for seed 0: give it to all
    batches = []
    for _ in range(n_batches):
        rows = []
        for e in order.next_batch():
            # kubedistill's labels are shifted (labels[t] = the token position t predicts); HF's are not.
            hf = [IGNORE_INDEX] + [e.input_ids[t + 1] if e.labels[t] != IGNORE_INDEX else IGNORE_INDEX
                                   for t in range(len(e.input_ids) - 1)]
            rows.append({"input_ids": e.input_ids, "labels": hf})
        batches.append(rows)
    (workdir / "data" / "batches.json").write_text(json.dumps(batches))
    return {"teacher": str(workdir / "models" / "teacher"), "student": str(workdir / "models" / "student"),
            "batches": str(workdir / "data" / "batches.json"), "train_file": str(workdir / "data" / "train.jsonl"),
            "pad_token_id": tokenizer.pad_token_id, "seq": sizes["seq"], "batch": sizes["batch"], "threads": threads,
            "workdir": str(workdir)}


def _subprocess(python: str, kind: str, spec: dict) -> dict:
    spec_path = Path(spec["workdir"]) / f"spec_{kind}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([python, __file__, "--worker", kind, "--spec", str(spec_path)], env=env,
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"error: the {kind} contender failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


class _ActorMemory:
    """Peak RSS (VmHWM) of this driver's Ray actor processes of kubedistill's workers, polled while a run lasts."""

    def __init__(self):
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _descendants(self) -> list[int]:
        children, pids = {}, [os.getpid()]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        out = []
        while pids:
            pid = pids.pop()
            for child in children.get(pid, []):
                out.append(child)
                pids.append(child)
        return out

    def _poll(self):
        while not self._stop.wait(0.5):
            for pid in self._descendants():
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if not cmd.startswith((b"ray::TeacherWorker", b"ray::StudentWorker")):
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peaks[pid] = max(self.peaks.get(pid, 0.0), int(line.split()[1]) / 1024)
                except OSError:
                    continue

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _kubedistill_config(spec: dict, run_dir: Path, topk: int, tail: bool, cache_dir: Path | None = None):
    from distill_trainer.config import config_from_dict

    steps = spec["warmup"] + spec["steps"]
    data = {
        "exp_name": f"vs_trl_top{topk}", "seed": 0, "output_dir": str(run_dir), "logging_dir": str(run_dir / "logs"),
        "max_steps": steps, "save_steps": 0, "logging_steps": 1, "eval_steps": 0, "overwrite_output_dir": True,
        "student_pretrain": spec["student"], "teacher_pretrain": spec["teacher"],
        "distill_loss_weight": 1.0, "kd_objective": "forward_kl", "logits_topk": topk, "topk_tail": tail,
        "kd_temperature": 1.0,
        "sequence_length": spec["seq"],
        "student": {"training_args": {"learning_rate": LR, "lr_scheduler_type": "constant", "warmup_steps": 0,
                                      "per_device_train_batch_size": spec["batch"], "weight_decay": 0.0,
                                      "max_grad_norm": 1.0, "adam_beta2": 0.95},
                    "data_args": {"file_name": spec["train_file"]}},
    }
    if cache_dir is not None:
        data.update(teacher_cache_dir=str(cache_dir), teacher_cache_dtype="compact")
    return config_from_dict(data, "<vs_trl>")


def write_teacher_cache(spec: dict) -> dict:
    """The teacher's one-off pass for the "from cache" contender: ``kubedistill cache-teacher`` (top-64 with the
    tail, compact) over the run's records, on all ``--threads`` (the teacher alone); timed, its size read back."""
    from distill_trainer.teacher_cache.writer import CacheTeacherRun

    cache_dir = Path(spec["workdir"]) / "teacher_cache_top64"
    shutil.rmtree(cache_dir, ignore_errors=True)
    run_dir = Path(spec["workdir"]) / "runs" / "cache_teacher"
    config = _kubedistill_config(spec, run_dir, 64, True, cache_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(run_dir.parent / "cache_teacher.log", "w") as log, contextlib.redirect_stdout(log):
        result = CacheTeacherRun(config, num_threads=spec["threads"]).run()
    seconds = time.perf_counter() - started
    files = json.loads((cache_dir / "manifest.json").read_text())["shard_files"]
    rows, size = sum(f["rows"] for f in files), sum(f["bytes"] for f in files)
    return {"dir": str(cache_dir), "seconds": seconds, "records": result.records, "rows": rows, "bytes": size,
            "bytes_per_token": size / rows}


def run_kubedistill(spec: dict, topk: int, tail: bool, round_: int, cache_dir: Path | None = None) -> dict:
    from distill_trainer.pipeline import DistillPipeline

    run_dir = Path(spec["workdir"]) / "runs" / (
        f"kubedistill_top{topk}{'' if tail else '_notail'}{'_cache' if cache_dir else ''}_r{round_}")
    steps = spec["warmup"] + spec["steps"]
    config = _kubedistill_config(spec, run_dir, topk, tail, cache_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # Teacher and student: half the threads each; reading a cache, the student actor is alone and gets them all.
    os.environ["KUBEDISTILL_NUM_THREADS"] = str(spec["threads"] if cache_dir else max(1, spec["threads"] // 2))
    with _ActorMemory() as memory, open(run_dir.parent / f"{run_dir.name}.log", "w") as log, \
            contextlib.redirect_stdout(log):
        DistillPipeline(config, console=False).run()
    records = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    batches = json.loads(Path(spec["batches"]).read_text())
    tokens = sum(len(r["input_ids"]) for rows in batches[spec["warmup"]:steps] for r in rows)
    by_step = {r["step"]: r for r in records}
    seconds = by_step[steps]["time"] - by_step[spec["warmup"]]["time"]
    timed = [by_step[s] for s in range(spec["warmup"] + 1, steps + 1)]
    return {"tokens_per_second": tokens / seconds, "seconds": seconds,
            "peak_rss_mib": sum(memory.peaks.values()),
            "teacher_forward": _median_of(timed, "time/teacher_forward"),
            "student_step": _median_of(timed, "time/student_step"),
            "transfer": _median_of(timed, "time/logits_transfer")}


def _median_of(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run")
    parser.add_argument("--steps", type=int, default=12, help="timed steps of every run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="cores for each contender")
    parser.add_argument("--trl-python", default=str(REPO / ".venv-bench" / "bin" / "python"))
    parser.add_argument("--workdir", default="/tmp/kubedistill-vs-trl")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny models, 1 round, 2 + 3 steps")
    parser.add_argument("--only", nargs="+", choices=list(CONTENDERS), help="run only these contenders")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the contenders: kubedistill's step part by part, each alone on one thread")
    parser.add_argument("--worker", choices=["trl", "torch", "profile"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # a contender's subprocess
        spec = json.loads(Path(args.spec).read_text())
        result = {"trl": run_trl, "torch": run_torch_loop, "profile": run_profile}[args.worker](spec)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    if args.quick:
        args.rounds, args.warmup, args.steps = 1, 2, 3
    if not Path(args.trl_python).is_file() and not args.profile and "trl" in (args.only or CONTENDERS):
        raise SystemExit(f"error: {args.trl_python} not found; create the benchmark's environment first (see the "
                         f"docstring: python -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 trl ...)")
    sizes = SIZES["quick" if args.quick else "full"]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    spec = _build(workdir, sizes, args.warmup + args.steps, args.threads)
    spec.update(warmup=args.warmup, steps=args.steps)
    if args.profile:
        parts = _subprocess(sys.executable, "profile", {**spec, "threads": 1})
        print(f"kubedistill's step in parts, each alone on 1 thread, median of 5 (first timed batch: "
              f"{parts.pop('tokens')} tokens, {parts.pop('label_rows')} label rows):")
        for name, ms in parts.items():
            print(f"  {name:<36} {ms:7.1f} ms")
        return 0
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "trainer"), os.environ.get("PYTHONPATH")]))

    from distill_trainer.pipeline import ensure_ray
    from transformers import AutoModelForCausalLM

    counts = {n: AutoModelForCausalLM.from_pretrained(spec[n]).num_parameters() for n in ("teacher", "student")}
    batches = json.loads(Path(spec["batches"]).read_text())
    mean_len = statistics.mean(len(r["input_ids"]) for rows in batches for r in rows)
    labels = statistics.mean(sum(x != -100 for x in r["labels"]) for rows in batches for r in rows)
    contenders = [CONTENDERS[c] for c in (args.only or CONTENDERS)]
    results: dict[str, list[dict]] = {c: [] for c in contenders}
    started_ray = ensure_ray()
    cache = None
    try:
        if CONTENDERS["cache"] in contenders:  # written beforehand, once; its time is not in any tokens/s
            load = os.getloadavg()[0]
            cache = write_teacher_cache(spec)
            print(f"[vs_trl] teacher cache (top-64 + tail, compact) written in {cache['seconds']:.1f} s: "
                  f"{cache['records']:,} records, {cache['rows']:,} label tokens, {cache['bytes_per_token']:.1f} B per "
                  f"label token (load average {load:.1f} at start)", flush=True)
        for round_ in range(args.rounds):
            for name in contenders:
                load = os.getloadavg()[0]
                if name == CONTENDERS["trl"]:
                    r = _subprocess(args.trl_python, "trl", spec)
                elif name == CONTENDERS["loop"]:
                    r = _subprocess(sys.executable, "torch", spec)
                elif name == CONTENDERS["cache"]:
                    r = run_kubedistill(spec, 64, True, round_, Path(cache["dir"]))
                else:
                    r = run_kubedistill(spec, 0 if "full" in name else 64, "no tail" not in name, round_)
                r["load"] = load
                results[name].append(r)
                print(f"[vs_trl] round {round_ + 1}: {name}: {r['tokens_per_second']:.0f} tok/s, peak RSS "
                      f"{r['peak_rss_mib']:.0f} MiB (load average {load:.1f} at start)", flush=True)
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    print(f"\nteacher {counts['teacher'] / 1e6:.1f}M, student {counts['student'] / 1e6:.1f}M parameters (Qwen2, fp32, "
          f"random init); BPE vocabulary {sizes['vocab']:,} trained on python3.11-doc prose; batch {sizes['batch']}, "
          f"{mean_len:.0f} tokens per record on average ({labels:.0f} of them answer/label tokens), sequence length "
          f"{sizes['seq']}; forward KL; {args.warmup} warm-up + {args.steps} timed steps per run; {args.threads} "
          f"threads per contender (kubedistill: {max(1, args.threads // 2)} each for teacher and student); "
          f"{args.rounds} interleaved rounds")
    trl = results.get(CONTENDERS["trl"])
    trl_median = statistics.median(r["tokens_per_second"] for r in trl) if trl else None
    head = " | ".join(f"round {i + 1}" for i in range(args.rounds))
    print(f"| contender | {head} | median tok/s | peak RSS | vs TRL |")
    print("|---|" + "---|" * args.rounds + "---|---|---|")
    for name, runs in results.items():
        median = statistics.median(r["tokens_per_second"] for r in runs)
        rounds = " | ".join(f"{r['tokens_per_second']:,.0f}" for r in runs)
        print(f"| {name} | {rounds} | {median:,.0f} | {max(r['peak_rss_mib'] for r in runs):,.0f} MiB | "
              f"{f'{median / trl_median:.2f}x' if trl_median else '-'} |")
    for name in (c for c in contenders if c.startswith("kubedistill")):
        runs = results[name]
        split = {key: [r[key] for r in runs if r.get(key) is not None]
                 for key in ("teacher_forward", "student_step", "transfer")}
        if name == CONTENDERS["cache"] or not split["teacher_forward"]:
            step = f"{statistics.median(split['student_step']):.3f} s" if split["student_step"] else "-"
            print(f"{name}: median student step {step} (no teacher actor: the targets are read from the cache)")
            continue
        print(f"{name}: median step split: teacher forward {statistics.median(split['teacher_forward']):.3f} s"
              f" (overlapped with the student's previous step), student step "
              f"{statistics.median(split['student_step']):.3f} s, hand-off "
              f"{statistics.median(split['transfer']) * 1000:.0f} ms")
    if cache is not None:
        n = len(results[CONTENDERS["cache"]])
        print(f"kubedistill from cache: the teacher's one-off pass (cache-teacher, written before the rounds) took "
              f"{cache['seconds']:.1f} s for {cache['records']:,} records ({cache['rows']:,} label tokens, "
              f"{cache['bytes'] / 2**20:.2f} MiB, {cache['bytes_per_token']:.1f} B/label token), read by {n} runs; "
              f"not included in its tokens/s")
    loads = ", ".join(f"{r['load']:.1f}" for rs in results.values() for r in rs)
    print(f"load average (1 min) at the start of each run: {loads}; total wall time {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
