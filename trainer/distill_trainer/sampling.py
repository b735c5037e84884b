"""Sampling completions of prompts, for on-policy distillation (``on_policy_fraction``) and ``seq_kd``.

A strategy samples through ``decode``: it gives a ``Stepper`` (the model's next-token logits of every row, first
for the prompts, then after each token appended) and ``decode`` picks the tokens. Keeping the token choice here,
apart from the model, makes the HF KV-cache path (``strategies.torch``) and Megatron's TP/PP path
(``strategies.megatron``) choose tokens the same way, and an external engine (vLLM, SGLang) a drop-in: it needs
to return the same ``Completion`` (tokens and their log-probs under the distribution they were drawn from).

Determinism. Every draw uses a ``torch.Generator`` seeded from (run seed, step, micro-batch, side)
(``sampling_seed``), never the process's global RNG, so a resumed run samples exactly what the uninterrupted run
sampled, and every rank of a model replica (TP, PP) draws the same tokens from the same logits. Tokens are drawn
by the Gumbel-max trick, argmax(log p + g) with g = −log(−log u), u uniform from the generator: the same draw
on any device and any rank.

Filters (``GenerationConfig``): temperature T (0 = greedy), top-k, then top-p over what top-k left (the order of
HF's logits warpers). The log-prob of a drawn token is under that filtered, tempered distribution: the
behaviour policy an importance ratio needs.

``sampled_micro_batch`` turns prompts and completions into the batch dict the teacher and the student train on:
right-padded like ``data.collate``, labels (shifted, as everywhere) on the completion tokens only (the prompt
is never learned from a sampled row), the behaviour log-prob of each label token, and ``sampler`` naming who
sampled (``SAMPLER_STUDENT`` / ``SAMPLER_TEACHER``).
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from .data import IGNORE_INDEX

# batch["sampler"]: who sampled a micro-batch's completions (absent: the dataset's answers).
SAMPLER_STUDENT = 1
SAMPLER_TEACHER = 2


@dataclass(frozen=True)
class SamplingParams:
    """``GenerationConfig``'s settings as the sampler takes them (plain values, picklable to every rank)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @classmethod
    def of(cls, generation) -> "SamplingParams":
        return cls(generation.max_new_tokens, generation.temperature, generation.top_p, generation.top_k)

    def greedy(self) -> "SamplingParams":
        return SamplingParams(self.max_new_tokens, 0.0, 1.0, 0)


@dataclass(frozen=True)
class Completion:
    """The tokens sampled after one prompt (its EOS included when one was drawn) and the log-prob of each under
    the distribution it was drawn from (0 for greedy picks)."""

    tokens: list[int]
    logprobs: list[float]


class Stepper(Protocol):
    """A model decoding a batch of prompts: ``start()`` gives the logits [B, V] (float32, the tokenizer's vocabulary)
    after each prompt; ``step(tokens)`` appends one token [B] to every row and gives the logits after it."""

    def start(self) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...


