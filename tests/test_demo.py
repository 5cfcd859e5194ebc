"""``alignvec demo`` on the bundled preference-spectrum models: it runs, the dial moves answers, λ = 0 is the base."""

from __future__ import annotations

from importlib import resources

import pytest

from alignvec_gguf import demo
from alignvec_gguf.avfile import AlignmentVector
from alignvec_gguf.cli import main

N_TOKENS = 12


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNVEC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_bundled_data_is_packaged_and_small():
    data = resources.files("alignvec_gguf") / "demo_data"
    names = [demo.BASE_FILE, demo.HELDOUT_FILE, "PROVENANCE.md", *(demo.av_file(d) for d in demo.DOMAINS)]
    for name in names:
        assert (data / name).is_file(), name
    assert sum((data / name).stat().st_size for name in names) < 10_000_000  # type: ignore[attr-defined]
    with demo.demo_data() as files:
        for domain, path in files.vectors.items():
            assert AlignmentVector(path).info.domain == domain
    assert demo.demo_question().domain == "medical"


def test_cli_demo_prints_answers_and_table(cache, capsys, monkeypatch):
    monkeypatch.setattr(demo, "TABLE_LAMBDAS", (0.0, 1.0))  # the full table is the same code, 4x longer
    assert main(["-q", "demo", "-n", str(N_TOKENS)]) == 0
    out = capsys.readouterr().out
    assert "θ(λ) = θ_base + Σ λ_d·AV_d" in out
    assert demo.demo_question().prompt in out
    for label in ("λ=-1", "λ=0 base", "λ=0.5", "λ=1 expert AV"):
        assert out.count(label) == 1, label
    assert "Preference accuracy" in out
    for domain in demo.DOMAINS:
        assert f"{domain} (n=" in out
    table = out[out.index(f"Q4_K_M base ({demo.BASE_FILE})") :].splitlines()
    assert len(table) == 3 + 2
    assert any(cache.rglob("*.gguf")), "merges go to the cache"


def test_dial_changes_the_answer_and_zero_is_the_base(cache):
    from llama_cpp import Llama

    answers = demo.generate_answers([0.0, 1.0], N_TOKENS)
    assert set(answers) == {0.0, 1.0}
    assert answers[1.0].strip().startswith("Clinically")
    assert not answers[0.0].strip().startswith("Clinically")

    with demo.demo_data() as data:
        base = Llama(model_path=str(data.base), n_ctx=demo.N_CTX, verbose=False, seed=demo.SEED)
        direct = base.create_completion(demo.demo_question().prompt, max_tokens=N_TOKENS, temperature=0.0)
        assert direct["choices"][0]["text"] == answers[0.0]  # type: ignore[index]
        base.close()


def test_bad_lambdas_and_token_counts(cache, capsys):
    assert main(["-q", "demo", "--lambdas", "nan"]) == 2
    assert "finite" in capsys.readouterr().err
    assert main(["-q", "demo", "-n", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_missing_demo_data_is_one_line(cache, monkeypatch, capsys):
    monkeypatch.setattr(demo, "HELDOUT_FILE", "nothing-here.json")
    assert main(["-q", "demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nothing-here.json is missing" in err and "\n" not in err


def test_format_answers_wraps_under_labels():
    answers = {-1.0: "word " * 40, 0.0: "", 1.0: "Clinically, short."}
    text = demo.format_answers("Question: q? Answer:", answers, width=60)
    lines = text.splitlines()
    assert lines[0] == "Question: q? Answer:"
    assert all(len(line) <= 60 for line in lines)
    assert "λ=0 base  (nothing)" in text and "λ=1 expert AV  Clinically, short." in text
