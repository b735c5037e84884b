"""The teacher cache's row codec: float32 rows are the live targets bit for bit; compact rows keep the indices
exactly, the values within the stated quantisation step and the tail within float16, in the stated number of
bytes, and the KD loss within 1e-3 relative of the live targets."""

import math

import numpy as np
import pytest
import torch

from distill_trainer.distill_loss import LossConfig, TeacherTargets, distill_loss
from distill_trainer.losses import topk_teacher_logits
from distill_trainer.teacher_cache.encoding import RowCodec

QWEN_V = 151_936


def _zipf_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """LM-like logits: c·log of a Zipf prior (c ∈ [1.5, 4.5]: top-1 probability ≈ 0.3–0.95) + noise, over a
    random order of the vocabulary per row, shifted by a random per-row offset."""
    g = torch.Generator().manual_seed(seed)
    c = torch.empty(rows, 1).uniform_(1.5, 4.5, generator=g)
    ranked = -c * torch.arange(1, vocab + 1, dtype=torch.float32).log() + 0.5 * torch.randn(rows, vocab, generator=g)
    perm = torch.randperm(vocab, generator=g)
    shift = torch.randint(0, vocab, (rows, 1), generator=g)
    out = torch.empty_like(ranked).scatter_(1, perm[(torch.arange(vocab) + shift) % vocab], ranked)
    return out + 20 + 5 * torch.randn(rows, 1, generator=g)


def _targets(logits: torch.Tensor, k: int, tail: bool, temperature: float = 1.0) -> TeacherTargets:
    top = topk_teacher_logits(logits, k, temperature if tail else None)
    return TeacherTargets(top.values, top.indices, top.tail_logmass)


# ------------------------------------------------------------------------------------------------ float32


@pytest.mark.parametrize("tail", [True, False])
def test_float32_topk_round_trip_is_bit_exact(tail):
    targets = _targets(_zipf_logits(50, 4_000, seed=0), 16, tail)
    codec = RowCodec("float32", 16, 4_000, tail)
    rows = codec.encode(targets)
    assert rows.dtype == np.uint8 and rows.shape == (50, codec.row_bytes) == (50, 8 * 16 + 4 * tail)
    back = codec.decode(rows)
    assert back.values.dtype == torch.float32 and back.indices.dtype == torch.int64
    assert torch.equal(back.values.view(torch.int32), targets.values.view(torch.int32))
    assert torch.equal(back.indices, targets.indices)
    if tail:
        assert back.tail.dtype == torch.float32
        assert torch.equal(back.tail.view(torch.int32), targets.tail.view(torch.int32))
    else:
        assert back.tail is None


def test_float32_full_vocabulary_round_trip_is_bit_exact_with_masked_columns():
    logits = torch.randn(7, 1_000) * 4
    logits[:, 990:] = -math.inf  # padded columns
    codec = RowCodec("float32", 0, 1_000, False)
    rows = codec.encode(TeacherTargets(logits))
    assert rows.shape == (7, 4_000)
    back = codec.decode(rows)
    assert back.indices is None and back.tail is None
    assert torch.equal(back.values.view(torch.int32), logits.view(torch.int32))


# ------------------------------------------------------------------------------------------------ compact


def test_compact_bytes_per_token_at_qwen_vocabulary():
    """The figures the module docstring states (a check of the format's size, not a timing)."""
    assert RowCodec("compact", 64, QWEN_V, True).row_bytes == 188  # < 274 B of 18-bit indices + fp16 values
    assert RowCodec("compact", 64, QWEN_V, False).row_bytes == 186
    assert RowCodec("compact", 128, QWEN_V, True).row_bytes == 357
    assert RowCodec("compact", 256, QWEN_V, True).row_bytes == 680
    assert RowCodec("compact", 0, QWEN_V, False).row_bytes == 2 * QWEN_V
    assert RowCodec("float32", 64, QWEN_V, True).row_bytes == 516
    assert RowCodec("float32", 0, QWEN_V, False).row_bytes == 4 * QWEN_V


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("k, vocab", [(64, QWEN_V), (7, 100), (5, 5), (1, 2**17 + 3)])
def test_compact_topk_round_trip(k, vocab, tail):
    logits = _zipf_logits(40, vocab, seed=k)
    targets = _targets(logits, k, tail)
    codec = RowCodec("compact", k, vocab, tail)
    rows = codec.encode(targets)
    assert rows.shape == (40, codec.row_bytes)
    back = codec.decode(rows)
    # Indices: exactly the same set per row, ascending.
    expected_indices, order = targets.indices.sort(1)
    assert torch.equal(back.indices, expected_indices)
    # Values: relative to the row's max (0), within half a quantisation step of the curve.
    x = (targets.values.max(1, keepdim=True).values - targets.values).gather(1, order)
    bound = torch.from_numpy(codec.value_error_bound(x.double().numpy())) + 1e-5
    assert ((-back.values.double() - x.double()).abs() <= bound).all()
    assert (back.values.max(1).values == 0).all()  # the row's max is exact
    if tail:
        assert torch.equal(back.tail, targets.tail.half().float())
    else:
        assert back.tail is None


def test_compact_topk_keeps_masked_values_and_clamps_far_ones():
    values = torch.tensor([[3.0, 1.0, -100.0, -math.inf], [-math.inf] * 4])
    indices = torch.tensor([[9, 0, 5, 7], [1, 2, 3, 4]])
    codec = RowCodec("compact", 4, 10, False)
    back = codec.decode(codec.encode(TeacherTargets(values, indices)))
    assert back.indices.tolist() == [[0, 5, 7, 9], [1, 2, 3, 4]]
    row = back.values[0].tolist()
    assert row[3] == 0.0 and row[2] == -math.inf
    assert abs(row[0] + 2.0) <= codec.value_error_bound(2.0)
    assert row[1] == pytest.approx(-codec.value_range, rel=1e-6)  # x = 103 is clamped to R: e^-32 of the max
    assert back.values[1].tolist() == [-math.inf] * 4


