"""Finding and checking the HF-format teacher and student before any worker starts.

Distillation compares the two models' distributions token id by token id, so they must share one
vocabulary. A teacher whose embedding matrix is padded beyond the tokenizer (Qwen pads to a multiple of
128) is fine: logits are cut to the tokenizer's size on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError


@dataclass(frozen=True)
class VocabInfo:
    """What the workers need to know about the shared vocabulary."""

    size: int  # number of token ids the tokenizer can produce; logits are cut to this
    eos_token_id: int
    pad_token_id: int


def check_model_dir(path: str, field: str) -> Path:
    """A local HF model directory must exist and hold a config.json (we never download at run time)."""
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"{field}: model directory {path!r} does not exist (a local HF-format directory is required)")
    if not (directory / "config.json").is_file():
        raise ConfigError(
            f"{field}: {path!r} has no config.json; save the model with save_pretrained() into that directory"
        )
    return directory


def load_tokenizer(path: str, field: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{field}: cannot load a tokenizer from {path!r}: {error}") from None


def model_vocab_size(path: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    size = getattr(config, "vocab_size", None)
    if size is None and hasattr(config, "get_text_config"):
        size = config.get_text_config().vocab_size
    return int(size)


def check_shared_vocab(student_path: str, teacher_path: str) -> VocabInfo:
    """Refuse a teacher/student pair whose tokenizers map tokens to different ids."""
    check_model_dir(student_path, "student_pretrain")
    check_model_dir(teacher_path, "teacher_pretrain")
    student_tok = load_tokenizer(student_path, "student_pretrain")
    teacher_tok = load_tokenizer(teacher_path, "teacher_pretrain")

    student_vocab, teacher_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if len(student_vocab) != len(teacher_vocab):
        raise ConfigError(
            f"teacher and student vocabularies differ: student_pretrain {student_path!r} has {len(student_vocab)} "
            f"tokens, teacher_pretrain {teacher_path!r} has {len(teacher_vocab)}; distillation needs one shared "
            "tokenizer (pick a student from the teacher's model family)"
        )
    differing = [token for token, index in student_vocab.items() if teacher_vocab.get(token) != index]
    if differing:
        example = differing[0]
        raise ConfigError(
            f"teacher and student vocabularies differ: {len(differing)} tokens map to different ids, e.g. "
            f"{example!r} is {student_vocab[example]} in student_pretrain and {teacher_vocab.get(example)} in "
            "teacher_pretrain; distillation needs one shared tokenizer"
        )

    size = len(student_vocab)
    for path, field in ((student_path, "student_pretrain"), (teacher_path, "teacher_pretrain")):
        rows = model_vocab_size(path)
        if rows < size:
            raise ConfigError(
                f"{field}: the model's vocab_size {rows} is smaller than its tokenizer's {size} tokens; "
                "the checkpoint does not match its tokenizer"
            )
    if student_tok.eos_token_id is None:
        raise ConfigError(f"student_pretrain: the tokenizer in {student_path!r} has no eos_token")
    pad = student_tok.pad_token_id if student_tok.pad_token_id is not None else student_tok.eos_token_id
    return VocabInfo(size=size, eos_token_id=student_tok.eos_token_id, pad_token_id=pad)
