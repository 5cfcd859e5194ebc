"""Preference accuracy (arXiv 2410.19206) through llama.cpp on merged GGUF models, over a λ grid.

For every held-out question the model scores the response of each level (avoidance, generic, expert)
by its length-normalised log-likelihood: the mean log p(token | prompt, earlier tokens) over the
response's tokens and the end-of-sequence token. The *share* of a level is the fraction of questions
whose highest-scoring response is that level's; the preference accuracy for a target level is its
share. Each domain's vector is merged alone at each λ (other domains at 0) and scored on that domain's
questions. The eval set (its JSON format, :class:`EvalItem`) is ``evalset.py``'s.

:class:`MixScorer` scores the same way under decoding-time realignment (DeRa, arXiv 2402.02992): per
token, the logits are ``(1 − λ)·z_base + λ·z_aligned``, two forward passes instead of one merged model.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from .avfile import AlignmentVector
from .errors import FormatError, InputError
from .evalset import LEVELS, EvalItem, Shares, by_domain
from .merge import merge
from .mix import VectorRef
from .policy import DEFAULT_POLICY

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

DEFAULT_LAMBDAS = (-1.5, -1.0, -0.5, 0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 1.5)
N_CTX = 512  # prompt + response; llama-cpp-python keeps n_ctx x n_vocab logits with logits_all


def domain_of(vector: str | os.PathLike[str]) -> str:
    """The domain an AV file declares (``alignvec.domain``), or its name if it declares none."""
    av = AlignmentVector(vector)
    return av.info.domain or av.info.name


class Scorer:
    """Length-normalised log-likelihoods of responses under one GGUF model, with llama.cpp."""

    def __init__(self, model_path: str | os.PathLike[str], *, n_threads: int | None = None) -> None:
        from .cpu import new_llama

        # One thread by default, for prompts too (llama-cpp-python's batch default is every core): for a
        # model this small, threads only add barriers, and on a busy CPU a barrier waits for a time slice.
        threads = n_threads or 1
        try:
            self.llm: Llama = new_llama(
                model_path,
                n_ctx=N_CTX,
                logits_all=True,
                verbose=False,
                n_threads=threads,
                n_threads_batch=threads,
            )
        except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
            raise FormatError(f"llama.cpp cannot load {model_path} ({e})") from None
        self._eos = self.llm.token_eos()

    def close(self) -> None:
        """Free the model."""
        self.llm.close()

    def _tokens(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def response_logits(self, item: EvalItem, level: str) -> tuple[np.ndarray, list[int]]:
        """The logits that predict each response token (and the EOS after it), and those tokens."""
        prompt = self._tokens(item.prompt)
        full = self._tokens(item.text(level))
        shared = 0
        while shared < min(len(prompt), len(full)) and prompt[shared] == full[shared]:
            shared += 1
        shared = max(shared, 1)  # BOS at least: the first response token needs a prefix
        target = full[shared:] + [self._eos]
        if len(full) + 1 > self.llm.n_ctx():
            raise InputError(
                f"prompt + response is {len(full) + 1} tokens, over the scorer's context of {self.llm.n_ctx()}; "
                "shorten the eval set's texts"
            )
        self._set_prefix(full[:shared])
        if len(target) > 1:
            self.llm.eval(target[:-1])
        return np.asarray(self.llm.scores[shared - 1 : shared - 1 + len(target)], dtype=np.float64), target

    def level_scores(self, item: EvalItem) -> dict[str, float]:
        """level -> mean log-probability per response token (EOS included) given the prompt."""
        return {level: mean_logp(*self.response_logits(item, level)) for level in LEVELS}

    def _set_prefix(self, tokens: list[int]) -> None:
        # Keep the KV cache of a shared prompt: rewind to it when it is already there, else evaluate it.
        n = len(tokens)
        if self.llm.n_tokens >= n and list(self.llm.input_ids[:n]) == tokens:
            self.llm.n_tokens = n
            return
        self.llm.reset()
        self.llm.eval(tokens)


def mean_logp(logits: np.ndarray, target: Sequence[int]) -> float:
    """Mean log-softmax probability of ``target[i]`` under row ``i`` of ``logits``."""
    top = logits.max(axis=1, keepdims=True)
    lse = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]
    return float((logits[np.arange(len(target)), list(target)] - lse).mean())


class MixScorer:
    """Level scores under DeRa (arXiv 2402.02992): logits (1 − λ)·z_base + λ·z_aligned, token by token.

    Both models' logits for an item are computed once and mixed for every λ, so a whole λ curve costs
    two forward passes per response; at generation time DeRa pays those two passes for every token.
    """

    def __init__(self, base: Scorer, aligned: Scorer) -> None:
        self.base, self.aligned = base, aligned

    def level_scores_over(self, item: EvalItem, lambdas: Sequence[float]) -> dict[float, dict[str, float]]:
        """λ -> level -> mean log-probability per response token under the mixed logits."""
        out: dict[float, dict[str, float]] = {lam: {} for lam in lambdas}
        for level in LEVELS:
            z0, target = self.base.response_logits(item, level)
            z1, target1 = self.aligned.response_logits(item, level)
            if target != target1:
                raise InputError("the base and the aligned model tokenize differently; DeRa needs one vocabulary")
            for lam in lambdas:
                out[lam][level] = mean_logp((1 - lam) * z0 + lam * z1, target)
        return out


def preferred(scores: Mapping[str, float]) -> str:
    """The level with the highest score (the first in spectrum order on a tie)."""
    return max(LEVELS, key=lambda lv: scores[lv])


def shares(scorer: Scorer, items: Sequence[EvalItem]) -> Shares:
    """level -> share of ``items`` whose preferred response is that level's."""
    counts = dict.fromkeys(LEVELS, 0)
    for item in items:
        counts[preferred(scorer.level_scores(item))] += 1
    return {lv: counts[lv] / len(items) for lv in LEVELS}


