"""Where llama.cpp may put a model's weights on this CPU, and the one place this package builds a ``Llama``.

On Intel CPUs with AMX (Sapphire Rapids and later: ``amx_int8`` in /proc/cpuinfo), a native build of
llama-cpp-python 0.3.36 offers the ``AMX`` buffer type first, puts Q4_K/Q6_K/... weights there, and
``ggml_backend_amx_mul_mat`` segfaults on the first decode (llama.cpp #20824). llama.cpp has no switch
for that one buffer type: ``use_extra_bufts = false`` drops every extra buffer type, the CPU weight
repacking (``CPU_REPACK``, the interleaved Q4_0/Q4_K layouts that make decode fast on AVX2) included.

The guard: where the CPU backend offers ``AMX`` (and the user has not opted in to it), a model is loaded
with ``use_extra_bufts = false`` plus ``tensor_buft_overrides`` that pin each weight the repack buffer
takes (asked of ggml itself: :func:`ggml.buft_takes_weight`, llama.cpp's own test) to ``CPU_REPACK``.
Weights only AMX would take stay in plain CPU memory. So nothing reaches the AMX kernel and the repacked
decode speed is kept (``benchmarks/cpu.py`` measures both; README, "Intel CPUs with AMX").

Opt in to llama.cpp's own choice, AMX included, with ``ALIGNVEC_AMX=allow`` or ``allow_amx=True``;
``ALIGNVEC_AMX=avoid`` applies the guard on any CPU (what the tests use to run the guarded path
everywhere). ``alignvec doctor`` shows the decision.

``Llama`` takes no model-params hook, so :func:`new_llama` reaches llama.cpp's loader through one
wrapper of ``llama_cpp.llama_cpp.llama_model_load_from_file``, installed once, that consults a context
variable: a load started by :func:`new_llama` sees its own parameters or loader, every other load (another
thread, a user's own ``Llama``) reaches the original function unchanged. Nothing else in the package
touches llama-cpp-python's globals.
"""

from __future__ import annotations

import contextvars
import ctypes
import logging
import os
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gguf import GGMLQuantizationType as QT

from . import ggml
from .errors import AlignVecError, InputError

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

ENV = "ALIGNVEC_AMX"
MODES = ("auto", "avoid", "allow")
AMX = "AMX"
REPACK = "CPU_REPACK"
# weights that llama.cpp multiplies (mul_mat) and may repack; a name outside this list (embeddings read
# with get_rows, norms, biases, architecture-specific projections) is never pinned and stays plain CPU
_MATMUL = re.compile(
    r"^(?:blk\.(?P<layer>\d+)\.)?(?P<role>attn_q|attn_k|attn_v|attn_qkv|attn_output|ffn_gate|ffn_up|ffn_down|"
    r"ffn_gate_up|output)\.weight$"
)

# A loader takes (path: bytes, llama_model_params) and returns a llama_model pointer (or None).
Loader = Callable[[bytes, Any], Any]
_hook: contextvars.ContextVar[Callable[[bytes, Any, Loader], Any] | None] = contextvars.ContextVar(
    "alignvec_model_loader", default=None
)
_install_lock = threading.Lock()
_original: Loader | None = None
_process_wide: Callable[[bytes, Any, Loader], Any] | None = None  # set by guard_process()


class _BuftOverride(ctypes.Structure):
    """``struct llama_model_tensor_buft_override`` (include/llama.h), which llama-cpp-python does not bind."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@dataclass(frozen=True)
class BufferPlan:
    """How one model is to be loaded: llama.cpp's default, or the guard (and what it pins)."""

    guarded: bool
    reason: str
    pinned: tuple[str, ...] = ()  # regex patterns of the weights pinned to CPU_REPACK
    pinned_tensors: int = 0
    extra_buffer_types: tuple[str, ...] = ()

    def describe(self) -> str:
        if not self.guarded:
            return f"llama.cpp's default buffer selection ({self.reason})"
        return f"AMX avoided: {self.reason}; {self.pinned_tensors} weights pinned to {REPACK}"


@dataclass
class _Applied:
    """What a guarded load handed to llama.cpp; kept alive as long as the model (it owns the C strings)."""

    plan: BufferPlan
    overrides: Any = None
    patterns: list[bytes] = field(default_factory=list)


