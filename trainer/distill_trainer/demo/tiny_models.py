"""Tokenizers and tiny Qwen2 causal LMs built offline (no downloads), saved in HF format.

``build_tokenizer`` makes a byte-level BPE trained on the given texts, with digits split one per
token as Qwen2's tokenizer does (256 byte symbols + merges + 2 specials, so a top-k of 64 is a real
truncation). It has ``eos_token`` and ``pad_token`` (distinct ids 1 and 0), adds no BOS/EOS when
encoding and has no chat template. Byte-level BPE is also what ``AutoTokenizer`` expects next to a
``qwen2`` config: transformers 5 loads any tokenizer saved beside a qwen2 ``config.json`` as
``Qwen2Tokenizer`` (rebuilt from vocab + merges with Qwen's pre-tokenizer), which would silently
break a char-level WordLevel tokenizer; the BPE here encodes identically under both loaders.

``build_causal_lm`` initializes a ``Qwen2ForCausalLM`` from a config with a fixed seed and saves
model + tokenizer together so that ``AutoModelForCausalLM/AutoTokenizer.from_pretrained(out_dir)``
load them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN]  # ids 0 and 1


def _wrap(tok, out_dir: str | None):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = None
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        hf.save_pretrained(out_dir)
    return hf


def build_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike[str] | None,
    kind: str = "bpe",
    vocab_size: int = 512,
):
    """Build a ``PreTrainedTokenizerFast`` from ``texts`` and save it to ``out_dir`` (if given).

    Only ``kind="bpe"`` exists: byte-level BPE trained on ``texts`` up to ``vocab_size`` (fewer
    when the texts allow fewer merges); every digit is its own token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = list(texts)
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'bpe')")
    tok.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tok, None if out_dir is None else os.fspath(out_dir))


def padded_vocab_size(n: int, vocab_multiple: int | None) -> int:
    if not vocab_multiple:
        return n
    return -(-n // vocab_multiple) * vocab_multiple


def build_causal_lm(
    tokenizer,
    out_dir: str | os.PathLike[str] | None,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    seed: int,
    vocab_multiple: int | None = None,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
    rope_theta: float = 10000.0,
):
    """A randomly initialized ``Qwen2ForCausalLM`` (float32) sized for ``tokenizer``.

    ``vocab_multiple`` pads the embedding/LM-head rows up to a multiple of it (as Qwen checkpoints
    do: ``config.vocab_size > len(tokenizer)``). Saved with safetensors, together with the tokenizer,
    when ``out_dir`` is given. ``rope_theta``: a small base (e.g. 100) gives short sequences more
    distinguishable rotary frequencies, so position-keyed attention is learned in far fewer steps.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    config = Qwen2Config(
        vocab_size=padded_vocab_size(len(tokenizer), vocab_multiple),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    return model
