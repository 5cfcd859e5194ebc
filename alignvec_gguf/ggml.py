"""A thin ctypes binding to the ggml that llama-cpp-python ships (``llama_cpp/lib/libggml-base.*``).

Only what the merge needs: type traits, row sizes, dequantization (``to_float``) and quantization
(``ggml_quantize_chunk``). Everything here works on numpy arrays of float32 rows and raw bytes.
ggml aborts the process on a failed assertion, so every precondition is checked in Python first.

Long module: every ggml symbol the project calls is bound here and nowhere else (as llama-cpp-python keeps
its binding in ``llama_cpp.py``), so the checks that keep ggml's assertions from aborting sit next to the
calls they guard.
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
        try:  # the SIMD Q8_0 row quantizer llama.cpp runs on activations (quantize(..., exact=False))
            cpu.quantize_row_q8_0.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            cpu.quantize_row_q8_0.restype = None
        except AttributeError:
            pass
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
    if n < 2 << 22:  # one slice (a merge's chunks): no thread pool, and no Python work that holds the GIL
        fn(src.ctypes.data, dst.ctypes.data, n)
        return True
    slices = np.linspace(0, n, min(_threads(), n >> 22) + 1, dtype=np.int64)

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
    exact: bool = True,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Quantize a 2-D float32 array (rows x n_per_row) with ggml; returns the raw bytes as uint8.

    ``imatrix`` is the importance of each input column: ``(n_per_row,)`` for a matrix, or
    ``(n_matrices, n_per_row)`` for stacked matrices (MoE experts), whose rows are then split evenly
    between the matrices. Row blocks run in parallel threads (ctypes releases the GIL); the result is
    byte-identical to a single call because ggml quantizes every row independently.

    ``exact=False`` lets Q8_0 without an importance matrix go through the CPU backend's SIMD row quantizer
    (the one llama.cpp runs on activations), 10-25x faster than the file quantizer ``ggml_quantize_chunk``
    (scalar ``roundf``): it rounds ties to even and computes the inverse scale as ``127 / max``, so about
    2 elements in a million land one step apart (on random weights); the default keeps the file
    quantizer's bytes exactly. ``out``, if given, is a contiguous uint8 array of the result's size that
    receives the bytes (a slice of a larger buffer: no copy).
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
    rsize = row_size(qtype, n_per_row)
    if out is None:
        out = np.empty(nrows * rsize, dtype=np.uint8)
    elif out.dtype != np.uint8 or out.size != nrows * rsize or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous uint8 array of {nrows * rsize} bytes")
    if qtype in _FAST_FROM_F32 and imatrix is None and _convert(_FAST_FROM_F32[qtype], rows, 4, out, 2, rows.size):
        return out
    lib = _lib()
    lib.ggml_quantize_init(int(qtype))  # not thread-safe to race on first use: initialize once up front
    per_mat = nrows // n_mat
    cpu = _cpu_lib() if not exact and qtype == QT.Q8_0 and imatrix is None else None
    simd = getattr(cpu, "quantize_row_q8_0", None)

    def run(r0: int, r1: int) -> None:
        if simd is not None:
            simd(rows.ctypes.data + r0 * n_per_row * 4, out.ctypes.data + r0 * rsize, (r1 - r0) * n_per_row)
            return
        imat_ptr = None if imatrix is None else imatrix[r0 // per_mat].ctypes.data
        n = lib.ggml_quantize_chunk(
            int(qtype), rows.ctypes.data, out.ctypes.data, r0 * n_per_row, r1 - r0, n_per_row, imat_ptr
        )
        assert n == (r1 - r0) * rsize

    n_threads = min(threads or _threads(), max(1, nrows // 16))
    # chunks never cross a matrix boundary, so each gets one matrix's importance vector
    chunks: list[tuple[int, int]] = [(0, nrows)] if n_threads == 1 and n_mat == 1 else []
    for m in range(n_mat if not chunks else 0):
        bounds = np.linspace(m * per_mat, (m + 1) * per_mat, max(1, n_threads // n_mat) + 1, dtype=np.int64)
        chunks += [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    if n_threads == 1 or len(chunks) == 1:
        for r0, r1 in chunks:
            run(r0, r1)
    else:
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(lambda c: run(*c), chunks))
    return out


# --- ggml's backend registry (libggml): which buffer types the CPU backend offers for weights -----------

_BACKEND_NAMES = {"darwin": "libggml.dylib", "win32": "ggml.dll"}
_DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL", 4: "META"}
_TENSOR_BUFFER_OFFSET = 8  # struct ggml_tensor { enum ggml_type type; ggml_backend_buffer * buffer; ...


class _InitParams(ctypes.Structure):
    """``struct ggml_init_params`` (ggml/include/ggml.h)."""

    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _Feature(ctypes.Structure):
    """``struct ggml_backend_feature`` (ggml/include/ggml-backend.h)."""

    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


_extra_bufts_t = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)
_get_features_t = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)


def _sig(lib: ctypes.CDLL, name: str, args: list, res: object) -> None:
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = args, res


@cache
def _backend_lib() -> ctypes.CDLL | None:
    """``libggml`` beside ``libggml-base`` (the backend registry); None where the build has none."""
    path = _library_path().with_name(_BACKEND_NAMES.get(sys.platform, "libggml.so"))
    try:
        reg = ctypes.CDLL(str(path))
        P, S = ctypes.c_void_p, ctypes.c_char_p
        _sig(reg, "ggml_backend_reg_by_name", [S], P)
        _sig(reg, "ggml_backend_reg_get_proc_address", [P, S], P)
        _sig(reg, "ggml_backend_dev_by_type", [ctypes.c_int], P)
        _sig(reg, "ggml_backend_dev_count", [], ctypes.c_size_t)
        _sig(reg, "ggml_backend_dev_get", [ctypes.c_size_t], P)
    except (OSError, AttributeError):
        return None
    base = _lib()
    P = ctypes.c_void_p
    _sig(base, "ggml_backend_dev_name", [P], ctypes.c_char_p)
    _sig(base, "ggml_backend_dev_type", [P], ctypes.c_int)
    _sig(base, "ggml_backend_dev_supports_op", [P, P], ctypes.c_bool)
    _sig(base, "ggml_backend_buft_name", [P], ctypes.c_char_p)
    _sig(base, "ggml_backend_buft_alloc_buffer", [P, ctypes.c_size_t], P)
    _sig(base, "ggml_backend_buffer_free", [P], None)
    _sig(base, "ggml_tensor_overhead", [], ctypes.c_size_t)
    _sig(base, "ggml_init", [_InitParams], P)
    _sig(base, "ggml_free", [P], None)
    _sig(base, "ggml_new_tensor_2d", [P, ctypes.c_int, ctypes.c_int64, ctypes.c_int64], P)
    _sig(base, "ggml_mul_mat", [P, P, P], P)
    return reg


def devices() -> list[tuple[str, str]]:
    """(name, kind) of every device ggml's registry knows: ``("CPU", "CPU")``, ``("CUDA0", "GPU")``..."""
    reg = _backend_lib()
    if reg is None:
        return []
    base = _lib()
    out = []
    for i in range(int(reg.ggml_backend_dev_count())):
        dev = reg.ggml_backend_dev_get(i)
        out.append((base.ggml_backend_dev_name(dev).decode(), _DEVICE_TYPES.get(base.ggml_backend_dev_type(dev), "?")))
    return out