def sampling_seed(seed: int, step: int, micro_batch: int, side: str) -> int:
    """The seed of one micro-batch's draws: a function of the run's seed, the optimizer step, the global micro-batch
    index and the sampling side only (not of the rank, the process or what ran before)."""
    digest = hashlib.sha256(f"kubedistill-sampling:{seed}:{step}:{micro_batch}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def filtered_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """log-probs [B, V] of the distribution tokens are drawn from: logits / T, cut to the top-k, then to the
    smallest set whose mass reaches top-p (at least one token is always kept); −inf outside."""
    z = logits.float() / params.temperature
    if params.top_k and params.top_k < z.shape[-1]:
        kth = torch.topk(z, params.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, -torch.inf)
    if params.top_p < 1:
        ordered, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each
        cut = before >= params.top_p  # the first token is never cut (its mass before is 0)
        z = z.scatter(-1, order, ordered.masked_fill(cut, -torch.inf))
    return torch.log_softmax(z, dim=-1)


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits`` [B, V] and its log-prob under the sampling distribution."""
    if params.temperature == 0:  # greedy: the first maximum, as HF's argmax
        return logits.argmax(-1), torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    logp = filtered_logprobs(logits, params)
    uniform = torch.rand(logp.shape, generator=generator, device=logp.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(uniform))  # u = 0 gives −inf: never picked
    tokens = (logp + gumbel).argmax(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def decode(stepper: Stepper, rows: int, params: SamplingParams, eos_token_id: int, generator: torch.Generator) -> list[Completion]:
    """Sample up to ``params.max_new_tokens`` tokens after each of ``rows`` prompts; a row ends at its first EOS
    (kept). Rows that ended are fed EOS until every row has (their logits are not used)."""
    tokens: list[list[int]] = [[] for _ in range(rows)]
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    done = torch.zeros(rows, dtype=torch.bool)
    logits = stepper.start()
    for position in range(params.max_new_tokens):
        picked, picked_logprobs = next_tokens(logits, params, generator)
        picked, picked_logprobs = picked.cpu(), picked_logprobs.cpu()
        for row in torch.nonzero(~done).flatten().tolist():
            tokens[row].append(int(picked[row]))
            logprobs[row].append(float(picked_logprobs[row]))
        done |= picked == eos_token_id
        if bool(done.all()) or position == params.max_new_tokens - 1:
            break
        logits = stepper.step(torch.where(done, torch.full_like(picked, eos_token_id), picked).to(logits.device))
    return [Completion(t, p) for t, p in zip(tokens, logprobs)]


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def sampled_micro_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Completion],
    pad_token_id: int,
    sampler: int,
    record_ids: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """The micro-batch of ``prompts[i] + completions[i]``: ``input_ids``, ``attention_mask``, ``labels`` (the
    completion's tokens at the positions that predict them, −100 elsewhere), ``behaviour_logprobs`` [B, T] (each
    label's log-prob when it was drawn, 0 elsewhere), ``sampler`` and ``record_ids`` [B, 1]."""
    width = max(len(p) + len(c.tokens) for p, c in zip(prompts, completions))
    batch = len(prompts)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    behaviour = torch.zeros((batch, width), dtype=torch.float32)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        p, n = len(prompt), len(completion.tokens)
        input_ids[row, : p + n] = torch.tensor([*prompt, *completion.tokens], dtype=torch.long)
        attention_mask[row, : p + n] = 1
        # Position t predicts token t + 1: the completion's tokens are predicted at p − 1 ... p + n − 2.
        labels[row, p - 1 : p - 1 + n] = torch.tensor(completion.tokens, dtype=torch.long)
        behaviour[row, p - 1 : p - 1 + n] = torch.tensor(completion.logprobs, dtype=torch.float32)
    ids = record_ids if record_ids is not None else [-1] * batch
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "behaviour_logprobs": behaviour,
        "sampler": torch.tensor(sampler),
        "record_ids": torch.tensor(list(ids), dtype=torch.long).unsqueeze(1),
    }


class HFCachedStepper:
    """A transformers causal LM decoding left-padded prompts with its KV cache: one forward over the prompts,
    then one token per step. ``vocab_size`` cuts the padded rows of the output layer (they are never drawn)."""

    def __init__(self, model, prompts: Sequence[Sequence[int]], pad_token_id: int, vocab_size: int,
                 device: torch.device):
        self.model, self.vocab_size, self.device = model, vocab_size, device
        width = max(len(p) for p in prompts)
        self.input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        self.mask = torch.zeros_like(self.input_ids)
        for row, prompt in enumerate(prompts):
            self.input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            self.mask[row, width - len(prompt) :] = 1
        self.input_ids, self.mask = self.input_ids.to(device), self.mask.to(device)
        # Left padding: each row's positions start at 0 at its first real token.
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = None
        # transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` is deprecated).
        self.cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _logits(self, out) -> torch.Tensor:
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else out.past_key_values
        return out.logits[:, -1, : self.vocab_size].float()

    def start(self) -> torch.Tensor:
        out = self.model(input_ids=self.input_ids, attention_mask=self.mask, position_ids=self.positions,
                         use_cache=True)
        self.positions = self.positions[:, -1:] + 1
        return self._logits(out)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        out = self.model(input_ids=tokens[:, None].to(self.device), attention_mask=self.mask,
                         position_ids=self.positions, use_cache=True, **{self.cache_argument: self.cache})
        self.positions = self.positions + 1
        return self._logits(out)


def sample_with_kv_cache(model, prompts: Sequence[Sequence[int]], params: SamplingParams, eos_token_id: int,
                         pad_token_id: int, seed: int, vocab_size: int, device: torch.device) -> list[Completion]:
    """``decode`` with a transformers model and its KV cache (eval mode, no gradients; the mode is restored)."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            stepper = HFCachedStepper(model, prompts, pad_token_id, vocab_size, device)
            return decode(stepper, len(prompts), params, eos_token_id, make_generator(seed, device))
    finally:
        model.train(training)