def mode(allow_amx: bool | None = None, env: Mapping[str, str] | None = None) -> str:
    """The user's choice: ``allow_amx`` (a keyword) over ``ALIGNVEC_AMX`` over ``auto``."""
    if allow_amx is not None:
        return "allow" if allow_amx else "avoid"
    value = (os.environ if env is None else env).get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise InputError(f"{ENV}={value!r} is not one of {', '.join(MODES)}")
    return value


def extra_buffer_types() -> tuple[str, ...]:
    """The CPU backend's extra weight buffer types in llama.cpp's order (``("AMX", "CPU_REPACK")``...)."""
    return tuple(ggml.cpu_extra_buffer_types())


def decide(extra: tuple[str, ...], choice: str) -> tuple[bool, str]:
    """Whether to guard, and why, from the buffer types the CPU backend offers and the user's choice."""
    if choice == "allow":
        return False, f"{ENV}=allow or allow_amx=True"
    if choice == "avoid":
        return True, f"{ENV}=avoid or allow_amx=False"
    if AMX in extra:
        return True, "this CPU and llama.cpp build would put weights in the AMX buffer (llama.cpp #20824 segfaults)"
    return False, "no AMX buffer type on this CPU and build"


def _tensors(path: Path) -> list[tuple[str, QT, tuple[int, ...]]]:
    from .ggufread import GGUFModel

    return [(t.name, t.tensor_type, t.info.ne) for t in GGUFModel(path, "model")]


def _patterns(names: list[str]) -> list[str]:
    """Short ECMAScript regexes matching exactly ``names`` (llama.cpp compiles each one per tensor)."""
    by_role: dict[str, list[int]] = defaultdict(list)
    single: list[str] = []
    for name in names:
        m = _MATMUL.match(name)
        if m and m["layer"] is not None:
            by_role[m["role"]].append(int(m["layer"]))
        else:
            single.append(re.escape(name))
    out = [rf"^blk\.(?:{'|'.join(str(i) for i in sorted(set(ls)))})\.{role}\.weight$" for role, ls in by_role.items()]
    if single:
        out.append(rf"^(?:{'|'.join(single)})$")
    return out


def plan(
    path: str | os.PathLike[str],
    *,
    allow_amx: bool | None = None,
    offload: bool = False,
    extra: tuple[str, ...] | None = None,
    tensors: list[tuple[str, QT, tuple[int, ...]]] | None = None,
) -> BufferPlan:
    """The buffer plan for loading ``path`` here (``offload``: layers go to a GPU; then nothing is pinned).

    ``tensors`` (name, type, ggml ``ne``) replaces the file's own list, for a model built in memory whose
    types differ from the file's (``direct.py``).
    """
    extra = extra_buffer_types() if extra is None else extra
    guarded, reason = decide(extra, mode(allow_amx))
    if not guarded:
        return BufferPlan(False, reason, extra_buffer_types=extra)
    buft = ggml.cpu_extra_buffer_types().get(REPACK)
    if offload or REPACK not in extra or buft is None:
        why = "GPU offload" if offload else f"no {REPACK} buffer in this build"
        return BufferPlan(True, f"{reason}; weights not repacked ({why})", extra_buffer_types=extra)
    try:
        tensors = _tensors(Path(path)) if tensors is None else tensors
    except (AlignVecError, OSError) as e:  # llama.cpp will say what is wrong with the file; load it guarded
        log.debug("buffer plan: cannot read %s (%s); no weights pinned", path, e)
        return BufferPlan(True, reason, extra_buffer_types=extra)
    takes: dict[tuple[QT, int, int], bool] = {}
    pinned = []
    for name, qtype, ne in tensors:
        if len(ne) != 2 or not _MATMUL.match(name):
            continue
        key = (qtype, int(ne[0]), int(ne[1]))
        if key not in takes:
            takes[key] = ggml.buft_takes_weight(buft, *key)
        if takes[key]:
            pinned.append(name)
    return BufferPlan(True, reason, tuple(_patterns(pinned)), len(pinned), extra)


def _install() -> None:
    """Route llama-cpp-python's model loads through :func:`_dispatch` (once per process)."""
    global _original
    with _install_lock:
        if _original is not None:
            return
        import llama_cpp.llama_cpp as C

        _original = C.llama_model_load_from_file
        C.llama_model_load_from_file = _dispatch


def _dispatch(path_model: bytes, params: Any) -> Any:
    assert _original is not None
    hook = _hook.get() or _process_wide
    if hook is None:  # not a load of ours: exactly llama-cpp-python's own call
        return _original(path_model, params)
    return hook(path_model, params, _original)