def cpu_extra_buffer_types() -> dict[str, int]:
    """name -> handle of each extra buffer type the CPU backend offers for weights, in llama.cpp's order.

    llama.cpp (``make_cpu_buft_list``) tries these before the plain CPU buffer for every weight, first
    match wins: ``AMX`` (built with AMX and the kernel granted the tile state), ``KLEIDIAI``,
    ``CPU_REPACK`` (interleaved layouts for Q4_0/Q4_K/IQ4_NL/... on AVX2 and NEON).
    """
    reg = _backend_lib()
    if reg is None:
        return {}
    cpu_reg = reg.ggml_backend_reg_by_name(b"CPU")
    cpu_dev = reg.ggml_backend_dev_by_type(0)
    if not cpu_reg or not cpu_dev:
        return {}
    addr = reg.ggml_backend_reg_get_proc_address(cpu_reg, b"ggml_backend_dev_get_extra_bufts")
    if not addr:
        return {}
    bufts = _extra_bufts_t(addr)(cpu_dev)
    out: dict[str, int] = {}
    i = 0
    while bufts and bufts[i]:
        out[_lib().ggml_backend_buft_name(bufts[i]).decode()] = int(bufts[i])
        i += 1
    return out


def cpu_backend_features() -> dict[str, str]:
    """The CPU backend's own account of its build (``AVX2``, ``AVX512``, ``AMX_INT8``, ``REPACK``...)."""
    reg = _backend_lib()
    cpu_reg = reg.ggml_backend_reg_by_name(b"CPU") if reg is not None else None
    addr = reg.ggml_backend_reg_get_proc_address(cpu_reg, b"ggml_backend_get_features") if reg and cpu_reg else None
    if not addr:
        return {}
    feats = _get_features_t(addr)(cpu_reg)
    out: dict[str, str] = {}
    i = 0
    while feats and feats[i].name:
        out[feats[i].name.decode()] = (feats[i].value or b"").decode()
        i += 1
    return out


def buft_takes_weight(buft: int, qtype: QT, ne0: int, ne1: int) -> bool:
    """Whether the CPU backend computes ``mul_mat(W, x)`` with W (``ne0`` x ``ne1``, ``qtype``) in ``buft``.

    The same question llama.cpp asks before it places a weight in an extra buffer type
    (``weight_buft_supported`` in src/llama-model-loader.cpp): a metadata-only mul_mat whose weight sits
    in a zero-size buffer of that type, put to the CPU device's ``supports_op``.
    """
    reg = _backend_lib()
    if reg is None:
        return False
    base = _lib()
    cpu_dev = reg.ggml_backend_dev_by_type(0)
    ctx = base.ggml_init(_InitParams(base.ggml_tensor_overhead() * 8, None, True))
    if not ctx or not cpu_dev:
        return False
    buf = base.ggml_backend_buft_alloc_buffer(ctypes.c_void_p(buft), 0)
    try:
        w = base.ggml_new_tensor_2d(ctx, int(qtype), ne0, ne1)
        x = base.ggml_new_tensor_2d(ctx, int(QT.F32), ne0, 512)
        op = base.ggml_mul_mat(ctx, w, x)
        ctypes.c_void_p.from_address(w + _TENSOR_BUFFER_OFFSET).value = buf
        return bool(base.ggml_backend_dev_supports_op(cpu_dev, op))
    finally:
        if buf:
            base.ggml_backend_buffer_free(buf)
        base.ggml_free(ctx)
