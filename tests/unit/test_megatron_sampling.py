"""``sample`` of the Megatron strategies (gloo CPU ranks): greedy sampling at tp=2, tp=1 and pp=2 equals
transformers' greedy decoding of the same checkpoint (EOS kept); at temperature 1 (and with top-k/top-p) the same
seed draws the same tokens, with the same log-probs, at tp=2 as at tp=1, on every rank of the replica, and, for
prompts of one length, what the torch strategies' ``sample_with_kv_cache`` draws.

One spawn of 2 ranks samples every layout in turn (tp=2; tp=1 with dp=2, each rank a whole replica; pp=2), each
rank writing what it sampled; the tests compare the files."""

import json

import pytest
import torch

from distill_trainer.models import VocabInfo
from distill_trainer.sampling import SamplingParams

from .megatron_helpers import TOKENIZER_VOCAB, fake_config, rank_context, reset_megatron, spawn, write_tiny_model

VOCAB = VocabInfo(size=TOKENIZER_VOCAB, eos_token_id=1, pad_token_id=0)
NEW_TOKENS = 6
# Lengths 3, 4, 3, 1, 5: four length groups, the first of two prompts.
PROMPTS = [[5, 9, 13], [7, 3, 2, 8], [11, 12, 4], [20], [30, 31, 32, 33, 34]]
EQUAL = [[5, 9, 13], [11, 12, 4], [40, 41, 42]]  # one group: draws comparable with sample_with_kv_cache
SEED = 1234
SETTINGS = {
    "greedy": SamplingParams(NEW_TOKENS, temperature=0.0),
    "t1": SamplingParams(NEW_TOKENS, temperature=1.0),
    "filtered": SamplingParams(NEW_TOKENS, temperature=0.8, top_p=0.9, top_k=20),
}
# (strategy, tp, pp) per layout; the teacher's strategy at tp=1 covers MegatronInferStrategy's ``sample``.
LAYOUTS = {"tp2": ("train", 2, 1), "tp1": ("train", 1, 1), "tp1_infer": ("infer", 1, 1), "pp2": ("train", 1, 2)}


