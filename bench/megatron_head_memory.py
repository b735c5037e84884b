"""Benchmark: peak memory of one forward + backward of the Megatron student's loss, full logits vs the fused head.

The student is a Megatron-Core GPT model (``MegatronTrainStrategy``, Qwen2 layout) with the real vocabulary of
Qwen2/Qwen2.5 (151,936 embedding rows; padded to 152,064 for tp = 2, each TP rank holding 76,032 columns; the
tokenizer's 151,665 tokens, the rest masked) and small other dimensions (hidden 512, 2 layers), on ``--tp`` gloo CPU
ranks. One micro-batch of ``--batch`` × ``--seq`` tokens with labels after a ``--prompt``-token prompt. Two paths:

  logits  Megatron's column-parallel output layer at every position: [B, T, V/tp] logits, then the loss on them
          (``_logits_view`` + ``distill_loss`` with a ``VocabShard``): ``student.model_args.fused_lm_head: false``
  fused   the final hidden states at the label rows, output layer and loss chunk by chunk over the rank's
          vocabulary shard (``distill_loss.fused_head_distill_loss``): the default

and two kinds of teacher targets: the pipeline's default top-64 with the tail (each TP rank's candidates with
global indices, the tail all-reduced as ``megatron_infer`` ships it), and full-vocabulary shards.

Method. Every (path, targets) pair runs in fresh processes (one per TP rank). Each rank builds the strategy,
runs one warm-up step (``forward_backward``, then the DDP gradient buffer zeroed), then two measured steps:

  peak RSS   the kernel's peak-RSS counter reset (5 written to /proc/self/clear_refs: VmHWM := VmRSS), VmRSS read
             as the baseline, one step, VmHWM read: peak extra resident memory of the step (as bench/kd_loss.py).
             Allocations under glibc's mmap threshold may reuse heap pages RSS already counts.
  tensors    one step under ``torch.profiler`` with ``profile_memory=True``: PyTorch's CPU allocator reports every
             allocation and free to the profiler with its running total of bytes allocated since the profiler
             started (the "[memory]" events' "Total Allocated"); its maximum is the peak of tensor memory the step
             allocated and still held (parameters and the DDP buffers exist before and are not counted).

The table shows, per row, the larger of the TP ranks' figures, and the step's wall time (the RSS step; the machine
may be shared: compare within a run).

    python bench/megatron_head_memory.py                      # tp 2, V 151,936, hidden 512, 1 x 512 tokens
    python bench/megatron_head_memory.py --seq 1024 --hidden 1024
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer"))
sys.path.insert(0, str(ROOT / "bench"))

from kd_loss import _reset_peak, _status_kib  # noqa: E402  (peak RSS from /proc, as kd_loss measures it)

QWEN_VOCAB = 151_936  # Qwen2 / Qwen2.5 embedding rows
QWEN_TOKENIZER = 151_665  # len(tokenizer) of Qwen2.5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_model(directory: str, args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=max(2048, args.seq), tie_word_embeddings=args.tied, rms_norm_eps=1e-6,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)


def _config(model: str, args):
    """The fields of DistillConfig that MegatronTrainStrategy reads."""
    training_args = SimpleNamespace(learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0,
                                    weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999)
    strategy_args = SimpleNamespace(sequence_parallel=False, recompute_granularity=None,
                                    use_distributed_optimizer=False)
    model_args = SimpleNamespace(dtype="fp32", fused_lm_head=True)
    student = SimpleNamespace(model_args=model_args, training_args=training_args, strategy_args=strategy_args)
    return SimpleNamespace(student_pretrain=model, teacher_pretrain=model, seed=0, logits_topk=args.topk,
                           topk_tail=True, kd_temperature=1.0, teacher_temperature=1.0, max_steps=10,
                           student=student, teacher=student)


def _teacher_targets(strategy, n_rows: int, kind: str, topk: int, tp_rank: int):
    """What teacher TP rank ``tp_rank`` ships for ``n_rows`` label rows (random logits of its shard)."""
    import torch

    from distill_trainer.distill_loss import TeacherTargets
    from distill_trainer.parallel_losses import mask_vocab_padding, merge_topk, shard_topk, vocab_parallel_tail_logmass

    g = torch.Generator().manual_seed(1000 + tp_rank)
    rows = torch.randn(n_rows, strategy.shard_width, generator=g).mul_(3)
    mask_vocab_padding(rows, strategy.vocab_start, strategy.vocab.size)
    if kind == "full":
        return TeacherTargets(rows)
    top = shard_topk(rows, topk, strategy.vocab_start)
    merged = merge_topk(top, topk, strategy.tp_group)
    tail = vocab_parallel_tail_logmass(rows, merged.indices, vocab_start=strategy.vocab_start,
                                       group=strategy.tp_group, temperature=1.0)
    return TeacherTargets(top.values, top.indices, tail)


def _profiled_peak(step) -> int:
    """Peak bytes of tensors allocated during ``step()`` and still held (torch.profiler's CPU memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.load(open(trace.name))["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return max(totals, default=0)


def rank_main(rank: int, world: int, port: int, model: str, path: str, targets: str, args, out: str) -> None:
    import gc

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from distill_trainer.data import IGNORE_INDEX
        from distill_trainer.distill_loss import LossConfig, make_loss_fn
        from distill_trainer.models import VocabInfo
        from distill_trainer.strategies.base import MicroBatch, RankContext
        from distill_trainer.strategies.megatron import MegatronTrainStrategy

        ctx = RankContext(rank=rank, world_size=world, tp_size=args.tp, pp_size=1, group=dist.group.WORLD)
        vocab = VocabInfo(size=min(QWEN_TOKENIZER, args.vocab), eos_token_id=1, pad_token_id=0)
        strategy = MegatronTrainStrategy(_config(model, args), ctx, vocab)
        strategy.fused_head = path == "fused"
        g = torch.Generator().manual_seed(7)
        input_ids = torch.randint(2, vocab.size, (args.batch, args.seq), generator=g)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, args.prompt - 1 : -1] = input_ids[:, args.prompt :]
        n_label = int((labels != IGNORE_INDEX).sum())
        teacher = _teacher_targets(strategy, n_label, targets, args.topk, ctx.tp_rank)
        batch = MicroBatch(input_ids, torch.ones_like(input_ids), labels, teacher)
        cfg = LossConfig(distill_loss_weight=0.5, kd_objective="forward_kl",
                         logits_topk=args.topk if targets == "topk" else 0, topk_tail=True)
        loss_fn = make_loss_fn(cfg, float(n_label))
        stats = []

        def step():
            stats.append(strategy.forward_backward([batch], loss_fn))
            strategy.model.zero_grad_buffer()

        step()  # warm-up: lazily built buffers, caches
        gc.collect()
        dist.barrier()
        measured = _reset_peak()
        baseline = _status_kib("VmRSS")
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        rss_peak = (_status_kib("VmHWM") - baseline) * 1024 if measured else None
        gc.collect()
        dist.barrier()
        tensors_peak = _profiled_peak(step)
        losses = [s.ce_sum for s in stats]
        result = {"rank": rank, "tensors_peak": tensors_peak, "rss_peak": rss_peak, "seconds": seconds,
                  "label_tokens": n_label, "shard_width": strategy.shard_width, "padded": strategy.padded_vocab,
                  "ce_sums": losses, "counted": stats[-1].counted}
        with open(f"{out}.rank{rank}", "w") as f:
            json.dump(result, f)
    finally:
        from megatron.core import parallel_state as mpu

        mpu.destroy_model_parallel()
        dist.destroy_process_group()


