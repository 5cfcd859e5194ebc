"""A thin ctypes binding to the ggml that llama-cpp-python ships (``llama_cpp/lib/libggml-base.*``).

Only what the merge needs: type traits, row sizes, dequantization (``to_float``) and quantization
(``ggml_quantize_chunk``). Everything here works on numpy arrays of float32 rows and raw bytes.
ggml aborts the process on a failed assertion, so every precondition is checked in Python first.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

from .errors import AlignVecError, CompatibilityError

# The types ggml_quantize_chunk has a case for (ggml/src/ggml.c); all others assert.
QUANTIZABLE: frozenset[QT] = frozenset(
    {QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0}
    | {QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.TQ1_0, QT.TQ2_0}
    | {QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S, QT.IQ1_S, QT.IQ1_M}
    | {QT.IQ4_NL, QT.IQ4_XS, QT.MXFP4, QT.NVFP4, QT.Q1_0}
)

_to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


class GGUFInitParams(ctypes.Structure):
    """``struct gguf_init_params`` (ggml/include/gguf.h)."""

    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _library_path() -> Path:
    override = os.environ.get("ALIGNVEC_GGML_LIB")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise AlignVecError("llama-cpp-python is not installed: pip install llama-cpp-python")
    libdir = Path(spec.origin).parent / "lib"
    names = {"darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
    path = libdir / names.get(sys.platform, "libggml-base.so")
    if not path.exists():
        raise AlignVecError(f"ggml library not found at {path}; set ALIGNVEC_GGML_LIB to libggml-base")
    return path


@cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_library_path()))
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    # for loading a model from memory (direct.py): GGUF metadata contexts and backend tensors
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, GGUFInitParams]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.gguf_free.restype = None
    lib.gguf_find_tensor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_find_tensor.restype = ctypes.c_int64
    lib.gguf_set_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    lib.gguf_set_tensor_type.restype = None
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_set.restype = None
    return lib


_CPU_NAMES = {"darwin": "libggml-cpu.dylib", "win32": "ggml-cpu.dll"}


@cache
def _cpu_lib() -> ctypes.CDLL | None:
    """``libggml-cpu`` beside ``libggml-base``, for its SIMD F16/BF16 <-> F32 conversions; None if absent.

    ggml-base's own row conversions are scalar (about 10x slower); builds that load CPU backends
    dynamically (one library per CPU variant) have no plain ``libggml-cpu``, and then those are used.
    """
    path = _library_path().with_name(_CPU_NAMES.get(sys.platform, "libggml-cpu.so"))
    try:
        cpu = ctypes.CDLL(str(path))
        cpu.ggml_cpu_init.argtypes = []
        cpu.ggml_cpu_init.restype = None
        for fn in ("ggml_cpu_fp16_to_fp32", "ggml_cpu_bf16_to_fp32", "ggml_cpu_fp32_to_fp16", "ggml_cpu_fp32_to_bf16"):
            getattr(cpu, fn).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            getattr(cpu, fn).restype = None
    except (OSError, AttributeError):
        return None
    cpu.ggml_cpu_init()  # fills the conversion tables the scalar tails use
    return cpu


def _convert(fn_name: str, src: np.ndarray, s_item: int, dst: np.ndarray, d_item: int, n: int) -> bool:
    """Run a ggml-cpu row conversion over ``n`` values (``s_item`` -> ``d_item`` bytes each) in parallel slices.

    Returns False, doing nothing, where there is no ggml-cpu library.
    """
    cpu = _cpu_lib()
    if cpu is None:
        return False
    fn = getattr(cpu, fn_name)
    slices = np.linspace(0, n, min(_threads(), max(1, n >> 22)) + 1, dtype=np.int64)

    def run(i: int) -> None:
        a, b = int(slices[i]), int(slices[i + 1])
        fn(src.ctypes.data + a * s_item, dst.ctypes.data + a * d_item, b - a)

    if len(slices) == 2:
        run(0)
    else:
        with ThreadPoolExecutor(len(slices) - 1) as pool:
            list(pool.map(run, range(len(slices) - 1)))
    return True


def lib() -> ctypes.CDLL:
    """The bound ``libggml-base`` (for the few callers that need ggml's GGUF and backend API)."""
    return _lib()


@dataclass(frozen=True)
class TypeInfo:
    """What ggml says about one tensor type."""

    qtype: QT
    name: str
    block_size: int
    type_size: int
    is_quantized: bool


@cache
def type_info(qtype: QT) -> TypeInfo:
    t = _lib().ggml_get_type_traits(int(qtype)).contents
    return TypeInfo(QT(qtype), t.type_name.decode(), int(t.blck_size), int(t.type_size), bool(t.is_quantized))


@cache
def _to_float(qtype: QT) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    ptr = _lib().ggml_get_type_traits(int(qtype)).contents.to_float
    return _to_float_t(ptr) if ptr else None


def row_size(qtype: QT, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` elements."""
    return int(_lib().ggml_row_size(int(qtype), n_per_row))


def requires_imatrix(qtype: QT) -> bool:
    return bool(_lib().ggml_quantize_requires_imatrix(int(qtype)))


def can_quantize(qtype: QT, n_per_row: int, has_imatrix: bool = False) -> bool:
    """Whether ggml can quantize rows of this length to ``qtype`` (with or without an importance matrix)."""
    return (
        qtype in QUANTIZABLE
        and n_per_row % type_info(qtype).block_size == 0
        and (has_imatrix or not requires_imatrix(qtype))
    )


_FAST_TO_F32 = {QT.F16: "ggml_cpu_fp16_to_fp32", QT.BF16: "ggml_cpu_bf16_to_fp32"}
_FAST_FROM_F32 = {QT.F16: "ggml_cpu_fp32_to_fp16", QT.BF16: "ggml_cpu_fp32_to_bf16"}


def default_threads() -> int:
    """The cores this process may use."""
    return _threads()


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def dequantize(data: np.ndarray, qtype: QT, n_elements: int, out: np.ndarray | None = None) -> np.ndarray:
    """Raw bytes (or a float array) of ``n_elements`` values of ``qtype`` -> flat float32 array.

    ``out``, if given, is a contiguous float32 array of ``n_elements`` that receives the values.
    """
    if out is not None and (out.dtype != np.float32 or out.size != n_elements or not out.flags.c_contiguous):
        raise ValueError(f"out must be a contiguous float32 array of {n_elements} values")
    if qtype == QT.F32:
        values = np.frombuffer(np.ascontiguousarray(data).data, dtype=np.float32, count=n_elements)
        if out is None:
            return values.copy()
        out[...] = values
        return out
    src = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    info = type_info(qtype)
    if n_elements % info.block_size or src.nbytes != n_elements // info.block_size * info.type_size:
        raise CompatibilityError(f"{info.name}: {src.nbytes} bytes do not hold {n_elements} elements")
    fn = _to_float(qtype)
    if fn is None and qtype not in _FAST_TO_F32:
        raise CompatibilityError(f"ggml cannot dequantize type {info.name}")
    if out is None:
        out = np.empty(n_elements, dtype=np.float32)
    if qtype in _FAST_TO_F32 and _convert(_FAST_TO_F32[qtype], src, 2, out, 4, n_elements):
        return out
    assert fn is not None
    fn(src.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n_elements)
    return out


def quantize(
    rows: np.ndarray,
    qtype: QT,
    imatrix: np.ndarray | None = None,
    *,
    threads: int | None = None,
) -> np.ndarray:
    """Quantize a 2-D float32 array (rows x n_per_row) with ggml; returns the raw bytes as uint8.

    ``imatrix`` is the importance of each input column: ``(n_per_row,)`` for a matrix, or
    ``(n_matrices, n_per_row)`` for stacked matrices (MoE experts), whose rows are then split evenly
    between the matrices. Row blocks run in parallel threads (ctypes releases the GIL); the result is
    byte-identical to a single call because ggml quantizes every row independently.
    """
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError("quantize expects a 2-D array of rows")
    nrows, n_per_row = rows.shape
    info = type_info(qtype)
    if qtype not in QUANTIZABLE:
        raise CompatibilityError(f"ggml cannot quantize to {info.name}")
    if n_per_row % info.block_size:
        raise CompatibilityError(f"{info.name} needs rows that are a multiple of {info.block_size}, got {n_per_row}")
    if requires_imatrix(qtype) and imatrix is None:
        raise CompatibilityError(f"{info.name} needs an importance matrix")
    n_mat = 1
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.ndim == 1:
            imatrix = imatrix.reshape(1, -1)
        n_mat = imatrix.shape[0]
        if imatrix.ndim != 2 or imatrix.shape[1] != n_per_row or nrows % n_mat:
            raise ValueError(f"imatrix must be (n_matrices, {n_per_row}) dividing {nrows} rows, got {imatrix.shape}")
        if not np.all(np.isfinite(imatrix)):
            raise CompatibilityError("the importance matrix has NaN or infinite values")
    if qtype in _FAST_FROM_F32 and imatrix is None:
        out = np.empty(rows.size * 2, dtype=np.uint8)
        if _convert(_FAST_FROM_F32[qtype], rows, 4, out, 2, rows.size):
            return out
    lib = _lib()
    lib.ggml_quantize_init(int(qtype))  # not thread-safe to race on first use: initialize once up front
    rsize = row_size(qtype, n_per_row)
    out = np.empty(nrows * rsize, dtype=np.uint8)
    per_mat = nrows // n_mat

    def run(r0: int, r1: int) -> None:
        imat_ptr = None if imatrix is None else imatrix[r0 // per_mat].ctypes.data
        n = lib.ggml_quantize_chunk(
            int(qtype), rows.ctypes.data, out.ctypes.data, r0 * n_per_row, r1 - r0, n_per_row, imat_ptr
        )
        assert n == (r1 - r0) * rsize

    n_threads = min(threads or _threads(), max(1, nrows // 16))
    # chunks never cross a matrix boundary, so each gets one matrix's importance vector
    chunks: list[tuple[int, int]] = []
    for m in range(n_mat):
        bounds = np.linspace(m * per_mat, (m + 1) * per_mat, max(1, n_threads // n_mat) + 1, dtype=np.int64)
        chunks += [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    if n_threads == 1 or len(chunks) == 1:
        for r0, r1 in chunks:
            run(r0, r1)
    else:
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(lambda c: run(*c), chunks))
    return out
