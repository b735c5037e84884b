"""The sampler of on-policy distillation: filters, draws, EOS, seeds, the sampled micro-batch, the GKD mix, and the
on-policy config (TRL's and ROLL's names, refusals)."""

import math

import pytest
import torch

from distill_trainer.config import ConfigError, config_from_dict
from distill_trainer.data import IGNORE_INDEX, Example
from distill_trainer.on_policy import check_prompts_fit, micro_batch_sources, prompts_of
from distill_trainer.sampling import (
    SAMPLER_STUDENT,
    SAMPLER_TEACHER,
    Completion,
    SamplingParams,
    decode,
    filtered_logprobs,
    make_generator,
    next_tokens,
    sampled_micro_batch,
    sampling_seed,
)

BASE = dict(student_pretrain="s", teacher_pretrain="t", max_steps=1, student={"data_args": {"file_name": "x.jsonl"}})


def test_top_k_and_top_p_keep_the_tokens_hf_keeps_and_renormalise():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    only_two = filtered_logprobs(logits, SamplingParams(1, top_k=2)).exp()
    assert torch.allclose(only_two, torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    # top_p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the third token (which crosses 0.8) is kept too, as HF's TopPLogitsWarper.
    nucleus = filtered_logprobs(logits, SamplingParams(1, top_p=0.8)).exp()
    assert torch.allclose(nucleus, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    tempered = filtered_logprobs(logits, SamplingParams(1, temperature=0.5)).exp()
    assert torch.allclose(tempered, torch.softmax(logits / 0.5, -1))


def test_draws_follow_the_distribution_and_report_its_log_probs():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.log(probs).expand(20000, 3).clone()
    tokens, logprobs = next_tokens(logits, SamplingParams(1), make_generator(3, torch.device("cpu")))
    frequencies = torch.bincount(tokens, minlength=3).double() / len(tokens)
    assert torch.allclose(frequencies, probs.double(), atol=0.015)
    assert torch.allclose(logprobs, torch.log(probs)[tokens])


def test_greedy_picks_the_first_maximum_with_log_prob_zero():
    tokens, logprobs = next_tokens(torch.tensor([[1.0, 3.0, 3.0]]), SamplingParams(1, temperature=0.0), None)
    assert tokens.tolist() == [1] and logprobs.tolist() == [0.0]


class _Scripted:
    """A stepper whose logits put all mass on a scripted token per row and step."""

    def __init__(self, script):
        self.script, self.position, self.fed = script, 0, []

    def _logits(self):
        logits = torch.full((len(self.script), 10), -1e9)
        for row, tokens in enumerate(self.script):
            logits[row, tokens[min(self.position, len(tokens) - 1)]] = 0.0
        return logits

    def start(self):
        return self._logits()

    def step(self, tokens):
        self.fed.append(tokens.tolist())
        self.position += 1
        return self._logits()


def test_decode_keeps_eos_stops_each_row_there_and_feeds_eos_after():
    stepper = _Scripted([[4, 2, 5], [6, 7, 8]])  # EOS = 2
    completions = decode(stepper, 2, SamplingParams(3), eos_token_id=2, generator=make_generator(0, torch.device("cpu")))
    assert [c.tokens for c in completions] == [[4, 2], [6, 7, 8]]
    assert all(len(c.logprobs) == len(c.tokens) for c in completions)
    assert stepper.fed == [[4, 6], [2, 7]]  # row 0 is fed EOS once it has ended; no step after the last token


def test_seeds_depend_on_step_micro_batch_and_side_only():
    assert sampling_seed(1, 5, 3, "student") == sampling_seed(1, 5, 3, "student")
    assert len({sampling_seed(1, 5, 3, "student"), sampling_seed(1, 6, 3, "student"), sampling_seed(1, 5, 4, "student"),
                sampling_seed(1, 5, 3, "teacher"), sampling_seed(2, 5, 3, "student")}) == 5


def test_sampled_micro_batch_labels_exactly_the_completion_tokens():
    batch = sampled_micro_batch([[10, 11, 12], [20]], [Completion([7, 2], [-0.5, -0.25]), Completion([9], [-1.0])],
                                pad_token_id=0, sampler=SAMPLER_STUDENT, record_ids=[3, 4])
    assert batch["input_ids"].tolist() == [[10, 11, 12, 7, 2], [20, 9, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # position t predicts token t + 1: the prompt's last position predicts the first sampled token
    assert batch["labels"].tolist() == [[-100, -100, 7, 2, -100], [9, -100, -100, -100, -100]]
    mask = batch["labels"] != IGNORE_INDEX
    assert batch["behaviour_logprobs"][mask].tolist() == [-0.5, -0.25, -1.0]
    assert int(batch["sampler"]) == SAMPLER_STUDENT and batch["record_ids"].tolist() == [[3], [4]]


def test_the_mix_draws_each_micro_batch_from_the_seed_and_step():
    config = config_from_dict({**BASE, "on_policy_fraction": 0.5, "seq_kd": True})
    sources = [s for step in range(1, 401) for s in micro_batch_sources(config, step, 4)]
    assert set(sources) == {SAMPLER_STUDENT, SAMPLER_TEACHER}
    assert abs(sources.count(SAMPLER_STUDENT) / len(sources) - 0.5) < 0.05
    assert micro_batch_sources(config, 7, 4) == micro_batch_sources(config, 7, 4)
    assert micro_batch_sources(config_from_dict({**BASE, "on_policy_fraction": 1}), 7, 3) == [SAMPLER_STUDENT] * 3
    assert micro_batch_sources(config_from_dict({**BASE, "seq_kd": True}), 7, 2) == [SAMPLER_TEACHER] * 2
    assert micro_batch_sources(config_from_dict(BASE), 7, 2) == [0, 0]


def test_prompts_repeat_per_sample_and_a_prompt_without_room_is_refused():
    examples = [Example([1, 2, 3, 4], [], 2, "a", where="train.jsonl:1"), Example([5, 6, 7], [], 3, "b", where="train.jsonl:2")]
    assert prompts_of([1, 0], examples, 2) == ([[5, 6, 7], [5, 6, 7], [1, 2], [1, 2]], [1, 1, 0, 0])
    config = config_from_dict({**BASE, "sequence_length": 8, "on_policy_fraction": 1, "generation": {"max_new_tokens": 6}})
    with pytest.raises(ConfigError, match=r"train.jsonl:2: the prompt is 3 tokens.*max_new_tokens=6.*leaving 2"):
        check_prompts_fit(config, examples, "training")


def test_trl_and_roll_names_map_onto_ours():
    gkd = config_from_dict({**BASE, "lmbda": 0.5, "beta": 0.5, "seq_kd": True})
    assert (gkd.on_policy_fraction, gkd.kd_objective, gkd.seq_kd) == (0.5, "js_divergence", True)
    assert config_from_dict({**BASE, "beta": 0}).kd_objective == "forward_kl"
    for name in ("use_opd", "is_pure_opd"):
        roll = config_from_dict({**BASE, name: True, "opd_kl_coef": 2.0})
        assert (roll.on_policy_fraction, roll.on_policy_loss, roll.opd_kl_coef) == (1.0, "sampled_reverse_kl", 2.0)


@pytest.mark.parametrize("fields, message", [
    ({"lmbda": 0.5, "on_policy_fraction": 0.2}, "lmbda: conflicts with on_policy_fraction=0.2"),
    ({"beta": 0.3}, "beta: TRL's generalized JSD is implemented at beta 0"),
    ({"samples_per_prompt": 4}, "samples_per_prompt: needs on_policy_fraction > 0 or seq_kd"),
    ({"on_policy_fraction": 1, "distill_loss_weight": 0}, "on_policy_fraction: needs a teacher"),
    ({"seq_kd": True, "teacher_cache_dir": "/c"}, "teacher_cache_dir: cannot serve seq_kd"),
    ({"on_policy_fraction": 1, "student": {"data_args": {"file_name": "x"}, "use_sequence_packing": True}},
     "student.use_sequence_packing: not supported with on_policy_fraction"),
    ({"on_policy_fraction": 1, "sequence_length": 64}, "generation.max_new_tokens: leaves no room for a prompt"),
])
def test_what_on_policy_cannot_do_is_refused_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**BASE, **fields})


def test_unfiltered_sampling_is_temperature_one_without_cuts():
    config = config_from_dict({**BASE, "on_policy_fraction": 1})
    assert config.generation.unfiltered()
    assert not config_from_dict({**BASE, "generation": {"top_p": 0.95}}).generation.unfiltered()
    assert math.isclose(config.generation.temperature, 1.0)


def test_greedy_kv_cache_decoding_of_left_padded_prompts_equals_transformers_generate(tmp_path):
    """The decode the torch strategies use for on-policy samples and for exact-match evaluation (``generate``)."""
    from transformers import AutoModelForCausalLM

    from distill_trainer.demo.tiny_models import build_causal_lm, build_tokenizer
    from distill_trainer.sampling import sample_with_kv_cache

    tokenizer = build_tokenizer(["12+34=46", "7+8=15", "100+1=101"], None)
    build_causal_lm(tokenizer, tmp_path / "m", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=3)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    vocab = len(tokenizer.get_vocab())
    prompts = [tokenizer(text)["input_ids"] for text in ("12+34=", "7+8=", "100+1=")]  # lengths differ: left padding
    completions = sample_with_kv_cache(model, prompts, SamplingParams(8, temperature=0.0), tokenizer.eos_token_id,
                                       tokenizer.pad_token_id or 0, 0, vocab, torch.device("cpu"))
    for prompt, completion in zip(prompts, completions):
        reference = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0)
        assert completion.tokens == reference[0, len(prompt):].tolist()[: len(completion.tokens)]
        assert len(completion.tokens) == 8 or completion.tokens[-1] == tokenizer.eos_token_id
