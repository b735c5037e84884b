"""Sequence packing (``use_sequence_packing``) against padded micro-batches: label tokens per second, same records.

The records are real English prose with a real spread of lengths: every paragraph of the reStructuredText sources
of Debian's ``python3.11-doc`` (read and cleaned by ``bench/realtext.py``'s ``fetch_prose``), its first
``--question-words`` words the question and the rest of the paragraph the answer (paragraph lengths: median 28
words, 90th percentile 67, 99th 116). A byte-level BPE tokenizer trained on them, and ``bench/realtext.py``'s
Qwen2-shaped teacher and student (random weights: speed does not depend on what they know); records are tokenized
as the trainer does (``data.load_examples``, answers longer than ``--seq`` truncated).

The work: one pass over the same ``--records`` records in the same order (the trainer's epoch-0 shuffle for seed 0),
``--batch`` sequences per micro-batch, one optimizer step per micro-batch, with the torch strategies the pipeline's
actors run (``TorchInferStrategy`` top-64 targets with the tail, ``TorchTrainStrategy`` forward/backward with the
fused head, AdamW), in this process, one after the other (no Ray, no overlap: the compute a step is made of):

- **padded**: ``ShuffledBatches``, ``--batch`` records per micro-batch, right-padded to its longest record;
- **packed**: ``PackedBatches``, ``--batch`` rows per micro-batch, each row the records first-fit packs into
  ``--seq`` tokens, the model told where each record starts (``position_ids``), attention within each record.

Padded fraction = padding positions / all positions the models ran (rows x width, summed over micro-batches).
Label tokens/s = the answer tokens learned (the same in both) / the wall time of the pass; a warm-up micro-batch
runs before each pass and is not counted. Rounds alternate the two, so load from other processes falls on both
alike; the table gives each round and the median. Figures only; it never passes or fails on them.

  .venv/bin/python bench/packing.py                       # 3 rounds (~3 min on 2 shared cores)
  .venv/bin/python bench/packing.py --quick               # smoke run: tiny models, 64 records, 1 round
  .venv/bin/python bench/packing.py --cache DIR           # where python3.11-doc is fetched and cached
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer"))
sys.path.insert(0, str(REPO / "bench"))

from realtext import DEFAULT_CACHE, FULL, QUICK, fetch_prose, write_jsonl  # noqa: E402


@dataclass
class Pass:
    layout: str
    micro_batches: int
    positions: int  # rows x width, summed
    input_tokens: int
    label_tokens: int
    seconds: float

    @property
    def padded_fraction(self) -> float:
        return 1 - self.input_tokens / self.positions


def paragraph_records(docs: dict[str, list[str]], question_words: int) -> list[dict]:
    records = []
    for name in sorted(docs):
        for paragraph in docs[name]:
            words = paragraph.split()
            if len(words) > question_words + 1:
                records.append({"question": " ".join(words[:question_words]),
                                "answer": " " + " ".join(words[question_words:])})
    return records


def build(out: Path, sizes, seq: int, records: list[dict], question_words: int):
    """Tokenizer, models, config and the tokenized examples."""
    from distill_trainer.config import config_from_dict
    from distill_trainer.data import load_examples
    from distill_trainer.demo.tiny_models import build_causal_lm, build_tokenizer

    texts = (r["question"] + r["answer"] for r in records)
    tokenizer = build_tokenizer(texts, out / "tokenizer", vocab_size=sizes.vocab)
    for name, seed in (("teacher", 1000), ("student", 1)):
        build_causal_lm(tokenizer, out / name, seed=seed, max_position_embeddings=seq, **getattr(sizes, name))
    write_jsonl(records, out / "records.jsonl")
    config = config_from_dict({
        "max_steps": 100_000, "student_pretrain": str(out / "student"), "teacher_pretrain": str(out / "teacher"),
        "sequence_length": seq, "logits_topk": sizes.topk, "distill_loss_weight": 0.5,
        "student": {"data_args": {"file_name": str(out / "records.jsonl")},
                    "training_args": {"learning_rate": 1e-3, "lr_scheduler_type": "constant"}},
    }, "<bench/packing>")
    examples = load_examples(out / "records.jsonl", tokenizer, question_key="question", answer_key="answer",
                             sequence_length=seq, distill_on_prompt=False)
    return config, tokenizer, examples


def micro_batches(layout: str, examples, batch: int, seq: int, pad: int) -> list[dict]:
    """Every micro-batch of one pass over ``examples`` (the trainer's epoch-0 order for seed 0)."""
    from distill_trainer.data import PackedBatches, ShuffledBatches, collate, collate_packed

    if layout == "padded":
        order = ShuffledBatches(examples, batch, seed=0)._order(0)
        return [collate([examples[i] for i in order[s : s + batch]], pad) for s in range(0, len(order), batch)]
    rows = PackedBatches(examples, batch, seed=0, sequence_length=seq).rows(0)
    return [collate_packed([[examples[i] for i in row] for row in rows[s : s + batch]], pad)
            for s in range(0, len(rows), batch)]


def run_pass(layout: str, config, vocab, batches: list[dict], warmup: dict) -> Pass:
    from distill_trainer.data import IGNORE_INDEX
    from distill_trainer.distill_loss import LossConfig, make_loss_fn
    from distill_trainer.strategies.base import MicroBatch, RankContext
    from distill_trainer.strategies.torch import TorchInferStrategy, TorchTrainStrategy

    teacher = TorchInferStrategy(config, RankContext(), vocab)
    student = TorchTrainStrategy(config, RankContext(), vocab)  # the same initial weights for every pass
    loss_config = LossConfig.from_config(config)

    def step(batch: dict) -> None:
        mb = MicroBatch(batch["input_ids"], batch["attention_mask"], batch["labels"], None, batch.get("position_ids"))
        mb.teacher = teacher.forward(mb)
        student.forward_backward([mb], make_loss_fn(loss_config, float((mb.labels != IGNORE_INDEX).sum())))
        update = student.optimizer_step()
        assert update.applied

    step(warmup)
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    seconds = time.perf_counter() - started
    del teacher, student
    return Pass(
        layout,
        micro_batches=len(batches),
        positions=sum(b["input_ids"].numel() for b in batches),
        input_tokens=sum(int(b["attention_mask"].sum()) for b in batches),
        label_tokens=sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches),
        seconds=seconds,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=512, help="records in the pass (default 512)")
    parser.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size (default 8)")
    parser.add_argument("--seq", type=int, default=256, help="sequence_length (default 256)")
    parser.add_argument("--question-words", type=int, default=8, help="words of a paragraph that are the question")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="where python3.11-doc is fetched and cached")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny models, 64 records, 1 round")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.quick:
        args.records, args.rounds, args.seq = min(args.records, 64), 1, min(args.seq, 128)

    import random

    import torch
    import transformers

    from distill_trainer.models import check_shared_vocab

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    records = paragraph_records(fetch_prose(Path(args.cache)), args.question_words)
    records = random.Random(0).sample(records, min(args.records, len(records)))
    with tempfile.TemporaryDirectory(prefix="kubedistill-packing-") as tmp:
        config, tokenizer, examples = build(Path(tmp), sizes, args.seq, records, args.question_words)
        vocab = check_shared_vocab(config.student_pretrain, config.teacher_pretrain)
        lengths = sorted(len(e.input_ids) for e in examples)
        truncated = sum(n == args.seq for n in lengths)
        layouts = {layout: micro_batches(layout, examples, args.batch, args.seq, vocab.pad_token_id)
                   for layout in ("padded", "packed")}
        warmup = layouts["padded"][-1]
        passes: dict[str, list[Pass]] = {"padded": [], "packed": []}
        for round_ in range(args.rounds):
            for layout in ("padded", "packed"):
                done = run_pass(layout, config, vocab, layouts[layout], warmup)
                passes[layout].append(done)
                print(f"[packing] round {round_ + 1} {layout}: {done.micro_batches} micro-batches, "
                      f"{done.seconds:.1f} s, {done.label_tokens / done.seconds:,.0f} label tokens/s", flush=True)
    load_end = os.getloadavg()

    print()
    print(f"records: {len(examples)} paragraphs of python3.11-doc (question = first {args.question_words} words), "
          f"tokens per record median {statistics.median(lengths):.0f}, 90th percentile "
          f"{lengths[int(0.9 * (len(lengths) - 1))]}, max {lengths[-1]} ({truncated} truncated at sequence_length "
          f"{args.seq}); vocabulary {vocab.size}")
    print(f"models: teacher {_shape(sizes.teacher)}, student {_shape(sizes.student)}; top-{sizes.topk} targets with "
          f"the tail, distill_loss_weight 0.5, fused head; batch {args.batch}, one optimizer step per micro-batch; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}, load average {load_start[0]:.1f} -> {load_end[0]:.1f}")
    print()
    print("| layout | micro-batches | positions run (rows x width) | padded fraction | label tokens | seconds "
          "(median of rounds) | label tokens/s | input tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    medians = {}
    for layout, runs in passes.items():
        seconds = statistics.median(p.seconds for p in runs)
        medians[layout] = seconds
        p = runs[0]
        print(f"| {layout} | {p.micro_batches} | {p.positions:,} | {p.padded_fraction:.1%} | {p.label_tokens:,} | "
              f"{seconds:.1f} ({', '.join(f'{r.seconds:.1f}' for r in runs)}) | {p.label_tokens / seconds:,.0f} | "
              f"{p.input_tokens / seconds:,.0f} |")
    print()
    print(f"packed / padded label tokens per second: {medians['padded'] / medians['packed']:.2f}x")
    return 0


def _shape(size: dict) -> str:
    return (f"{size['num_layers']} layers x {size['hidden_size']} (heads {size['num_heads']}, "
            f"MLP {size['intermediate_size']})")


if __name__ == "__main__":
    sys.exit(main())
