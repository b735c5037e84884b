"""Distillation on real English prose: does a distilled student beat SFT, per step and per unit of time?

Everything runs offline and through kubedistill's own pipeline (``DistillPipeline``, one embedded Ray for
all runs, as ``kubedistill train`` runs them):

1. Text: the reStructuredText sources of the Python 3.11 documentation, which Debian's ``python3.11-doc``
   ships (PSF license): ``apt-get download`` + ``dpkg-deb -x`` into the cache directory, once. Markup is
   stripped (directives, code and indented blocks, tables, headings; roles and literals keep their text);
   paragraphs of prose remain.
2. Records: each document's words are cut into consecutive windows; the first ``q_words`` words are the
   question, the next ``a_words`` the answer (the continuation). One document in ten (by a hash of its
   name) is held out, so held-out text is never seen in training.
3. A byte-level BPE tokenizer trained on the training records, a Qwen2-shaped teacher and a smaller
   student (``distill_trainer.demo.tiny_models``).
4. The teacher: a pipeline run with ``distill_loss_weight=0`` (plain SFT), cosine schedule, 2000 steps of batch
   16 (about 4.6 epochs of its 6.9k records; at 500 the SFT students caught up with it).
5. Students, per seed (each seed: its own initialization and data order), on a fixed random sample of the
   teacher's training records: SFT only, and each of the six KD objectives at ``distill_loss_weight`` 0.5
   and 1, top-64 teacher logits with the tail bucket, T = 1.

Every student run uses the same learning rate, batch and schedule: linear warmup, then a CONSTANT learning
rate. That makes one long SFT run serve both comparisons: its first S steps are exactly those of an S-step
run (same seed, same data order, same learning rate at every step; evaluation does not touch training), so

- **equal steps**: SFT's held-out loss is its evaluation at step S, the KD runs' step count;
- **equal wall time**: a KD run's time is S × its median step time; SFT's held-out loss at that time is read
  from its evaluations every E steps, linearly interpolated at step S × (KD median step time / SFT median
  step time). Step times are the medians of the step-to-step intervals in each run's ``metrics.jsonl``
  (evaluation steps excluded), which other jobs' bursts on a shared machine move less than a total would.
  Start-up (actors, model loading), evaluation and the checkpoint at the end are not counted for either.

**KD from cache** (``--from-cache``, issue 19): for each k of ``--cache-topk`` (default 64; 0 = the full
vocabulary) the teacher's targets over the students' training records are written once to an offline teacher
cache (``kubedistill cache-teacher``: ``CacheTeacherRun``, ``teacher_cache_dtype`` ``--cache-dtype``, default
compact), timed apart, its size read from the manifest (B per label token = the shards' bytes / their rows).
Then, per seed, students at ``--cache-weights`` x ``--cache-objectives`` (default 0.5 and 1 x forward_kl and
adaptive_kl) read it: no teacher actor, so such a run gets the two actors' threads, like SFT. Their rows give the
step time over SFT's and the deltas at equal steps and at equal wall time, and "d equal time+pass" adds each
run's share of the teacher's pass (its time / the runs that read that cache). ``--no-live`` leaves the rows with a
live teacher out. The table ends with the teacher's strength: its held-out CE against the best student at the
budget and SFT at the end of its long run. The teacher (``--teacher-steps``, default 2000 steps of batch 16,
cosine) is trained once and kept in ``--out``/models, reused while its data and sizes are the same.

  .venv/bin/python bench/realtext.py --from-cache --no-live --cache-topk 64 256 0   # the k table, cache rows only

Held-out loss is the student's full-vocabulary cross-entropy per answer token (``val/loss``, the number SFT
reports, not the mixed training loss), perplexity its exp. Rows give the median over seeds and the spread
(min–max). This script prints figures only; it never passes or fails on them.

  .venv/bin/python bench/realtext.py                     # the full table (~40 min on 2 shared cores)
  .venv/bin/python bench/realtext.py --quick --out /tmp/rt   # smoke run, tiny everything (~1 min)

**On-policy distillation** (``--on-policy``): per seed, students whose micro-batches are, with probability
λ = ``on_policy_fraction`` (``--on-policy-fractions``, default 0.5 and 1), completions the student samples itself
from the record's question (temperature 1, one per prompt; the teacher scores them, and the student trains on
``kd_objective`` at those positions, or with ``--on-policy-objectives sampled_reverse_kl`` on ROLL's sampled
reverse KL as a policy gradient), for each of ``--on-policy-objectives`` (default reverse_kl), at
``distill_loss_weight`` 1 with a live teacher, top-k with the tail bucket, the same steps and learning rate as
the other KD rows. ``generation.max_new_tokens`` comes from the data: each of the students' training records has
an answer window, its answer tokens + EOS as truncated to ``sequence_length`` (min(answer + 1, sequence - prompt));
the budget is the longest window, capped at ``sequence_length`` minus the longest prompt of the training and
held-out records, so that every prompt fits. At the full sizes the cap decides: windows median 96 tokens, longest
116, prompts up to 63 tokens (records keep prompts of at most half the sequence), so 128 - 63 = 65 tokens, and a
sampled completion covers about two thirds of a typical answer (under 1% of the windows fit whole); the line the
run prints gives the figures of its data. With ``--on-policy`` every live-teacher KD row, off-policy ones
included, also reports ``eval/onpolicy_rkl`` (the teacher's per-token reverse KL on the student's own greedy
completions of the held-out questions, up to that budget), in an "onpolicy rkl" column, so that off- and
on-policy students of one objective and weight compare on the student's own text as well as on held-out CE. An
on-policy row's ms/step is its MEAN step time (a step samples or not at λ < 1; sampling included), and "sample ms"
the mean sampling time per step; xSFT and the equal-time columns follow from it as for the other rows. The
on-policy rows run whatever ``--live`` says.

  # SFT, off-policy reverse_kl at w=1, on-policy reverse_kl at λ 0.5 and 1 (w=1), 3 seeds
  .venv/bin/python bench/realtext.py --on-policy --objectives reverse_kl --weights 1 --renorm --seeds 0 1 2

``--threads`` (default 1) is the torch threads of each Ray actor of a KD run; with ``overlap_teacher``, the
default, the teacher computes the next micro-batch's targets while the student trains, so a KD run keeps
2 × threads cores busy, and SFT-only runs (the teacher's and the students') get 2 × threads for their one
actor: the same hardware, which is what "equal wall time" compares. KD rows use the top-k "tail bucket"
(``topk_tail: true``, the default: k tokens plus the teacher's mass outside them); ``--renorm OBJECTIVE...`` adds rows at ``distill_loss_weight`` 1 with
``topk_tail: false`` (both sides renormalized over the top-k, the original pipeline's math) for reference
(default: forward_kl).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer"))

DEB_PACKAGE = "python3.11-doc"
SOURCES_IN_PACKAGE = "usr/share/doc/python3.11/html/_sources"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubedistill" / "realtext"
OBJECTIVES = ("forward_kl", "reverse_kl", "skewed_forward_kl", "skewed_reverse_kl", "js_divergence", "adaptive_kl")


@dataclass(frozen=True)
class Sizes:
    """Everything that sets the cost of the benchmark."""

    vocab: int
    seq: int
    q_words: int
    a_words: int
    teacher: dict
    student: dict
    teacher_steps: int
    teacher_lr: float
    teacher_batch: int
    steps: int  # KD runs (and SFT's equal-steps point)
    transfer_records: int  # the students' training set: a fixed random sample of the teacher's
    sft_factor: float  # the SFT run is this many times longer, for the equal-time reading
    evals: int  # SFT evaluations per S steps
    lr: float
    batch: int
    topk: int
    eval_records: int
    max_train_records: int


FULL = Sizes(
    vocab=2048, seq=128, q_words=12, a_words=56,
    teacher=dict(hidden_size=192, num_layers=4, num_heads=6, intermediate_size=768),
    student=dict(hidden_size=96, num_layers=3, num_heads=4, intermediate_size=256),
    teacher_steps=2000, teacher_lr=2e-3, teacher_batch=16, steps=160, transfer_records=4000, sft_factor=3.5, evals=4,
    lr=3e-3, batch=8, topk=64,
    eval_records=256, max_train_records=100_000,
)
QUICK = Sizes(
    vocab=512, seq=64, q_words=4, a_words=12,
    teacher=dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
    student=dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
    teacher_steps=4, teacher_lr=3e-3, teacher_batch=4, steps=4, transfer_records=200, sft_factor=4.0, evals=2,
    lr=3e-3, batch=4, topk=16,
    eval_records=16, max_train_records=400,
)


# --- Text -----------------------------------------------------------------------------------------------------

_ROLE = re.compile(r":[A-Za-z][\w:+.-]*:`[~!]?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`~os.path` -> os.path
_LINK = re.compile(r"`([^`<]*?)\s*<[^>]*>`_{1,2}")  # `text <url>`_ -> text
_LITERAL = re.compile(r"``([^`]*)``")
_INTERPRETED = re.compile(r"`([^`]*)`_{0,2}")
_UNDERLINE = re.compile(r"[=\-~^\"'`#*+.:_]{3,}\s*")


def rst_paragraphs(text: str) -> list[str]:
    """Paragraphs of prose from reStructuredText: markup stripped, code, directives and tables dropped."""
    out = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or lines[0][:1] in (" ", "\t") or lines[0].startswith(".."):
            continue  # an indented block (code, a directive's body, a quote) or a directive/comment
        lines = [line for line in lines if not _UNDERLINE.fullmatch(line)]  # heading underlines
        if not lines or any(line.lstrip().startswith((">>>", "|", "+-", "==", ".. ")) for line in lines):
            continue  # doctest, table, line block, a directive inside
        p = " ".join(line.strip() for line in lines)
        p = _ROLE.sub(r"\1", p)
        p = _LINK.sub(r"\1", p)
        p = _LITERAL.sub(r"\1", p)
        p = _INTERPRETED.sub(r"\1", p)
        p = re.sub(r"^[*#-] ", "", p).replace("**", "").replace("\\", "")
        p = re.sub(r"(?<!\w)\*([^*\s][^*]*?)\*(?!\w)", r"\1", p)  # *emphasis*
        p = re.sub(r"::$", ":", re.sub(r"\s+", " ", p)).strip()
        if len(p.split()) < 8 or sum(c.isalpha() or c.isspace() for c in p) < 0.85 * len(p):
            continue  # a caption, a signature, a list of symbols
        out.append(p)
    return out


def fetch_prose(cache: Path) -> dict[str, list[str]]:
    """Paragraphs per document of ``python3.11-doc``, fetched with apt-get and cached as JSON in ``cache``."""
    corpus = cache / "python3.11-doc-prose.json"
    if corpus.is_file():
        return json.loads(corpus.read_text())
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{DEB_PACKAGE}_*.deb"))
    if not debs:
        if shutil.which("apt-get") is None:
            raise SystemExit(
                f"error: apt-get not found. This benchmark reads the prose of Debian's {DEB_PACKAGE} package; on a "
                f"system without apt, download {DEB_PACKAGE}_*.deb (packages.debian.org) into {cache} and rerun."
            )
        print(f"[realtext] apt-get download {DEB_PACKAGE} into {cache}", flush=True)
        proc = subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=cache, capture_output=True, text=True)
        debs = sorted(cache.glob(f"{DEB_PACKAGE}_*.deb"))
        if proc.returncode or not debs:
            raise SystemExit(
                f"error: `apt-get download {DEB_PACKAGE}` failed (exit {proc.returncode}): "
                f"{proc.stderr.strip().splitlines()[-1:] or '?'}. Run `apt-get update` first (the package lists may be "
                f"missing), or put {DEB_PACKAGE}_*.deb into {cache} by hand."
            )
    if shutil.which("dpkg-deb") is None:
        raise SystemExit(f"error: dpkg-deb not found; it unpacks {debs[-1]}")
    unpacked = cache / "unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], check=True)
    root = unpacked / SOURCES_IN_PACKAGE
    docs = {}
    for path in sorted(root.rglob("*.rst.txt")):
        paragraphs = rst_paragraphs(path.read_text(encoding="utf-8", errors="replace"))
        if paragraphs:
            docs[str(path.relative_to(root))] = paragraphs
    shutil.rmtree(unpacked)  # 71 MB of HTML; the JSON is what is reused
    if not docs:
        raise SystemExit(f"error: no prose found under {SOURCES_IN_PACKAGE} in {debs[-1]}")
    tmp = corpus.with_suffix(".tmp")
    tmp.write_text(json.dumps(docs))
    tmp.rename(corpus)
    return docs


def make_records(docs: dict[str, list[str]], sizes: Sizes) -> tuple[list[dict], list[dict]]:
    """Question = a window's first q_words words, answer = the next a_words; one document in ten held out."""
    train, held_out = [], []
    width = sizes.q_words + sizes.a_words
    for name, paragraphs in sorted(docs.items()):
        words = " ".join(paragraphs).split()
        target = held_out if zlib.crc32(name.encode()) % 10 == 0 else train
        for start in range(0, len(words) - width + 1, width):
            target.append({
                "question": " ".join(words[start : start + sizes.q_words]),
                "answer": " " + " ".join(words[start + sizes.q_words : start + width]),
            })
    # Held-out: an even sample over the held-out documents, not just the first ones.
    step = max(1, len(held_out) // sizes.eval_records)
    return train[: sizes.max_train_records], held_out[::step][: sizes.eval_records]


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# --- Runs -----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    seed: int
    w: float
    objective: str | None
    steps: int
    tail: bool = True
    cache_k: int | None = None  # read its teacher targets from the top-k cache (0: full vocabulary); None: live
    on_policy: float = 0.0  # on_policy_fraction (--on-policy rows); objective "sampled_reverse_kl": ROLL's loss
    rkl: float | None = None  # eval/onpolicy_rkl at the end (--on-policy: every live-teacher KD row)
    sample_s: float = 0.0  # mean time/sample per step (the student's sampling; on-policy rows)
    wall_s: float = 0.0  # the whole pipeline run: actors, loading, training, evaluation, checkpoint
    step_s: float = 0.0  # median step-to-step interval
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out CE)

    @property
    def final(self) -> float:
        return self.curve[-1][1]

    def loss_at(self, step: float) -> float | None:
        """Held-out CE at ``step``, linearly interpolated between evaluations; None beyond the last one."""
        points = self.curve
        if step > points[-1][0] + 1e-9:
            return None
        for (s0, l0), (s1, l1) in zip(points, points[1:]):
            if s0 <= step <= s1:
                return l0 + (l1 - l0) * (step - s0) / (s1 - s0)
        return points[0][1] if step <= points[0][0] else points[-1][1]


