"""Preference accuracy, the multidomain search and ``alignvec eval``, on the bundled preference-spectrum models.

The oracles: the scorer's KV-cache reuse gives the same log-likelihoods as scoring each text from scratch
with llama.cpp's own ``logprobs``; λ = 0 is the base and prefers the generic level; λ = 1 (Q4_K_M,
requant same) prefers the expert level; the search picks the grid points those two facts imply.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from alignvec_gguf import demodata as demo
from alignvec_gguf.cli import main
from alignvec_gguf.cli.report import eval_table, search_table
from alignvec_gguf.errors import FormatError, InputError
from alignvec_gguf.eval import (
    MixScorer,
    Scorer,
    evaluate,
    evaluate_dera,
    preferred,
    result_from_json,
    shares,
)
from alignvec_gguf.evalset import LEVELS, EvalItem, load_eval_set
from alignvec_gguf.search import Point, best_points, search

LIMIT = 6  # questions per domain in the slower tests


@pytest.fixture(scope="module")
def bundled():
    with demo.demo_data() as data:
        yield data


@pytest.fixture(scope="module")
def items(bundled):
    return bundled.items()


def _few(items, n=LIMIT):
    out, seen = [], {}
    for it in items:
        if seen.get(it.domain, 0) < n:
            out.append(it)
            seen[it.domain] = seen.get(it.domain, 0) + 1
    return out


def test_bundled_eval_set_covers_three_domains_and_levels(items):
    domains = {it.domain for it in items}
    assert domains == set(demo.DOMAINS)
    for d in domains:
        assert sum(it.domain == d for it in items) >= 15
    assert all(set(it.responses) == set(LEVELS) for it in items)


def test_scores_match_llama_cpp_from_scratch(bundled, items):
    """Reusing the prompt's KV cache must give the log-likelihoods of a fresh evaluation of prompt + response."""
    from alignvec_gguf.cpu import new_llama

    item = items[0]
    scorer = Scorer(bundled.base)
    try:
        got = scorer.level_scores(item)
        fresh = new_llama(bundled.base, n_ctx=0, logits_all=True, verbose=False)
        for level in LEVELS:
            prompt = fresh.tokenize(item.prompt.encode(), add_bos=True)
            full = fresh.tokenize(f"{item.prompt} {item.responses[level]}".encode(), add_bos=True)
            assert full[: len(prompt)] == prompt
            fresh.reset()
            fresh.eval(full)  # the EOS is predicted after the last token
            logits = np.asarray(fresh.scores[: len(full)], dtype=np.float64)
            logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
            logp -= logits.max(1, keepdims=True)
            targets = full[len(prompt) :] + [fresh.token_eos()]
            rows = range(len(prompt) - 1, len(full))
            expected = float(np.mean([logp[r, t] for r, t in zip(rows, targets, strict=True)]))
            assert got[level] == pytest.approx(expected, abs=1e-4), level
            assert got[level] < 0
        fresh.close()
    finally:
        scorer.close()


def test_dial_moves_every_domain_from_generic_to_expert(bundled, items):
    """On the Q4_K_M base: λ=0 prefers generic, λ=1 expert (≥ 0.9), λ=-1 mostly avoidance or generic."""
    result = evaluate(bundled.base, bundled.vectors, _few(items, 10), [-1.0, 0.0, 1.0])
    for domain in demo.DOMAINS:
        curve = result.curves[domain]
        assert curve[0.0]["generic"] >= 0.9, (domain, curve)
        assert curve[1.0]["expert"] >= 0.9, (domain, curve)
        assert curve[-1.0]["avoidance"] + curve[-1.0]["generic"] >= 0.6, (domain, curve)  # away from expert
        assert curve[-1.0]["avoidance"] >= curve[0.0]["avoidance"], (domain, curve)
        for lam in result.lambdas:
            assert math.isclose(sum(curve[lam].values()), 1.0)
    table = eval_table(result)
    assert "medical (n=" in table and table.count("\n") == 2 + len(result.lambdas)
    assert result.curves["medical"][-1.0]["avoidance"] >= 0.8  # the medical knob's reverse side is avoidance