def check_lambdas(lambdas: Sequence[float]) -> list[float]:
    """Finite λ values, sorted, without repeats."""
    if not lambdas:
        raise InputError("give at least one λ, e.g. --lambdas 0 0.5 1")
    for lam in lambdas:
        if not math.isfinite(lam):
            raise InputError(f"λ must be a finite number, got {lam!r}")
    return sorted({float(lam) + 0.0 for lam in lambdas})


def check_vectors(vectors: Mapping[str, str | os.PathLike[str]], items: Sequence[EvalItem]) -> None:
    """Every vector's domain must have questions in the eval set."""
    if not vectors:
        raise InputError("give at least one alignment vector (-v AV.avec.gguf)")
    domains = by_domain(items)
    for domain, path in vectors.items():
        if domain not in domains:
            raise InputError(
                f"{Path(path).name} is for domain {domain!r}, which the eval set does not have "
                f"(it has {', '.join(domains)}); give an eval set with {domain} questions"
            )


def check_inputs(
    base: str | os.PathLike[str],
    vectors: Mapping[str, str | os.PathLike[str]],
    items: Sequence[EvalItem],
    lambdas: Sequence[float],
) -> tuple[Path, list[float], dict[str, list[EvalItem]]]:
    """The base's path, the λ grid (:func:`check_lambdas`) and the items of each vector's domain, checked."""
    base = Path(base)
    if not base.is_file():
        raise InputError(f"base model {base} does not exist")
    grid = check_lambdas(lambdas)
    check_vectors(vectors, items)
    return base, grid, {d: g for d, g in by_domain(items).items() if d in vectors}


def _new_result(
    base: Path,
    vectors: Mapping[str, str | os.PathLike[str]],
    groups: Mapping[str, list[EvalItem]],
    grid: list[float],
    requant: str,
) -> EvalResult:
    return EvalResult(
        base=str(base),
        requant=requant,
        vectors={d: str(p) for d, p in vectors.items()},
        n_items={d: len(groups[d]) for d in vectors},
        lambdas=grid,
    )


def vector_refs(vectors: Mapping[str, str | os.PathLike[str]]) -> Callable[[str, float], VectorRef]:
    """``(domain, λ) ->`` the reference a mix of a run uses: the domain's vector opened once, at its first λ ≠ 0,
    and that same :class:`AlignmentVector` for every later mix (a λ = 0 mix merges nothing and opens nothing)."""
    opened: dict[str, AlignmentVector] = {}

    def ref(domain: str, lam: float) -> VectorRef:
        if lam == 0:
            return vectors[domain]
        if domain not in opened:
            opened[domain] = AlignmentVector(vectors[domain])
        return opened[domain]

    return ref


@contextmanager
def merged_model(base: Path, vectors: Mapping[VectorRef, float], work_dir: Path, requant: str) -> Iterator[Path]:
    """The merged model for one mix, in ``work_dir``, deleted afterwards (the base itself when all λ = 0)."""
    if all(lam == 0 for lam in vectors.values()):
        yield base
        return
    fd, name = tempfile.mkstemp(suffix=".gguf", dir=work_dir)
    os.close(fd)
    path = Path(name)
    try:
        merge(base, dict(vectors), path, requant=requant)
        yield path
    finally:
        path.unlink(missing_ok=True)


