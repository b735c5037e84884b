"""The demo's task data and tiny model builders (pure, offline, seconds)."""

from __future__ import annotations

import json

import pytest

from distill_trainer.demo import task
from distill_trainer.demo.tiny_models import build_causal_lm, build_tokenizer, padded_vocab_size


def _texts():
    sp = task.make_splits(seed=0, n_train=300, n_transfer=50, n_eval=50)
    return [r["question"] + r["answer"] for recs in sp.values() for r in recs]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(_texts(), d)
    return d


def test_splits_deterministic_and_disjoint():
    a = task.make_splits(seed=3, n_train=2000, n_transfer=200, n_eval=300)
    b = task.make_splits(seed=3, n_train=2000, n_transfer=200, n_eval=300)
    c = task.make_splits(seed=4, n_train=2000, n_transfer=200, n_eval=300)
    assert a == b
    assert a != c
    assert [len(a[s]) for s in task.SPLITS] == [2000, 200, 300]
    qs = [{r["question"] for r in a[s]} for s in task.SPLITS]
    assert [len(q) for q in qs] == [2000, 200, 300]  # no duplicates within a split
    assert not (qs[0] & qs[1]) and not (qs[0] & qs[2]) and not (qs[1] & qs[2])


def test_records_are_correct_and_fixed_length():
    sp = task.make_splits(seed=0, n_train=500, n_transfer=10, n_eval=10)
    for r in sp["train"]:
        assert set(r) == {"question", "answer"}
        a, b = r["question"].rstrip("=").split("+")
        assert len(a) == len(b) == 3 and r["question"].endswith("=")
        assert r["answer"] == str(int(a[::-1]) + int(b[::-1])).zfill(4)[::-1]  # least-significant digit first
        assert task.solve(r["question"]) == r["answer"]
    assert task.make_splits(seed=0, n_train=1, n_transfer=0, n_eval=0)["train"][0]["question"].count("+") == 1


def test_label_noise_only_in_training_splits():
    clean = task.make_splits(seed=5, n_train=3000, n_transfer=500, n_eval=500)
    noisy = task.make_splits(seed=5, n_train=3000, n_transfer=500, n_eval=500, label_noise=0.2)
    assert noisy == task.make_splits(seed=5, n_train=3000, n_transfer=500, n_eval=500, label_noise=0.2)
    assert noisy["eval"] == clean["eval"]
    for name in ("train", "transfer"):
        assert [r["question"] for r in noisy[name]] == [r["question"] for r in clean[name]]
        pairs = [(x, y) for a, b in zip(clean[name], noisy[name]) for x, y in zip(a["answer"], b["answer"])]
        assert all(len(a["answer"]) == len(b["answer"]) for a, b in zip(clean[name], noisy[name]))
        assert all(y.isdigit() for _, y in pairs)
        rate = sum(x != y for x, y in pairs) / len(pairs)
        assert 0.17 < rate < 0.23
    only = task.make_splits(seed=5, n_train=3000, n_transfer=500, n_eval=500, label_noise=0.2,
                            noisy_splits=("transfer",))
    assert only["train"] == clean["train"] and only["eval"] == clean["eval"]
    assert only["transfer"] == noisy["transfer"]  # same noise draw whichever splits are noisy
    with pytest.raises(ValueError):
        task.make_splits(label_noise=1.0)
    with pytest.raises(ValueError):
        task.make_splits(label_noise=0.1, noisy_splits=("eval",))


def test_make_splits_rejects_bad_sizes():
    with pytest.raises(ValueError):
        task.make_splits(n_train=-1)
    with pytest.raises(ValueError):
        task.make_splits(n_train=60, n_transfer=30, n_eval=20, digits=1)  # only 100 questions exist


def test_example_record():
    assert task.solve("754+830=") == "5940"  # 457 + 038 = 0495, all reversed


