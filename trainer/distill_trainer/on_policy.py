"""On-policy distillation and seq_kd: which micro-batches of a step get sampled completions, and from which prompts.

Per step, each of the global batch's micro-batches independently gets its completions from (GKD's mix, TRL's
``GKDTrainer``): the student, with probability ``on_policy_fraction`` (λ); otherwise the teacher when ``seq_kd``;
otherwise the dataset's answers. The draw is seeded from (seed, step) only, so a resumed run makes the same
choices. A sampled micro-batch's rows are its records' prompts, each ``samples_per_prompt`` times; the driver
hands them to every rank of the replica that samples (``workers._Rank.sample``) and the sampled batch then takes
the dataset batch's place: the teacher scores it and the student trains on it, through the same channel and loss
as any micro-batch (``distill_loss._LossFn`` picks the loss of samples).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .config import ConfigError, DistillConfig
from .data import Example
from .sampling import SAMPLER_STUDENT, SAMPLER_TEACHER, sampling_seed


def micro_batch_sources(config: DistillConfig, step: int, count: int) -> list[int]:
    """Who provides the completions of each of a step's ``count`` micro-batches: ``SAMPLER_STUDENT``,
    ``SAMPLER_TEACHER`` (seq_kd) or 0 (the dataset)."""
    fallback = SAMPLER_TEACHER if config.seq_kd else 0
    if config.on_policy_fraction <= 0:
        return [fallback] * count
    if config.on_policy_fraction >= 1:
        return [SAMPLER_STUDENT] * count
    generator = torch.Generator().manual_seed(sampling_seed(config.seed, step, -1, "mix"))
    draws = torch.rand(count, generator=generator, dtype=torch.float64).tolist()
    return [SAMPLER_STUDENT if u < config.on_policy_fraction else fallback for u in draws]


def prompts_of(record_ids: Sequence[int], examples: Sequence[Example], samples_per_prompt: int) -> tuple[list[list[int]], list[int]]:
    """The prompts (token ids) of a micro-batch's records, each ``samples_per_prompt`` times in a row, and their
    record ids in the same order."""
    prompts, ids = [], []
    for record in record_ids:
        example = examples[record]
        for _ in range(samples_per_prompt):
            prompts.append(example.input_ids[: example.prompt_length])
            ids.append(record)
    return prompts, ids


def check_prompts_fit(config: DistillConfig, examples: Sequence[Example], what: str) -> None:
    """Refuse (before any work) a prompt that leaves fewer than ``generation.max_new_tokens`` tokens of
    ``sequence_length`` for its completion, naming its record."""
    room = config.sequence_length - config.generation.max_new_tokens
    for index, example in enumerate(examples):
        if example.prompt_length > room:
            where = example.where or f"{what} record {index}"
            raise ConfigError(
                f"{where}: the prompt is {example.prompt_length} tokens, but sampled completions need "
                f"generation.max_new_tokens={config.generation.max_new_tokens} of sequence_length="
                f"{config.sequence_length}, leaving {room} for the prompt; shorten the prompt, lower "
                "generation.max_new_tokens or raise sequence_length"
            )