def test_compact_full_vocabulary_is_float16_relative_to_the_row_max():
    logits = torch.randn(5, 3_000) * 5 + 30
    logits[:, -3:] = -math.inf
    logits[4] = -math.inf  # a fully masked row stays fully masked
    codec = RowCodec("compact", 0, 3_000, False)
    rows = codec.encode(TeacherTargets(logits))
    assert rows.shape == (5, 6_000)
    back = codec.decode(rows).values
    shifted = logits[:4] - logits[:4].max(1, keepdim=True).values
    assert torch.equal(back[:4], shifted.half().float())
    assert torch.isneginf(back[4]).all()


def test_description_round_trips_and_refuses_a_different_layout():
    codec = RowCodec("compact", 64, QWEN_V, True)
    d = codec.describe()
    assert d["row_bytes"] == 188 and d["value_bits"] == 10
    assert RowCodec.from_description(d) == codec
    assert RowCodec.from_description(RowCodec("float32", 0, 8, False).describe()) == RowCodec("float32", 0, 8, False)
    with pytest.raises(ValueError, match="row_bytes|bytes per row"):
        RowCodec.from_description({**d, "row_bytes": 187})
    with pytest.raises(ValueError, match="unknown row codec parameters"):
        RowCodec.from_description({**d, "zstd": True})


@pytest.mark.parametrize("objective", ["forward_kl", "adaptive_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_compact_kd_loss_within_1e3_of_float32(objective, temperature):
    """One step of 256 label tokens at Qwen's vocabulary, top-64 with the tail, w = 1: the KD loss from decoded
    compact targets is within 1e-3 relative of the loss from the live (float32) targets. The student is the
    teacher plus N(0, 1) noise (KL ≈ 0.2 nats/token at T = 1: close to the teacher, where quantisation shows most)."""
    rows = 256
    teacher = _zipf_logits(rows, QWEN_V, seed=3)
    student = (teacher + torch.randn(teacher.shape, generator=torch.Generator().manual_seed(4))).unsqueeze(0)
    labels = torch.zeros(1, rows, dtype=torch.long)
    live = _targets(teacher, 64, True, temperature)
    codec = RowCodec("compact", 64, QWEN_V, True)
    cached = codec.decode(codec.encode(live))
    cfg = LossConfig(distill_loss_weight=1.0, kd_objective=objective, kd_temperature=temperature, logits_topk=64)
    with torch.no_grad():
        reference = distill_loss(student, labels, live, cfg, rows).kd_sum.item()
        got = distill_loss(student, labels, cached, cfg, rows).kd_sum.item()
    assert reference > 0
    assert abs(got / reference - 1) < 1e-3


# ------------------------------------------------------------------------------------------------ bad inputs


def test_bad_codec_parameters_raise():
    with pytest.raises(ValueError, match="unknown teacher cache encoding"):
        RowCodec("bf16", 64, 100, True)
    with pytest.raises(ValueError, match="larger than vocab_size"):
        RowCodec("compact", 101, 100, True)
    with pytest.raises(ValueError, match="needs top-k"):
        RowCodec("compact", 0, 100, True)
    with pytest.raises(ValueError, match="value_bits"):
        RowCodec("compact", 4, 100, False, value_bits=1)


def test_bad_targets_raise():
    codec = RowCodec("compact", 4, 100, True)
    values = torch.randn(3, 4)
    indices = torch.tensor([[0, 1, 2, 3]] * 3)
    tail = torch.full((3,), -1.0)
    with pytest.raises(ValueError, match=r"must be \[N, 4\]"):
        codec.encode(TeacherTargets(torch.randn(3, 5), indices, tail))
    with pytest.raises(ValueError, match="indices must be in"):
        codec.encode(TeacherTargets(values, indices + 97, tail))
    with pytest.raises(ValueError, match="without indices"):
        codec.encode(TeacherTargets(values, None, tail))
    with pytest.raises(ValueError, match="carry none"):
        codec.encode(TeacherTargets(values, indices, None))
    with pytest.raises(ValueError, match=r"tail must be \[N=3\]"):
        codec.encode(TeacherTargets(values, indices, tail[:2]))
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(TeacherTargets(values.masked_fill(values > 0, math.nan), indices, tail))
    with pytest.raises(ValueError, match="full-vocabulary codec"):
        RowCodec("float32", 0, 4, False).encode(TeacherTargets(values, indices))
    with pytest.raises(ValueError, match=r"rows must be uint8 \[N, "):
        codec.decode(np.zeros((3, codec.row_bytes + 1), np.uint8))
    with pytest.raises(ValueError, match="corrupt"):
        codec.decode(np.zeros((3, codec.row_bytes), np.uint8))  # no Elias-Fano ones at all


@pytest.mark.parametrize("width", [1, 5, 10, 11, 17])
@pytest.mark.parametrize("first_bit", [0, 3, 13])
def test_bit_fields_read_back_from_bytes_as_packed(width, first_bit):
    # decode reads each field from the bytes that hold it; the layout is _to_bits + packbits(bitorder="little").
    from distill_trainer.teacher_cache.encoding import _read_fields, _to_bits

    x = np.random.default_rng(width).integers(0, 1 << width, (20, 64))
    bits = np.concatenate([np.zeros((20, first_bit), bool), _to_bits(x, width)], axis=1)
    packed = np.packbits(bits, axis=1, bitorder="little")
    assert np.array_equal(_read_fields(packed, first_bit, width, 64), x)
