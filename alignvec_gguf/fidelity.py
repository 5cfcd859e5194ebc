"""Knob fidelity: how much of the λ-shift of a model's logits survives requantization.

Dequantized base weights sit on the quantization grid, so requantizing ``dequant(W_q) + λΔ`` can snap
small changes back to where they were. :func:`fidelity` merges the same mix under several
requantization policies and compares llama.cpp's logits over a fixed token set with a float
reference, ``θ_ref + Σ λ_i Δ_i`` with its touched tensors kept in float32:

- ``shift_kept``: ``<s_q, s_ref> / |s_ref|²`` where ``s_q = logits(merged_q) − logits(base_q)`` and
  ``s_ref = logits(ref_merged) − logits(ref_base)``: the share of the knob's effect that survives
  (1.0: all of it; 0: erased);
- ``shift_cos``: the cosine between ``s_q`` and ``s_ref`` (its direction; noise lowers it);
- ``kl``: ``KL(merged_q ‖ ref_merged)`` of the next-token distributions, in nats, averaged over
  positions (what the quantized file costs against the exact merged model);
- ``size_ratio``: merged file size over the base's.

The reference is the full-precision base when one is given (``full_base``; then the *anchor* is also
measured: touched tensors quantized from scratch from ``θ_full + Σ λ_i Δ_i`` at the base's types, which
is what a quantizer of the full-precision aligned model would produce), else the quantized base itself
(``ref_base = base_q`` and ``ref_merged`` = the merge with touched tensors in float32).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cpu import new_llama
from .diagnose import MergeReport
from .errors import InputError
from .ggufread import GGUFModel
from .merge import merge
from .mix import VectorMix, Vectors
from .policy import parse_requant

# A fixed text over several domains: tokenized by the model itself, so every model sees its own tokens.
DEFAULT_TEXT = (
    "The patient reports a persistent headache and mild fever since Monday; consult a physician before "
    "taking any medication. A contract is binding when both parties agree to its terms in writing, and "
    "the court may void a lease signed under pressure. Diversify your savings across index funds, bonds "
    "and cash, and remember that interest rates move the value of government bonds. Symptoms such as "
    "chest pain require immediate medical attention."
)
DEFAULT_POLICIES = ("same", "unbiased", "hifi")


@dataclass
class Measure:
    """One merged file against the float reference."""

    label: str  # the policy, or "anchor"
    shift_kept: float
    shift_cos: float
    kl: float
    size_ratio: float
    seconds: float = 0.0  # merge wall time
    extra: dict[str, Any] = field(default_factory=dict)  # what fidelity()'s ``extra`` measured on the file
    weight_kept: float = 1.0  # the merge's own measure: share of the requested change kept in weight space
    weight_kept_min: float = 1.0  # ... by the tensor that kept least
    warnings: list[str] = field(default_factory=list)  # what the merge warned about (MergeReport.warnings)


@dataclass
class FidelityReport:
    """What :func:`fidelity` measured."""

    base: str
    lambdas: list[float]
    n_tokens: int
    reference: str  # "full-precision base" or "quantized base, touched tensors in float32"
    rows: list[Measure] = field(default_factory=list)
    anchor: Measure | None = None
    ref_shift_rms: float = 0.0  # size of the reference shift, in logits
    ref_extra: dict[str, Any] = field(default_factory=dict)  # fidelity()'s ``extra`` on the exact merge

    def row(self, label: str) -> Measure:
        for m in [*self.rows, *([self.anchor] if self.anchor else [])]:
            if m.label == label:
                return m
        raise KeyError(label)

    def table(self) -> str:
        lines = [f"{'policy':14} {'kept':>7} {'cosine':>7} {'KL':>10} {'size':>7} {'merge s':>8}"]
        for m in [*self.rows, *([self.anchor] if self.anchor else [])]:
            lines.append(
                f"{m.label:14} {m.shift_kept:7.3f} {m.shift_cos:7.3f} {m.kl:10.3e} {m.size_ratio:6.2f}x"
                f" {m.seconds:8.2f}"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json())


def model_logits(
    path: str | os.PathLike[str], tokens: list[int], threads: int | None = None, window: int = 512
) -> np.ndarray:
    """llama.cpp's logits (n_tokens x n_vocab) for every position of ``tokens``, in windows of ``window``.

    Each window starts a fresh context, so no position lies beyond the model's training context.
    """
    n_ctx = max(8, min(window, len(tokens)))
    llm = new_llama(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=threads)
    try:
        out = []
        for i in range(0, len(tokens), n_ctx):
            chunk = tokens[i : i + n_ctx]
            llm.reset()
            llm.eval(chunk)
            out.append(np.array(llm.scores[: len(chunk)], dtype=np.float64))
        return np.concatenate(out)
    finally:
        llm.close()


def tokenize(path: str | os.PathLike[str], text: str) -> list[int]:
    """``text`` in the model's own tokens, with its BOS."""
    llm = new_llama(path, vocab_only=True, verbose=False)
    try:
        return list(llm.tokenize(text.encode(), add_bos=True))
    finally:
        llm.close()


