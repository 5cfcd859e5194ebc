"""Live knobs: one loaded base model, any number of low-rank AVs, λ chosen per call with no reload.

Low-rank AVs are llama.cpp LoRA adapters (``adapter.lora.alpha`` and the factors are written so that
llama.cpp's scale is λ itself). :class:`LiveModel` loads the base once, loads every AV as a runtime
adapter (``llama_adapter_lora_init``) and, for each call, sets the adapters' scales to that call's λ
(``llama_set_adapters_lora``): ``W x + Σ λ_i B_i A_i x``, the same model as merging
``W + Σ λ_i B_i A_i``, without rewriting a single weight.

One llama.cpp context runs one sequence at a time, so calls are serialized by a lock: a
``LiveModel`` is safe to share between threads (a web server's workers), and concurrent requests
queue. The KV cache is dropped whenever λ changes, since it holds activations of the previous λ.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, Union

import numpy as np

from .avfile import STORAGE_TYPES, AlignmentVector, write_lowrank_av
from .cpu import new_llama
from .errors import AlignVecError, CompatibilityError, FormatError, InputError
from .ggufread import GGUFModel
from .mix import check_compatible

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

VectorFile = Union[str, os.PathLike[str], AlignmentVector]
LiveVectors = Union[Mapping[str, VectorFile], Sequence[VectorFile], VectorFile]
DEFAULT_LAMBDA_RANGE = (-2.0, 2.0)
T = TypeVar("T")


@dataclass(frozen=True)
class LiveVector:
    """One low-rank AV loaded as a runtime adapter."""

    name: str
    vector: AlignmentVector

    def describe(self, lambda_range: tuple[float, float]) -> dict[str, Any]:
        """A JSON-ready summary (what ``GET /v1/alignment`` lists)."""
        av = self.vector
        assert av.lora is not None
        ranks = [av.rank(n) for n in av.names]
        return {
            "name": self.name,
            "domain": av.info.domain,
            "description": av.info.description,
            "path": str(av.path),
            "rank": max(ranks, default=0),
            "tensors": len(ranks),
            "rel_error": av.lora.rel_error,
            "dropped": list(av.lora.dropped),
            "lambda_min": lambda_range[0],
            "lambda_max": lambda_range[1],
        }


@contextmanager
def _stored_as(av: AlignmentVector, adapter_type: str | None) -> Iterator[Path]:
    """``av``'s file, or where its factors are stored in another type than ``adapter_type``, a temporary copy
    with them in that type (same pairs, same metadata; the copy is deleted on exit)."""
    target = STORAGE_TYPES.get(adapter_type or "")
    if target is None or all(av.storage_type(n) == target for n in av.names):
        yield av.path
        return
    assert av.lora is not None
    alpha = av.alpha

    def factors() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for name in av.names:
            a, b = av.factors(name)  # delta = alpha / r · B @ A; write_lowrank_av folds r / alpha in again
            yield name, a, (b * np.float32(alpha / a.shape[-2]) if alpha else b)

    with tempfile.TemporaryDirectory(prefix="alignvec-live-") as tmp:
        path = Path(tmp) / av.path.name
        write_lowrank_av(path, av.info.architecture, factors(), av.info, av.lora, alpha=alpha, dtype=adapter_type or "")
        yield path


def _write_folded(path: Path, active: Sequence[tuple[AlignmentVector, float]], dtype: str) -> None:
    """The vectors at their λ as one adapter of their summed rank: per tensor ``A = [A_1; A_2; ...]`` and
    ``B = [λ_1 s_1 B_1, λ_2 s_2 B_2, ...]`` (``s_i = alpha_i / r_i``), so that ``B @ A = Σ λ_i Δ_i`` at
    llama.cpp's scale 1 (``adapter.lora.alpha`` 0: no rank scaling)."""
    names = list(dict.fromkeys(n for av, _ in active for n in av.names))
    has = [set(av.names) for av, _ in active]

    def factors() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for name in names:
            a_parts, b_parts = [], []
            for (av, lam), names_of in zip(active, has, strict=True):
                if name not in names_of:
                    continue
                a, b = av.factors(name)
                scale = lam * (av.alpha / a.shape[-2] if av.alpha else 1.0)
                a_parts.append(a)
                b_parts.append(b * np.float32(scale))
            yield name, np.concatenate(a_parts, axis=-2), np.concatenate(b_parts, axis=-1)

    first = active[0][0]
    assert first.lora is not None
    write_lowrank_av(path, first.info.architecture, factors(), first.info, first.lora, alpha=0.0, dtype=dtype)