def test_shares_count_the_preferred_level():
    class Fixed:
        def level_scores(self, item):
            return {"avoidance": -3.0, "generic": -1.0 if item.prompt == "g" else -2.0, "expert": -1.5}

    got = shares(Fixed(), [EvalItem("d", p, dict.fromkeys(LEVELS, "x")) for p in ("g", "e", "e", "e")])  # type: ignore[arg-type]
    assert got == {"avoidance": 0.0, "generic": 0.25, "expert": 0.75}
    assert preferred({"avoidance": 0.0, "generic": 0.0, "expert": -1.0}) == "avoidance"  # ties: spectrum order


def test_best_points_picks_the_worst_domain_best():
    def pt(lams, expert_shares):
        return Point(
            dict(zip("ab", lams, strict=True)),
            {d: {"avoidance": 0.0, "generic": 1 - e, "expert": e} for d, e in zip("ab", expert_shares, strict=True)},
        )

    points = [pt((0, 0), (0, 0)), pt((1, 0), (1, 0.2)), pt((1, 1), (0.9, 0.8)), pt((2, 2), (1, 0.8))]
    combos = {tuple(c.targets.values()): c for c in best_points(points, ["a", "b"], threshold=0.5)}
    assert len(combos) == 9
    assert combos[("expert", "expert")].lambdas == {"a": 2, "b": 2}  # min 0.8, mean 0.9 beats (1, 1)
    assert combos[("generic", "generic")].lambdas == {"a": 0, "b": 0} and combos[("generic", "generic")].reached
    assert combos[("expert", "generic")].lambdas == {"a": 1, "b": 0}
    assert not combos[("avoidance", "avoidance")].reached
    with pytest.raises(InputError):
        best_points([], ["a"])


def test_search_picks_the_best_point_of_a_small_grid(bundled, items):
    found = search(bundled.base, bundled.vectors, _few(items, 4), [0.0, 1.0])
    assert len(found.points) == 8 and len(found.combinations) == 27
    by_targets = {tuple(c.targets.values()): c for c in found.combinations}
    assert by_targets[("generic",) * 3].lambdas == dict.fromkeys(demo.DOMAINS, 0.0)
    assert by_targets[("generic",) * 3].reached
    assert by_targets[("expert", "generic", "generic")].lambdas["medical"] == 1.0
    points = {tuple(p.lambdas.values()): p for p in found.points}
    for combo in found.combinations:  # each pick is the grid's best worst-domain share for its targets
        picked = points[tuple(combo.lambdas.values())]
        assert combo.target_shares == {d: picked.shares[d][combo.targets[d]] for d in demo.DOMAINS}
        best = max(min(p.shares[d][combo.targets[d]] for d in demo.DOMAINS) for p in found.points)
        assert min(combo.target_shares.values()) == best
        assert combo.reached == (best >= found.threshold)
    text = search_table(found)
    assert text.startswith(f"multidomain search: {found.reached} of 27") and len(text.splitlines()) == 29
    assert json.loads(json.dumps(found.to_json()))["reached"] == found.reached


def test_cli_eval_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["-q", "eval", "--lambdas", "0", "1", "--limit", "3", "--search", "--grid", "0", "1", "-o", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "preference accuracy" in text and "multidomain search:" in text
    payload = json.loads((out / "eval.json").read_text())
    assert payload["eval"]["lambdas"] == [0.0, 1.0]
    assert set(payload["eval"]["domains"]) == set(demo.DOMAINS)
    assert payload["search"]["n_combinations"] == 27
    pytest.importorskip("matplotlib")
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_eval_compare_reports_the_gap(tmp_path, capsys, bundled):
    args = ["-q", "eval", "--lambdas", "0", "--limit", "2", "--compare", str(bundled.base), "--no-plot"]
    assert main([*args, "-o", str(tmp_path)]) == 0
    assert "largest expert-share difference" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text())["max_expert_gap"] == 0.0