def _hf(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _hf_greedy(model, prompt: list[int], eos_token_id: int) -> list[int]:
    """transformers' greedy continuation (the vocabulary padding suppressed), cut after the first EOS (kept)."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos_token_id,
        pad_token_id=0, suppress_tokens=list(range(TOKENIZER_VOCAB, model.config.vocab_size)),
    )[0, len(prompt):].tolist()
    return out[: out.index(eos_token_id) + 1] if eos_token_id in out else out


def _sample_everything(rank, world, root, eos_token_id):
    from distill_trainer.strategies.megatron import MegatronInferStrategy, MegatronTrainStrategy

    results = {}
    for name, (kind, tp, pp) in LAYOUTS.items():
        strategy_class = MegatronTrainStrategy if kind == "train" else MegatronInferStrategy
        strategy = strategy_class(fake_config(f"{root}/student"), rank_context(rank, world, tp, pp), VOCAB)
        module_mode = strategy._sampling_model().training
        results[name] = {}
        for setting, params in SETTINGS.items():
            for prompts_name, prompts in (("mixed", PROMPTS), ("equal", EQUAL)):
                completions = strategy.sample(prompts, params, eos_token_id, VOCAB.pad_token_id, SEED)
                results[name][f"{setting}/{prompts_name}"] = [[c.tokens, c.logprobs] for c in completions]
        assert strategy._sampling_model().training == module_mode  # the mode is restored
        del strategy
        reset_megatron()
    with open(f"{root}/rank{rank}.json", "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """Every rank's completions per layout, setting and prompt set; the EOS id and transformers' greedy output."""
    root = tmp_path_factory.mktemp("megatron_sampling")
    write_tiny_model(str(root / "student"), "qwen2", tied=False, seed=7, layers=2, hidden=32)
    hf = _hf(str(root / "student"))
    # EOS: the third greedy token after the first prompt (if new there), so that greedy rows do end at an EOS.
    plain = _hf_greedy(hf, PROMPTS[0], eos_token_id=-1)
    eos = next(t for t in plain[2:] if t not in plain[:2])
    spawn(_sample_everything, 2, str(root), eos)
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    return {"ranks": ranks, "eos": eos, "hf": hf, "root": root}


def _tokens(completions):
    return [tokens for tokens, _ in completions]


def _max_logprob_diff(a, b) -> float:
    return max((abs(x - y) for (_, pa), (_, pb) in zip(a, b) for x, y in zip(pa, pb)), default=0.0)


@pytest.mark.timeout(300)
def test_greedy_sampling_at_tp2_equals_tp1_and_transformers_with_eos_kept(sampled):
    eos, hf = sampled["eos"], sampled["hf"]
    for prompts_name, prompts in (("mixed", PROMPTS), ("equal", EQUAL)):
        expected = [_hf_greedy(hf, prompt, eos) for prompt in prompts]
        for results in sampled["ranks"]:
            for layout in ("tp2", "tp1", "tp1_infer"):
                got = results[layout][f"greedy/{prompts_name}"]
                assert _tokens(got) == expected, (layout, prompts_name, _tokens(got), expected)
                assert all(p == 0.0 for _, logprobs in got for p in logprobs)  # greedy picks: log-prob 0
    mixed = _tokens(sampled["ranks"][0]["tp2"]["greedy/mixed"])
    assert mixed[0][-1] == eos and eos not in mixed[0][:-1]  # an EOS drawn ends the row and is kept
    assert any(len(tokens) == NEW_TOKENS and eos not in tokens for tokens in mixed)  # others run to the limit


@pytest.mark.timeout(300)
@pytest.mark.parametrize("setting", ["t1", "filtered"])
def test_seeded_sampling_at_tp2_equals_tp1_on_every_rank(sampled, setting):
    ranks = sampled["ranks"]
    for prompts_name in ("mixed", "equal"):
        key = f"{setting}/{prompts_name}"
        tp1 = ranks[0]["tp1"][key]
        for results in ranks:
            for layout in ("tp2", "tp1", "tp1_infer"):
                got = results[layout][key]
                assert _tokens(got) == _tokens(tp1), (layout, key, _tokens(got), _tokens(tp1))
                assert _max_logprob_diff(got, tp1) <= 1e-5, (layout, key)
        assert all(p <= 0 for _, logprobs in tp1 for p in logprobs)
        assert any(p < 0 for _, logprobs in tp1 for p in logprobs)  # drawn, not picked
    # Not greedy in disguise: some row differs from the greedy one.
    assert _tokens(ranks[0]["tp1"][f"{setting}/mixed"]) != _tokens(ranks[0]["tp1"]["greedy/mixed"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("setting", ["t1", "filtered"])
def test_one_length_group_draws_what_sample_with_kv_cache_draws(sampled, setting):
    # The first length group's generator is seeded with the seed itself, as the torch strategies' sampler is.
    from distill_trainer.sampling import sample_with_kv_cache

    eos = sampled["eos"]
    torch_side = sample_with_kv_cache(sampled["hf"], EQUAL, SETTINGS[setting], eos, VOCAB.pad_token_id, SEED,
                                      TOKENIZER_VOCAB, torch.device("cpu"))
    expected = [[c.tokens, c.logprobs] for c in torch_side]
    got = sampled["ranks"][0]["tp2"][f"{setting}/equal"]
    assert _tokens(got) == _tokens(expected)
    assert _max_logprob_diff(got, expected) <= 1e-4


@pytest.mark.timeout(300)
def test_pp2_samples_as_pp1_on_both_stages(sampled):
    ranks = sampled["ranks"]
    for key in ranks[0]["tp1"]:
        tp1 = ranks[0]["tp1"][key]
        for results in ranks:  # the first stage's completions too: the logits were broadcast to it
            got = results["pp2"][key]
            assert _tokens(got) == _tokens(tp1), (key, _tokens(got), _tokens(tp1))
            assert _max_logprob_diff(got, tp1) <= 1e-5, key