def read_metrics(logging_dir: Path) -> tuple[float, list[tuple[int, float]]]:
    """(median step-to-step interval excluding evaluation steps, [(step, val/loss)]) from metrics.jsonl."""
    records = [json.loads(line) for line in (logging_dir / "metrics.jsonl").read_text().splitlines() if line]
    curve = [(r["step"], r["val/loss"]) for r in records if "val/loss" in r]
    intervals = [
        b["time"] - a["time"]
        for a, b in zip(records, records[1:])
        if b["step"] == a["step"] + 1 and "val/loss" not in b  # b's record is written after its evaluation
    ]
    return (statistics.median(intervals) if intervals else float("nan")), curve


def read_on_policy_metrics(logging_dir: Path) -> tuple[float, float, float | None]:
    """(mean step-to-step interval excluding evaluation steps, mean time/sample per step, the last
    eval/onpolicy_rkl or None) from metrics.jsonl. The mean, not the median: at on_policy_fraction < 1 a step
    samples or not, so its time has two modes and the median would pick one of them."""
    records = [json.loads(line) for line in (logging_dir / "metrics.jsonl").read_text().splitlines() if line]
    intervals = [b["time"] - a["time"] for a, b in zip(records, records[1:])
                 if b["step"] == a["step"] + 1 and "val/loss" not in b]
    sample = [r["time/sample"] for r in records if "time/sample" in r]
    rkl = [r["eval/onpolicy_rkl"] for r in records if "eval/onpolicy_rkl" in r]
    return (statistics.fmean(intervals) if intervals else float("nan"),
            statistics.fmean(sample) if sample else 0.0, rkl[-1] if rkl else None)


