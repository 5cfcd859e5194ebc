"""The AMX guard (alignvec_gguf/cpu.py): the decision, what it hands llama.cpp, and every entry point using it.

AMX cannot be had on every CI machine, so the CPU's answer is faked (``cpu.extra_buffer_types``) and the
guarded path runs everywhere; on a machine that really has AMX the same tests run unfaked too (the
default ``auto`` is the guard there), and the rest of the suite decodes through it.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from llama_cpp import Llama

from alignvec_gguf import cpu, ggml, load
from alignvec_gguf.cli import main
from alignvec_gguf.errors import InputError
from alignvec_gguf.ggufread import GGUFModel
from tests.support import tinymodels as tm

DEMO = Path(__file__).resolve().parent.parent / "alignvec_gguf" / "demo_data"
BASE = DEMO / "base.Q4_K_M.gguf"
TOKENS = [1, 300, 301, 302, 303, 304, 305, 306, 307, 308]
REAL_AMX = cpu.AMX in cpu.extra_buffer_types()
HAS_REPACK = cpu.REPACK in cpu.extra_buffer_types()


@pytest.fixture
def amx(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Pretend this CPU and build offer the AMX buffer (first, as llama.cpp lists it); record each load's guard."""
    monkeypatch.delenv(cpu.ENV, raising=False)
    real_extra = cpu.extra_buffer_types
    monkeypatch.setattr(cpu, "extra_buffer_types", lambda: (cpu.AMX, *(b for b in real_extra() if b != cpu.AMX)))
    seen: list[bool] = []
    real = cpu._guarded_params

    def spy(params, applied):  # noqa: ANN001, ANN202
        out = real(params, applied)
        assert out.use_extra_bufts is False
        seen.append(applied.plan.guarded)
        return out

    monkeypatch.setattr(cpu, "_guarded_params", spy)
    return seen


def logits(llm: Llama) -> np.ndarray:
    llm.reset()
    llm.eval(TOKENS)
    return np.array(llm.scores[: len(TOKENS)], dtype=np.float32)


# --- the decision, with the CPU's answer faked ------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,choice,guarded",
    [
        (("AMX", "CPU_REPACK"), "auto", True),
        (("AMX",), "auto", True),
        (("CPU_REPACK",), "auto", False),
        ((), "auto", False),
        (("KLEIDIAI", "CPU_REPACK"), "auto", False),
        (("AMX", "CPU_REPACK"), "allow", False),
        (("CPU_REPACK",), "avoid", True),
    ],
)
def test_decision(extra: tuple[str, ...], choice: str, guarded: bool) -> None:
    assert cpu.decide(extra, choice)[0] is guarded


def test_mode_from_keyword_and_environment() -> None:
    assert cpu.mode(env={}) == "auto"
    assert cpu.mode(env={cpu.ENV: " Allow "}) == "allow"
    assert cpu.mode(env={cpu.ENV: "avoid"}) == "avoid"
    assert cpu.mode(allow_amx=True, env={cpu.ENV: "avoid"}) == "allow"  # the keyword wins
    assert cpu.mode(allow_amx=False, env={cpu.ENV: "allow"}) == "avoid"
    with pytest.raises(InputError, match="ALIGNVEC_AMX='on' is not one of auto, avoid, allow"):
        cpu.mode(env={cpu.ENV: "on"})


@pytest.mark.skipif(not HAS_REPACK, reason="this llama.cpp build has no CPU_REPACK buffer type")
def test_plan_pins_exactly_what_the_repack_buffer_takes() -> None:
    plan = cpu.plan(BASE, extra=(cpu.AMX, cpu.REPACK), allow_amx=None)
    assert plan.guarded and plan.pinned
    buft = ggml.cpu_extra_buffer_types()[cpu.REPACK]
    expected = []
    for t in GGUFModel(BASE):
        ne = t.info.ne
        if len(ne) == 2 and t.name != "token_embd.weight" and ggml.buft_takes_weight(buft, t.tensor_type, *ne):
            expected.append(t.name)
    names = [t.name for t in GGUFModel(BASE)]
    # the patterns are the ECMAScript regexes llama.cpp searches with; these ones mean the same in Python
    matched = [n for n in names if any(re.search(p, n) for p in plan.pinned)]
    assert matched == expected and plan.pinned_tensors == len(expected)
    assert "token_embd.weight" not in matched  # read with get_rows: a repacked layout would be garbage
    # a Q6_K or F32 tensor is not repackable on every CPU: whatever ggml says is what is pinned
    assert all(ggml.buft_takes_weight(buft, t.tensor_type, *t.info.ne) for t in GGUFModel(BASE) if t.name in matched)