def _guarded_params(params: Any, applied: _Applied) -> Any:
    """A copy of llama.cpp's model params with the guard applied (the copy's arrays live in ``applied``)."""
    import llama_cpp.llama_cpp as C

    p = C.llama_model_params.from_buffer_copy(params)
    p.use_extra_bufts = False
    if applied.plan.pinned:
        buft = ggml.cpu_extra_buffer_types()[REPACK]
        applied.patterns = [s.encode() for s in applied.plan.pinned]
        arr = (_BuftOverride * (len(applied.patterns) + 1))()
        for i, pattern in enumerate(applied.patterns):
            arr[i].pattern = pattern
            arr[i].buft = buft
        applied.overrides = arr  # the last entry stays zeroed: the terminator llama.cpp looks for
        p.tensor_buft_overrides = ctypes.addressof(arr)  # type: ignore[assignment]
    return p


def new_llama(
    model_path: str | os.PathLike[str],
    *,
    allow_amx: bool | None = None,
    loader: Loader | None = None,
    buffers: BufferPlan | None = None,
    **llama_kwargs: Any,
) -> Llama:
    """``llama_cpp.Llama(model_path, **llama_kwargs)``, with the AMX guard where this CPU needs it.

    ``allow_amx`` overrides ``ALIGNVEC_AMX`` (True: llama.cpp's default selection; False: guard on any
    CPU). ``loader``, if given, replaces llama.cpp's file loader for this one load (``direct.py`` builds the
    model from memory); it receives the (guarded) model params. ``buffers`` replaces the computed
    :func:`plan` (benchmarks/cpu.py compares plans). The plan used is ``llm.alignvec_buffers``.
    """
    from llama_cpp import Llama

    if buffers is None:
        gpu = any(kind != "CPU" for _, kind in ggml.devices())
        offload = gpu and int(llama_kwargs.get("n_gpu_layers", 0) or 0) != 0
        buffers = plan(model_path, allow_amx=allow_amx, offload=offload)
    applied = _Applied(buffers)

    def hook(path: bytes, params: Any, original: Loader) -> Any:
        if buffers.guarded:
            params = _guarded_params(params, applied)
        return (loader or original)(path, params)

    _install()
    token = _hook.set(hook)
    try:
        llm = Llama(model_path=str(model_path), **llama_kwargs)
    finally:
        _hook.reset(token)
    llm.alignvec_buffers = buffers  # type: ignore[attr-defined]
    llm._alignvec_buffer_overrides = applied  # type: ignore[attr-defined]
    if buffers.guarded:
        log.debug("%s: %s", Path(model_path).name, buffers.describe())
    return llm


def guard_process(*, allow_amx: bool | None = None) -> None:
    """Apply the guard to every model this process loads, ``llama_cpp.Llama(...)`` built by anyone included.

    For programs that build their own ``Llama`` (llama-cpp-python's OpenAI server, for one)::

        python -c "import alignvec_gguf.cpu as c, runpy; c.guard_process(); runpy.run_module('llama_cpp.server', \\
            run_name='__main__')" --model merged.gguf

    Loads through :func:`new_llama` keep their own plan. The decision is made per model, as there.
    """
    global _process_wide

    def hook(path: bytes, params: Any, original: Loader) -> Any:
        applied = _Applied(plan(path.decode(), allow_amx=allow_amx))  # alive during the load, when llama.cpp reads it
        return original(path, _guarded_params(params, applied) if applied.plan.guarded else params)

    _install()
    _process_wide = hook


def system_report(model: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What ``alignvec doctor`` prints: the llama.cpp build, CPU features, buffer types and the decision."""
    import llama_cpp

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    extra = extra_buffer_types()
    choice = mode()
    guarded, reason = decide(extra, choice)
    report: dict[str, Any] = {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "cpu_backend_features": ggml.cpu_backend_features(),
        "cpu_flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16")},
        "devices": [f"{name} ({kind})" for name, kind in ggml.devices()],
        "cpu_extra_buffer_types": list(extra),
        ENV: os.environ.get(ENV, "auto"),
        "guard": "on" if guarded else "off",
        "reason": reason,
    }
    if model is not None:
        p = plan(model)
        report["model"] = str(model)
        report["model_buffers"] = p.describe()
        report["model_pinned_to_repack"] = p.pinned_tensors
    return report
