"""Requantization on the base's own grid: keep every block's scales, move only its quantized values.

A quantized block stores ``value = step · q + offset`` with small integers ``q`` and per-block (or
per-sub-block) ``step`` and ``offset``. Dequantized base weights sit exactly on that grid, so
``dequant(W) + λΔ`` re-expressed on the same grid is ``q + λΔ / step``: nothing needs to be searched,
only the integer part has to be chosen. Three roundings are offered:

- ``nearest``: ``q + round(λΔ/step)``. Like ggml's requantization, it erases every ``|λΔ|`` below half a
  step, but it is several times faster than ggml's scale search on K-quants.
- ``dither``: ``q + floor(λΔ/step + u)`` with ``u`` uniform in [0, 1) (16 random bits, :func:`dither_offsets`),
  drawn from a generator seeded by the tensor's name. The expected value is ``dequant(W) + λΔ`` (unbiased,
  to 2^-16 of a step), so the knob survives
  on average, at the cost of rounding noise. The same ``u`` is used for every λ, so a tensor moves
  monotonically with λ and λ = 0 gives the base back bit for bit.
- ``calibrated``: the elements with the largest ``|λΔ|`` move by a whole step first, up to a rounding
  threshold set per tensor (:func:`calibrate_threshold`): as much of the knob as a noise budget allows,
  with the least added error for what it keeps.

The codes and steps come from the block codecs (``blockcodec.py``: the types in its ``GRID_TYPES``). On
a table type (IQ4_NL, IQ4_XS, MXFP4, NVFP4) the codes are ranks into the sorted table, and the shift is
measured in *table steps*: a value between two entries sits at the fraction of the gap between them, so
"a step" is the gap to the neighbouring entry, and every rounding above works unchanged (dithering goes
up with the probability of that fraction: still unbiased).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Union

import numpy as np
from gguf import GGMLQuantizationType as QT

from .blockcodec import Codec, codec_for, per_element
from .errors import CompatibilityError, FormatError


class Rounding(str, Enum):
    """How a merged value is rounded: by ggml's quantizer, or on the base's own grid (the three below it)."""

    GGML = "ggml"  # ggml's own quantizer, from the exact merged values (not a rounding of this module)
    NEAREST = "nearest"
    DITHER = "dither"
    CALIBRATED = "calibrated"

    def __str__(self) -> str:
        return self.value


# the roundings on the base's grid (requantize_on_grid)
ROUNDINGS = (Rounding.NEAREST, Rounding.DITHER, Rounding.CALIBRATED)
_SAMPLE = 1 << 16  # elements sampled to calibrate the rounding threshold of one tensor
_MIN_THRESHOLD = 0.01
# calibrated rounding adds at most this share of a tensor's own quantization noise beyond what round-to-nearest
# adds: chosen with benchmarks/fidelity.py (README, 'Requantization and the knob')
NOISE_BUDGET = 0.1
_FAR = 1 << 12  # a shift of more steps than this leaves every grid: clipped to it before integer rounding
_CHUNK_ELEMENTS = 1 << 19  # elements per numpy pass: its temporaries stay a few MB, reused per thread


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
_U16 = np.float32(2.0**-16)


def dither_offsets(seed: int, chunk: int, n: int) -> np.ndarray:
    """``n`` dither offsets ``u`` in [0, 1) for chunk ``chunk`` of the tensor seeded ``seed`` (a per-thread buffer).

    16 random bits per element, ``u = k / 2^16``: the expected move ``E floor(x + u)`` lies within 2^-16 of a
    step below ``x``, and 16 bits are a quarter of one raw 64-bit draw, where numpy's float32 ``random``
    spends a 32-bit draw and a conversion on each value (about 3x the time of this whole function).
    """
    bits = np.random.PCG64([seed, chunk]).random_raw(-(-n // 4)).view(np.uint16)[:n]
    return np.multiply(bits, _U16, out=scratch("dither", n, np.float32))


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
    codec = codec_for(qtype)
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
    codec = codec_for(qtype)
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
    rounding: Rounding | str = Rounding.NEAREST,
    seed: int = 0,
    threads: int = 1,
    *,
    noise_budget: float | None = None,
    refresh_fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
    in_place: bool = False,
    out: np.ndarray | None = None,
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
    ``in_place`` writes the new bytes over ``raw`` (a writable array the caller owns, such as the merge's
    regridded copy of a tensor) instead of a new array of the tensor's size; ``out`` (a writable uint8 array
    of ``raw``'s size) receives them otherwise, if given.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    rounding = Rounding(rounding)
    codec = codec_for(qtype)
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, codec.type_size)
    get, bs = _source(shift), codec.block_size
    if not callable(shift) and np.size(shift) != blocks.shape[0] * bs:
        raise CompatibilityError(f"{qtype.name}: {np.size(shift)} shift values for {blocks.shape[0] * bs} elements")
    threshold = _sample_threshold(codec, blocks, shift, noise_budget) if rounding is Rounding.CALIBRATED else 0.5
    if in_place and not blocks.flags.writeable:
        raise ValueError("in_place needs a writable array")
    if out is not None and (in_place or out.dtype != np.uint8 or out.nbytes != blocks.nbytes):
        raise ValueError(f"out must be a uint8 array of {blocks.nbytes} bytes, and not with in_place")
    if in_place:
        out = blocks
    else:
        out = np.empty_like(blocks) if out is None else out.reshape(blocks.shape)
    refresh = np.zeros(blocks.shape[0], dtype=bool)
    step_blocks = max(1, _CHUNK_ELEMENTS // codec.block_size)

    def chunk(i: int) -> None:
        b0 = i * step_blocks
        b = blocks[b0 : b0 + step_blocks]
        sh = get(b0 * bs, (b0 + len(b)) * bs).reshape(-1, bs)
        q, x, _ = _in_steps(codec, b, sh, reuse=True)
        if x.size and (x.min() < -_FAR or x.max() > _FAR):  # keeps the int16 moves below exact (NaN: caller's)
            np.clip(x, -_FAR, _FAR, out=x)
        moves = scratch("moves", x.size, np.int16).reshape(x.shape)  # whole steps each code moves
        if rounding is Rounding.DITHER:  # one generator per chunk: the result does not depend on the threads
            x += dither_offsets(seed, i, x.size).reshape(x.shape)
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
            # find the blocks only then, from the elements (an any() over short rows is slow): on a Q8_0 grid
            # made from the tensor's own values every block has a code at ±127, so this is not rare there
            off = np.flatnonzero((moves < codec.qmin - 1) | (moves > codec.qmax + 1))
            hit = np.zeros(len(b), dtype=bool)
            hit[off // bs] = True  # moves is (blocks, block size)
            bad = np.flatnonzero(hit)
            refresh[b0 + bad] = True
        np.clip(moves, codec.qmin, codec.qmax, out=moves)
        fresh = refresh_fn(b0 + bad, b[bad], sh[bad]) if refresh_fn is not None and bad.size else None
        out[b0 : b0 + len(b)] = codec.pack(b, moves)  # b may be out itself (in_place): read above, written here
        if fresh is not None:
            out[b0 + bad] = fresh

    n_chunks = -(-blocks.shape[0] // step_blocks)
    if threads > 1 and n_chunks > 1:  # numpy releases the GIL in these array operations
        with ThreadPoolExecutor(min(threads, n_chunks)) as pool:
            list(pool.map(chunk, range(n_chunks)))
    else:
        for i in range(n_chunks):
            chunk(i)
    return out.reshape(-1), refresh
