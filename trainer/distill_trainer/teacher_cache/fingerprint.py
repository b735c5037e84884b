"""What a teacher cache's targets depend on, recorded in its manifest, and the refusal of a run that differs.

The targets of a cache are the teacher's outputs on the training records as tokenized for it, in the cache's
encoding. They change with

- the teacher: its weights (``hash_model_weights``: the weight files and config.json) and its tokenizer
  (``hash_tokenizer``: tokenizer.json and the effective chat template), its vocabulary (the token -> id mapping,
  hashed, and its size) and the rows of its output layer (config.json's ``vocab_size``, padding included);
- the records' token ids: the data files' contents (hashed, in order), the keys, ``template``,
  ``sequence_length``, ``distill_on_prompt``, and the chat template of the tokenizer that formats the prompts
  (student_pretrain's: the data are tokenized by the student's tokenizer, as in a live run);
- what the teacher ships per label token: ``logits_topk``, ``topk_tail``, the temperature T·τ
  (``kd_temperature`` x ``teacher_temperature``: the tail's log-mass is computed at T·τ, while the top-k values are
  raw logits, so the product is recorded only where a tail is) and the encoding (``RowCodec.describe()``).

A run (``kubedistill cache-teacher`` over an existing cache, or training that reads one) computes the same
fingerprint of its own config and ``check_matches`` refuses it, naming every differing field with both values,
before any teacher or student starts. What is recorded but not compared (``RECORDED_ONLY``): the data files' paths
(a file moved or mounted elsewhere with the same content is the same data; its content hash is compared) and the
two temperatures the product is made of (shown in the message). A student whose tokenizer vocabulary is not the
teacher's is refused by ``check_student_matches_cache``.

Deliberately not in the fingerprint: the seed, batch shape, packing and step counts (the cache holds each record's
targets whatever order and batches read them) and the teacher's dtype and strategy (they change the targets only
by rounding; the weights are what the cache is of). The reader compares every record's stored token ids with the
batch's as well, so a tokenization change that none of these fields shows still cannot pair wrong targets.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError, DistillConfig, data_files

# Version of the fingerprint's fields (a change of what is recorded or how is a new version, never a silent edit).
FINGERPRINT_FORMAT = 1
BLOCK = 8 * 2**20  # bytes read at a time when hashing a file

# Field names, as the messages show them.
FORMAT = "fingerprint format"
TEACHER_WEIGHTS = "teacher_pretrain (weights sha256)"
TEACHER_TOKENIZER = "teacher tokenizer.json sha256"
TEACHER_CHAT_TEMPLATE = "teacher chat template sha256"
TEACHER_VOCAB = "teacher vocabulary sha256"
VOCAB_SIZE = "vocabulary size"
VOCAB_ROWS = "teacher vocabulary rows (padded)"
PROMPT_CHAT_TEMPLATE = "student chat template sha256 (formats the prompts)"
DATA_FILES = "student.data_args.file_name"
DATA_HASHES = "data file sha256"
QUESTION_KEY = "question_key"
ANSWER_KEY = "answer_key"
TEMPLATE = "template"
SEQUENCE_LENGTH = "sequence_length"
DISTILL_ON_PROMPT = "distill_on_prompt"
TOPK = "logits_topk"
TAIL = "topk_tail"
TEMPERATURE = "teacher temperature (kd_temperature x teacher_temperature)"
KD_TEMPERATURE = "kd_temperature"
TEACHER_TEMPERATURE = "teacher_temperature"
ENCODING = "encoding"

# Recorded for the messages, never a reason to refuse (see the module docstring).
RECORDED_ONLY = frozenset({DATA_FILES, KD_TEMPERATURE, TEACHER_TEMPERATURE})

# What a differing field means, or which settings change it (appended to its line).
_HINTS = {
    FORMAT: "the cache was written by another version of kubedistill",
    TEACHER_WEIGHTS: "teacher_pretrain holds other weights (or another config.json) than the cache was written from",
    TEACHER_TOKENIZER: "teacher_pretrain's tokenizer is not the one the cache was written with",
    TEACHER_CHAT_TEMPLATE: "teacher_pretrain's chat template changed",
    TEACHER_VOCAB: "teacher_pretrain's tokenizer maps tokens to other ids",
    VOCAB_SIZE: "teacher_pretrain's tokenizer has another number of tokens",
    VOCAB_ROWS: "config.json's vocab_size of teacher_pretrain",
    PROMPT_CHAT_TEMPLATE: "the prompts are formatted with student_pretrain's chat template, so its token ids differ",
    QUESTION_KEY: "student.data_args.question_key",
    ANSWER_KEY: "student.data_args.answer_key",
    TEMPLATE: "student.data_args.template",
    TOPK: "the teacher's top-k per label token",
    ENCODING: "teacher_cache_dtype chooses it; one cache holds one encoding",
}


class _NotRecorded:
    def __repr__(self) -> str:
        return "(not recorded)"


_NOT_RECORDED = _NotRecorded()
_DIGEST = re.compile(r"[0-9a-f]{64}")  # a field one side's fingerprint lacks (another format version)


class CacheMismatchError(ConfigError):
    """A teacher cache written for another config (or teacher, tokenizer, data) than this run's. A ConfigError: the
    CLI prints the message (every differing field, both values, what to do) and exits 2, before any work."""


@dataclass(frozen=True)
class Fingerprint:
    """``fields``: flat and JSON-able, in a fixed order: field name (as messages show it) -> value."""

    fields: dict[str, Any]

    def to_json(self) -> dict:
        return {"fields": dict(self.fields)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Fingerprint":
        fields = d.get("fields") if isinstance(d, Mapping) else None
        if not isinstance(fields, Mapping):
            raise ConfigError(f"the teacher cache's fingerprint is unreadable (expected {{'fields': {{...}}}}, got "
                              f"{d!r}); write the cache again with `kubedistill cache-teacher`")
        return cls(fields=dict(fields))


# --------------------------------------------------------------------------------------------------- hashing


def _update_with_file(digest, path: Path) -> None:
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            n = handle.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])


def hash_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in ``BLOCK``-sized blocks."""
    digest = hashlib.sha256()
    _update_with_file(digest, Path(path))
    return digest.hexdigest()