def generation_budget(prompt_lengths: list[int], answer_lengths: list[int], seq: int,
                      all_prompt_lengths: list[int]) -> dict:
    """generation.max_new_tokens of the --on-policy rows, from the data: each training record's answer window is
    what a student trains on after its prompt, answer tokens + EOS as truncated to ``seq`` (min(answer + 1,
    seq - prompt)); the budget is the longest window, capped at ``seq`` minus the longest prompt of
    ``all_prompt_lengths`` (training and held-out records), so that every prompt leaves room for a completion."""
    windows = [min(a + 1, seq - p) for p, a in zip(prompt_lengths, answer_lengths)]
    cap = seq - max(all_prompt_lengths)
    return {"max_new_tokens": max(1, min(max(windows), cap)), "window_median": statistics.median(windows),
            "window_max": max(windows), "longest_prompt": max(all_prompt_lengths), "cap": cap,
            "covered": sum(w <= cap for w in windows) / len(windows)}


def on_policy_specs(args: argparse.Namespace) -> list[tuple[float, str]]:
    """The --on-policy rows of each seed: (on_policy_fraction, objective); objective "sampled_reverse_kl" is
    on_policy_loss sampled_reverse_kl (ROLL's), any other the kd_objective on the sampled positions."""
    if not args.on_policy:
        return []
    return [(fraction, objective) for fraction in args.on_policy_fractions for objective in args.on_policy_objectives]


