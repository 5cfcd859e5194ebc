"""Requantization on the base's own grid: keep every block's scales, move only its quantized values.

A quantized block stores ``value = step · q + offset`` with small integers ``q`` and per-block (or
per-sub-block) ``step`` and ``offset``. Dequantized base weights sit exactly on that grid, so
``dequant(W) + λΔ`` re-expressed on the same grid is ``q + λΔ / step``: nothing needs to be searched,
only the integer part has to be chosen. Three roundings are offered:

- ``nearest``: ``q + round(λΔ/step)``. Like ggml's requantization, it erases every ``|λΔ|`` below half a
  step, but it is several times faster than ggml's scale search on K-quants.
- ``dither``: ``q + floor(λΔ/step + u)`` with ``u`` uniform in [0, 1), drawn from a generator seeded by
  the tensor's name. The expected value is exactly ``dequant(W) + λΔ`` (unbiased), so the knob survives
  on average, at the cost of rounding noise. The same ``u`` is used for every λ, so a tensor moves
  monotonically with λ and λ = 0 gives the base back bit for bit.
- ``calibrated``: the elements with the largest ``|λΔ|`` move by a whole step first, up to a rounding
  threshold set per tensor (:func:`calibrate_threshold`): as much of the knob as a noise budget allows,
  with the least added error for what it keeps.

Codecs exist for the types in :data:`GRID_TYPES`: the legacy and K-quant families (uniform grids), and
the 4-bit types whose grid is a table of 16 unequally spaced values times a block scale (IQ4_NL, IQ4_XS:
``kvalues_iq4nl``; MXFP4, NVFP4: the E2M1 values). On a table the codes are ranks into the sorted
table, and the shift is measured in *table steps*: a value between two entries sits at the fraction of
the gap between them, so "a step" is the gap to the neighbouring entry, and every rounding above works
unchanged (dithering goes up with the probability of that fraction: still unbiased). The bit layouts
follow ggml-common.h and are checked against ggml's own dequantizer in the tests.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Union

import numpy as np
from gguf import GGMLQuantizationType as QT

from .errors import CompatibilityError, FormatError

ROUNDINGS = ("nearest", "dither", "calibrated")
_SAMPLE = 1 << 16  # elements sampled to calibrate the rounding threshold of one tensor
_MIN_THRESHOLD = 0.01
# calibrated rounding adds at most this share of a tensor's own quantization noise beyond what round-to-nearest
# adds: chosen with benchmarks/fidelity.py (README, 'Requantization and the knob')
NOISE_BUDGET = 0.1
_FAR = 1 << 12  # a shift of more steps than this leaves every grid: clipped to it before integer rounding
_CHUNK_ELEMENTS = 1 << 19  # elements per numpy pass: its temporaries stay a few MB, reused per thread


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """Bytes (n, k·group) -> codes (n, 2·k·group): each run of ``group`` bytes gives its low then high nibbles."""
    n = qs.shape[0]
    x = qs.reshape(n, -1, 1, group) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (x & 0x0F).reshape(n, -1)


def _pack_nibbles(q: np.ndarray, group: int) -> np.ndarray:
    n = q.shape[0]
    x = q.reshape(n, -1, 2, group).astype(np.uint8)
    return (x[:, :, 0, :] | (x[:, :, 1, :] << 4)).reshape(n, -1)


def _bits(packed: np.ndarray, per_byte: int, group: int) -> np.ndarray:
    """Bytes (n, group) -> codes (n, per_byte·group) of 8/per_byte bits, element ``s·group + l`` from byte ``l``."""
    width = 8 // per_byte
    n = packed.shape[0]
    shifts = (np.arange(per_byte, dtype=np.uint8) * width).reshape(1, 1, per_byte, 1)
    x = packed.reshape(n, -1, 1, group) >> shifts
    return (x & ((1 << width) - 1)).reshape(n, -1)


def _pack_bits(codes: np.ndarray, per_byte: int, group: int) -> np.ndarray:
    width = 8 // per_byte
    n = codes.shape[0]
    x = codes.reshape(n, -1, per_byte, group).astype(np.uint8)
    out = np.zeros((n, x.shape[1], group), dtype=np.uint8)
    for s in range(per_byte):
        out |= (x[:, :, s, :] & ((1 << width) - 1)) << (s * width)
    return out.reshape(n, -1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K / Q5_K super-block (ggml's get_scale_min_k4)."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


@dataclass(frozen=True)
class Codec:
    """How one block type splits into integer codes ``q`` and ``value = step · q + offset``."""

    qtype: QT
    block_size: int
    type_size: int
    qmin: int
    qmax: int
    # blocks (n, type_size) uint8 -> (q integers (n, block), step f32 (n, G), offset f32 (n, G) or (n, 1)):
    # the G groups of block // G consecutive elements share a step and an offset
    unpack: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
    # (blocks, q) -> new blocks with the same scales and the codes q
    pack: Callable[[np.ndarray, np.ndarray], np.ndarray]
    # a non-uniform grid: the sorted distinct values ``value = step · levels[q] + offset`` (q is a rank)
    levels: np.ndarray | None = None

    def values(self, q: np.ndarray) -> np.ndarray:
        """The grid value of codes ``q`` in units of their group's step (``q`` itself on a uniform grid)."""
        return q if self.levels is None else self.levels[q]