def _hash_named_files(paths: list[Path]) -> str:
    """sha256 over files in the given order: each file's name, size and bytes (so that a rename, a split or a
    moved byte between two files changes the hash)."""
    digest = hashlib.sha256()
    for path in paths:
        name = path.name.encode()
        digest.update(len(name).to_bytes(8, "little") + name + path.stat().st_size.to_bytes(8, "little"))
        _update_with_file(digest, path)
    return digest.hexdigest()


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin")) or name.endswith((".safetensors.index.json", ".bin.index.json"))


def hash_model_weights(model_dir: str) -> str:
    """sha256 over an HF model directory's weight files (``*.safetensors``, ``*.bin``, their index json) and
    config.json, in sorted name order, names included (subdirectories, e.g. a repository's ``original/``, are not
    what transformers loads and are left out). Streams: a multi-GB teacher is read once, 8 MiB at a time."""
    directory = Path(model_dir)
    files = sorted((p for p in directory.iterdir() if p.is_file() and _is_weight_file(p.name)), key=lambda p: p.name)
    if not files:
        raise ConfigError(f"{model_dir!r} holds no weight files (*.safetensors or *.bin): nothing to fingerprint the "
                          "teacher by; save the model with save_pretrained() into that directory")
    config = directory / "config.json"
    if config.is_file():
        files = sorted([*files, config], key=lambda p: p.name)
    return _hash_named_files(files)


# Files a tokenizer is built from when there is no tokenizer.json (slow tokenizers).
_VOCAB_FILES = ("added_tokens.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model",
                "vocab.json", "vocab.txt")


def _hash_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def effective_chat_template(model_dir: str) -> str | dict[str, str] | None:
    """The chat template transformers' AutoTokenizer would load from ``model_dir``: ``chat_template.jinja`` and
    ``additional_chat_templates/*.jinja`` when present (they win over the config), else tokenizer_config.json's
    ``chat_template`` (a string, or a list of named templates), else ``chat_template.json``'s; None when there is
    none. Several named templates come back as a dict name -> template."""
    directory = Path(model_dir)
    templates: dict[str, str] = {}
    if (directory / "chat_template.jinja").is_file():
        templates["default"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    extra = directory / "additional_chat_templates"
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError):
            raise ConfigError(f"{path} is not a JSON object; the tokenizer in {model_dir!r} cannot be read") from None
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = {item["name"]: item["template"] for item in template}
        if template:
            return template
    return None


def hash_tokenizer(model_dir: str) -> dict:
    """``{"tokenizer_json": sha256 of tokenizer.json (or, without one, of the vocabulary/merges files, names
    included; None when there are none), "chat_template": sha256 of the effective chat template, or None}``."""
    directory = Path(model_dir)
    if (directory / "tokenizer.json").is_file():
        tokenizer_json = hash_file(directory / "tokenizer.json")
    else:
        files = [directory / name for name in _VOCAB_FILES if (directory / name).is_file()]
        tokenizer_json = _hash_named_files(files) if files else None
    template = effective_chat_template(model_dir)
    if template is None:
        chat = None
    else:
        chat = _hash_text(template if isinstance(template, str) else _canonical(template))
    return {"tokenizer_json": tokenizer_json, "chat_template": chat}


