"""The vectors of a merge as one value (``mix.VectorMix``): opened and checked once, then passed on.

Oracles: counts of ``AlignmentVector`` constructions (each one maps and validates the file) and of
compatibility checks on the way from ``load()`` / ``cached_merge()`` to the merged file, and the merged
bytes, which must not depend on whether the caller passed a mapping or a mix.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import pytest

from alignvec_gguf import AlignmentVector, cached_merge, load, merge
from alignvec_gguf import mix as mix_mod
from alignvec_gguf.errors import InputError
from alignvec_gguf.mix import VectorMix


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> tuple[Counter[str], Counter[str]]:
    """(AV file name -> AlignmentVector constructions, AV file name -> compatibility checks), counted live."""
    opened: Counter[str] = Counter()
    checked: Counter[str] = Counter()
    real_init, real_check = AlignmentVector.__init__, mix_mod.check_compatible

    def init(self: AlignmentVector, path: object) -> None:
        opened[Path(str(path)).name] += 1
        real_init(self, path)  # type: ignore[arg-type]

    def check(model, base, vectors) -> None:  # type: ignore[no-untyped-def]
        pairs = list(vectors)
        for av, _ in pairs:
            checked[av.path.name] += 1
        real_check(model, base, pairs)

    monkeypatch.setattr(AlignmentVector, "__init__", init)
    monkeypatch.setattr(mix_mod, "check_compatible", check)
    return opened, checked


@pytest.fixture
def base(quantized_bases, tmp_path) -> Path:
    path = tmp_path / "base.Q4_K_M.gguf"
    shutil.copy(quantized_bases["Q4_K_M"], path)
    return path


def test_load_opens_and_checks_each_vector_once(llama_pair, second_av, base, tmp_path, counted):
    opened, checked = counted
    vectors = {str(llama_pair.av): 0.5, str(second_av[0]): -0.25}
    names = {llama_pair.av.name, second_av[0].name}
    llm = load(base, vectors, cache_dir=tmp_path / "cache", n_ctx=32)  # a cache miss: merged, then loaded
    llm.close()
    assert set(opened) == names and all(n == 1 for n in opened.values()), opened
    assert set(checked) == names and all(n == 1 for n in checked.values()), checked
    opened.clear()
    checked.clear()
    llm = load(base, vectors, cache_dir=tmp_path / "cache", n_ctx=32)  # a hit: the key, then the file
    llm.close()
    assert set(opened) == names and all(n == 1 for n in opened.values()), opened
    assert not checked  # checked when the entry was merged; a hit merges nothing


def test_direct_load_opens_and_checks_each_vector_once(llama_pair, base, counted):
    opened, checked = counted
    llm = load(base, {str(llama_pair.av): 0.5}, mode="direct", n_ctx=32)
    llm.close()
    assert opened == Counter({llama_pair.av.name: 1}) and checked == Counter({llama_pair.av.name: 1})


def test_cached_merge_opens_and_checks_each_vector_once(llama_pair, second_av, base, tmp_path, counted):
    opened, checked = counted
    vectors = {str(second_av[0]): 0.3, str(llama_pair.av): 0.5}
    path = cached_merge(base, vectors, cache_dir=tmp_path / "cache")
    assert path.is_file() and path.parent == tmp_path / "cache"
    want = Counter({llama_pair.av.name: 1, second_av[0].name: 1})
    assert opened == want and checked == want


def test_a_mix_merges_like_the_mapping_it_was_opened_from(llama_pair, second_av, base, tmp_path, counted):
    opened, _ = counted
    vectors = {str(llama_pair.av): 0.5, str(second_av[0]): 0.2}
    mix = VectorMix.open(vectors)
    assert [lam for _, lam in mix] == [0.5, 0.2] and [av.path for av, _ in mix] == [llama_pair.av, second_av[0]]
    assert VectorMix.open(mix) is mix  # a mix is used as it is
    from_mix = merge(base, mix, tmp_path / "a.gguf", threads=1)
    assert sum(opened.values()) == 2  # the merge opened nothing more
    from_mapping = merge(base, vectors, tmp_path / "b.gguf", threads=1)
    assert from_mix.path.read_bytes() == from_mapping.path.read_bytes()  # one process, one order, one thread count
    assert from_mix.touched == from_mapping.touched and from_mix.warnings == from_mapping.warnings


def test_a_mix_is_frozen_and_its_canonical_order_drops_zero_and_sorts(llama_pair, second_av):
    mix = VectorMix.open({str(llama_pair.av): 0.5, str(second_av[0]): 0.0, llama_pair.av: -0.5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        mix.items = ()  # type: ignore[misc]
    assert len(mix) == 3 and not mix.is_identity
    ordered = mix.canonical(lambda av, lam: (lam,))
    assert [lam for _, lam in ordered] == [-0.5, 0.5]  # λ = 0 left out, the rest by the key
    assert VectorMix.open({str(second_av[0]): 0.0}).is_identity


@pytest.mark.parametrize(
    ("vectors", "message"),
    [
        ([0.5], "vectors must map AV paths (or AlignmentVector objects) to λ"),
        ({"AV": float("nan")}, "must be a finite number"),
        ({"AV": True}, "must be a finite number"),
        ({"AV": 1e31}, "the merge computes in float32"),
    ],
)
def test_opening_a_bad_mix_is_one_input_error(llama_pair, vectors, message):
    if isinstance(vectors, dict):
        vectors = {str(llama_pair.av): lam for lam in vectors.values()}
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        VectorMix.open(vectors)