class Bench:
    def __init__(self, args: argparse.Namespace, sizes: Sizes):
        self.args, self.sizes = args, sizes
        self.out = Path(args.out).resolve()
        self.loads: list[float] = []

    def config(self, name: str, init: Path, *, steps: int, w: float, seed: int, lr: float, schedule: str,
               warmup: int, eval_steps: int, teacher: Path | None = None, objective: str = "forward_kl",
               tail: bool = True, train_file: str = "transfer.jsonl", batch: int | None = None,
               topk: int | None = None, cache_dir: Path | None = None, on_policy: float = 0.0,
               max_new_tokens: int | None = None, onpolicy_rkl: bool = False):
        from distill_trainer.config import config_from_dict

        s, run_dir = self.sizes, self.out / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        data = {
            "exp_name": name, "seed": seed, "output_dir": str(run_dir), "logging_dir": str(run_dir / "logs"),
            "max_steps": steps, "save_steps": 0, "logging_steps": 1, "eval_steps": eval_steps, "max_ckpt_to_keep": 1,
            "student_pretrain": str(init), "teacher_pretrain": str(teacher or init),
            "distill_loss_weight": w, "kd_objective": objective, "logits_topk": s.topk if topk is None else topk,
            "topk_tail": tail,
            "kd_temperature": 1.0,
            "sequence_length": s.seq,
            **({"teacher_cache_dir": str(cache_dir), "teacher_cache_dtype": self.args.cache_dtype} if cache_dir else {}),
            **({"on_policy_fraction": on_policy} if on_policy else {}),
            **({"on_policy_loss": "sampled_reverse_kl", "kd_objective": "reverse_kl"}
               if on_policy and objective == "sampled_reverse_kl" else {}),
            **({"eval_onpolicy_rkl": True} if onpolicy_rkl else {}),
            **({"generation": {"max_new_tokens": max_new_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": 0}}
               if max_new_tokens else {}),
            "student": {
                "training_args": {
                    "learning_rate": lr, "lr_scheduler_type": schedule, "warmup_steps": warmup,
                    "per_device_train_batch_size": batch or s.batch, "weight_decay": 0.0, "max_grad_norm": 1.0,
                    "adam_beta2": 0.95, "per_device_eval_batch_size": 64,
                },
                "data_args": {"file_name": str(self.out / "data" / train_file),
                              "eval_file_name": str(self.out / "data" / "eval.jsonl")},
            },
        }
        return config_from_dict(data, f"<realtext {name}>")

    def rkl_eval(self) -> dict:
        """With --on-policy, what every live-teacher KD row adds to its config: eval/onpolicy_rkl, with the
        on-policy rows' generation budget (greedy at evaluation); nothing otherwise."""
        if not self.args.on_policy:
            return {}
        return {"onpolicy_rkl": True, "max_new_tokens": self.budget["max_new_tokens"]}

    def pipeline_run(self, config, run: Run) -> Run:
        from distill_trainer.config import runs_live_teacher
        from distill_trainer.pipeline import DistillPipeline

        self.loads.append(os.getloadavg()[0])
        started = time.perf_counter()
        log_path = Path(config.output_dir) / "console.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log, contextlib.redirect_stdout(log):  # a line per step: into the run's log
            # Equal hardware: an SFT-only run has one actor, a KD run two (teacher and student, overlapped),
            # so SFT gets the threads of both, and so does a run that reads its targets from a teacher cache (it
            # starts no teacher actor).
            threads = self.args.threads * (1 if runs_live_teacher(config) else 2)
            result = DistillPipeline(config, num_threads=threads, console=False).run()
        run.wall_s = time.perf_counter() - started
        run.step_s, run.curve = read_metrics(Path(config.logging_dir))
        if self.args.on_policy and runs_live_teacher(config):
            mean_step, run.sample_s, run.rkl = read_on_policy_metrics(Path(config.logging_dir))
            if run.on_policy:
                run.step_s = mean_step
            if run.rkl is None:
                run.rkl = result.eval_metrics.get("eval/onpolicy_rkl")
        if not run.curve:
            run.curve = [(result.final_step, result.eval_metrics["val/loss"])]
        label = "SFT" if run.w == 0 else f"{run.objective} w={run.w:g}" + ("" if run.tail else " topk_tail=false") + (
            "" if run.cache_k is None else f" from the {_k_name(run.cache_k)} cache") + (
            f" on-policy λ={run.on_policy:g}" if run.on_policy else "")
        print(f"[realtext] {run.name}: {label}, {run.steps} steps, held-out CE {run.final:.4f}, "
              f"{run.step_s * 1000:.0f} ms/step, {run.wall_s:.0f} s run (load {self.loads[-1]:.1f})"
              + ("" if run.rkl is None else f", onpolicy rkl {run.rkl:.4f}"), flush=True)
        return run

    def teacher(self, tokenizer_dir: Path) -> tuple[Path, Run]:
        s = self.sizes
        init, final = self.out / "models" / "teacher_init", self.out / "models" / "teacher"
        stamp = self.out / "models" / "teacher.json"
        teacher_fields = ("vocab", "seq", "q_words", "a_words", "teacher", "teacher_steps", "teacher_lr", "teacher_batch",
                          "eval_records", "max_train_records")
        spec = {"sizes": {k: getattr(s, k) for k in teacher_fields}, "threads": self.args.threads,
                "data": self.data_digest}
        if final.is_dir() and stamp.is_file() and json.loads(stamp.read_text())["spec"] == spec:
            saved = json.loads(stamp.read_text())["run"]
            print(f"[realtext] reusing the teacher trained earlier in {final} (same data, sizes and steps)")
            return final, Run(**{**saved, "curve": [tuple(p) for p in saved["curve"]]})
        from distill_trainer.demo.tiny_models import build_causal_lm
        from transformers import AutoTokenizer

        build_causal_lm(AutoTokenizer.from_pretrained(tokenizer_dir), init, seed=1000, max_position_embeddings=s.seq,
                        **s.teacher)
        config = self.config("teacher", init, steps=s.teacher_steps, w=0.0, seed=1000, lr=s.teacher_lr,
                             schedule="cosine", warmup=max(1, s.teacher_steps // 20), eval_steps=0,
                             train_file="train.jsonl", batch=s.teacher_batch)
        run = self.pipeline_run(config, Run("teacher", 1000, 0.0, None, s.teacher_steps))
        checkpoint = Path(config.output_dir) / f"checkpoint-{s.teacher_steps}" / "student"
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(checkpoint, final)
        stamp.write_text(json.dumps({"spec": spec, "run": run.__dict__}))
        return final, run

    def write_cache(self, k: int, teacher_dir: Path, init: Path) -> dict:
        """The teacher's one-off pass (``kubedistill cache-teacher``) over the students' training records: its
        top-k targets (k = 0: the full vocabulary) in a teacher cache that every student run of that k reads.
        Written anew each time (its time is a result); timed from the call to the complete manifest."""
        from distill_trainer.teacher_cache.writer import CacheTeacherRun

        s = self.sizes
        cache_dir = self.out / "teacher_cache" / f"top{k}_{self.args.cache_dtype}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        config = self.config(f"cache_top{k}", init, steps=s.steps, w=1.0, seed=0, lr=s.lr,
                             schedule="constant_with_warmup", warmup=1, eval_steps=0, teacher=teacher_dir, topk=k,
                             cache_dir=cache_dir)
        self.loads.append(os.getloadavg()[0])
        log_path = Path(config.output_dir) / "console.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(log_path, "w") as log, contextlib.redirect_stdout(log):
            # The teacher alone: the threads of a KD run's two actors, like SFT.
            result = CacheTeacherRun(config, num_threads=2 * self.args.threads).run()
        seconds = time.perf_counter() - started
        manifest = json.loads((cache_dir / "manifest.json").read_text())
        files = manifest["shard_files"]
        info = {"k": k, "dir": str(cache_dir), "dtype": self.args.cache_dtype, "seconds": seconds,
                "write_seconds": result.seconds, "records": result.records, "shards": len(files),
                "rows": sum(f["rows"] for f in files), "bytes": sum(f["bytes"] for f in files)}
        info["bytes_per_token"] = info["bytes"] / info["rows"]
        print(f"[realtext] teacher cache {_k_name(k)} ({info['dtype']}): {info['records']:,} records, "
              f"{info['rows']:,} label tokens, {info['bytes'] / 2**20:.1f} MiB = {info['bytes_per_token']:.1f} B per "
              f"label token; the teacher's pass took {seconds:.0f} s (load {self.loads[-1]:.1f})", flush=True)
        return info

    def main(self) -> int:
        args, s = self.args, self.sizes
        began = time.perf_counter()
        load_start = os.getloadavg()
        docs = fetch_prose(Path(args.cache))
        train, held_out = make_records(docs, s)
        self.data_digest = zlib.crc32(json.dumps([train, held_out]).encode())

        import torch
        from distill_trainer.demo.tiny_models import build_causal_lm, build_tokenizer
        from distill_trainer.pipeline import ensure_ray

        torch.set_num_threads(args.threads)
        tok_dir = self.out / "models" / "tokenizer"
        tokenizer = build_tokenizer((r["question"] + r["answer"] for r in train), tok_dir, vocab_size=s.vocab)
        # A question of long identifiers can take many tokens: keep records whose prompt leaves half the sequence.
        fits = lambda r: len(tokenizer(r["question"]).input_ids) <= s.seq // 2  # noqa: E731
        dropped = len(train) + len(held_out)
        train, held_out = [r for r in train if fits(r)], [r for r in held_out if fits(r)]
        dropped -= len(train) + len(held_out)
        write_jsonl(train, self.out / "data" / "train.jsonl")
        write_jsonl(held_out, self.out / "data" / "eval.jsonl")
        transfer = random.Random(0).sample(train, min(s.transfer_records, len(train)))
        self.n_train, self.n_transfer = len(train), len(transfer)
        write_jsonl(transfer, self.out / "data" / "transfer.jsonl")
        lengths = [len(tokenizer(r["question"] + r["answer"]).input_ids) + 1 for r in held_out]
        self.budget = None
        if args.on_policy:  # generation.max_new_tokens from the students' training records (generation_budget)
            from distill_trainer.data import prompt_ids

            prompts = [len(prompt_ids(tokenizer, r["question"])) for r in transfer]
            answers = [len(tokenizer(r["answer"], add_special_tokens=False).input_ids) for r in transfer]
            self.budget = generation_budget(prompts, answers, s.seq,
                                            prompts + [len(prompt_ids(tokenizer, r["question"])) for r in held_out])
        student_inits = {}
        for seed in args.seeds:
            student_inits[seed] = self.out / "models" / f"student_init_s{seed}"
            model = build_causal_lm(tokenizer, student_inits[seed], seed=seed, max_position_embeddings=s.seq,
                                    **s.student)
        n_student = sum(p.numel() for p in model.parameters())
        objectives = args.objectives
        weights = args.weights
        print(f"[realtext] text: {DEB_PACKAGE} ({len(docs)} documents, {sum(len(' '.join(p).split()) for p in docs.values()):,} words of prose); "
              f"{len(train):,} training records (teacher), a random {len(transfer):,} of them for the students, "
              f"{len(held_out)} held-out records from held-out documents; "
              f"question {s.q_words} words, answer {s.a_words} words; tokens per record median "
              f"{statistics.median(lengths):.0f} (sequence_length {s.seq}, longer answers truncated; {dropped} records with a "
              f"prompt over {s.seq // 2} tokens dropped)", flush=True)
        if self.budget:
            b = self.budget
            print(f"[realtext] on-policy: generation.max_new_tokens {b['max_new_tokens']} (the students' answer "
                  f"windows, answer + EOS within sequence_length: median {b['window_median']:.0f} tokens, longest "
                  f"{b['window_max']}; capped at {s.seq} - the longest prompt {b['longest_prompt']} = {b['cap']}, which "
                  f"covers {b['covered']:.0%} of them), temperature 1, 1 sample per prompt", flush=True)

        started_ray = ensure_ray()
        try:
            teacher_dir, teacher_run = self.teacher(tok_dir)
            print(f"[realtext] teacher: {s.teacher_steps} steps, held-out CE {teacher_run.final:.4f}", flush=True)
            from transformers import AutoModelForCausalLM

            n_teacher = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(teacher_dir).parameters())
            runs: list[Run] = []
            prefix_check = None
            self.caches = {}
            for k in args.cache_topk:  # the teacher's one-off pass, once per k, before any student reads it
                self.caches[k] = self.write_cache(k, teacher_dir, student_inits[args.seeds[0]])
            warmup = max(1, s.steps // 10)
            eval_every = _divisor_near(s.steps, s.steps / s.evals)
            sft_steps = math.ceil(s.steps * s.sft_factor / eval_every) * eval_every
            for seed in args.seeds:
                config = self.config(f"sft_s{seed}", student_inits[seed], steps=sft_steps, w=0.0, seed=seed, lr=s.lr,
                                     schedule="constant_with_warmup", warmup=warmup, eval_steps=eval_every)
                runs.append(self.pipeline_run(config, Run(f"sft_s{seed}", seed, 0.0, None, sft_steps)))
                if args.check_prefix and seed == args.seeds[0]:
                    # The equal-steps reading assumes the long SFT run's first S steps are an S-step run's.
                    config = self.config(f"sft_check_s{seed}", student_inits[seed], steps=s.steps, w=0.0, seed=seed,
                                         lr=s.lr, schedule="constant_with_warmup", warmup=warmup, eval_steps=0)
                    check = self.pipeline_run(config, Run(f"sft_check_s{seed}", seed, 0.0, None, s.steps))
                    prefix_check = {"separate_run": check.final, "long_run_at_S": runs[-1].loss_at(s.steps)}
                    print(f"[realtext] check: a separate {s.steps}-step SFT run: held-out CE {check.final:.6f}; the "
                          f"long SFT run at step {s.steps}: {prefix_check['long_run_at_S']:.6f}", flush=True)
                for w in weights if args.live else ():
                    for objective in objectives:
                        name = f"{objective}_w{w:g}_s{seed}"
                        config = self.config(name, student_inits[seed], steps=s.steps, w=w, seed=seed, lr=s.lr,
                                             schedule="constant_with_warmup", warmup=warmup, eval_steps=0,
                                             teacher=teacher_dir, objective=objective, **self.rkl_eval())
                        runs.append(self.pipeline_run(config, Run(name, seed, w, objective, s.steps)))
                for objective in args.renorm if args.live else ():
                    name = f"{objective}_w1_renorm_s{seed}"
                    config = self.config(name, student_inits[seed], steps=s.steps, w=1.0, seed=seed, lr=s.lr,
                                         schedule="constant_with_warmup", warmup=warmup, eval_steps=0,
                                         teacher=teacher_dir, objective=objective, tail=False, **self.rkl_eval())
                    runs.append(self.pipeline_run(config, Run(name, seed, 1.0, objective, s.steps, tail=False)))
                for fraction, objective in on_policy_specs(args):
                    name = f"{objective}_w1_op{fraction:g}_s{seed}"
                    config = self.config(name, student_inits[seed], steps=s.steps, w=1.0, seed=seed, lr=s.lr,
                                         schedule="constant_with_warmup", warmup=warmup, eval_steps=0,
                                         teacher=teacher_dir, objective=objective, on_policy=fraction,
                                         **self.rkl_eval())
                    runs.append(self.pipeline_run(config, Run(name, seed, 1.0, objective, s.steps, on_policy=fraction)))
                for k, cache in self.caches.items():
                    for w in args.cache_weights:
                        for objective in args.cache_objectives:
                            name = f"{objective}_w{w:g}_cache{k}_s{seed}"
                            config = self.config(name, student_inits[seed], steps=s.steps, w=w, seed=seed, lr=s.lr,
                                                 schedule="constant_with_warmup", warmup=warmup, eval_steps=0,
                                                 teacher=teacher_dir, objective=objective, topk=k,
                                                 cache_dir=Path(cache["dir"]))
                            runs.append(self.pipeline_run(config, Run(name, seed, w, objective, s.steps, cache_k=k)))
        finally:
            if started_ray:
                import ray

                ray.shutdown()
        total = time.perf_counter() - began
        table = self.report(runs, teacher_run, n_teacher, n_student, total, load_start, sft_steps, eval_every)
        print(table)
        (self.out / "results.json").write_text(json.dumps({
            "runs": [r.__dict__ for r in runs], "teacher": teacher_run.__dict__, "sizes": s.__dict__,
            "threads": args.threads, "seeds": args.seeds, "prefix_check": prefix_check, "caches": self.caches,
            **({"generation_budget": self.budget} if self.budget else {}),
            "table": table,
        }, indent=1, default=str))
        return 0

    def report(self, runs, teacher_run, n_teacher, n_student, total, load_start, sft_steps, eval_every) -> str:
        s, args = self.sizes, self.args
        sft = {r.seed: r for r in runs if r.w == 0}
        lines = []
        cpu = _cpu_model()
        load_end = os.getloadavg()
        lines.append(f"code: {_code_version()}")
        lines.append(f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch threads: "
                     f"{args.threads} per actor of a KD run (teacher and student), {2 * args.threads} for SFT-only runs")
        lines.append(f"other work: load average {load_start[0]:.1f} at start, {min(self.loads):.1f}-{max(self.loads):.1f} "
                     f"at run starts, {load_end[0]:.1f} at end (this benchmark alone adds about 1)")
        lines.append(f"teacher {n_teacher / 1e6:.2f}M params ({_shape(s.teacher)}), {s.teacher_steps} steps of batch "
                     f"{s.teacher_batch} on {self.n_train:,} records, cosine lr {s.teacher_lr:g}: held-out CE {teacher_run.final:.3f} (ppl {math.exp(teacher_run.final):.1f}), "
                     f"{teacher_run.wall_s:.0f} s")
        lines.append(f"student {n_student / 1e6:.2f}M params ({_shape(s.student)}); vocab {s.vocab}, sequence {s.seq}, "
                     f"batch {s.batch} from {self.n_transfer:,} of those records, lr {s.lr:g} constant after {max(1, s.steps // 10)} warmup steps, top-{s.topk}, "
                     f"T 1, topk_tail true unless a row says otherwise")
        lines.append(f"seeds {' '.join(map(str, args.seeds))}; KD runs {s.steps} steps; SFT run {sft_steps} steps, "
                     f"evaluated every {eval_every}")
        lines.append("held-out CE per answer token (student, full vocabulary); median [min-max] over seeds; "
                     "delta = KD - SFT, median of per-seed differences (negative: distillation wins)")
        caches = getattr(self, "caches", {})
        readers = {k: sum(1 for r in runs if r.cache_k == k) for k in caches}
        head = (f"{'student':<38}{'ms/step':>8}{'xSFT':>6}{'held-out CE':>22}{'ppl':>7}{'d equal steps':>24}"
                f"{'SFT@time':>10}{'d equal time':>24}" + (f"{'d equal time+pass':>24}" if caches else "")
                + (f"{'onpolicy rkl':>24}{'sample ms':>10}" if args.on_policy else ""))
        lines += [head, "-" * len(head)]
        sft_at_s = [r.loss_at(s.steps) for r in sft.values()]
        lines.append(f"{'SFT only':<38}{_med([r.step_s for r in sft.values()]) * 1000:>8.0f}{1:>6.2f}"
                     f"{_spread(sft_at_s):>22}{math.exp(statistics.median(sft_at_s)):>7.1f}"
                     + (f"{'':>24}{'':>10}{'':>24}" + (f"{'':>24}" if caches else "") + f"{'-':>24}{'':>10}"
                        if args.on_policy else ""))
        groups = [(w, o, True, None, 0.0) for w in args.weights for o in args.objectives] + \
                 [(1.0, o, False, None, 0.0) for o in args.renorm] + \
                 [(w, o, True, k, 0.0) for k in caches for w in args.cache_weights for o in args.cache_objectives] + \
                 [(1.0, o, True, None, fraction) for fraction, o in on_policy_specs(args)]
        for w, objective, tail, k, fraction in groups:
            rows = [r for r in runs if r.w == w and r.objective == objective and r.tail == tail and r.cache_k == k
                    and r.on_policy == fraction]
            if not rows:
                continue
            d_steps = [r.final - sft[r.seed].loss_at(s.steps) for r in rows]
            at_time, d_time, d_pass = [], [], []
            for r in rows:
                equivalent = r.steps * r.step_s / sft[r.seed].step_s
                value = sft[r.seed].loss_at(equivalent)
                if value is not None:
                    at_time.append(value)
                    d_time.append(r.final - value)
                if k is not None:  # the same, the teacher's pass (amortised over the cache's readers) added
                    value = sft[r.seed].loss_at((r.steps * r.step_s + caches[k]["seconds"] / readers[k])
                                                / sft[r.seed].step_s)
                    if value is not None:
                        d_pass.append(r.final - value)
            label = ("sampled rkl (ROLL)" if objective == "sampled_reverse_kl" else objective) + f" w={w:g}" + (
                "" if tail else " no tail") + ("" if k is None else f" {_k_name(k)} cache") + (
                f" on-policy λ={fraction:g}" if fraction else "")
            finals = [r.final for r in rows]
            time_cols = (f"{statistics.median(at_time):>10.3f}{_signed_spread(d_time):>24}"
                         if len(at_time) == len(rows) else f"{'(longer)':>10}{'':>24}")
            if k is not None:
                time_cols += f"{_signed_spread(d_pass):>24}" if len(d_pass) == len(rows) else f"{'(longer)':>24}"
            ratio = _med([r.step_s / sft[r.seed].step_s for r in rows])
            if args.on_policy:
                rkl = [r.rkl for r in rows if r.rkl is not None]
                time_cols += (f"{_spread(rkl, '.4f') if len(rkl) == len(rows) else '-':>24}"
                              + (f"{_med([r.sample_s for r in rows]) * 1000:>10.0f}" if fraction else f"{'-':>10}"))
            lines.append(f"{label:<38}{_med([r.step_s for r in rows]) * 1000:>8.0f}{ratio:>6.2f}{_spread(finals):>22}"
                         f"{math.exp(statistics.median(finals)):>7.1f}{_signed_spread(d_steps):>24}{time_cols}")
        lines.append(f"ms/step: median step time (median over seeds); xSFT: that over SFT's, median of per-seed ratios; "
                     f"SFT@time: SFT's held-out CE after the same training "
                     f"time as that KD run (interpolated; "
                     f"'(longer)': that time is past the SFT run's end for some seed); total wall time {total / 60:.1f} min")
        if args.on_policy:
            b = self.budget
            lines.append(f"on-policy λ: on_policy_fraction, the share of micro-batches whose answers the student samples "
                         f"(up to {b['max_new_tokens']} tokens, temperature 1; the teacher scores them; kd_objective on "
                         f"the sampled positions, or ROLL's sampled reverse KL), at distill_loss_weight 1; their ms/step "
                         f"is the MEAN step time (sampling included; at λ < 1 a step samples or not); sample ms: mean "
                         f"sampling time per step; onpolicy rkl: eval/onpolicy_rkl, the teacher's per-token reverse "
                         f"KL(student ‖ teacher) on the student's greedy completions (up to {b['max_new_tokens']} tokens) "
                         f"of the held-out questions, median [min-max] over seeds (lower: its own text is closer to "
                         f"the teacher's); every live-teacher KD row reports it")
        if caches:
            lines.append("d equal time+pass: as d equal time, the KD run's time plus its share of the teacher's one-off "
                         "pass (the pass's time / the number of student runs that read that cache)")
            for k, c in caches.items():
                n = readers[k]
                train_s = _med([r.steps * r.step_s for r in runs if r.cache_k == k]) if n else float("nan")
                lines.append(f"teacher cache {_k_name(k)} ({c['dtype']}): {c['records']:,} records, {c['rows']:,} label "
                             f"tokens, {c['bytes'] / 2**20:.1f} MiB = {c['bytes_per_token']:.1f} B/label token; the "
                             f"teacher's one-off pass {c['seconds']:.1f} s, read by {n} student runs: "
                             f"{c['seconds'] / max(n, 1):.1f} s each (a student's {s.steps} steps: {train_s:.1f} s)")
        students = [r for r in runs if r.w > 0] + list(sft.values())
        best = min(students, key=lambda r: r.loss_at(s.steps) if r.w == 0 else r.final)
        sft_end = statistics.median(r.final for r in sft.values())
        lines.append(f"teacher strength: held-out CE {teacher_run.final:.3f}; the best student at {s.steps} steps "
                     f"{(best.loss_at(s.steps) if best.w == 0 else best.final):.3f} ({best.name}); SFT after its whole "
                     f"{sft_steps}-step run {sft_end:.3f} (median): the teacher is "
                     f"{abs(sft_end - teacher_run.final):.3f} nats {'ahead of' if sft_end > teacher_run.final else 'behind'} "
                     f"it")
        return "\n".join(lines)


def _k_name(k: int) -> str:
    return "full-V" if k == 0 else f"top-{k}"


def _divisor_near(n: int, target: float) -> int:
    """The divisor of n closest to target (so that step n is an evaluation step)."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - target), d))


def _med(values):
    return statistics.median(values)


def _spread(values, fmt: str = ".3f") -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def _signed_spread(values) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):+.3f} [{min(values):+.3f},{max(values):+.3f}]"


def _shape(size: dict) -> str:
    return (f"{size['num_layers']} layers, hidden {size['hidden_size']}, {size['num_heads']} heads, "
            f"MLP {size['intermediate_size']}")


def _code_version() -> str:
    """The commit this checkout is at, and whether its trainer/ differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "trainer", "bench/realtext.py"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {head}" + (" with uncommitted changes in trainer/ or bench/realtext.py" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="student seeds (default 0 1 2; quick: 0)")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps of each KD run (default {FULL.steps})")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help=f"teacher SFT steps (default {FULL.teacher_steps})")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke version: tiny models, a few steps, one seed")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=None,
                        help="KD objectives (default all six; quick: forward_kl)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.5, 1.0], help="distill_loss_weight values")
    parser.add_argument("--renorm", nargs="*", choices=OBJECTIVES, default=["forward_kl"],
                        help="objectives also run at distill_loss_weight 1 with topk_tail false, for reference "
                        "(default: forward_kl; none: --renorm)")
    parser.add_argument("--check-prefix", action=argparse.BooleanOptionalAction, default=None,
                        help="also run SFT for exactly --steps steps (first seed) and compare with the long SFT run "
                        "at that step (default: on with --quick)")
    parser.add_argument("--from-cache", action="store_true",
                        help="also run students that read their teacher targets from an offline teacher cache "
                        "(kubedistill cache-teacher), written once per --cache-topk k, its pass timed apart")
    parser.add_argument("--cache-topk", type=int, nargs="+", default=None,
                        help="k of each teacher cache, 0 = full vocabulary (default with --from-cache: 64; the k table: "
                        "64 256 0)")
    parser.add_argument("--cache-objectives", nargs="+", choices=OBJECTIVES, default=None,
                        help="KD objectives of the cache rows (default forward_kl adaptive_kl; quick: forward_kl)")
    parser.add_argument("--cache-weights", type=float, nargs="+", default=[0.5, 1.0],
                        help="distill_loss_weight values of the cache rows")
    parser.add_argument("--cache-dtype", choices=["compact", "float32"], default="compact",
                        help="teacher_cache_dtype of the caches written")
    parser.add_argument("--live", action=argparse.BooleanOptionalAction, default=True,
                        help="the rows with a live teacher (--objectives x --weights, --renorm); --no-live: SFT and "
                        "the cache rows only")
    parser.add_argument("--on-policy", action="store_true",
                        help="also run on-policy distillation rows (--on-policy-fractions x --on-policy-objectives, "
                        "distill_loss_weight 1, live teacher, whatever --live says), and report eval/onpolicy_rkl "
                        "for every live-teacher KD row")
    parser.add_argument("--on-policy-fractions", type=float, nargs="+", default=None,
                        help="on_policy_fraction (λ) of the on-policy rows, in (0, 1] (default 0.5 1)")
    parser.add_argument("--on-policy-objectives", nargs="+", choices=OBJECTIVES + ("sampled_reverse_kl",), default=None,
                        help="kd_objective of the on-policy rows on the sampled positions, or sampled_reverse_kl: "
                        "on_policy_loss sampled_reverse_kl (ROLL's policy-gradient form) (default reverse_kl)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per Ray actor (KUBEDISTILL_NUM_THREADS)")
    parser.add_argument("--out", default="/tmp/kubedistill-realtext", help="data, models, runs and results.json")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help=f"where the {DEB_PACKAGE} package and its prose are kept")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.steps:
        sizes = Sizes(**{**sizes.__dict__, "steps": args.steps})
    if args.teacher_steps:
        sizes = Sizes(**{**sizes.__dict__, "teacher_steps": args.teacher_steps})
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    if args.check_prefix is None:
        args.check_prefix = args.quick
    args.objectives = args.objectives or (["forward_kl"] if args.quick else list(OBJECTIVES))
    if args.cache_topk is None:
        args.cache_topk = [64 if not args.quick else QUICK.topk] if args.from_cache else []
    elif not args.from_cache:
        parser.error("--cache-topk needs --from-cache")
    if not args.on_policy and (args.on_policy_fractions or args.on_policy_objectives):
        parser.error("--on-policy-fractions and --on-policy-objectives need --on-policy")
    args.on_policy_fractions = args.on_policy_fractions or [0.5, 1.0]
    args.on_policy_objectives = args.on_policy_objectives or ["reverse_kl"]
    if not all(0 < f <= 1 for f in args.on_policy_fractions):
        parser.error("--on-policy-fractions: each must be in (0, 1]")
    args.cache_objectives = args.cache_objectives or (["forward_kl"] if args.quick else ["forward_kl", "adaptive_kl"])
    os.environ["KUBEDISTILL_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray's worker processes import distill_trainer by themselves: make it this checkout's, whatever package an
    # editable install in the environment points at.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "trainer"), str(REPO / "operator")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return Bench(args, sizes).main()


if __name__ == "__main__":
    sys.exit(main())