def tokenizer_vocabulary(model_dir: str) -> dict[str, int]:
    """The token -> id mapping of the tokenizer in ``model_dir`` (its ``get_vocab()``, added tokens included): from
    tokenizer.json's ``model.vocab`` (a mapping, or Unigram's list of [piece, score]) and ``added_tokens`` when
    there is one, else from AutoTokenizer."""
    path = Path(model_dir) / "tokenizer.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            vocab = data["model"]["vocab"]
        except (ValueError, KeyError, TypeError):
            vocab = None
        if isinstance(vocab, dict):
            mapping = {str(token): int(index) for token, index in vocab.items()}
        elif isinstance(vocab, list):
            mapping = {str(item[0]): index for index, item in enumerate(vocab)}
        else:
            mapping = None
        if mapping is not None:
            for token in data.get("added_tokens") or []:
                mapping[str(token["content"])] = int(token["id"])
            return mapping
    from ..models import load_tokenizer

    return {str(token): int(index) for token, index in load_tokenizer(model_dir, model_dir).get_vocab().items()}


def hash_vocabulary(model_dir: str) -> tuple[str, int]:
    """(sha256 of the tokenizer's token -> id mapping, its number of tokens)."""
    mapping = tokenizer_vocabulary(model_dir)
    ordered = sorted(mapping.items(), key=lambda item: (item[1], item[0]))
    return _hash_text(_canonical(ordered)), len(mapping)


# --------------------------------------------------------------------------------------------------- fingerprint


def _template_of(config: DistillConfig) -> str | None:
    """The chat format setting (the config's validator makes every place that sets one agree)."""
    places = [config.student.data_args.template, config.teacher.data_args.template]
    if config.validation is not None:
        places.append(config.validation.data_args.template)
    return next((value for value in places if value is not None), None)


def fingerprint_of(config: DistillConfig, *, encoding: dict, teacher_weights_hash: str | None = None) -> Fingerprint:
    """What the targets of a cache written (or read) with ``config`` depend on. ``encoding``: the codec's
    ``describe()``. ``teacher_weights_hash``: ``hash_model_weights(config.teacher_pretrain)`` when the caller has
    it already (hashing a large teacher takes a while); computed here otherwise."""
    from ..models import model_vocab_size

    teacher = config.teacher_pretrain
    if teacher_weights_hash is None:
        teacher_weights_hash = hash_model_weights(teacher)
    teacher_tokenizer = hash_tokenizer(teacher)
    vocab_hash, vocab_size = hash_vocabulary(teacher)
    paths = data_files(config.data_args.file_name)
    hashes = []
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"student.data_args.file_name: data file {path!r} does not exist")
        hashes.append(hash_file(path))
    topk = config.logits_topk
    tail = bool(topk) and config.topk_tail  # as the codec has it: a full-vocabulary row has no tail
    fields = {
        FORMAT: FINGERPRINT_FORMAT,
        TEACHER_WEIGHTS: teacher_weights_hash,
        TEACHER_TOKENIZER: teacher_tokenizer["tokenizer_json"],
        TEACHER_CHAT_TEMPLATE: teacher_tokenizer["chat_template"],
        TEACHER_VOCAB: vocab_hash,
        VOCAB_SIZE: vocab_size,
        VOCAB_ROWS: model_vocab_size(teacher),
        PROMPT_CHAT_TEMPLATE: hash_tokenizer(config.student_pretrain)["chat_template"],
        DATA_FILES: [os.path.abspath(path) for path in paths],
        DATA_HASHES: hashes,
        QUESTION_KEY: config.data_args.question_key,
        ANSWER_KEY: config.data_args.answer_key,
        TEMPLATE: _template_of(config),
        SEQUENCE_LENGTH: config.sequence_length,
        DISTILL_ON_PROMPT: config.distill_on_prompt,
        TOPK: topk,
        TAIL: tail,
        # Top-k values are raw logits (temperatures are applied by the loss); only the tail's log-mass is computed at
        # T·τ, so the product is what the targets depend on, and only where there is a tail.
        TEMPERATURE: config.kd_temperature * config.teacher_temperature if tail else None,
        KD_TEMPERATURE: config.kd_temperature,
        TEACHER_TEMPERATURE: config.teacher_temperature,
        ENCODING: encoding,
    }
    return Fingerprint(fields=json.loads(json.dumps(fields)))  # JSON's values, as a manifest reads them back


