"""Benchmark: on-policy sampling on Megatron ranks, with Megatron-Core's KV cache against a whole forward per token.

The student is a Megatron-Core GPT model (``MegatronTrainStrategy``, Qwen2 layout, random weights, fp32) on ``--tp``
gloo CPU ranks. ``--batch`` prompts of ``--prompt`` random tokens each decode ``--new-tokens`` tokens at temperature
1 with ``sampling.decode`` (what ``sample`` runs; no EOS is ever drawn, so every row runs to the end), twice:

  kv        ``_MegatronKVStepper``: Megatron's static-batch inference path (``StaticInferenceContext`` through
            ``GPTInferenceWrapper``): the prompts once, then one token per step against the cached keys and values.
            What ``sample`` uses.
  no cache  ``_MegatronStepper``: every step one forward of the whole sequence so far (what ``sample`` falls back
            to under sequence parallel).

Both draw from generators with the same seed; the table says whether they drew the same tokens and how far apart
the log-probs of the drawn tokens are (float32 rounding: the two paths add in different orders). Each path runs
``--repeats`` times after a warm-up; the table shows the fastest (the machine may be shared: compare within a
run) and tokens per second. Figures only; it never passes or fails on them.

    python bench/megatron_sampling.py                                   # tp 1, hidden 256, 4 layers, 4 x 64 + 64
    python bench/megatron_sampling.py --tp 2 --prompt 128 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer"))
sys.path.insert(0, str(ROOT / "bench"))

import megatron_head_memory as head_memory  # noqa: E402  (the same random model, strategy config and free port)


def write_model(directory: str, args) -> None:
    """megatron_head_memory's random Qwen2 model (untied), with room for prompt + new tokens."""
    head_memory.write_model(directory, SimpleNamespace(vocab=args.vocab, hidden=args.hidden, layers=args.layers,
                                                       seq=args.prompt + args.new_tokens, tied=False))


def rank_main(rank: int, world: int, port: int, model: str, args, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, args.threads))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from distill_trainer.models import VocabInfo
        from distill_trainer.sampling import SamplingParams, decode, make_generator
        from distill_trainer.strategies.base import RankContext
        from distill_trainer.strategies.megatron import MegatronTrainStrategy, _MegatronKVStepper, _MegatronStepper

        ctx = RankContext(rank=rank, world_size=world, tp_size=args.tp, pp_size=1, group=dist.group.WORLD)
        vocab = VocabInfo(size=args.vocab, eos_token_id=0, pad_token_id=0)
        strategy = MegatronTrainStrategy(head_memory._config(model, SimpleNamespace(topk=64)), ctx, vocab)
        model_ = strategy._sampling_model()
        model_.eval()
        g = torch.Generator().manual_seed(7)
        prompts = torch.randint(1, vocab.size, (args.batch, args.prompt), generator=g)
        params = SamplingParams(args.new_tokens, temperature=1.0)
        steppers = {"kv": lambda: _MegatronKVStepper(strategy, model_, prompts, args.new_tokens),
                    "no cache": lambda: _MegatronStepper(strategy, model_, prompts)}
        eos = -1  # never drawn: every row decodes all new tokens

        def run(name: str, new_tokens: int):
            dist.barrier()
            start = time.perf_counter()
            with torch.no_grad():
                completions = decode(steppers[name](), args.batch, SamplingParams(new_tokens, temperature=1.0), eos,
                                     make_generator(1234, torch.device("cpu")))
            return completions, time.perf_counter() - start

        result = {"rank": rank}
        for name in steppers:
            run(name, 2)  # warm-up
            times, completions = [], None
            for _ in range(args.repeats):
                completions, seconds = run(name, params.max_new_tokens)
                times.append(seconds)
            result[name] = {"seconds": min(times), "all": times, "tokens": [c.tokens for c in completions],
                            "logprobs": [c.logprobs for c in completions]}
        with open(f"{out}.rank{rank}", "w") as f:
            json.dump(result, f)
    finally:
        from megatron.core import parallel_state as mpu

        mpu.destroy_model_parallel()
        dist.destroy_process_group()


def _spawn_entry(rank, world, port, model, args, out):
    rank_main(rank, world, port, model, args, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64, help="tokens of each prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args(argv)

    import torch.multiprocessing as mp

    work = tempfile.mkdtemp(prefix="megatron_sampling_")
    try:
        model = os.path.join(work, "student")
        write_model(model, args)
        out = os.path.join(work, "result.json")
        mp.spawn(_spawn_entry, args=(args.tp, head_memory._free_port(), model, args, out), nprocs=args.tp, join=True)
        ranks = [json.load(open(f"{out}.rank{r}")) for r in range(args.tp)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    kv, plain = ranks[0]["kv"], ranks[0]["no cache"]
    same_tokens = kv["tokens"] == plain["tokens"]
    same_on_ranks = all(r["kv"]["tokens"] == kv["tokens"] for r in ranks)
    diff = max((abs(a - b) for x, y in zip(kv["logprobs"], plain["logprobs"]) for a, b in zip(x, y)), default=0.0)
    tokens = args.batch * args.new_tokens
    print(f"\nMegatron sampling, tp={args.tp}, Qwen2 layout, hidden {args.hidden}, {args.layers} layers, V {args.vocab:,}, "
          f"fp32, {args.threads} thread(s) per rank: {args.batch} prompts x {args.prompt} tokens, {args.new_tokens} new "
          f"tokens at temperature 1; fastest of {args.repeats} (per row the slowest rank)\n")
    header = f"{'stepper':<10} {'seconds':>8} {'tokens/s':>9} {'vs no cache':>12}"
    print(header)
    print("-" * len(header))
    for name in ("no cache", "kv"):
        seconds = max(r[name]["seconds"] for r in ranks)
        base = max(r["no cache"]["seconds"] for r in ranks)
        print(f"{name:<10} {seconds:8.3f} {tokens / seconds:9.0f} {base / seconds:11.2f}x")
    print(f"\nsame tokens drawn by both: {same_tokens}; on every rank: {same_on_ranks}; "
          f"max |log-prob difference| {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
