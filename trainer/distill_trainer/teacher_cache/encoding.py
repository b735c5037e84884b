"""One label token's teacher targets <-> a fixed number of bytes (a "row"): the teacher cache's record format.

Every row of a given ``RowCodec`` has exactly ``row_bytes`` bytes, so a shard is an ``[N, row_bytes]`` uint8
array and row ``i`` starts at byte ``i · row_bytes`` (random access, no index). The layout below is a contract
between the cache writer and every reader of a cache written with it: ``describe()`` records the parameters in
the manifest, and a change to any layout is a new ``encoding`` name, never a silent edit. All multi-byte
numbers are little-endian; "bits" are packed with ``np.packbits(..., bitorder="little")`` (bit ``j`` of a
bit string is bit ``j % 8`` of byte ``j // 8``).

``float32`` (exactly what the live teacher hands over; training from it gives the live run's losses bit for bit)

    top-k (k > 0):  values float32 [k] | indices int32 [k] | tail float32 (only with ``tail``)
                    row_bytes = 8k (+ 4); the entries in the order the teacher shipped them (value-descending)
    full (k = 0):   values float32 [V];  row_bytes = 4V

``compact`` (the default; holds the KD loss within 1e-3 relative of float32, see "Precision" below)

    top-k (k > 0):  tail float16 (2 bytes, only with ``tail``) | one bit string of ceil(bits / 8) bytes:
                      value codes   k × b bits      (b = ``value_bits``; code j is bits [j·b, (j+1)·b), LSB first)
                      EF low bits   k × l bits      (entry j's low l bits at k·b + j·l, LSB first)
                      EF high bits  H = k + ((V − 1) >> l) + 1 bits (at k·b + k·l)
                    bits = k·b + k·l + H; zero padding up to the byte.
                    The k entries are sorted by vocabulary index, ascending (decode returns them in that
                    order; the loss does not depend on the order of the k entries).
                    Indices: Elias-Fano with l = floor(log2(V // k)) (0 when V // k < 2): low = i & (2^l − 1);
                    entry j (0-based, ascending) sets high bit (i >> l) + j. Duplicated indices are
                    representable (non-decreasing sequence) but top-k never ships them.
                    Values: x = rowmax − v ≥ 0 in raw logit units (the row's max is dropped: softmax is
                    invariant to it; decode returns −x, so the row's max decodes as 0.0). With
                    M = 2^b − 2, L = log1p(R / a):
                      code = min(M, round(M · log1p(x / a) / L))      (x ≥ R is clamped to R)
                      code = 2^b − 1                                  (v = −inf, a masked column)
                      decode: x̂ = a · expm1(code · L / M)
                    i.e. a logarithmic companding curve: the step is (a + x)·L/M, finest at the top of the row
                    where the probability mass is, relative (≈ L/M) deep in it. A row whose values are all −inf
                    decodes as all −inf. ``value_scale`` a and ``value_range`` R are in ``describe()``.
                    Tail: log P_tail as float16 (not bfloat16: near −20 bfloat16's step is 0.125).
    full (k = 0):   values float16 [V] of v − rowmax (≤ 0; −inf stays −inf; a row of −inf stays −inf);
                    row_bytes = 2V.

Sizes at V = 151,936 (Qwen2.5), with the tail, default value_bits b = 10 (checked by the unit test):

    k      float32   compact   (compact = 2 + ceil((10k + l·k + H) / 8); l, H of Elias-Fano)
    64       516       188     (l = 11, H = 139: indices 105.4 B, values 80 B, tail 2 B)
    128     1028       357     (l = 10, H = 277)
    256     2052       680     (l = 9,  H = 553)
    full  607,744   303,872    (k = 0: 4V and 2V)

Precision (why b = 10, a = 1, R = 32). The decoded x̂ is within half a step, (a + x)·(e^{L/2M} − 1) ≈
0.0017·(1 + x) logits of x (``value_error_bound``); the row's max is exact. What the KD loss makes of that was
measured (bench/teacher_cache_bytes.py; forward_kl, reverse_kl, adaptive_kl; with and without tail; T·τ ∈ {1, 2};
V = 151,936, top-64, steps of 256 label tokens; Zipf-like teachers with top-1 probability 0.3–0.95 and Gaussian
ones; students = teacher + N(0, σ²) noise, σ ∈ {0.5, 1, 2}, and unrelated random ones). Quantisation noise is zero
mean, so the step's relative error falls like 2^-b / sqrt(KL per token · tokens): it is largest for a student
close to the teacher. Worst relative error of forward/reverse KL per step:
b = 7: 1.1e-2, b = 8: 3.6e-3, b = 10: 5e-4 (at KL ≈ 0.017 nats/token, a student at σ = 0.5 and T·τ = 2; below
1e-4 for KL ≳ 1). b = 8 would give 172 B at top-64, 6 bits 156 B, but neither holds 1e-3 for close students.
adaptive_kl is discontinuous (a token whose ascending cumulative p sits at α moves between head and tail under any
perturbation and its weight jumps by |p_i − q_i|/(g_h + g_t)): with a student far from the teacher (KL ≈ 4.5,
forward − reverse ≈ 10 nats) one such flip in a step was measured at 3.2e-3 relative; for students whose forward
and reverse KL are close, flips cost little. Only the float32 encoding is exact for adaptive_kl.
The tail in float16 contributes ≤ 5e-5 (measured with b = 14, where the values' part is negligible).

Nothing here loops over rows in Python: every step is a numpy operation on the whole ``[N, ...]`` block.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from ..distill_loss import TeacherTargets

ENCODINGS = ("float32", "compact")

# Compact top-k value quantisation (raw logit units); chosen by measurement (module docstring, "Precision").
DEFAULT_VALUE_BITS = 10
DEFAULT_VALUE_SCALE = 1.0  # a: the companding curve's knee; below it the step is ~ a·L/M (absolute)
DEFAULT_VALUE_RANGE = 32.0  # R: x = rowmax − v beyond this is clamped (p_i / p_max < e^-32: no mass)


@dataclass(frozen=True)
class RowCodec:
    """How one label token's ``TeacherTargets`` row becomes ``row_bytes`` bytes (layout: the module docstring).

    ``encoding``: "float32" (lossless, the live path's bytes) or "compact" (quantised values, Elias-Fano indices).
    ``topk``: k, 0 for full-vocabulary rows. ``vocab_size``: V, every index is < V; full rows have V columns.
    ``tail``: top-k rows carry log P_tail. ``value_bits``/``value_scale``/``value_range``: compact top-k only.
    """

    encoding: str
    topk: int
    vocab_size: int
    tail: bool
    value_bits: int = DEFAULT_VALUE_BITS
    value_scale: float = DEFAULT_VALUE_SCALE
    value_range: float = DEFAULT_VALUE_RANGE

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown teacher cache encoding {self.encoding!r}; expected one of {ENCODINGS}")
        if not _is_int(self.vocab_size) or self.vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {self.vocab_size!r}")
        if not _is_int(self.topk) or self.topk < 0:
            raise ValueError(f"topk must be an int ≥ 0 (0 = full vocabulary), got {self.topk!r}")
        if self.topk > self.vocab_size:
            raise ValueError(f"topk={self.topk} is larger than vocab_size={self.vocab_size}")
        if self.topk == 0 and self.tail:
            raise ValueError("tail=True needs top-k rows (topk > 0): a full-vocabulary row has no tail")
        if self.vocab_size > 2**31 - 1:
            raise ValueError(f"vocab_size={self.vocab_size} does not fit the int32 indices of the float32 encoding")
        if not _is_int(self.value_bits) or not 2 <= self.value_bits <= 16:
            raise ValueError(f"value_bits must be an int in [2, 16], got {self.value_bits!r}")
        if not (self.value_scale > 0 and math.isfinite(self.value_scale)):
            raise ValueError(f"value_scale must be a finite number > 0, got {self.value_scale!r}")
        if not (self.value_range > 0 and math.isfinite(self.value_range)):
            raise ValueError(f"value_range must be a finite number > 0, got {self.value_range!r}")

    # ------------------------------------------------------------------------------------------ layout

    @property
    def _low_bits(self) -> int:
        """Elias-Fano's l = floor(log2(V // k)) (the low bits stored verbatim per index)."""
        return max(0, (self.vocab_size // self.topk).bit_length() - 1)

    @property
    def _high_bits(self) -> int:
        """Elias-Fano's upper bit vector: k ones, one zero per bucket (i >> l) up to (V − 1) >> l, + 1."""
        return self.topk + ((self.vocab_size - 1) >> self._low_bits) + 1

    @property
    def _packed_bits(self) -> int:
        k = self.topk
        return k * self.value_bits + k * self._low_bits + self._high_bits

    @property
    def row_bytes(self) -> int:
        """Bytes of every row (label token) of this codec."""
        k, vocab = self.topk, self.vocab_size
        if self.encoding == "float32":
            return 4 * vocab if k == 0 else 8 * k + 4 * self.tail
        if k == 0:
            return 2 * vocab
        return 2 * self.tail + (self._packed_bits + 7) // 8

    def describe(self) -> dict:
        """The parameters, JSON-able, for the cache manifest (``from_description`` inverts it); also the format."""
        d = asdict(self)
        if self.encoding != "compact" or self.topk == 0:
            for name in ("value_bits", "value_scale", "value_range"):
                d.pop(name)
        d["row_bytes"] = self.row_bytes
        return d

    @classmethod
    def from_description(cls, d: dict) -> "RowCodec":
        """The codec a manifest's ``describe()`` stands for; refuses one whose row_bytes disagrees (a format change)."""
        known = {"encoding", "topk", "vocab_size", "tail", "value_bits", "value_scale", "value_range"}
        unknown = set(d) - known - {"row_bytes"}
        if unknown:
            raise ValueError(f"unknown row codec parameters {sorted(unknown)} (a newer cache format?)")
        codec = cls(**{name: d[name] for name in known if name in d})
        if "row_bytes" in d and d["row_bytes"] != codec.row_bytes:
            raise ValueError(f"the description says {d['row_bytes']} bytes per row, this codec's layout has "
                             f"{codec.row_bytes}: the cache was written by a different format")
        return codec

    # ------------------------------------------------------------------------------------------ encode

    def encode(self, targets: TeacherTargets) -> np.ndarray:
        """uint8 [N, row_bytes]: ``targets`` (N label tokens, as the live teacher hands them over) as rows."""
        values, indices, tail = self._check_targets(targets)
        n = values.shape[0]
        if self.encoding == "float32":
            parts = [values.astype("<f4", copy=False).view(np.uint8).reshape(n, -1)]
            if self.topk:
                parts.append(indices.astype("<i4").view(np.uint8).reshape(n, -1))
                if self.tail:
                    parts.append(tail.astype("<f4", copy=False).reshape(n, 1).view(np.uint8))
            return np.ascontiguousarray(np.concatenate(parts, axis=1)) if len(parts) > 1 else np.ascontiguousarray(parts[0])
        if self.topk == 0:
            return _relative(values).astype("<f2").view(np.uint8).reshape(n, 2 * self.vocab_size)
        order = np.argsort(indices, axis=1, kind="stable")
        indices = np.take_along_axis(indices, order, 1)
        values = np.take_along_axis(values, order, 1)
        bits = np.concatenate(
            [_to_bits(self._value_codes(values), self.value_bits), *self._elias_fano_bits(indices)], axis=1
        )
        packed = np.packbits(bits, axis=1, bitorder="little")
        if not self.tail:
            return packed
        return np.concatenate([tail.astype("<f2").reshape(n, 1).view(np.uint8), packed], axis=1)

    def _value_codes(self, values: np.ndarray) -> np.ndarray:
        top = (1 << self.value_bits) - 1
        steps = top - 1
        x = -_relative(values)  # ≥ 0, +inf at −inf
        curve = steps / math.log1p(self.value_range / self.value_scale)
        with np.errstate(invalid="ignore"):
            level = np.rint(np.log1p(np.minimum(x, self.value_range) / self.value_scale) * curve)
        codes = np.where(np.isinf(x), top, level)
        return codes.astype(np.int64)

    def _elias_fano_bits(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(low [N, k·l], high [N, H]) bool bit matrices of each row's ascending ``indices``."""
        n, k = indices.shape
        low_bits = self._low_bits
        low = _to_bits(indices & ((1 << low_bits) - 1), low_bits)
        high = np.zeros((n, self._high_bits), dtype=bool)
        positions = (indices >> low_bits) + np.arange(k)
        high[np.arange(n)[:, None], positions] = True
        return low, high

    # ------------------------------------------------------------------------------------------ decode

    def decode(self, rows: np.ndarray) -> TeacherTargets:
        """``TeacherTargets`` (float32 values, int64 indices, float32 tail) of uint8 ``rows`` [N, row_bytes]."""
        rows = np.asarray(rows)
        if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != self.row_bytes:
            raise ValueError(f"rows must be uint8 [N, {self.row_bytes}] ({self.describe()}), "
                             f"got {rows.dtype} {list(rows.shape)}")
        rows = np.ascontiguousarray(rows)
        n, k = rows.shape[0], self.topk
        if self.encoding == "float32":
            values = rows[:, : 4 * (k or self.vocab_size)].copy().view("<f4")
            if k == 0:
                return TeacherTargets(torch.from_numpy(values.astype(np.float32, copy=False)))
            indices = rows[:, 4 * k: 8 * k].copy().view("<i4").astype(np.int64)
            tail = rows[:, 8 * k:].copy().view("<f4").reshape(n) if self.tail else None
            return _targets(values, indices, tail)
        if k == 0:
            return TeacherTargets(torch.from_numpy(rows.view("<f2").astype(np.float32)))
        tail = rows[:, :2].copy().view("<f2").reshape(n).astype(np.float32) if self.tail else None
        packed = rows[:, 2 * self.tail:]
        b, low_bits = self.value_bits, self._low_bits
        codes = _read_fields(packed, 0, b, k)
        low = _read_fields(packed, k * b, low_bits, k)
        # The high bits' part starts at bit k·(b + l), inside a byte: unpack only the bytes that hold it.
        start = k * (b + low_bits)
        high = np.unpackbits(packed[:, start // 8:], axis=1, bitorder="little")[:, start % 8: start % 8 + self._high_bits]
        row_of, column = np.nonzero(high)
        if row_of.size != n * k or np.any(np.bincount(row_of, minlength=n) != k):
            raise ValueError(f"corrupt compact rows: an Elias-Fano high-bit vector does not hold exactly k={k} entries")
        indices = ((column.reshape(n, k) - np.arange(k)) << low_bits) | low
        if n and int(indices.max()) >= self.vocab_size:
            raise ValueError(f"corrupt compact rows: a decoded index is ≥ vocab_size={self.vocab_size}")
        return _targets(self._dequantise(codes), indices, tail)

    def _dequantise(self, codes: np.ndarray) -> np.ndarray:
        top = (1 << self.value_bits) - 1
        step = math.log1p(self.value_range / self.value_scale) / (top - 1)
        x = self.value_scale * np.expm1(np.minimum(codes, top - 1) * step)
        return np.where(codes == top, -np.inf, -x).astype(np.float32)

    def value_error_bound(self, x: np.ndarray) -> np.ndarray:
        """The largest |decoded − original| of an entry x = rowmax − v below ``value_range`` (raw logit units):
        half a step of the curve there, a·(expm1((c + ½)·L/M) − expm1(c·L/M)) ≤ (a + x)·(e^{L/2M} − 1)."""
        top = (1 << self.value_bits) - 1
        half = 0.5 * math.log1p(self.value_range / self.value_scale) / (top - 1)
        return (self.value_scale + np.asarray(x, dtype=np.float64)) * math.expm1(half)

    # ------------------------------------------------------------------------------------------ checks

    def _check_targets(self, targets: TeacherTargets):
        """(values float32 [N, k or V], indices int64 [N, k] or None, tail float32 [N] or None) as numpy."""
        if not isinstance(targets, TeacherTargets):
            raise ValueError(f"expected TeacherTargets, got {type(targets).__name__}")
        values = _numpy(targets.values, "values")
        if not np.issubdtype(values.dtype, np.floating):
            raise ValueError(f"values must be floating point, got {values.dtype}")
        values = values.astype(np.float32, copy=False)
        width = self.topk or self.vocab_size
        if values.ndim != 2 or values.shape[1] != width:
            what = f"top-{self.topk}" if self.topk else f"full-vocabulary (V={self.vocab_size})"
            raise ValueError(f"{what} values must be [N, {width}], got {list(values.shape)}")
        if np.isnan(values).any() or np.isposinf(values).any():
            raise ValueError("values must not be NaN or +inf (−inf marks a masked column)")
        n = values.shape[0]
        indices = tail = None
        if self.topk == 0:
            if targets.indices is not None or targets.tail is not None:
                raise ValueError("a full-vocabulary codec (topk=0) got top-k targets (indices/tail set)")
            return values, None, None
        if targets.indices is None:
            raise ValueError(f"a top-{self.topk} codec got targets without indices (full-vocabulary values?)")
        indices = _numpy(targets.indices, "indices")
        if not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"indices must be integers, got {indices.dtype}")
        if indices.shape != values.shape:
            raise ValueError(f"indices {list(indices.shape)} and values {list(values.shape)} must both be [N, {self.topk}]")
        indices = indices.astype(np.int64, copy=False)
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= self.vocab_size):
            raise ValueError(f"indices must be in [0, vocab_size={self.vocab_size}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        if self.tail:
            if targets.tail is None:
                raise ValueError("the codec stores the tail (tail=True) but the targets carry none")
            tail = _numpy(targets.tail, "tail")
            if not np.issubdtype(tail.dtype, np.floating):
                raise ValueError(f"tail must be floating point, got {tail.dtype}")
            tail = tail.astype(np.float32, copy=False)
            if tail.shape != (n,):
                raise ValueError(f"tail must be [N={n}], got {list(tail.shape)}")
            if np.isnan(tail).any() or (tail > 0).any():
                raise ValueError("tail is a log-probability: it must be ≤ 0 and not NaN")
        elif targets.tail is not None:
            raise ValueError("the targets carry a tail but the codec has tail=False")
        return values, indices, tail


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _numpy(t, name: str) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    if isinstance(t, np.ndarray):
        return t
    raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(t).__name__}")


def _relative(values: np.ndarray) -> np.ndarray:
    """v − rowmax (≤ 0, float32); a row of −inf stays −inf (its max counts as 0)."""
    top = values.max(axis=1, keepdims=True) if values.shape[1] else np.zeros((values.shape[0], 1), np.float32)
    top = np.where(np.isfinite(top), top, np.float32(0))
    return values - top


def _to_bits(x: np.ndarray, width: int) -> np.ndarray:
    """bool [N, m·width]: each entry of the int array ``x`` [N, m] as ``width`` bits, LSB first."""
    n, m = x.shape
    shifts = np.arange(width, dtype=np.int64)
    return ((x[:, :, None] >> shifts) & 1).astype(bool).reshape(n, m * width)


def _read_fields(packed: np.ndarray, first_bit: int, width: int, m: int) -> np.ndarray:
    """int64 [N, m]: ``m`` consecutive ``width``-bit fields (LSB first, as ``_to_bits`` + ``np.packbits(...,
    bitorder="little")`` lay them out) starting at bit ``first_bit`` of each row of the uint8 ``packed`` [N, bytes].
    Reads each field from the (up to) 4 bytes that hold it: a gather and a shift, no per-bit unpacking (decode is
    on the student's critical path)."""
    n = packed.shape[0]
    if width == 0:
        return np.zeros((n, m), np.int64)
    if width > 25:  # a field plus its bit offset must fit the 32 bits read below
        raise ValueError(f"fields of {width} bits are wider than this reader's 25")
    offsets = first_bit + width * np.arange(m)
    byte = offsets // 8
    padded = np.concatenate([packed, np.zeros((n, 4), np.uint8)], axis=1)  # the last field may end in the last byte
    word = np.zeros((n, m), np.int64)
    for i in range(4):
        word |= padded[:, byte + i].astype(np.int64) << (8 * i)
    return (word >> (offsets % 8)) & ((1 << width) - 1)


def _targets(values: np.ndarray, indices: np.ndarray, tail: Optional[np.ndarray]) -> TeacherTargets:
    return TeacherTargets(
        torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)),
        None if tail is None else torch.from_numpy(np.ascontiguousarray(tail, dtype=np.float32)),
    )