# --------------------------------------------------------------------------------------------------- comparing


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
                and not isinstance(b, bool):
            return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _show(value: Any) -> str:
    if value is _NOT_RECORDED:
        return repr(value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if _DIGEST.fullmatch(value) else repr(value)  # a digest is shown as sha256sum prints it
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return _canonical(value)
    if isinstance(value, list):  # file names and their digests
        return "[" + ", ".join(item if isinstance(item, str) else _show(item) for item in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _temperature(fields: Mapping[str, Any]) -> str:
    product = fields.get(TEMPERATURE, _NOT_RECORDED)
    if product is None:
        return "not used (no top-k tail)"
    parts = fields.get(KD_TEMPERATURE), fields.get(TEACHER_TEMPERATURE)
    if product is _NOT_RECORDED or None in parts:
        return _show(product)
    return f"{_show(product)} (kd_temperature {_show(parts[0])} x teacher_temperature {_show(parts[1])})"


def _line(name: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    if name == TEMPERATURE:
        return (f"{name}: cache {_temperature(a)}, this run {_temperature(b)} (the cached top-k tail's log-mass was "
                "computed at this temperature)")
    x, y = a.get(name, _NOT_RECORDED), b.get(name, _NOT_RECORDED)
    line = f"{name}: cache {_show(x)}, this run {_show(y)}"
    if name == DATA_HASHES:
        return (f"{line} (the cache was written from {_show(a.get(DATA_FILES, _NOT_RECORDED))}, this run reads "
                f"{_show(b.get(DATA_FILES, _NOT_RECORDED))}: the data's content or order changed; the same content "
                "under another path matches)")
    hint = _HINTS.get(name)
    return f"{line} ({hint})" if hint else line


def differences(cache: Fingerprint, run: Fingerprint) -> list[str]:
    """One line per differing field, ``<field>: cache <a>, this run <b>`` (with a hint where one helps), in the
    fingerprint's order; fields in ``RECORDED_ONLY`` are shown within others' lines, never on their own."""
    a, b = cache.fields, run.fields
    names = list(a) + [name for name in b if name not in a]
    return [_line(name, a, b) for name in names
            if name not in RECORDED_ONLY and not _same(a.get(name, _NOT_RECORDED), b.get(name, _NOT_RECORDED))]


def check_matches(cache: Fingerprint, run: Fingerprint, cache_dir: str) -> None:
    """Refuse (CacheMismatchError) a run whose fingerprint differs from the cache's: the message names the cache
    directory, every differing field with both values, and what to do."""
    lines = differences(cache, run)
    if not lines:
        return
    listed = "\n".join(f"  - {line}" for line in lines)
    raise CacheMismatchError(
        f"the teacher cache in teacher_cache_dir={cache_dir!r} was written for another config than this run's; "
        f"{len(lines)} field(s) differ:\n{listed}\n"
        "Either write a cache for this config with `kubedistill cache-teacher CONFIG` (into another, or an emptied, "
        "teacher_cache_dir), or change these settings back to the cache's values."
    )


def check_student_matches_cache(cache: Fingerprint, student_pretrain: str, cache_dir: str | None = None) -> None:
    """Refuse (CacheMismatchError) a student whose tokenizer vocabulary (token -> id mapping and size) is not the
    teacher's recorded in the cache: its logits would be compared with the teacher's id by id."""
    recorded_hash, recorded_size = cache.fields.get(TEACHER_VOCAB), cache.fields.get(VOCAB_SIZE)
    student_hash, student_size = hash_vocabulary(student_pretrain)
    if (student_hash, student_size) == (recorded_hash, recorded_size):
        return
    where = f" in {cache_dir}" if cache_dir else ""
    lines = []
    if student_size != recorded_size:
        lines.append(f"{VOCAB_SIZE}: cache (teacher) {_show(recorded_size)}, student {student_size}")
    if student_hash != recorded_hash:
        lines.append(f"vocabulary sha256 (token -> id): cache (teacher) {_show(recorded_hash)}, student "
                     f"{student_hash!r}")
    listed = "\n".join(f"  - {line}" for line in lines)
    raise CacheMismatchError(
        f"student_pretrain={student_pretrain!r}: its tokenizer's vocabulary is not the teacher's the cache{where} was "
        f"written with:\n{listed}\n"
        "Distillation compares the two models token id by token id, so the student needs the teacher's tokenizer: "
        "pick a student of the teacher's family, or write a cache with a teacher that shares this student's "
        "tokenizer (`kubedistill cache-teacher`)."
    )