def test_plan_without_repack_buffer_or_with_offload_pins_nothing() -> None:
    assert cpu.plan(BASE, extra=(cpu.AMX,)).pinned == ()
    assert cpu.plan(BASE, extra=(cpu.AMX, cpu.REPACK), offload=True).pinned == ()
    assert cpu.plan(BASE, extra=(cpu.AMX, cpu.REPACK), offload=True).guarded
    assert not cpu.plan(BASE, extra=(cpu.REPACK,)).guarded


def test_plan_of_an_unreadable_file_is_still_guarded(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 12)
    plan = cpu.plan(bad, extra=(cpu.AMX, cpu.REPACK))
    assert plan.guarded and plan.pinned == ()


# --- what llama.cpp gets ------------------------------------------------------------------------------


def test_guarded_load_gives_the_same_model(amx: list[bool]) -> None:
    """The guard changes where weights live, not what the model computes."""
    guarded = cpu.new_llama(BASE, n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    assert guarded.alignvec_buffers.guarded and amx == [True]
    got = logits(guarded)
    guarded.close()
    plain = cpu.new_llama(
        BASE, buffers=cpu.BufferPlan(True, "no extra buffers"), n_ctx=64, logits_all=True, n_threads=1, verbose=False
    )
    ref_plain = logits(plain)
    plain.close()
    # repacked and plain kernels round differently; both are the same Q4_K model
    assert np.abs(got - ref_plain).max() <= 2e-2 * np.abs(ref_plain).max()
    if not REAL_AMX:  # llama.cpp's own selection: the same repacked layout, so the same numbers
        default = cpu.new_llama(BASE, allow_amx=True, n_ctx=64, logits_all=True, n_threads=1, verbose=False)
        assert not default.alignvec_buffers.guarded
        np.testing.assert_array_equal(got, logits(default))
        default.close()


def test_other_loads_are_untouched(amx: list[bool], llama_pair) -> None:  # noqa: ANN001
    """A Llama built outside new_llama (a user's own, another thread) gets llama-cpp-python's own call."""
    results: list[bool] = []
    llm = cpu.new_llama(BASE, n_ctx=32, verbose=False)  # installs the dispatcher
    llm.close()
    amx.clear()
    plain = llama_pair.base_gguf  # F32: no AMX kernel takes it, so an unguarded load is safe on any CPU

    def other() -> None:
        Llama(model_path=str(plain), n_ctx=32, verbose=False).close()
        results.append(True)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    other()
    assert results == [True, True] and amx == []


def test_amx_opt_in(amx: list[bool], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu.ENV, "allow")
    assert not cpu.plan(BASE).guarded
    monkeypatch.delenv(cpu.ENV)
    assert cpu.plan(BASE).guarded
    assert not cpu.plan(BASE, allow_amx=True).guarded


# --- every entry point that builds a Llama decodes through the guard -------------------------------------


def test_load_cached_and_direct(amx: list[bool], llama_pair, quantized_bases, tmp_path: Path) -> None:  # noqa: ANN001
    base = quantized_bases["Q4_K_M"]
    for mode in ("cached", "direct"):
        llm = load(base, {llama_pair.av: 0.5}, mode=mode, cache_dir=tmp_path, n_ctx=64, logits_all=True, verbose=False)
        assert llm.alignvec_buffers.guarded, mode
        assert np.isfinite(logits(llm)).all()
        llm.close()
    llm = load(base, {llama_pair.av: 0.0}, cache_dir=tmp_path, n_ctx=64, verbose=False)  # λ = 0: the base as is
    assert llm.alignvec_buffers.guarded
    llm.close()
    assert amx == [True, True, True]
    opted_in = load(base, {llama_pair.av: 0.5}, cache_dir=tmp_path, allow_amx=True, n_ctx=64)
    assert opted_in.alignvec_buffers.guarded is False


def test_live_model(amx: list[bool], llama_pair, lowrank_pair, quantized_bases) -> None:  # noqa: ANN001
    from alignvec_gguf.live import LiveModel

    with LiveModel(quantized_bases["Q4_K_M"], [lowrank_pair.lowrank_av], n_ctx=64) as live:
        assert live.llm.alignvec_buffers.guarded
        assert isinstance(live.generate("the patient reports", alignment={"medical": 1.0}, max_tokens=4), str)
    assert amx == [True]


def test_eval_scorer_fidelity_and_test_helpers(amx: list[bool], quantized_bases) -> None:  # noqa: ANN001
    from alignvec_gguf.eval import Scorer
    from alignvec_gguf.fidelity import model_logits, tokenize

    scorer = Scorer(BASE)
    assert scorer.llm.alignvec_buffers.guarded
    scorer.close()
    tokens = tokenize(quantized_bases["Q4_K_M"], "the patient reports pain")
    assert np.isfinite(model_logits(quantized_bases["Q4_K_M"], tokens)).all()
    assert np.isfinite(tm.llama_logits(quantized_bases["Q4_K_M"], tokens)).all()
    assert amx == [True] * 4


def test_demo_generate(amx: list[bool]) -> None:
    from alignvec_gguf import demodata as demo

    assert isinstance(demo.generate(BASE, "The patient", 4), str)
    assert amx == [True]


def test_cli_run(amx: list[bool], llama_pair, quantized_bases, tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    monkeypatch.setenv("ALIGNVEC_CACHE_DIR", str(tmp_path))
    argv = ["-q", "run", str(quantized_bases["Q4_K_M"]), "-v", f"{llama_pair.av}=0.5", "-p", "the patient", "-n", "4"]
    assert main(argv) == 0
    assert amx == [True]


def test_doctor(capsys: pytest.CaptureFixture[str], amx: list[bool]) -> None:
    assert main(["doctor", str(BASE), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["guard"] == "on" and cpu.AMX in report["cpu_extra_buffer_types"]
    assert report["model_pinned_to_repack"] == (cpu.plan(BASE).pinned_tensors)
    assert main(["doctor"]) == 0
    assert "guard" in capsys.readouterr().out
    assert main(["doctor", "/nonexistent.gguf"]) == 2


def test_guard_process_covers_a_users_own_llama(amx: list[bool], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "_process_wide", None)
    cpu.guard_process()
    llm = Llama(model_path=str(BASE), n_ctx=32, logits_all=True, verbose=False)
    assert np.isfinite(logits(llm)).all()
    llm.close()
    assert amx == [True]


def test_direct_load_places_weights_by_the_merged_types(amx: list[bool], llama_pair, quantized_bases, tmp_path) -> None:  # noqa: ANN001
    """Touched Q4_K tensors written as Q8_0 must not be pinned where the repack buffer takes only Q4_K."""
    base = quantized_bases["Q4_K_M"]
    file_plan = cpu.plan(base)
    llm = load(base, {llama_pair.av: 1.0}, mode="direct", requant="q8_0", n_ctx=64, logits_all=True, verbose=False)
    direct_plan = llm.alignvec_buffers
    assert np.isfinite(logits(llm)).all()
    llm.close()
    buft = ggml.cpu_extra_buffer_types().get(cpu.REPACK)
    if buft is not None and not ggml.buft_takes_weight(buft, QT.Q8_0, 256, 256):
        assert direct_plan.pinned_tensors < file_plan.pinned_tensors
