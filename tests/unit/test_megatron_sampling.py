"""``sample`` of the Megatron strategies (gloo CPU ranks): greedy sampling at tp=2, tp=1 and pp=2 equals
transformers' greedy decoding of the same checkpoint (EOS kept); at temperature 1 (and with top-k/top-p) the same
seed draws the same tokens, with the same log-probs, at tp=2 as at tp=1, on every rank of the replica, and, for
prompts of one length, what the torch strategies' ``sample_with_kv_cache`` draws.

One spawn of 2 ranks samples every layout in turn (tp=2; tp=1 with dp=2, each rank a whole replica; pp=2), each
rank writing what it sampled; the tests compare the files.

``sample`` decodes with Megatron's KV cache (``_MegatronKVStepper``): in the same spawn, its logits are compared at
every decode step with the no-cache stepper's (``_MegatronStepper``, a whole forward of the sequence so far) at tp=2,
tp=1 and pp=2, and the width of every forward ``sample`` runs through the GPTModel is recorded (the prompt once,
then one token per step). Under sequence parallel ``sample`` falls back to the no-cache stepper (tp=2 + SP)."""

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
        results.setdefault("cache", {})[name] = _kv_cache_checks(strategy, eos_token_id)
        del strategy
        reset_megatron()
    # Sequence parallel: the no-cache fallback (Megatron's static-batch inference does not support it).
    config = fake_config(f"{root}/student")
    config.student.strategy_args.sequence_parallel = True
    strategy = MegatronTrainStrategy(config, rank_context(rank, world, 2, 1), VOCAB)
    widths, completions = _forward_widths(strategy, PROMPTS, SETTINGS["greedy"], eos_token_id)
    results["tp2_sp"] = {"greedy/mixed": [[c.tokens, c.logprobs] for c in completions], "widths": widths}
    del strategy
    reset_megatron()
    with open(f"{root}/rank{rank}.json", "w") as f:
        json.dump(results, f)


def _forward_widths(strategy, prompts, params, eos_token_id):
    """The number of positions of every forward of the GPTModel while ``sample`` decodes ``prompts`` (a forward
    pre-hook on this rank's model stage: its first argument is the token ids on every stage), and the completions."""
    widths = []
    handle = strategy.module.register_forward_pre_hook(lambda module, args: widths.append(int(args[0].shape[1])))
    try:
        completions = strategy.sample(prompts, params, eos_token_id, VOCAB.pad_token_id, SEED)
    finally:
        handle.remove()
    return widths, completions


def _kv_cache_checks(strategy, eos_token_id):
    """The KV-cached stepper against the no-cache one, fed the same tokens (drawn from a fixed generator, the same on
    every rank): the max |difference| of their logits after the prompts and after every decode step, the KV
    stepper's last logits (to compare across ranks) and forward widths; and the forward widths of a ``sample``."""
    from distill_trainer.strategies.megatron import _MegatronKVStepper, _MegatronStepper

    model = strategy._sampling_model()
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tokens = torch.tensor(EQUAL, dtype=torch.long)
            cached = _MegatronKVStepper(strategy, model, tokens, NEW_TOKENS)
            plain = _MegatronStepper(strategy, model, tokens)
            a, b = cached.start(), plain.start()
            diffs = [float((a - b).abs().max())]
            generator = torch.Generator().manual_seed(5)
            for _ in range(NEW_TOKENS - 1):
                picked = torch.randint(2, TOKENIZER_VOCAB, (len(EQUAL),), generator=generator)
                a, b = cached.step(picked), plain.step(picked)
                diffs.append(float((a - b).abs().max()))
            kv_forwarded = list(cached.forwarded)
            last = a.tolist()
    finally:
        model.train(training)
    widths, completions = _forward_widths(strategy, PROMPTS, SETTINGS["greedy"], eos_token_id)
    return {"diffs": diffs, "last": last, "kv_forwarded": kv_forwarded, "widths": widths,
            "lengths": [len(c.tokens) for c in completions]}


def _expected_widths(prompts, lengths):
    """Forward widths of a KV-cached ``sample``: per length group (in order of first appearance) the prompt length
    once, then 1 per further step (as many as the group's longest completion has tokens after its first)."""
    groups: dict[int, list[int]] = {}
    for prompt, length in zip(prompts, lengths):
        groups.setdefault(len(prompt), []).append(length)
    return [w for size, group in groups.items() for w in [size] + [1] * (max(group) - 1)]


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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["tp2", "tp1", "pp2"])
def test_kv_cached_stepper_logits_equal_the_no_cache_forward_at_every_step(sampled, layout):
    ranks = sampled["ranks"]
    for results in ranks:
        cache = results["cache"][layout]
        assert len(cache["diffs"]) == NEW_TOKENS  # after the prompts, then after each of NEW_TOKENS - 1 steps
        assert max(cache["diffs"]) <= 1e-5, cache["diffs"]
        assert cache["kv_forwarded"] == [len(EQUAL[0])] + [1] * (NEW_TOKENS - 1)
        # Whole-vocabulary logits, the same on every rank of the replica (both stages under pp=2).
        assert len(cache["last"][0]) == TOKENIZER_VOCAB
    # Every rank's logits alike: one replica's ranks (tp=2, both stages of pp=2), or two replicas (tp=1, dp=2).
    assert ranks[0]["cache"][layout]["last"] == ranks[1]["cache"][layout]["last"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["tp2", "tp1", "tp1_infer", "pp2"])
def test_sample_forwards_the_prompt_once_then_one_token_per_step(sampled, layout):
    for results in sampled["ranks"]:
        cache = results["cache"][layout]
        assert cache["lengths"] == [len(t) for t in _tokens(results[layout]["greedy/mixed"])]
        assert cache["widths"] == _expected_widths(PROMPTS, cache["lengths"]), cache["widths"]
        assert cache["widths"].count(1) > 0


@pytest.mark.timeout(300)
def test_sequence_parallel_sample_falls_back_to_the_no_cache_stepper(sampled):
    for results in sampled["ranks"]:
        got = results["tp2_sp"]["greedy/mixed"]
        assert _tokens(got) == _tokens(results["tp1"]["greedy/mixed"])
        # No cache: every forward runs the whole sequence so far (the prompt, then one position more per step),
        # right-padded to a multiple of tp = 2 for sequence parallel.
        groups = {}
        for prompt, tokens in zip(PROMPTS, _tokens(got)):
            groups.setdefault(len(prompt), []).append(len(tokens))
        expected = [-(-(size + k) // 2) * 2 for size, lengths in groups.items() for k in range(max(lengths))]
        assert results["tp2_sp"]["widths"] == expected
