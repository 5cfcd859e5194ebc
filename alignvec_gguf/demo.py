"""``alignvec demo``: the dial on the bundled tiny models.

The package ships a tiny Llama base (``demo_data/base.Q4_K_M.gguf``, trained to give plain answers to
medical questions) and one alignment vector (``demo_data/expert.avec.gguf``, toward clinical expert
answers). The demo merges the vector at several strengths λ and prints the greedy answers side by
side. How the data was built: ``demo_data/PROVENANCE.md`` and ``examples/tiny_demo/``.
"""

from __future__ import annotations

import json
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

BASE_FILE = "base.Q4_K_M.gguf"
AV_FILE = "expert.avec.gguf"
PROMPTS_FILE = "prompts.json"
DEFAULT_LAMBDAS = (-1.0, 0.0, 0.5, 1.0)
N_CTX = 256
SEED = 0


class DemoDataError(InputError):
    """The bundled demo files are missing or unreadable."""


@dataclass(frozen=True)
class DemoData:
    """Paths of the bundled base model and alignment vector, and the demo prompts."""

    base: Path
    vector: Path
    prompts: list[str]


def _read_prompts(path: Path) -> list[str]:
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DemoDataError(f"demo prompts {path} are not readable JSON ({e}); reinstall alignvec-gguf") from None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise DemoDataError(f"demo prompts {path} must be a non-empty JSON list of strings; reinstall alignvec-gguf")
    return prompts


@contextmanager
def demo_data() -> Iterator[DemoData]:
    """The bundled demo files as real paths (extracted for the duration if the package is zipped)."""
    with resources.as_file(resources.files("alignvec_gguf") / "demo_data") as directory:
        for name in (BASE_FILE, AV_FILE, PROMPTS_FILE):
            if not (directory / name).is_file():
                raise DemoDataError(
                    f"demo data file {name} is missing from {directory}; reinstall alignvec-gguf "
                    "or rebuild it with examples/tiny_demo/build.py"
                )
        yield DemoData(directory / BASE_FILE, directory / AV_FILE, _read_prompts(directory / PROMPTS_FILE))


def demo_prompts() -> list[str]:
    """The prompts the demo answers, in order."""
    with demo_data() as data:
        return data.prompts


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


def generate(model_path: Path, prompts: Sequence[str], n_tokens: int) -> list[str]:
    """Greedy completions of ``n_tokens`` tokens for each prompt with llama.cpp."""
    from llama_cpp import Llama

    try:
        llm = Llama(model_path=str(model_path), n_ctx=N_CTX, verbose=False, seed=SEED)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise FormatError(f"llama.cpp cannot load {model_path} ({e})") from None
    with closing(llm):
        outputs = []
        for prompt in prompts:
            result = llm.create_completion(prompt, max_tokens=n_tokens, temperature=0.0, seed=SEED)
            outputs.append(result["choices"][0]["text"])  # type: ignore[index]
    return outputs


def generate_table(
    lambdas: Sequence[float],
    n_tokens: int,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[float, list[str]]:
    """λ -> one greedy generation per demo prompt, for base + λ·AV merged into the bundled Q4_K_M base.

    Merges are cached under ``cache_dir`` (default: ``demo/`` in the alignvec cache).
    """
    if n_tokens < 1:
        raise InputError(f"-n must be at least 1, got {n_tokens}")
    lambdas = check_lambdas(lambdas)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "demo"
    table: dict[float, list[str]] = {}
    with demo_data() as data, logging_redirect_tqdm(), _quiet_repeats("alignvec_gguf.merge"):
        bar = tqdm(lambdas, desc="merge + generate", unit="λ", disable=not progress, leave=False)
        for lam in bar:
            bar.set_postfix_str(f"λ={lam:g}")
            merged = cached_merge(data.base, {data.vector: lam}, cache_dir=directory)
            table[lam] = generate(merged, data.prompts, n_tokens)
    return table


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip() or "(nothing)"


def lambda_label(lam: float) -> str:
    """``λ=-1``, ``λ=0.5``... with a note on the two ends of the dial."""
    note = {0.0: " base", 1.0: " expert"}.get(lam, "")
    return f"λ={lam:g}{note}"


def format_table(prompts: Sequence[str], table: dict[float, list[str]], width: int) -> str:
    """One block per prompt, one wrapped line per λ under a right-aligned λ label."""
    labels = {lam: lambda_label(lam) for lam in table}
    label_width = max(len(label) for label in labels.values())
    indent = " " * (label_width + 4)
    blocks = []
    for i, prompt in enumerate(prompts):
        lines = [textwrap.fill(prompt, width=width, subsequent_indent="  ")]
        for lam, outputs in table.items():
            head = f"  {labels[lam]:>{label_width}}  "
            lines.append(
                textwrap.fill(_one_line(outputs[i]), width=width, initial_indent=head, subsequent_indent=indent)
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def header(n_tokens: int) -> str:
    """What the demo shows, in a few lines."""
    return "\n".join(
        [
            "alignvec demo: alignment as a dial, θ(λ) = θ_base + λ·AV",
            f"  base: a tiny Llama ({BASE_FILE}) trained to give plain answers to medical questions",
            f"  AV:   {AV_FILE} = θ_expert − θ_base, toward clinical expert answers",
            "  λ=0 is the base, λ=1 the expert model; 0<λ<1 blends, λ>1 extrapolates, λ<0 pushes away.",
            "  Each λ is merged into the Q4_K_M base (touched tensors requantized to their own types) and",
            f"  answers greedily ({n_tokens} tokens). The tiny models: demo_data/PROVENANCE.md.",
        ]
    )


def run_demo(lambdas: Sequence[float] = DEFAULT_LAMBDAS, n_tokens: int = 40, quiet: bool = False) -> int:
    """Merge the bundled AV at each λ, generate, and print the answers side by side. Returns 0."""
    table = generate_table(lambdas, n_tokens, progress=not quiet)
    width = max(60, min(120, shutil.get_terminal_size((100, 24)).columns))
    print(header(n_tokens))
    print()
    print(format_table(demo_prompts(), table, width))
    return 0
