"""Live knobs: one loaded base, λ per call through llama.cpp's runtime adapters, against merged models."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from llama_cpp import Llama

from alignvec_gguf import merge
from alignvec_gguf.cpu import new_llama
from alignvec_gguf.errors import CompatibilityError, InputError
from alignvec_gguf.live import LiveModel

PROMPTS = ["the patient reports", "a contract is binding when"]
N_TOKENS = 24


def greedy(llm: Llama, prompt: str) -> str:
    return llm.create_completion(prompt, max_tokens=N_TOKENS, temperature=0.0)["choices"][0]["text"]


def merged_outputs(base: Path, vectors: dict, tmp_path: Path) -> list[str]:
    path = merge(base, vectors, tmp_path / f"m{len(list(tmp_path.iterdir()))}.gguf").path
    llm = new_llama(path, n_ctx=128, n_threads_batch=1, verbose=False)
    try:
        return [greedy(llm, p) for p in PROMPTS]
    finally:
        llm.close()


@pytest.fixture(scope="module")
def live(llama_pair, lowrank_pair):
    model = LiveModel(
        llama_pair.base_gguf,
        {"medical": lowrank_pair.lowrank_av, "legal": lowrank_pair.second_av},
        lambda_range=(-2.0, 2.0),
        n_ctx=128,
        n_threads_batch=1,
    )
    yield model
    model.close()


def test_consecutive_requests_with_different_lambda_match_merged_models(live, llama_pair, lowrank_pair, tmp_path):
    """The done-when test: per-request λ on one live model == a separately merged model at each λ."""
    lambdas = [1.5, -1.0, 1.5, 0.0]  # back and forth on the same prompts: no stale KV cache may leak through
    got = [[live.generate(p, alignment={"medical": lam}, max_tokens=N_TOKENS) for p in PROMPTS] for lam in lambdas]
    want = {lam: merged_outputs(llama_pair.base_gguf, {lowrank_pair.lowrank_av: lam}, tmp_path) for lam in set(lambdas)}
    for lam, outputs in zip(lambdas, got, strict=True):
        assert outputs == want[lam], f"λ = {lam}"
    assert got[0] != got[1] and got[1] != got[3]  # the knob changes the answers
    assert live.generate(PROMPTS[0], max_tokens=N_TOKENS) == got[3][0]  # no alignment is the base


def test_two_knobs_at_once_match_the_merge_of_both(live, llama_pair, lowrank_pair, tmp_path):
    alignment = {"medical": 0.7, "legal": -1.5}
    got = [live.generate(p, alignment=alignment, max_tokens=N_TOKENS) for p in PROMPTS]
    want = merged_outputs(llama_pair.base_gguf, {lowrank_pair.lowrank_av: 0.7, lowrank_pair.second_av: -1.5}, tmp_path)
    assert got == want
    assert got != [live.generate(p, alignment={"medical": 0.7}, max_tokens=N_TOKENS) for p in PROMPTS]


def test_logits_match_the_merged_model(llama_pair, lowrank_pair, tmp_path):
    tokens = [1, 5, 17, 42, 99, 200, 7, 3]
    with LiveModel(
        llama_pair.base_gguf, [lowrank_pair.lowrank_av], n_ctx=64, n_threads_batch=1, logits_all=True
    ) as live:
        for lam in (-0.5, 2.0):
            with live.using({"medical": lam}) as llm:  # the name comes from the file's alignvec.name
                llm.reset()
                llm.eval(tokens)
                got = np.array(llm.scores[: len(tokens)], dtype=np.float32)
            merged = new_llama(
                merge(llama_pair.base_gguf, {lowrank_pair.lowrank_av: lam}, tmp_path / "m.gguf").path,
                n_ctx=64,
                n_threads_batch=1,
                logits_all=True,
                verbose=False,
            )
            merged.eval(tokens)
            want = np.array(merged.scores[: len(tokens)], dtype=np.float32)
            merged.close()
            assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_adapter_type_gives_the_merge_of_factors_stored_in_that_type(llama_pair, lowrank_pair, tmp_path):
    """adapter_type="q8_0" on an F32 file: llama.cpp gets Q8_0 factors, and the live model is the merge of the
    converter's own Q8_0 file of the same vector, up to the rounding of the activations that ggml's Q8_0
    kernels add (so not token for token, unlike F32 factors): the knob's shift of the logits is kept."""
    from gguf import GGMLQuantizationType as QT

    from alignvec_gguf import AlignmentVector
    from converters import convert

    q8 = tmp_path / "medical.q8.avec.gguf"
    convert(llama_pair.base_dir, lowrank_pair.aligned_dir, q8, name="medical", domain="medical", rank=16, dtype="q8_0")
    f32_av, q8_av = AlignmentVector(lowrank_pair.lowrank_av), AlignmentVector(q8)
    assert {f32_av.storage_type(n) for n in f32_av.names} == {QT.F32}
    assert QT.Q8_0 in {q8_av.storage_type(n) for n in q8_av.names}
    tokens, lam = [1, 5, 17, 42, 99, 200, 7, 3], 1.5

    def scores(llm: Llama) -> np.ndarray:
        llm.reset()
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)

    kwargs = {"n_ctx": 64, "n_threads_batch": 1, "logits_all": True}
    got: dict[str, np.ndarray] = {}
    for key, av, adapter_type in (
        ("restored", lowrank_pair.lowrank_av, "q8_0"),
        ("q8_file", q8, None),
        ("f32", lowrank_pair.lowrank_av, None),
    ):
        with LiveModel(llama_pair.base_gguf, {"m": av}, adapter_type=adapter_type, **kwargs) as live:
            with live.using({"m": lam}) as llm:
                got[key] = scores(llm)
            with live.using({}) as llm:
                base = scores(llm)
    merged = new_llama(merge(llama_pair.base_gguf, {q8: lam}, tmp_path / "m.gguf").path, verbose=False, **kwargs)
    want = scores(merged)
    merged.close()
    shift = np.abs(want - base).max()
    assert shift > 0.05 * np.abs(want).max()  # the knob moves the logits
    assert np.abs(got["restored"] - want).max() <= 0.05 * shift
    # llama.cpp got the Q8_0 file's factors, not the F32 ones (which differ from them by their rounding)
    assert np.abs(got["restored"] - got["q8_file"]).max() < 0.1 * np.abs(got["f32"] - got["q8_file"]).max()
    with pytest.raises(InputError, match="adapter_type"):
        LiveModel(llama_pair.base_gguf, [lowrank_pair.lowrank_av], adapter_type="q4_k")


