"""Session fixtures: tiny real Llama checkpoints, their GGUFs from llama.cpp's converter, and AV files."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO
from tests.support import tinymodels as tm
from tests.support.commands import run_main


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    """``run_cli(*argv)``: ``alignvec ARGV...`` in this process, returning (exit status, stderr)."""
    return functools.partial(run_main, capsys)


@pytest.fixture(scope="module")
def live(llama_pair: Pair, lowrank_pair: LowRankPair) -> Iterator[Any]:
    """The servers' LiveModel on the tiny models (tests/support/loopback.py's ``tiny_live``), one per test module
    and closed after it (test_clients.py and test_live.py define their own)."""
    from tests.support.loopback import tiny_live

    model = tiny_live(llama_pair, lowrank_pair)
    yield model
    model.close()


@pytest.fixture(scope="session")
def llama_src() -> Path:
    return tm.llama_cpp_source(Path(os.environ.get("ALIGNVEC_TEST_CACHE", REPO / ".cache")))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tm.train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@dataclass
class Pair:
    """A base and an aligned checkpoint, their GGUFs by llama.cpp, and the AV between them."""

    root: Path
    base_model: object
    aligned_state: dict
    base_dir: Path
    aligned_dir: Path
    base_gguf: Path  # F32, llama.cpp's converter
    aligned_gguf: Path
    av: Path  # full form, F32 storage


def _make_pair(root: Path, llama_src: Path, tokenizer: Path, arch: str, seed: int, untouched: tuple[str, ...]) -> Pair:
    from converters import convert

    base = tm.make_model(tm.llama_config(arch), seed)
    aligned = tm.perturbed(base, seed + 100, untouched=untouched)
    base_dir = tm.save(base, None, root / "base", tokenizer)
    aligned_dir = tm.save(base, aligned, root / "aligned", tokenizer)
    base_gguf = tm.hf_to_gguf(llama_src, base_dir, root / "base-f32.gguf")
    aligned_gguf = tm.hf_to_gguf(llama_src, aligned_dir, root / "aligned-f32.gguf")
    av = root / "aligned.avec.gguf"
    convert(base_dir, aligned_dir, av, name="aligned", domain="medical", description="test vector")
    return Pair(root, base, aligned, base_dir, aligned_dir, base_gguf, aligned_gguf, av)


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory: pytest.TempPathFactory, llama_src: Path, tokenizer: Path) -> Pair:
    # layer 0's MLP and the embeddings stay untouched, so the merge must copy them byte for byte
    return _make_pair(
        tmp_path_factory.mktemp("llama"), llama_src, tokenizer, "LlamaForCausalLM", 0, ("embed_tokens", "layers.0.mlp")
    )


@pytest.fixture(scope="session")
def second_av(llama_pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A second vector on the same base (another fine-tune), touching other tensors too."""
    from converters import convert

    root = tmp_path_factory.mktemp("second")
    state = tm.perturbed(llama_pair.base_model, 7, scale=0.08, untouched=("layers.1",))
    aligned_dir = tm.save(llama_pair.base_model, state, root / "aligned2", llama_pair.base_dir / "tokenizer.model")
    av = root / "second.avec.gguf"
    convert(llama_pair.base_dir, aligned_dir, av, name="second", domain="legal")
    return av, state


@pytest.fixture(scope="session")
def quantized_bases(llama_pair: Pair) -> dict[str, Path]:
    """The base quantized by llama.cpp's own quantizer."""
    return {
        name: tm.quantize_gguf(llama_pair.base_gguf, llama_pair.root / f"base-{name}.gguf", f"MOSTLY_{name}")
        for name in ("Q8_0", "Q4_K_M")
    }


@dataclass
class LowRankPair:
    """An aligned checkpoint of llama_pair's base whose Δ is low-rank plus noise, in both AV forms."""

    aligned_state: dict
    aligned_dir: Path
    full_av: Path  # full form, F32
    lowrank_av: Path  # low-rank form, rank 16
    second_av: Path  # another low-rank vector (another fine-tune), rank 8


@pytest.fixture(scope="session")
def lowrank_pair(llama_pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> LowRankPair:
    from converters import convert

    root = tmp_path_factory.mktemp("lowrank")
    state = tm.lowrank_perturbed(llama_pair.base_model, 11, rank=8, scale=0.3, noise=0.3)
    aligned_dir = tm.save(llama_pair.base_model, state, root / "aligned", llama_pair.base_dir / "tokenizer.model")
    full = convert(llama_pair.base_dir, aligned_dir, root / "full.avec.gguf", name="medical", domain="medical").path
    lowrank = root / "medical.r16.avec.gguf"
    convert(llama_pair.base_dir, aligned_dir, lowrank, name="medical", domain="medical", rank=16)
    state2 = tm.lowrank_perturbed(llama_pair.base_model, 12, rank=4, scale=0.2, noise=0.2, untouched=("layers.1",))
    dir2 = tm.save(llama_pair.base_model, state2, root / "aligned2", llama_pair.base_dir / "tokenizer.model")
    second = root / "legal.r8.avec.gguf"
    convert(llama_pair.base_dir, dir2, second, name="legal", domain="legal", rank=8)
    return LowRankPair(state, aligned_dir, full, lowrank, second)