def test_bad_eval_input_is_one_line(tmp_path, capsys, bundled):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"domain": "medical", "prompt": "q", "responses": {"expert": "x"}}]')
    cases = [
        (["--data", str(tmp_path / "missing.json")], "does not exist"),
        (["--data", str(bad)], "expected"),
        (["--lambdas", "nan"], "finite"),
        (["--limit", "0"], "at least 1"),
        (["-v", str(bundled.vectors["medical"]), "-v", str(bundled.vectors["medical"])], "one vector per domain"),
    ]
    for extra, message in cases:
        assert main(["-q", "eval", "--no-plot", "-o", str(tmp_path / "o"), *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (extra, err)


def test_load_eval_set_errors(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("not json")
    with pytest.raises(FormatError, match="not readable JSON"):
        load_eval_set(path)
    path.write_text("[]")
    with pytest.raises(FormatError, match="non-empty"):
        load_eval_set(path)
    with pytest.raises(InputError, match="does not exist"):
        load_eval_set(tmp_path / "nope.json")


def test_separator_joins_prompt_and_response(tmp_path, bundled, items):
    """A chat-style set (``separator: ""``) scores prompt + response exactly as a plain set spelling the space out."""
    item = items[0]
    path = tmp_path / "chat.json"
    record = {"domain": item.domain, "prompt": item.prompt + " ", "separator": "", "responses": item.responses}
    path.write_text(json.dumps([record]))
    (loaded,) = load_eval_set(path)
    assert loaded.separator == "" and loaded.text("expert") == item.text("expert")
    scorer = Scorer(bundled.base)
    try:
        assert scorer.level_scores(loaded) == pytest.approx(scorer.level_scores(item), abs=1e-6)
    finally:
        scorer.close()
    path.write_text(json.dumps([{**record, "separator": 3}]))
    with pytest.raises(FormatError, match="separator"):
        load_eval_set(path)


def test_dera_mixes_logits_between_the_base_and_the_aligned_model(tmp_path, bundled, items):
    """λ = 0 is the base's score and λ = 1 the merged model's, exactly; λ = 0.5 mixes the logits, not the scores."""
    from alignvec_gguf import merge

    aligned = tmp_path / "medical.gguf"
    merge(bundled.base, {bundled.vectors["medical"]: 1.0}, aligned)
    item = next(it for it in items if it.domain == "medical")
    s0, s1 = Scorer(bundled.base), Scorer(aligned)
    try:
        mixed = MixScorer(s0, s1).level_scores_over(item, [0.0, 0.5, 1.0])
        assert mixed[0.0] == pytest.approx(s0.level_scores(item), abs=1e-9)
        assert mixed[1.0] == pytest.approx(s1.level_scores(item), abs=1e-9)
        z0, target = s0.response_logits(item, "expert")
        z1, _ = s1.response_logits(item, "expert")
        half = 0.5 * (z0 + z1)
        logp = (
            half - np.log(np.exp(half - half.max(1, keepdims=True)).sum(1, keepdims=True)) - half.max(1, keepdims=True)
        )
        assert mixed[0.5]["expert"] == pytest.approx(float(np.mean(logp[np.arange(len(target)), target])), abs=1e-9)
    finally:
        s0.close()
        s1.close()
    curve = evaluate_dera(bundled.base, {"medical": bundled.vectors["medical"]}, _few(items, 4), [0.0, 1.0])
    plain = evaluate(bundled.base, {"medical": bundled.vectors["medical"]}, _few(items, 4), [0.0, 1.0])
    assert curve.curves["medical"] == plain.curves["medical"]  # the two ends are the two models themselves
    assert curve.requant.startswith("DeRa")


def test_eval_result_round_trips_through_json(bundled, items):
    result = evaluate(bundled.base, {"legal": bundled.vectors["legal"]}, _few(items, 2), [0.0])
    back = result_from_json(json.loads(json.dumps(result.to_json())))
    assert (back.curves, back.lambdas, back.n_items, back.requant) == (
        result.curves,
        result.lambdas,
        result.n_items,
        result.requant,
    )
    with pytest.raises(FormatError, match="not an eval result"):
        result_from_json({"base": "x"})