def test_folded_knobs_are_the_merge_of_the_mix_and_follow_every_change(llama_pair, lowrank_pair, tmp_path):
    """fold=True: the vectors at their λ as one adapter of the summed rank, rebuilt when a λ changes. The logits
    are the merged model's (the float32 sums run in another order), for one knob, both, and back to none."""
    tokens = [1, 5, 17, 42, 99, 200, 7, 3]
    kwargs = {"n_ctx": 64, "n_threads_batch": 1, "logits_all": True}
    vectors = {"medical": lowrank_pair.lowrank_av, "legal": lowrank_pair.second_av}

    def scores(llm: Llama) -> np.ndarray:
        llm.reset()
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)

    mixes = [{"medical": 0.7, "legal": -1.5}, {"medical": 1.5}, {"medical": 1.5, "legal": 0.5}, {}]
    with LiveModel(llama_pair.base_gguf, vectors, fold=True, **kwargs) as live:
        assert live._adapters is None  # no adapter per vector: only the folded one
        got = []
        for alignment in mixes:
            with live.using(alignment) as llm:
                got.append(scores(llm))
        assert live._folded is None  # every λ at 0: no adapter left in llama.cpp
    base = new_llama(llama_pair.base_gguf, verbose=False, **kwargs)
    want_base = scores(base)
    base.close()
    for alignment, logits in zip(mixes, got, strict=True):
        mix = {vectors[name]: lam for name, lam in alignment.items()}
        if not mix:
            assert np.array_equal(logits, want_base)
            continue
        merged = new_llama(merge(llama_pair.base_gguf, mix, tmp_path / "m.gguf").path, verbose=False, **kwargs)
        want = scores(merged)
        merged.close()
        assert np.abs(want - want_base).max() > 0.05 * np.abs(want).max()  # the knobs move the logits
        assert np.abs(logits - want).max() <= 1e-3 * np.abs(want).max(), alignment
    with LiveModel(llama_pair.base_gguf, vectors, fold=True, n_ctx=128, n_threads_batch=1) as live:
        # greedy answers as the unfolded live model gives them (which equal merged models: tests above)
        assert (
            live.generate(PROMPTS[0], alignment=mixes[0], max_tokens=N_TOKENS)
            == merged_outputs(llama_pair.base_gguf, {vectors[k]: v for k, v in mixes[0].items()}, tmp_path)[0]
        )