def test_exact_match():
    assert task.exact_match("5940", "5940")
    assert task.exact_match(" 5940\n", "5940")
    assert not task.exact_match("594", "5940")
    assert not task.exact_match("5941", "5940")
    assert not task.exact_match("", "5940")


def test_write_jsonl_atomic_roundtrip(tmp_path):
    recs = task.make_splits(seed=1, n_train=5, n_transfer=0, n_eval=0)["train"]
    p = tmp_path / "sub" / "train.jsonl"
    assert task.write_jsonl(recs, p) == str(p)
    assert [json.loads(line) for line in p.read_text().splitlines()] == recs
    assert task.read_jsonl(p) == recs
    task.write_jsonl(recs[:2], p)  # overwrite in place
    assert task.read_jsonl(p) == recs[:2]
    assert [f.name for f in p.parent.iterdir()] == ["train.jsonl"]  # no temp file left


def test_write_jsonl_failure_leaves_previous_file(tmp_path):
    p = tmp_path / "x.jsonl"
    task.write_jsonl([{"question": "1+1=", "answer": "2"}], p)

    def bad():
        yield {"question": "2+2=", "answer": "4"}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        task.write_jsonl(bad(), p)
    assert task.read_jsonl(p) == [{"question": "1+1=", "answer": "2"}]
    assert [f.name for f in tmp_path.iterdir()] == ["x.jsonl"]


def test_tokenizer_roundtrip_and_specials(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert tok.eos_token is not None and tok.pad_token is not None
    assert tok.eos_token_id != tok.pad_token_id
    assert not tok.chat_template
    assert len(tok) > 64  # byte-level: a top-k of 64 truncates the distribution
    for text in ["457+038=", "5940", "hello, world 12"]:
        ids = tok(text).input_ids
        assert tok.eos_token_id not in ids and tok.pad_token_id not in ids  # no BOS/EOS added
        assert tok.decode(ids) == text
    assert len(tok("457+038=").input_ids) == 8  # one token per digit and symbol
    assert tok.decode([*tok("5940").input_ids, tok.eos_token_id], skip_special_tokens=True) == "5940"


def test_unknown_tokenizer_kind(tmp_path):
    with pytest.raises(ValueError):
        build_tokenizer(["1+1=2"], tmp_path, kind="nope")


@pytest.mark.parametrize("vocab_multiple", [None, 64])
def test_model_builds_and_loads_back(tmp_path, vocab_multiple):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = build_tokenizer(_texts(), None)
    out = tmp_path / "m"
    m = build_causal_lm(tok, out, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=7,
                        vocab_multiple=vocab_multiple)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    expected_vocab = padded_vocab_size(len(tok), vocab_multiple)
    assert m.config.vocab_size == expected_vocab
    if vocab_multiple:
        assert expected_vocab % vocab_multiple == 0 and expected_vocab > len(tok)
    else:
        assert expected_vocab == len(tok)

    m2 = AutoModelForCausalLM.from_pretrained(out)
    tok2 = AutoTokenizer.from_pretrained(out)
    assert m2.get_input_embeddings().weight.shape[0] == expected_vocab
    assert m2.config.eos_token_id == tok2.eos_token_id and m2.config.pad_token_id == tok2.pad_token_id
    assert len(tok2) == len(tok) and not tok2.chat_template
    q = "457+038="
    assert tok2(q).input_ids == tok(q).input_ids  # same ids whichever class AutoTokenizer picks
    ids = torch.tensor([tok2(q).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=ids).logits, m(input_ids=ids).logits)
        gen = m2.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] <= ids.shape[1] + 3


def test_model_init_is_seeded():
    import torch

    tok = build_tokenizer(_texts(), None)
    kw = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    a = build_causal_lm(tok, None, seed=1, **kw)
    b = build_causal_lm(tok, None, seed=1, **kw)
    c = build_causal_lm(tok, None, seed=2, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    with pytest.raises(ValueError):
        build_causal_lm(tok, None, hidden_size=30, num_layers=1, num_heads=4, intermediate_size=64, seed=0)
