"""``alignvec demo`` on the bundled tiny models: it runs, the dial changes the answers, λ = 0 is the base."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from alignvec_gguf import demo
from alignvec_gguf.cli import main

N_TOKENS = 16


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNVEC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_bundled_data_is_packaged():
    data = resources.files("alignvec_gguf") / "demo_data"
    for name in (demo.BASE_FILE, demo.AV_FILE, demo.PROMPTS_FILE, "PROVENANCE.md"):
        assert (data / name).is_file(), name
    prompts = json.loads((data / demo.PROMPTS_FILE).read_text(encoding="utf-8"))
    assert prompts == demo.demo_prompts() and len(prompts) >= 2
    size = sum((data / name).stat().st_size for name in (demo.BASE_FILE, demo.AV_FILE))  # type: ignore[attr-defined]
    assert size < 5_000_000


def test_cli_demo_prints_every_lambda(cache, capsys):
    assert main(["-q", "demo", "-n", str(N_TOKENS)]) == 0
    out = capsys.readouterr().out
    assert "θ(λ) = θ_base + λ·AV" in out
    for label in ("λ=-1", "λ=0 base", "λ=0.5", "λ=1 expert"):
        assert out.count(label) == len(demo.demo_prompts()), label
    assert any(cache.rglob("*.gguf")), "merges go to the cache"


def test_dial_changes_answers_and_zero_is_the_base(cache):
    from llama_cpp import Llama

    table = demo.generate_table([0.0, 1.0], N_TOKENS)
    prompts = demo.demo_prompts()
    assert set(table) == {0.0, 1.0}
    assert all(len(outputs) == len(prompts) for outputs in table.values())
    for plain, expert in zip(table[0.0], table[1.0], strict=True):
        assert plain != expert
        assert expert.strip().startswith("Clinically")
        assert not plain.strip().startswith("Clinically")

    with demo.demo_data() as data:
        base = Llama(model_path=str(data.base), n_ctx=demo.N_CTX, verbose=False, seed=demo.SEED)
        for prompt, merged in zip(prompts, table[0.0], strict=True):
            direct = base.create_completion(prompt, max_tokens=N_TOKENS, temperature=0.0, seed=demo.SEED)
            assert direct["choices"][0]["text"] == merged  # type: ignore[index]
        base.close()


def test_bad_lambdas_and_token_counts(cache, capsys):
    assert main(["-q", "demo", "--lambdas", "nan"]) == 2
    assert "finite" in capsys.readouterr().err
    assert main(["-q", "demo", "-n", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_missing_demo_data_is_one_line(cache, monkeypatch, capsys):
    monkeypatch.setattr(demo, "AV_FILE", "nothing-here.avec.gguf")
    assert main(["-q", "demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nothing-here.avec.gguf is missing" in err and "\n" not in err


def test_format_table_wraps_under_labels():
    table = {-1.0: ["word " * 40], 0.0: [""], 1.0: ["Clinically, short."]}
    text = demo.format_table(["Question: q? Answer:"], table, width=60)
    lines = text.splitlines()
    assert lines[0] == "Question: q? Answer:"
    assert all(len(line) <= 60 for line in lines)
    assert "λ=0 base  (nothing)" in text and "λ=1 expert  Clinically, short." in text