def test_concurrent_threads_are_serialized_and_each_gets_its_lambda(live):
    lambdas = [1.5, -1.0, 0.5, 0.0, -2.0, 1.0]
    sequential = {lam: live.generate(PROMPTS[0], alignment={"medical": lam}, max_tokens=12) for lam in lambdas}
    results: dict[float, str] = {}
    errors: list[BaseException] = []

    def worker(lam: float) -> None:
        try:
            results[lam] = live.generate(PROMPTS[0], alignment={"medical": lam}, max_tokens=12)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(lam,)) for lam in lambdas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and results == sequential


def test_streaming_gives_the_same_text_and_releases_the_model(live):
    alignment = {"medical": -1.0, "legal": 0.5}
    chunks = live.create_completion(PROMPTS[1], alignment=alignment, max_tokens=16, temperature=0.0, stream=True)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == live.generate(PROMPTS[1], alignment=alignment, max_tokens=16)
    chat = live.create_chat_completion(
        [{"role": "user", "content": "hello"}], alignment=alignment, max_tokens=8, temperature=0.0
    )
    assert chat["choices"][0]["message"]["role"] == "assistant"
    stream = live.create_completion(PROMPTS[0], alignment=alignment, max_tokens=16, stream=True)
    next(stream)
    stream.close()  # an abandoned stream, once closed, frees the model for the next call
    assert live.generate(PROMPTS[0], max_tokens=2) is not None


@pytest.mark.parametrize(
    "alignment,needle",
    [
        ({"surgery": 1.0}, "unknown alignment vector 'surgery'; this model has: medical, legal"),
        ({"medical": 2.5}, "outside the allowed range [-2, 2]"),
        ({"medical": float("nan")}, "outside the allowed range"),
        ({"medical": "high"}, "must be a number"),
        ({"medical": True}, "must be a number"),
        ([("medical", 1.0)], "must map vector names"),
    ],
)
def test_bad_alignment_is_refused_before_any_work(live, alignment, needle):
    with pytest.raises(InputError) as e:
        live.create_completion("x", alignment=alignment, max_tokens=1)
    assert needle in str(e.value)
    with pytest.raises(InputError):  # streams fail on the call, not at the first chunk
        live.create_completion("x", alignment=alignment, max_tokens=1, stream=True)


def without_tensor(src: Path, drop: str, out: Path) -> Path:
    """A copy of a GGUF model without one tensor: another tensor layout, as another model would have."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(out, str(reader.get_field("general.architecture").contents()))
    for f in reader.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    for t in reader.tensors:
        if t.name != drop:
            writer.add_tensor(t.name, np.asarray(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_bad_vectors_are_refused(llama_pair, lowrank_pair, tmp_path):
    with pytest.raises(InputError, match="full form; live knobs need the low-rank form"):
        LiveModel(llama_pair.base_gguf, {"medical": lowrank_pair.full_av})
    with pytest.raises(InputError, match="given twice"):
        LiveModel(llama_pair.base_gguf, [lowrank_pair.lowrank_av, lowrank_pair.lowrank_av])
    with pytest.raises(InputError, match="include 0"):
        LiveModel(llama_pair.base_gguf, [lowrank_pair.lowrank_av], lambda_range=(0.5, 2.0))
    other_base = without_tensor(llama_pair.base_gguf, "blk.1.ffn_norm.weight", tmp_path / "other.gguf")
    with pytest.raises(CompatibilityError, match="different tensor layout"):
        LiveModel(other_base, [lowrank_pair.lowrank_av])