def sequence_logprobs(
    path: str | os.PathLike[str], sequences: list[tuple[list[int], int]], threads: int | None = None
) -> list[float]:
    """llama.cpp's log-likelihood of each sequence's tokens from its ``start`` on: (tokens, start) pairs.

    The measure of preference tests: which of several answers to one prompt the model finds likeliest.
    """
    if any(not 0 < start < len(toks) for toks, start in sequences):
        raise InputError("each scored sequence needs a prompt (start ≥ 1) and at least one token to score")
    n_ctx = max(8, max((len(t) for t, _ in sequences), default=8))
    llm = new_llama(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=threads)
    try:
        out = []
        for toks, start in sequences:
            llm.reset()
            llm.eval(toks)
            logp = _log_softmax(np.array(llm.scores[: len(toks) - 1], dtype=np.float64))
            out.append(float(logp[np.arange(start - 1, len(toks) - 1), toks[start:]].sum()))
        return out
    finally:
        llm.close()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(logits_p: np.ndarray, logits_q: np.ndarray) -> float:
    """Mean over positions of KL(P ‖ Q) between the softmax distributions, in nats."""
    lp, lq = _log_softmax(logits_p), _log_softmax(logits_q)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def shift_stats(shift: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(share of ``ref`` kept by ``shift`` as a projection, cosine between them)."""
    ref_sq = float((ref * ref).sum())
    if ref_sq == 0.0:
        return float("nan"), float("nan")
    dot = float((shift * ref).sum())
    norm = float(np.linalg.norm(shift)) * ref_sq**0.5
    return dot / ref_sq, (dot / norm if norm else 0.0)


def fidelity(
    base: str | os.PathLike[str],
    vectors: Vectors | VectorMix,
    *,
    policies: tuple[str, ...] | list[str] = DEFAULT_POLICIES,
    full_base: str | os.PathLike[str] | None = None,
    text: str = DEFAULT_TEXT,
    tokens: list[int] | None = None,
    imatrix: str | os.PathLike[str] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    extra: Callable[[Path], dict[str, Any]] | None = None,
) -> FidelityReport:
    """Measure how much of the knob each requantization policy keeps on ``base`` (see the module doc).

    Merged files are written to ``workdir`` (default: a temporary directory, removed afterwards).
    ``extra(path)``, if given, is called on every merged file before it is removed (the exact F32 merge
    as ``"reference"`` too) and its result is kept in :attr:`Measure.extra` (e.g. preference accuracy).
    """
    base = Path(base)
    mix = VectorMix.open(vectors)  # once: every merge below takes the mix as it is
    if mix.is_identity:
        raise InputError("fidelity needs at least one vector with λ ≠ 0: at λ = 0 there is no knob to keep")
    for p in policies:
        parse_requant(p)
    model = GGUFModel(base, "base model")
    base_size = model.size()
    context = model.field(f"{model.field('general.architecture')}.context_length", 512)
    window = int(context) if isinstance(context, int) and context > 0 else 512
    window = max(8, min(512, window))
    with tempfile.TemporaryDirectory(prefix="alignvec-fidelity-", dir=workdir) as tmp:
        root = Path(tmp)
        toks = tokens if tokens is not None else tokenize(base, text)
        if len(toks) < 2:
            raise InputError("fidelity needs at least two tokens")
        ref_base = Path(full_base) if full_base is not None else base
        ref_merged = merge(ref_base, mix, root / "ref.gguf", requant="f32", imatrix=imatrix, threads=threads).path
        ref_logits = model_logits(ref_merged, toks, threads, window)
        ref_extra = extra(ref_merged) if extra is not None else {}
        ref_base_logits = model_logits(ref_base, toks, threads, window)
        ref_shift = ref_logits - ref_base_logits
        base_logits = ref_base_logits if full_base is None else model_logits(base, toks, threads, window)
        report = FidelityReport(
            base=str(base),
            lambdas=[lam for _, lam in mix],
            n_tokens=len(toks),
            reference="full-precision base" if full_base is not None else "quantized base, touched tensors in float32",
            ref_shift_rms=float(np.sqrt(np.mean(ref_shift**2))),
            ref_extra=ref_extra,
        )

        def measure(label: str, merged: MergeReport, seconds: float) -> Measure:
            path = merged.path
            logits = model_logits(path, toks, threads, window)
            kept, cos = shift_stats(logits - base_logits, ref_shift)
            m = Measure(label, kept, cos, kl_divergence(logits, ref_logits), path.stat().st_size / base_size, seconds)
            m.weight_kept, m.weight_kept_min = merged.kept_share, merged.min_kept_share
            m.warnings = list(merged.warnings)
            if extra is not None:
                m.extra = extra(path)
            path.unlink()
            return m

        for policy in policies:
            t0 = time.perf_counter()
            out = merge(base, mix, root / f"{policy}.gguf", requant=policy, imatrix=imatrix, threads=threads)
            report.rows.append(measure(policy, out, time.perf_counter() - t0))
        if full_base is not None:
            t0 = time.perf_counter()
            out = merge(base, mix, root / "anchor.gguf", requant="same", imatrix=imatrix, full_base=full_base)
            report.anchor = measure("anchor", out, time.perf_counter() - t0)
    return report
