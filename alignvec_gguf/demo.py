"""``alignvec demo``: the preference spectrum on the bundled tiny models, three domains, one dial each.

The package ships a tiny Llama base (``demo_data/base.Q4_K_M.gguf``, answering at the generic level),
three alignment vectors made by DPO toward expert answers (``medical``, ``legal``, ``financial``
``.avec.gguf``) and the held-out questions with one response per level (``heldout.json``). The demo
merges the medical vector into the Q4_K_M base at several λ, answers one medical question at each, side
by side, then prints the preference-accuracy table of all three domains (:mod:`alignvec_gguf.eval`).
How the data was built: ``demo_data/PROVENANCE.md`` and ``examples/preference_spectrum/``.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .cache import cached_merge, default_cache_dir
from .errors import FormatError, InputError
from .eval import EvalItem, EvalResult, evaluate, load_eval_set

BASE_FILE = "base.Q4_K_M.gguf"
DOMAINS = ("medical", "legal", "financial")
HELDOUT_FILE = "heldout.json"
DEFAULT_LAMBDAS = (-1.0, 0.0, 0.5, 1.0)
TABLE_LAMBDAS = (-1.0, -0.5, 0.0, 0.1, 0.2, 0.5, 1.0, 1.5)
DEMO_DOMAIN = "medical"
N_CTX = 256
SEED = 0


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
def _quiet_repeats(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    once = _Once()
    logger.addFilter(once)
    try:
        yield
    finally:
        logger.removeFilter(once)


def generate(model_path: Path, prompt: str, n_tokens: int) -> str:
    """A greedy completion of up to ``n_tokens`` tokens with llama.cpp."""
    from llama_cpp import Llama

    try:
        llm = Llama(model_path=str(model_path), n_ctx=N_CTX, verbose=False, seed=SEED, n_threads=1, n_threads_batch=1)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise FormatError(f"llama.cpp cannot load {model_path} ({e})") from None
    with closing(llm):
        result = llm.create_completion(prompt, max_tokens=n_tokens, temperature=0.0, seed=SEED)
    return str(result["choices"][0]["text"])  # type: ignore[index]


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
    with demo_data() as data, logging_redirect_tqdm(), _quiet_repeats("alignvec_gguf.merge"):
        bar = tqdm(lambdas, desc="merge + generate", unit="λ", disable=not progress, leave=False)
        for lam in bar:
            bar.set_postfix_str(f"λ={lam:g}")
            merged = cached_merge(data.base, {data.vectors[DEMO_DOMAIN]: lam}, cache_dir=directory)
            answers[lam] = generate(merged, question.prompt, n_tokens)
    return answers


def accuracy_table(lambdas: Sequence[float] | None = None, *, progress: bool = False) -> EvalResult:
    """Preference accuracy of each bundled domain vector over ``lambdas`` (default ``TABLE_LAMBDAS``)."""
    grid = TABLE_LAMBDAS if lambdas is None else lambdas
    with demo_data() as data, logging_redirect_tqdm(), _quiet_repeats("alignvec_gguf.merge"):
        return evaluate(data.base, data.vectors, data.items(), grid, progress=progress, desc="preference accuracy")


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip() or "(nothing)"


def lambda_label(lam: float) -> str:
    """``λ=-1``, ``λ=0.5``... with a note on the two ends of the dial."""
    note = {0.0: " base", 1.0: " expert AV"}.get(lam, "")
    return f"λ={lam:g}{note}"


def format_answers(prompt: str, answers: dict[float, str], width: int) -> str:
    """The prompt, then one wrapped answer per λ under a right-aligned λ label."""
    labels = {lam: lambda_label(lam) for lam in answers}
    label_width = max(len(label) for label in labels.values())
    indent = " " * (label_width + 4)
    lines = [textwrap.fill(prompt, width=width, subsequent_indent="  ")]
    for lam, text in answers.items():
        head = f"  {labels[lam]:>{label_width}}  "
        lines.append(textwrap.fill(_one_line(text), width=width, initial_indent=head, subsequent_indent=indent))
    return "\n".join(lines)


def header(n_tokens: int) -> str:
    """What the demo shows, in a few lines."""
    return "\n".join(
        [
            "alignvec demo: the preference spectrum as a dial, θ(λ) = θ_base + Σ λ_d·AV_d",
            f"  base: a tiny Llama ({BASE_FILE}) that answers medical, legal and financial questions at the",
            "        generic level; levels: avoidance (declines), generic (plain advice), expert (specialist).",
            "  AVs:  θ_DPO − θ_base per domain (medical, legal, financial), DPO toward expert ≻ generic ≻ avoidance.",
            "  Each λ is merged into the Q4_K_M base (touched tensors requantized to their own types);",
            f"  answers are greedy ({n_tokens} tokens). The tiny models: demo_data/PROVENANCE.md.",
        ]
    )


def table_intro() -> str:
    """The lines before the accuracy table."""
    return (
        "Preference accuracy (arXiv 2410.19206): share of held-out questions whose most likely response\n"
        "(length-normalised log-likelihood, llama.cpp) is each level, one domain's AV merged at a time."
    )


def run_demo(
    lambdas: Sequence[float] = DEFAULT_LAMBDAS, n_tokens: int = 48, quiet: bool = False, table: bool = True
) -> int:
    """Answer the demo question at each λ, print the answers side by side, then the accuracy table."""
    from .merge import DEFAULT_POLICY
    from .report import eval_table

    answers = generate_answers(lambdas, n_tokens, progress=not quiet)
    width = max(60, min(120, shutil.get_terminal_size((100, 24)).columns))
    print(header(n_tokens))
    print()
    print(f"One held-out {DEMO_DOMAIN} question, {DEMO_DOMAIN} AV at each λ:")
    print(format_answers(demo_question().prompt, answers, width))
    if table:
        result = accuracy_table(progress=not quiet)
        print()
        print(table_intro())
        print(eval_table(result, title=f"Q4_K_M base ({BASE_FILE}), requant {DEFAULT_POLICY}:"))
    return 0