def _spawn_entry(rank, world, port, model, path, targets, args, out):
    rank_main(rank, world, port, model, path, targets, args, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=128, help="tokens before the first label")
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--tied", action="store_true", help="tied embeddings (Qwen2.5-0.5B's layout)")
    parser.add_argument("--only", choices=["topk", "full"], help="one kind of teacher targets")
    args = parser.parse_args()

    import torch.multiprocessing as mp

    work = tempfile.mkdtemp(prefix="megatron_head_memory_")
    try:
        model = os.path.join(work, "student")
        write_model(model, args)
        rows = []
        for targets in [args.only] if args.only else ["topk", "full"]:
            for path in ("logits", "fused"):
                out = os.path.join(work, f"{path}_{targets}.json")
                mp.spawn(_spawn_entry, args=(args.tp, _free_port(), model, path, targets, args, out), nprocs=args.tp,
                         join=True)
                ranks = [json.load(open(f"{out}.rank{r}")) for r in range(args.tp)]
                rows.append((path, targets, ranks))
                print(f"done: {path} {targets}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    first = rows[0][2][0]
    print(f"\nMegatron student, tp={args.tp}, V={args.vocab:,} (padded {first['padded']:,}, {first['shard_width']:,} "
          f"columns per TP rank), hidden {args.hidden}, {args.layers} layers, {args.batch} x {args.seq} tokens, "
          f"{first['label_tokens']} label tokens, fp32, one forward + backward (w 0.5, forward_kl); "
          "per row the larger of the TP ranks' figures\n")
    header = f"{'path':<8} {'teacher targets':<16} {'tp':>3} {'V':>8} {'tokens':>7} {'labels':>7} " \
             f"{'peak tensors MiB':>17} {'peak RSS MiB':>13} {'step s':>7} {'ce_sum':>12}"
    print(header)
    print("-" * len(header))
    for path, targets, ranks in rows:
        tensors = max(r["tensors_peak"] for r in ranks) / 2**20
        rss = [r["rss_peak"] for r in ranks]
        rss_text = f"{max(rss) / 2**20:13.1f}" if None not in rss else f"{'n/a':>13}"
        seconds = max(r["seconds"] for r in ranks)
        ce = next(r["ce_sums"][-1] for r in ranks if r["counted"])
        label = "top-64+tail" if targets == "topk" else "full vocab"
        print(f"{path:<8} {label:<16} {args.tp:>3} {args.vocab:>8,} {args.batch * args.seq:>7} "
              f"{ranks[0]['label_tokens']:>7} {tensors:17.1f} {rss_text} {seconds:7.2f} {ce:12.4f}")


if __name__ == "__main__":
    main()