def _zeros(n: int) -> np.ndarray:
    return np.broadcast_to(np.float32(0), (n, 1))


def per_element(a: np.ndarray, block_size: int) -> np.ndarray:
    """A per-group array (n, G) from :attr:`Codec.unpack` repeated to one value per element (n, block)."""
    return np.repeat(a, block_size // a.shape[1], axis=1) if a.shape[1] != block_size else a


# --- legacy 32-element blocks -------------------------------------------------------------------


def _unpack_q8_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return b[:, 2:].view(np.int8), _f16(b, 0), _zeros(b.shape[0])


def _pack_q8_0(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    out = b.copy()
    out[:, 2:].view(np.int8)[...] = q
    return out


def _legacy(b: np.ndarray, head: int, with_min: bool, high_bit: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(b, 0)
    q = _nibbles(b[:, head + (4 if high_bit else 0) :], 16).astype(np.int16)
    if high_bit:
        qh = b[:, head : head + 4].copy().view(np.uint32).reshape(-1, 1)
        q |= (((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16)) << 4
    offset = _f16(b, 2) if with_min else -d * (16 if high_bit else 8)
    return q, d, offset


def _pack_legacy(b: np.ndarray, q: np.ndarray, head: int, high_bit: bool) -> np.ndarray:
    out = b.copy()
    u = q.astype(np.uint32)
    if high_bit:
        qh = ((u >> 4) & 1) << np.arange(32, dtype=np.uint32)
        out[:, head : head + 4] = qh.sum(axis=1, dtype=np.uint32).reshape(-1, 1).view(np.uint8)
        head += 4
    out[:, head:] = _pack_nibbles(u & 0x0F, 16)
    return out


# --- K-quants (256-element super-blocks) ----------------------------------------------------------


def _unpack_q4_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _nibbles(b[:, 16:], 32).astype(np.int16)
    return q, d * sc, -(dmin * mn)


def _pack_q4_k(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    out = b.copy()
    out[:, 16:] = _pack_nibbles(q, 32)
    return out


def _unpack_q5_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _nibbles(b[:, 48:], 32).astype(np.int16) | (_bits(b[:, 16:48], 8, 32).astype(np.int16) << 4)
    return q, d * sc, -(dmin * mn)


def _pack_q5_k(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    out = b.copy()
    out[:, 16:48] = _pack_bits(q >> 4, 8, 32)
    out[:, 48:] = _pack_nibbles(q & 0x0F, 32)
    return out


def _unpack_q6_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = b.shape[0]
    lo = _nibbles(b[:, :128], 64).reshape(n, 2, 128)
    hi = _bits(b[:, 128:192], 4, 32).reshape(n, 2, 128)
    q = (lo.astype(np.int16) | (hi.astype(np.int16) << 4)).reshape(n, 256) - 32
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    return q, _f16(b, 208) * scales, _zeros(n)


def _pack_q6_k(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    u = (q + 32).astype(np.uint8).reshape(n, 2, 128)
    out = b.copy()
    out[:, :128] = _pack_nibbles((u & 0x0F).reshape(n, 256), 64)
    out[:, 128:192] = _pack_bits((u >> 4).reshape(n, 256), 4, 32)
    return out


def _unpack_q2_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scales = b[:, :16]
    q = _bits(b[:, 16:80], 4, 32).astype(np.int16)
    d, dmin = _f16(b, 80), _f16(b, 82)
    return q, d * (scales & 0x0F).astype(np.float32), -(dmin * (scales >> 4).astype(np.float32))


def _pack_q2_k(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    out = b.copy()
    out[:, 16:80] = _pack_bits(q, 4, 32)
    return out


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    n = s.shape[0]
    low = (s[:, :8].reshape(n, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)).reshape(n, 16) & 0x0F
    high = (s[:, 8:12].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)).reshape(n, 16) & 3
    return ((low | (high << 4)).astype(np.int16) - 32).astype(np.float32)


def _unpack_q3_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    low = _bits(b[:, 32:96], 4, 32).astype(np.int16)
    high = _bits(b[:, :32], 8, 32).astype(np.int16)
    q = low - 4 * (1 - high)  # the high bit set means "no offset": codes -4..3
    return q, _f16(b, 108) * _q3_k_scales(b[:, 96:108]), _zeros(b.shape[0])


def _pack_q3_k(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    u = q + 4  # 0..7: bit 2 is the hmask bit, the low two bits go to qs
    out = b.copy()
    out[:, :32] = _pack_bits(u >> 2, 8, 32)
    out[:, 32:96] = _pack_bits(u & 3, 4, 32)
    return out


# --- non-uniform 4-bit tables (a block scale times one of 16 values) ------------------------------

# ggml-common.h: kvalues_iq4nl, and kvalues_fp4 (E2M1 values doubled; code 8 is -0, the same value as 0)
_IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
_FP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)


@dataclass(frozen=True)
class _Table:
    """A 16-entry value table: codes (nibbles) <-> ranks into its sorted distinct values."""

    levels: np.ndarray  # sorted distinct values, float32
    rank_of: np.ndarray  # code -> rank
    code_of: np.ndarray  # rank -> the code written for it

    @classmethod
    def of(cls, values: np.ndarray) -> _Table:
        levels = np.unique(values)
        rank_of = np.searchsorted(levels, values).astype(np.int16)
        code_of = np.array([int(np.flatnonzero(rank_of == r)[0]) for r in range(levels.size)], np.uint8)
        return cls(levels.astype(np.float32), rank_of, code_of)

    def ranks(self, codes: np.ndarray) -> np.ndarray:
        return self.rank_of[codes]

    def codes(self, ranks: np.ndarray, old: np.ndarray) -> np.ndarray:
        """Codes for ``ranks``; an element whose rank did not change keeps its old code (-0 stays -0)."""
        new = self.code_of[ranks]
        return np.where(self.rank_of[old] == ranks, old, new)


_IQ4NL = _Table.of(_IQ4NL_VALUES)
_FP4 = _Table.of(_FP4_VALUES)


def _e8m0_half(e: np.ndarray) -> np.ndarray:
    """ggml_e8m0_to_fp32_half: 2^(e - 128) as float32, with its two subnormal codes."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32)
    return bits.view(np.float32)


def _ue4m3_table() -> np.ndarray:
    """ggml_ue4m3_to_fp32 for every byte: unsigned E4M3 (bias 7), halved like kvalues_fp4; 0 and 0x7F are 0."""
    out = np.zeros(256, np.float32)
    for x in range(256):
        if x in (0, 0x7F):
            continue
        exp, man = (x >> 3) & 0xF, x & 0x7
        raw = man * 2.0**-9 if exp == 0 else (1.0 + man / 8.0) * 2.0 ** (exp - 7)
        out[x] = raw * 0.5
    return out


_UE4M3 = _ue4m3_table()


def _unpack_iq4_nl(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _IQ4NL.ranks(_nibbles(b[:, 2:], 16)), _f16(b, 0), _zeros(b.shape[0])


def _pack_iq4_nl(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    out = b.copy()
    out[:, 2:] = _pack_nibbles(_IQ4NL.codes(q, _nibbles(b[:, 2:], 16)), 16)
    return out


def _unpack_iq4_xs(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = b.shape[0]
    scales_h = b[:, 2:4].copy().view(np.uint16).astype(np.int32)  # (n, 1)
    low = (b[:, 4:8].reshape(n, 4, 1) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2)).reshape(n, 8) & 0x0F
    high = (scales_h >> (2 * np.arange(8, dtype=np.int32))) & 3
    ls = (low.astype(np.int32) | (high << 4)) - 32
    return _IQ4NL.ranks(_nibbles(b[:, 8:], 16)), _f16(b, 0) * ls.astype(np.float32), _zeros(n)


def _pack_iq4_xs(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    out = b.copy()
    out[:, 8:] = _pack_nibbles(_IQ4NL.codes(q, _nibbles(b[:, 8:], 16)), 16)
    return out


def _unpack_mxfp4(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _FP4.ranks(_nibbles(b[:, 1:], 16)), _e8m0_half(b[:, :1]), _zeros(b.shape[0])


def _pack_mxfp4(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    out = b.copy()
    out[:, 1:] = _pack_nibbles(_FP4.codes(q, _nibbles(b[:, 1:], 16)), 16)
    return out


def _unpack_nvfp4(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _FP4.ranks(_nibbles(b[:, 4:], 8)), _UE4M3[b[:, :4]], _zeros(b.shape[0])


def _pack_nvfp4(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    out = b.copy()
    out[:, 4:] = _pack_nibbles(_FP4.codes(q, _nibbles(b[:, 4:], 8)), 8)
    return out


def _table_codec(qtype: QT, block: int, size: int, table: _Table, unpack: Callable, pack: Callable) -> Codec:
    return Codec(qtype, block, size, 0, table.levels.size - 1, unpack, pack, table.levels)


CODECS: dict[QT, Codec] = {
    c.qtype: c
    for c in (
        Codec(QT.Q8_0, 32, 34, -127, 127, _unpack_q8_0, _pack_q8_0),
        Codec(QT.Q4_0, 32, 18, 0, 15, lambda b: _legacy(b, 2, False, False), lambda b, q: _pack_legacy(b, q, 2, False)),
        Codec(QT.Q4_1, 32, 20, 0, 15, lambda b: _legacy(b, 4, True, False), lambda b, q: _pack_legacy(b, q, 4, False)),
        Codec(QT.Q5_0, 32, 22, 0, 31, lambda b: _legacy(b, 2, False, True), lambda b, q: _pack_legacy(b, q, 2, True)),
        Codec(QT.Q5_1, 32, 24, 0, 31, lambda b: _legacy(b, 4, True, True), lambda b, q: _pack_legacy(b, q, 4, True)),
        Codec(QT.Q2_K, 256, 84, 0, 3, _unpack_q2_k, _pack_q2_k),
        Codec(QT.Q3_K, 256, 110, -4, 3, _unpack_q3_k, _pack_q3_k),
        Codec(QT.Q4_K, 256, 144, 0, 15, _unpack_q4_k, _pack_q4_k),
        Codec(QT.Q5_K, 256, 176, 0, 31, _unpack_q5_k, _pack_q5_k),
        Codec(QT.Q6_K, 256, 210, -32, 31, _unpack_q6_k, _pack_q6_k),
        _table_codec(QT.IQ4_NL, 32, 18, _IQ4NL, _unpack_iq4_nl, _pack_iq4_nl),
        _table_codec(QT.IQ4_XS, 256, 136, _IQ4NL, _unpack_iq4_xs, _pack_iq4_xs),
        _table_codec(QT.MXFP4, 32, 17, _FP4, _unpack_mxfp4, _pack_mxfp4),
        _table_codec(QT.NVFP4, 64, 36, _FP4, _unpack_nvfp4, _pack_nvfp4),
    )
}
GRID_TYPES: frozenset[QT] = frozenset(CODECS)
# the grids whose values are a table of unequal steps (the rest are uniform)
TABLE_TYPES: frozenset[QT] = frozenset(t for t, c in CODECS.items() if c.levels is not None)


def grid_values(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """Dequantize through the codec (``step · q + offset``); the tests hold it against ggml's own to_float."""
    codec = _codec(qtype)
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, codec.type_size)
    q, step, offset = codec.unpack(blocks)
    n, g = q.shape[0], step.shape[1]
    return (codec.values(q).reshape(n, g, -1) * step[:, :, None] + offset[:, :, None]).reshape(-1)


def _codec(qtype: QT) -> Codec:
    codec = CODECS.get(qtype)
    if codec is None:
        raise CompatibilityError(
            f"no grid codec for {qtype.name}; grid requantization supports {', '.join(sorted(t.name for t in CODECS))}"
        )
    return codec


def seed_for(name: str, salt: str = "") -> int:
    """A stable 64-bit seed per tensor name, so a merge is reproducible and λ moves each weight monotonically."""
    return int.from_bytes(hashlib.sha256(f"alignvec-dither:{salt}:{name}".encode()).digest()[:8], "little")


def _moves(a: np.ndarray, threshold: float) -> np.ndarray:
    """Whole steps an element moves for |shift| = ``a`` steps: rounding that goes up from ``threshold`` on."""
    return np.floor(a + (1.0 - threshold))


def _bisect(f: Callable[[float], float], target: float, lo: float, hi: float) -> float:
    """The t in [lo, hi] where the decreasing function f crosses ``target``."""
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) > target else (lo, mid)
    return 0.5 * (lo + hi)


def calibrate_threshold(x: np.ndarray, weight: np.ndarray, noise_budget: float | None = None) -> float:
    """The rounding threshold t in (0, 0.5] that keeps the whole shift, as a projection, within a noise budget.

    ``x`` is the shift in steps and ``weight`` the squared step of each element. The change of an
    element is ``sign(x)·floor(|x| + 1 − t)`` steps; the projection of all changes onto the shift,
    ``Σ w·move·|x|``, falls as t rises, and t is chosen where it equals ``Σ w·x²``. Among roundings
    on the grid, moving the elements with the largest ``|x|`` first (a threshold) keeps a given
    projection with the least added squared error; round-to-nearest (t = 0.5) is kept when it already
    keeps the whole projection (large shifts).

    Every moved element adds error: the merged value's error against the exact ``W + shift`` is the
    base's own rounding error (unknown, variance 1/12 step²) plus ``move − x``. ``noise_budget`` caps
    the added mean ``(move − x)²`` at that fraction of 1/12 (default :data:`NOISE_BUDGET`); where the
    whole projection would cost more, t rises until the cap is met (less of the knob, less noise),
    but never above 0.5: round-to-nearest's own ``x²`` is always allowed.
    """
    budget = NOISE_BUDGET if noise_budget is None else noise_budget
    a = np.abs(x).astype(np.float64)
    w = weight.astype(np.float64)
    want = float((w * a * a).sum())
    if want == 0.0:
        return 0.5

    def kept(t: float) -> float:
        return float((w * _moves(a, t) * a).sum())

    def noise(t: float) -> float:  # added error as a fraction of the base's rounding noise
        return 12.0 * float((w * (_moves(a, t) - a) ** 2).sum()) / float(w.sum())

    if kept(0.5) >= want:
        return 0.5
    t = _MIN_THRESHOLD if kept(_MIN_THRESHOLD) <= want else _bisect(kept, want, _MIN_THRESHOLD, 0.5)
    cap = noise(0.5) + budget
    if noise(t) > cap:
        t = _bisect(noise, cap, t, 0.5)
    return t


_local = threading.local()


def scratch(key: str, n: int, dtype: type[np.generic]) -> np.ndarray:
    """A reused per-thread buffer of ``n`` items: chunk temporaries that would otherwise be fresh pages
    (page faults, zeroing) on every chunk of every tensor. The caller must be done with the previous
    buffer of the same key in this thread."""
    buf = _local.__dict__.get(key)
    if buf is None or buf.size < n or buf.dtype != dtype:
        buf = _local.__dict__[key] = np.empty(max(n, _CHUNK_ELEMENTS), dtype=dtype)
    return buf[:n]


_F32_MAX = np.float32(np.finfo(np.float32).max)


def _in_steps(
    codec: Codec, blocks: np.ndarray, shift: np.ndarray, reuse: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, ``shift`` in steps of each element's group (0 where the step is 0), steps per group)."""
    q, step, _ = codec.unpack(blocks)
    if np.isnan(step).any():
        raise FormatError(f"its {codec.qtype.name} block scales hold NaN: the file is corrupt")
    n, g = step.shape
    inv = np.zeros_like(step)
    x = scratch("x", shift.size, np.float32) if reuse else np.empty(shift.size, np.float32)
    # a shift of more than float32's steps is clipped to _FAR below; a step too small to invert (an E8M0 scale
    # of 2^-128) gets the largest finite inverse, so that a change there leaves the grid (the block is quantized
    # afresh) and no change stays 0, never NaN
    with np.errstate(over="ignore"):
        np.divide(np.float32(1), step, out=inv, where=step != 0)
        np.clip(inv, -_F32_MAX, _F32_MAX, out=inv)
        np.multiply(shift.reshape(n, g, -1), inv[:, :, None], out=x.reshape(n, g, -1))
    x = x.reshape(n, -1)
    if codec.levels is None:
        return q, x, step
    return q, *_table_steps(codec.levels, q, x, per_element(step, codec.block_size))


def _table_steps(levels: np.ndarray, q: np.ndarray, x: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A shift ``x`` in units of the block scale -> (the shift in table steps, each element's step as a value).

    The target ``levels[q] + x`` lies between two entries ``i`` and ``i + 1`` (beyond the ends: the
    end gap continued) at the fraction ``f`` of their gap; in table steps it is ``i + f − q``, so
    ``q + floor(x + u)`` is entry ``i + 1`` with probability ``f`` (unbiased), ``q + rint(x)`` the
    nearest entry. The step of an element is its gap times the block scale (for noise weights).
    """
    gaps = np.diff(levels)
    with np.errstate(invalid="ignore", over="ignore"):  # infinite targets stay infinite (clipped later)
        v = levels[q] + x
        i = np.clip(np.searchsorted(levels, v, side="right") - 1, 0, levels.size - 2)
        gap = gaps[i]
        x[...] = (v - levels[i]) / gap + (i - q).astype(np.float32)
    return x, step * gap


# The change to add, as an array (one float32 per element) or as a function of an element range that
# returns those elements (a merge decodes a big tensor's vector chunk by chunk).
Shift = Union[np.ndarray, Callable[[int, int], np.ndarray]]


def _source(shift: Shift) -> Callable[[int, int], np.ndarray]:
    if callable(shift):
        return shift
    flat = np.ascontiguousarray(shift, dtype=np.float32).reshape(-1)
    return lambda a, b: flat[a:b]


def _sample(codec: Codec, blocks: np.ndarray, shift: Shift) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, their shift) of a sample: 16 evenly spaced runs of blocks, :data:`_SAMPLE` elements in all.

    Runs rather than single blocks, so that a chunked source decodes a few ranges, not thousands.
    """
    get, n, bs = _source(shift), blocks.shape[0], codec.block_size
    if n * bs <= _SAMPLE:
        return blocks, get(0, n * bs).reshape(n, bs).copy()
    runs = 16
    length = max(1, _SAMPLE // bs // runs)
    starts = np.unique(np.linspace(0, n - length, runs).astype(np.int64))
    b = np.concatenate([blocks[s : s + length] for s in starts])
    # copies: a chunked source may hand out one reused buffer
    sh = np.concatenate([get(int(s) * bs, (int(s) + length) * bs).copy() for s in starts]).reshape(-1, bs)
    return b, sh


def _sample_threshold(codec: Codec, blocks: np.ndarray, shift: Shift, noise_budget: float | None) -> float:
    """Calibrate on a sample of blocks (the whole tensor when it is small)."""
    b, sh = _sample(codec, blocks, shift)
    _, x, step = _in_steps(codec, b, sh)
    return calibrate_threshold(x, per_element(step * step, codec.block_size), noise_budget)


def nearest_keeps(raw: np.ndarray, qtype: QT, shift: Shift) -> tuple[float, float]:
    """(share kept, cosine) of ``shift`` when it is rounded to the nearest point of the base's grid.

    Measured in weight space on a sample of blocks: it tells whether the base type is fine enough
    for this change, or whether the tensor needs a finer type to keep the knob.
    """
    codec = _codec(qtype)
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, codec.type_size)
    b, sh = _sample(codec, blocks, shift)
    want = sh.astype(np.float64)
    q, x, _ = _in_steps(codec, b, sh)
    new = np.clip(q + np.rint(x), codec.qmin, codec.qmax).astype(np.int64)
    step = per_element(codec.unpack(b)[1], codec.block_size)
    got = (codec.values(new) - codec.values(q)) * step
    ref = float((want * want).sum())
    if ref == 0.0:
        return 1.0, 1.0
    dot = float((got * want).sum())
    norm = float(np.sqrt((got * got).sum() * ref))
    return dot / ref, (dot / norm if norm else 0.0)


def dither_noise(raw: np.ndarray, qtype: QT, shift: Shift) -> float:
    """The error ``dither`` rounding of ``shift`` adds, as a share of the tensor's own rounding noise.

    Unbiased rounding moves an element whose shift is ``x`` steps by ``floor(x)`` or ``floor(x) + 1``
    steps, with the probabilities that make the expected move ``x``: its added squared error has the mean
    ``f(1 − f)`` steps², ``f = x − floor(x)``. The base's own rounding error is about ``1/12`` step² per
    element, so the result is ``12 · Σ step² f(1 − f) / Σ step²`` over a sample of blocks: 0 for a shift
    of whole steps, up to 3 for half steps everywhere.
    """
    codec = _codec(qtype)
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, codec.type_size)
    b, sh = _sample(codec, blocks, shift)
    _, x, step = _in_steps(codec, b, sh)
    w = per_element(step * step, codec.block_size).astype(np.float64)
    total = float(w.sum())
    if total == 0.0:
        return 0.0
    f = x.astype(np.float64) - np.floor(x)
    return 12.0 * float((w * f * (1.0 - f)).sum()) / total


def requantize_on_grid(
    raw: np.ndarray,
    qtype: QT,
    shift: Shift,
    rounding: str = "nearest",
    seed: int = 0,
    threads: int = 1,
    *,
    noise_budget: float | None = None,
    refresh_fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Add ``shift`` (float32, one value per element, or a function of an element range) to a quantized
    tensor on its own grid; a function is called once per chunk of blocks, in order.

    Returns the new raw bytes (same type, same scales) and, per block, whether the block's grid cannot
    hold its new values: a code would leave the type's range by more than one step. Such blocks
    should be quantized afresh (the merge does it with ggml). A code that leaves it by one step (the
    extreme element of a block pushed outwards) is clipped instead: that costs at most one step on
    one element, where a fresh quantization would redo the whole block. Elements of a block whose
    step is zero cannot move. ``refresh_fn(block indices, their raw blocks, their shift rows)``, if given,
    returns those blocks quantized afresh; it is called chunk by chunk, while the shift is at hand.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    codec = _codec(qtype)
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, codec.type_size)
    get, bs = _source(shift), codec.block_size
    if not callable(shift) and np.size(shift) != blocks.shape[0] * bs:
        raise CompatibilityError(f"{qtype.name}: {np.size(shift)} shift values for {blocks.shape[0] * bs} elements")
    threshold = _sample_threshold(codec, blocks, shift, noise_budget) if rounding == "calibrated" else 0.5
    out = np.empty_like(blocks)
    refresh = np.zeros(blocks.shape[0], dtype=bool)
    step_blocks = max(1, _CHUNK_ELEMENTS // codec.block_size)

    def chunk(i: int) -> None:
        b0 = i * step_blocks
        b = blocks[b0 : b0 + step_blocks]
        sh = get(b0 * bs, (b0 + len(b)) * bs).reshape(-1, bs)
        q, x, _ = _in_steps(codec, b, sh, reuse=True)
        np.clip(x, -_FAR, _FAR, out=x)  # keeps the int16 moves below exact
        moves = scratch("moves", x.size, np.int16).reshape(x.shape)  # whole steps each code moves
        if rounding == "dither":  # one generator per chunk: the result does not depend on the threads
            x += np.random.default_rng([seed, i]).random(x.shape, dtype=np.float32)
            np.floor(x, out=moves, casting="unsafe")
        elif threshold == 0.5:
            np.rint(x, out=moves, casting="unsafe")
        else:  # sign(x)·floor(|x| + 1 − t)
            a = np.abs(x, out=scratch("abs", x.size, np.float32).reshape(x.shape))
            a += np.float32(1.0 - threshold)
            np.floor(a, out=a)
            np.copysign(a, x, out=moves, casting="unsafe")
        moves += q  # the new codes, still unclipped
        bad = np.zeros(0, dtype=np.int64)
        if moves.size and (moves.min() < codec.qmin - 1 or moves.max() > codec.qmax + 1):
            # rare: find the blocks only then (reductions over short rows are slow)
            bad = np.flatnonzero(((moves < codec.qmin - 1) | (moves > codec.qmax + 1)).any(axis=1))
            refresh[b0 + bad] = True
        np.clip(moves, codec.qmin, codec.qmax, out=moves)
        out[b0 : b0 + len(b)] = codec.pack(b, moves)
        if refresh_fn is not None and bad.size:
            out[b0 + bad] = refresh_fn(b0 + bad, b[bad], sh[bad])

    n_chunks = -(-blocks.shape[0] // step_blocks)
    if threads > 1 and n_chunks > 1:  # numpy releases the GIL in these array operations
        with ThreadPoolExecutor(min(threads, n_chunks)) as pool:
            list(pool.map(chunk, range(n_chunks)))
    else:
        for i in range(n_chunks):
            chunk(i)
    return out.reshape(-1), refresh