def score_mix(
    base: Path,
    vectors: Mapping[VectorRef, float],
    groups: Mapping[str, Sequence[EvalItem]],
    work_dir: Path,
    *,
    requant: str = DEFAULT_POLICY,
    n_threads: int | None = None,
) -> dict[str, Shares]:
    """Merge one mix of vectors and return each domain's level shares under it."""
    with merged_model(base, vectors, work_dir, requant) as path, closing(Scorer(path, n_threads=n_threads)) as scorer:
        return {domain: shares(scorer, group) for domain, group in groups.items()}


@dataclass
class EvalResult:
    """Level shares per domain and λ for one base model."""

    base: str
    requant: str
    vectors: dict[str, str]  # domain -> AV path
    n_items: dict[str, int]  # domain -> number of questions
    lambdas: list[float]
    curves: dict[str, dict[float, Shares]] = field(default_factory=dict)  # domain -> λ -> shares

    def expert_share(self, domain: str, lam: float) -> float:
        """The expert share of ``domain`` at ``lam``."""
        return self.curves[domain][lam]["expert"]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (λ keys as strings are avoided: curves are lists)."""
        return {
            "base": self.base,
            "requant": self.requant,
            "levels": list(LEVELS),
            "lambdas": self.lambdas,
            "domains": {
                d: {
                    "vector": self.vectors[d],
                    "n_items": self.n_items[d],
                    "shares": [{"lambda": lam, **self.curves[d][lam]} for lam in self.lambdas],
                }
                for d in self.curves
            },
        }


def evaluate(
    base: str | os.PathLike[str],
    vectors: Mapping[str, str | os.PathLike[str]],
    items: Sequence[EvalItem],
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    *,
    requant: str = DEFAULT_POLICY,
    n_threads: int | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> EvalResult:
    """Level shares per domain over ``lambdas``: each domain's vector (domain -> AV path) merged alone.

    Merged models go to a temporary directory next to nothing else and are deleted after scoring.
    """
    base, grid, groups = check_inputs(base, vectors, items, lambdas)
    result = _new_result(base, vectors, groups, grid, requant)
    jobs = [(d, lam) for d in vectors for lam in grid]
    ref = vector_refs(vectors)
    with tempfile.TemporaryDirectory(prefix="alignvec-eval-") as tmp:
        for domain, lam in tqdm(jobs, desc=desc, unit="model", disable=not progress, leave=False):
            mix: dict[VectorRef, float] = {ref(domain, lam): lam}
            got = score_mix(base, mix, {domain: groups[domain]}, Path(tmp), requant=requant, n_threads=n_threads)
            result.curves.setdefault(domain, {})[lam] = got[domain]
    return result


def evaluate_dera(
    base: str | os.PathLike[str],
    vectors: Mapping[str, str | os.PathLike[str]],
    items: Sequence[EvalItem],
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    *,
    requant: str = DEFAULT_POLICY,
    n_threads: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Level shares per domain over ``lambdas`` under DeRa instead of a merge at each λ.

    The aligned model of a domain is the base with its AV merged at λ = 1 (``requant``); the share at
    λ comes from the logits (1 − λ)·z_base + λ·z_aligned (:class:`MixScorer`).
    """
    base, grid, groups = check_inputs(base, vectors, items, lambdas)
    result = _new_result(base, vectors, groups, grid, f"DeRa ({requant} at λ=1)")
    with tempfile.TemporaryDirectory(prefix="alignvec-dera-") as tmp, closing(Scorer(base, n_threads=n_threads)) as s0:
        for domain in tqdm(list(vectors), desc="DeRa", unit="domain", disable=not progress, leave=False):
            with merged_model(base, {vectors[domain]: 1.0}, Path(tmp), requant) as path:
                with closing(Scorer(path, n_threads=n_threads)) as s1:
                    mix = MixScorer(s0, s1)
                    counts = {lam: dict.fromkeys(LEVELS, 0) for lam in grid}
                    for item in groups[domain]:
                        for lam, scores in mix.level_scores_over(item, grid).items():
                            counts[lam][preferred(scores)] += 1
            n = len(groups[domain])
            result.curves[domain] = {lam: {lv: c[lv] / n for lv in LEVELS} for lam, c in counts.items()}
    return result


def result_from_json(payload: Mapping[str, Any]) -> EvalResult:
    """An :class:`EvalResult` back from its :meth:`EvalResult.to_json` form."""
    try:
        result = EvalResult(
            base=str(payload["base"]),
            requant=str(payload["requant"]),
            vectors={d: str(v["vector"]) for d, v in payload["domains"].items()},
            n_items={d: int(v["n_items"]) for d, v in payload["domains"].items()},
            lambdas=[float(x) for x in payload["lambdas"]],
        )
        for d, v in payload["domains"].items():
            result.curves[d] = {float(row["lambda"]): {lv: float(row[lv]) for lv in LEVELS} for row in v["shares"]}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FormatError(f"not an eval result ({e!r})") from None
    return result