def check_base(base: Path, vectors: Sequence[AlignmentVector]) -> None:
    """Check that low-rank ``vectors`` can be llama.cpp adapters of the model GGUF ``base``, before it loads.

    Reads the base's header only (:class:`GGUFModel`: metadata decoded when asked, so a 262k-token
    vocabulary costs a header walk, not gguf-py's eager parse).
    """
    model = GGUFModel(base, "base model")
    if not model.field("general.architecture"):
        raise InputError(f"base model {base} has no general.architecture; is it a model GGUF?")
    check_compatible(model, base, [(av, 0.0) for av in vectors])
    if "output.weight" not in model:
        for av in vectors:
            if "token_embd.weight" in av.names:  # llama.cpp would abort (GGML_ASSERT) on the output
                raise CompatibilityError(
                    f"{av.path.name} changes token_embd.weight, which {base.name} ties to its output; "
                    "llama.cpp cannot apply that as an adapter: re-convert it with this alignvec (it drops it)"
                )


class LiveModel:
    """A base GGUF with low-rank alignment vectors as llama.cpp runtime adapters; λ per call.

    ``vectors`` maps a knob name to a low-rank AV file (or is a list of files, named by their
    ``alignvec.name``). Every call takes ``alignment={"medical": 0.5, ...}``: names not given are at
    λ = 0, and each λ must lie in ``lambda_range``. Extra keyword arguments go to ``llama_cpp.Llama``.

    ``adapter_type`` (``"f16"``, ``"q8_0"``, ``"bf16"``, ``"f32"``) hands llama.cpp the factors stored in that
    type, re-stored at load where a file holds another: on a 1.1B Q4_K_M base with three rank-32 F32 vectors,
    Q8_0 factors decoded 15% faster (``benchmarks/live.py --size 1b``). The live model is then the merge of
    those re-stored factors (``alignvec convert --dtype q8_0`` writes such a file directly); the default,
    None, uses every file as it is, so the live model equals the merge of the files themselves.

    ``fold=True`` hands llama.cpp the vectors whose λ is not 0 as one adapter of their summed rank, each
    vector's B scaled by its λ, rebuilt whenever a λ changes: one pair of products per weight instead of
    one per vector. With three rank-32 Q8_0 vectors on a 1.1B Q4_K_M base it decoded 6-11% faster than three
    adapters, and a new λ cost about a second more, the rebuild (``benchmarks/live.py --size 1b``: README,
    'At 1.1B'); the live model is the same merge (the sums run in another order).

    >>> live = LiveModel("base.Q4_K_M.gguf", {"medical": "medical.r32.avec.gguf"}, n_ctx=2048)
    >>> live.generate("My knee hurts.", alignment={"medical": 1.0}, max_tokens=64)
    """

    def __init__(
        self,
        base: str | os.PathLike[str],
        vectors: LiveVectors,
        *,
        lambda_range: tuple[float, float] = DEFAULT_LAMBDA_RANGE,
        adapter_type: str | None = None,
        fold: bool = False,
        **llama_kwargs: Any,
    ):
        lo, hi = (float(x) for x in lambda_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= 0.0 <= hi):
            raise InputError(f"λ range [{lo:g}, {hi:g}] must be finite and include 0 (the base model)")
        if adapter_type is not None and adapter_type not in STORAGE_TYPES:
            raise InputError(f"adapter_type must be one of {', '.join(STORAGE_TYPES)} or None, got {adapter_type!r}")
        self.adapter_type = adapter_type
        self.lambda_range = (lo, hi)
        self.base = Path(base)
        self.vectors = self._open(vectors)
        check_base(self.base, [v.vector for v in self.vectors])
        for v in self.vectors:
            v.vector.check_finite()
            self._log_dropped(v)

        import llama_cpp

        self._llama_cpp = llama_cpp
        llama_kwargs.setdefault("verbose", False)
        self.llm: Llama = new_llama(self.base, **llama_kwargs)
        self.fold = fold
        self._folded: Any = None  # fold=True: the adapter of the λ applied now (None at λ = 0)
        adapters = []
        for v in self.vectors if not fold else []:
            with _stored_as(v.vector, adapter_type) as path:  # llama.cpp copies the file into its own buffer
                adapter = llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode())
            if not adapter:
                self.llm.close()
                raise FormatError(
                    f"llama.cpp could not load {v.vector.path.name} as a LoRA adapter for {self.base.name}; "
                    "run with verbose=True to see llama.cpp's reason"
                )
            adapters.append(adapter)  # freed with the model
        n = len(adapters)
        self._adapters = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*adapters) if n else None
        self._lock = threading.Lock()
        self._applied: tuple[float, ...] = (0.0,) * len(self.vectors)

    @staticmethod
    def _open(vectors: LiveVectors) -> list[LiveVector]:
        if isinstance(vectors, (str, os.PathLike, AlignmentVector)):
            vectors = [vectors]
        if isinstance(vectors, Mapping):
            pairs: list[tuple[str | None, VectorFile]] = list(vectors.items())
        else:
            pairs = [(None, path) for path in vectors]
        out: list[LiveVector] = []
        for name, path in pairs:
            av = path if isinstance(path, AlignmentVector) else AlignmentVector(path)
            if av.form != "lora":
                raise InputError(
                    f"{av.path.name} is the full form; live knobs need the low-rank form "
                    "(alignvec convert --rank 32 ...), or merge it with alignvec merge"
                )
            name = name or av.info.name or av.path.name.removesuffix(".avec.gguf")
            if not name or any(v.name == name for v in out):
                raise InputError(f"alignment vector name {name!r} is empty or given twice; give each vector a name")
            out.append(LiveVector(name, av))
        return out

    @staticmethod
    def _log_dropped(v: LiveVector) -> None:
        stats = v.vector.lora
        if stats is not None and stats.dropped:
            changes = [c for c in stats.dropped_rel_change if not math.isnan(c)]
            worst = f", largest relative change {max(changes):.3g}" if changes else ""
            log.info(
                "%s: %d tensors that cannot be low-rank are not applied (%.2f%% of ‖Δ‖²%s)",
                v.name,
                len(stats.dropped),
                100 * stats.dropped_energy,
                worst,
            )

    @property
    def names(self) -> list[str]:
        """The knob names, in adapter order."""
        return [v.name for v in self.vectors]

    def describe(self) -> list[dict[str, Any]]:
        """Every vector with its domain, rank, error, dropped tensors and allowed λ range."""
        return [v.describe(self.lambda_range) for v in self.vectors]

    def check(self, alignment: Mapping[str, Any] | None) -> tuple[float, ...]:
        """Validate ``alignment`` (name -> λ) and return one λ per adapter; raises InputError."""
        if alignment is None:
            return (0.0,) * len(self.vectors)
        if not isinstance(alignment, Mapping):
            raise InputError('alignment must map vector names to λ, e.g. {"medical": 0.5}')
        known = self.names
        lo, hi = self.lambda_range
        for name, lam in alignment.items():
            if name not in known:
                have = ", ".join(known) or "none"
                raise InputError(f"unknown alignment vector {name!r}; this model has: {have}")
            if isinstance(lam, bool) or not isinstance(lam, (int, float, np.floating, np.integer)):
                raise InputError(f"λ for {name!r} must be a number, got {lam!r}")
            if not (math.isfinite(lam) and lo <= lam <= hi):
                raise InputError(f"λ {lam} for {name!r} is outside the allowed range [{lo:g}, {hi:g}]")
        return tuple(float(alignment.get(name, 0.0)) for name in known)

    def _apply(self, lambdas: tuple[float, ...]) -> None:
        if lambdas == self._applied:
            return
        if self.fold:
            self._apply_folded(lambdas)
        else:
            n = len(lambdas)
            scales = (ctypes.c_float * n)(*lambdas) if n else None
            if self._llama_cpp.llama_set_adapters_lora(self.llm.ctx, self._adapters, n, scales) != 0:
                raise AlignVecError("llama.cpp refused to set the adapters' scales")
        self.llm.reset()  # the KV cache holds activations of the previous λ
        self._applied = lambdas

    def _fold_type(self) -> str:
        """The folded adapter's storage: ``adapter_type``, else the files' own type where they all share one."""
        if self.adapter_type is not None:
            return self.adapter_type
        stored = {v.vector.storage_type(n) for v in self.vectors for n in v.vector.names}
        names = [name for name, qtype in STORAGE_TYPES.items() if {qtype} == stored]
        return names[0] if names else "f32"

    def _apply_folded(self, lambdas: tuple[float, ...]) -> None:
        """Build the folded adapter of ``lambdas``, put it in place of the last one and free that one."""
        lc = self._llama_cpp
        active = [(v.vector, lam) for v, lam in zip(self.vectors, lambdas, strict=True) if lam != 0.0]
        new = None
        if active:
            with tempfile.TemporaryDirectory(prefix="alignvec-fold-") as tmp:
                path = Path(tmp) / "folded.avec.gguf"
                _write_folded(path, active, self._fold_type())
                new = lc.llama_adapter_lora_init(self.llm.model, str(path).encode())  # copied into its buffer
            if not new:
                raise FormatError(f"llama.cpp could not load the folded adapter for {self.base.name}")
        adapters = (lc.llama_adapter_lora_p_ctypes * 1)(new) if new else None
        scales = (ctypes.c_float * 1)(1.0) if new else None
        if lc.llama_set_adapters_lora(self.llm.ctx, adapters, 1 if new else 0, scales) != 0:
            lc.llama_adapter_lora_free(new)
            raise AlignVecError("llama.cpp refused to set the folded adapter")
        if self._folded:
            lc.llama_adapter_lora_free(self._folded)  # no context refers to it any more
        self._folded = new

    @contextmanager
    def using(self, alignment: Mapping[str, Any] | None = None) -> Iterator[Llama]:
        """Hold the model with ``alignment`` applied: ``with live.using({"medical": 1}) as llm: ...``.

        The lock is held for the whole block, so other threads wait; do not keep it longer than a call.
        """
        lambdas = self.check(alignment)
        with self._lock:
            self._apply(lambdas)
            yield self.llm

    def _call(self, alignment: Mapping[str, Any] | None, stream: bool, fn: Callable[[Llama], T]) -> T:
        if not stream:
            with self.using(alignment) as llm:
                return fn(llm)
        lambdas = self.check(alignment)  # fail now, not at the first chunk

        def chunks() -> Iterator[Any]:
            with self._lock:
                self._apply(lambdas)
                yield from fn(self.llm)  # type: ignore[misc]

        return chunks()  # type: ignore[return-value]

    def create_completion(self, prompt: str, *, alignment: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """``Llama.create_completion`` with ``alignment`` applied.

        With ``stream=True`` the returned iterator holds the model until it is exhausted or closed.
        """
        stream = bool(kwargs.get("stream"))
        return self._call(alignment, stream, lambda llm: llm.create_completion(prompt, **kwargs))

    def create_chat_completion(
        self, messages: list[dict[str, Any]], *, alignment: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> Any:
        """``Llama.create_chat_completion`` with ``alignment`` applied (``stream=True`` as in create_completion)."""
        stream = bool(kwargs.get("stream"))
        return self._call(alignment, stream, lambda llm: llm.create_chat_completion(messages, **kwargs))  # type: ignore[arg-type]

    def generate(
        self, prompt: str, *, alignment: Mapping[str, Any] | None = None, max_tokens: int = 64, **kwargs: Any
    ) -> str:
        """The completion text of ``prompt`` (greedy unless ``temperature`` is given) with ``alignment`` applied."""
        kwargs.setdefault("temperature", 0.0)
        out = self.create_completion(prompt, alignment=alignment, max_tokens=max_tokens, **kwargs)
        return str(out["choices"][0]["text"])

    def close(self) -> None:
        """Free the model, its context and its adapters."""
        with self._lock:
            self.llm.close()

    def __enter__(self) -> LiveModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
