"""Block codecs of the grid types: each block split into integer codes and ``value = step · code + offset``.

Pack and unpack per ggml type (:data:`CODECS`), for the types in :data:`GRID_TYPES`: the legacy and K-quant
families (uniform grids), and the 4-bit types whose grid is a table of 16 unequally spaced values times a
block scale (IQ4_NL, IQ4_XS: ``kvalues_iq4nl``; MXFP4, NVFP4: the E2M1 values; :data:`TABLE_TYPES`). The bit
layouts follow ggml-common.h and are checked against ggml's own dequantizer in the tests. How the codes move
(the roundings) is ``requant.py``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from .errors import CompatibilityError


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
    codec = codec_for(qtype)
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, codec.type_size)
    q, step, offset = codec.unpack(blocks)
    n, g = q.shape[0], step.shape[1]
    return (codec.values(q).reshape(n, g, -1) * step[:, :, None] + offset[:, :, None]).reshape(-1)


def codec_for(qtype: QT) -> Codec:
    """The codec of ``qtype``, or a :class:`CompatibilityError` naming the types that have one."""
    codec = CODECS.get(qtype)
    if codec is None:
        raise CompatibilityError(
            f"no grid codec for {qtype.name}; grid requantization supports {', '.join(sorted(t.name for t in CODECS))}"
        )
    return codec
