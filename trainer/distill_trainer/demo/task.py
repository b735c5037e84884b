"""The demo task: 3-digit addition with every number written least-significant digit first.

A record is ``{"question": "754+830=", "answer": "5940"}`` (that is 457 + 038 = 0495): both operands
are zero-padded to ``digits`` digits and reversed, and the sum, zero-padded to ``digits + 1`` digits,
is reversed too. Each answer digit then depends on one column of the operands at a fixed relative
distance plus the carry from the digit just produced, which tiny RoPE models learn quickly and
reliably (written most-significant digit first they sit on a long, seed-dependent plateau).

Label noise (``label_noise`` > 0): in the ``train`` and ``transfer`` splits each answer digit is,
independently with that probability, replaced by a different random digit (the EOS and the
question are never touched); ``eval`` answers are always clean. Real answer labels carry errors and
ambiguity; a teacher trained on much more data averages the noise out and its per-token
distribution says "this digit, with these odds" where a label gives one noisy sample -- which is
what distillation transfers and what SFT on the few transfer records cannot recover.

Splits are drawn without replacement from all ``10**(2*digits)`` operand pairs with one seeded
generator, so they are deterministic and disjoint: ``train`` (the teacher's SFT set), ``transfer``
(the much smaller set the student is trained/distilled on) and ``eval`` (held out).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Iterable, Mapping

SPLITS = ("train", "transfer", "eval")


def _record(a: int, b: int, digits: int) -> dict[str, str]:
    question = f"{a:0{digits}d}"[::-1] + "+" + f"{b:0{digits}d}"[::-1] + "="
    answer = f"{a + b:0{digits + 1}d}"[::-1]
    return {"question": question, "answer": answer}


def make_splits(
    seed: int = 0,
    n_train: int = 20000,
    n_transfer: int = 1000,
    n_eval: int = 500,
    digits: int = 3,
    label_noise: float = 0.0,
    noisy_splits: tuple[str, ...] = ("train", "transfer"),
) -> dict[str, list[dict[str, str]]]:
    """Deterministic, disjoint ``train`` / ``transfer`` / ``eval`` lists of question/answer records.

    ``label_noise`` corrupts answer digits of the ``noisy_splits`` (``train`` and/or ``transfer``;
    never ``eval``; see the module doc); the questions, and the noise drawn for each split, do not
    depend on which splits are noisy.
    """
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    if not set(noisy_splits) <= {"train", "transfer"}:
        raise ValueError(f"noisy_splits must be among ('train', 'transfer'), got {noisy_splits}")
    if digits < 1:
        raise ValueError("digits must be >= 1")
    sizes = {"train": n_train, "transfer": n_transfer, "eval": n_eval}
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    space = 10 ** (2 * digits)
    total = sum(sizes.values())
    if total > space:
        raise ValueError(f"{total} records requested but only {space} distinct questions exist")
    base = 10**digits
    codes = random.Random(seed).sample(range(space), total)
    out: dict[str, list[dict[str, str]]] = {}
    start = 0
    for name in SPLITS:
        chunk = codes[start : start + sizes[name]]
        start += sizes[name]
        out[name] = [_record(c // base, c % base, digits) for c in chunk]
    if label_noise > 0:
        noise_rng = random.Random(f"label-noise:{seed}")
        for name in ("train", "transfer"):
            noisy = [_corrupt(r, label_noise, noise_rng) for r in out[name]]  # drawn even if unused
            if name in noisy_splits:
                out[name] = noisy
    return out


def _corrupt(rec: dict[str, str], p: float, rng: random.Random) -> dict[str, str]:
    chars = list(rec["answer"])
    for i, ch in enumerate(chars):
        if rng.random() < p:
            chars[i] = rng.choice([d for d in "0123456789" if d != ch])
    return {"question": rec["question"], "answer": "".join(chars)}


def solve(question: str) -> str:
    """The reference answer of a question of this task (used to check records)."""
    a, b = question.rstrip("=").split("+")
    return f"{int(a[::-1]) + int(b[::-1]):0{len(a) + 1}d}"[::-1]


def exact_match(prediction: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace (generation may decode a leading space)."""
    return prediction.strip() == answer.strip()


def write_jsonl(records: Iterable[Mapping[str, object]], path: str | os.PathLike[str]) -> str:
    """Write one JSON object per line atomically (temp file in the same folder, fsync, rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(dict(rec), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def read_jsonl(path: str | os.PathLike[str]) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
