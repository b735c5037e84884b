"""Shared pieces of the Megatron strategy tests: tiny HF models written to disk, a duck-typed config,
and a spawn helper for gloo CPU ranks."""

from __future__ import annotations

import os
import socket
import traceback
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TOKENIZER_VOCAB = 90  # the tokenizer's size; the models' embeddings have 96 rows (padded, as Qwen's are)
MODEL_VOCAB = 96


def tiny_config(family: str, *, tied: bool, layers: int = 2, hidden: int = 64):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=MODEL_VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 3 // 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        rope_theta=10000.0,
    )
    if family == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common, attention_bias=False, mlp_bias=False)


def write_tiny_model(directory: str, family: str, *, tied: bool, seed: int, layers: int = 2, hidden: int = 64) -> str:
    """A randomly initialized HF causal LM saved with save_pretrained; weights scaled up so that the
    logits are far from uniform (a comparison of near-equal logits would prove little)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tied=tied, layers=layers, hidden=hidden))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2:
                param.mul_(4.0)
            elif "bias" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(directory)
    return directory


def fake_config(student: str, teacher: str | None = None, *, topk: int = 0, max_steps: int = 5, lr: float = 1e-2,
                dtype: str = "fp32", warmup_steps: int = 1, recompute: str | None = None,
                distributed_optimizer: bool = False):
    """The fields of DistillConfig the Megatron strategies read (a duck-typed stand-in)."""
    training_args = SimpleNamespace(
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=warmup_steps,
        weight_decay=0.01,
        max_grad_norm=1.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
    )
    model_args = SimpleNamespace(dtype=dtype)
    strategy_args = SimpleNamespace(sequence_parallel=False, recompute_granularity=recompute,
                                    use_distributed_optimizer=distributed_optimizer)
    return SimpleNamespace(
        student_pretrain=student,
        teacher_pretrain=teacher or student,
        seed=0,
        logits_topk=topk,
        topk_tail=True,
        kd_temperature=1.0,
        teacher_temperature=1.0,
        max_steps=max_steps,
        student=SimpleNamespace(model_args=model_args, training_args=training_args, strategy_args=strategy_args),
        teacher=SimpleNamespace(model_args=model_args, strategy_args=strategy_args),
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world, port, fn, args):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        from megatron.core import parallel_state as mpu

        mpu.destroy_model_parallel()
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo CPU processes."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def rank_context(rank: int, world: int, tp: int, pp: int):
    from distill_trainer.strategies.base import RankContext

    return RankContext(rank=rank, world_size=world, tp_size=tp, pp_size=pp, group=dist.group.WORLD)


def reset_megatron() -> None:
    from megatron.core import parallel_state as mpu

    mpu.destroy_model_parallel()


def distill_step(student, micro_batches, loss_config, normalizer: float) -> tuple[float, float]:
    """One training step of a Megatron student on ``micro_batches`` (teacher targets attached): the step's loss over
    every rank (CE and KD sums all-reduced; ranks that would double count report zeros) and its gradient norm."""
    from distill_trainer.distill_loss import make_loss_fn

    stats = student.forward_backward(micro_batches, make_loss_fn(loss_config, normalizer))
    update = student.optimizer_step()
    assert update.applied
    sums = torch.tensor([stats.ce_sum, stats.kd_sum, stats.label_tokens], dtype=torch.float64)
    dist.all_reduce(sums)
    assert sums[2] == normalizer
    w = loss_config.distill_loss_weight
    return float(((1 - w) * sums[0] + w * sums[1]) / normalizer), update.grad_norm


def assert_generate_equals_transformers(generated: list[list[int]], prompts: list[list[int]], model_dir: str,
                                        eos_token_id: int) -> None:
    """Greedy ``generate`` of a Megatron student equals transformers' greedy decoding of its HF checkpoint (the
    vocabulary padding suppressed, cut at EOS)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for prompt, mine in zip(prompts, generated):
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=eos_token_id,
            pad_token_id=0, suppress_tokens=list(range(TOKENIZER_VOCAB, hf.config.vocab_size)),
        )[0, len(prompt):].tolist()
        expected = out[: out.index(eos_token_id)] if eos_token_id in out else out
        assert mine == expected, (prompt, mine, expected)
