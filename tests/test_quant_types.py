"""Every ggml type, the importance matrix and its fallback, stacked experts, split bases, the grid codecs.

Long module: one section per subject of the line above, all over the same quantized fixtures, built once
per module.

Oracles: ggml's own dequantizer (the grid codecs must agree bit for bit), ggml's own quantization of the
exact merged tensor (a merge's error may not exceed it), llama.cpp loading the merged file, and
llama.cpp's imatrix formats as its quantize tool reads them.

"""

from __future__ import annotations

import importlib
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFWriter

from alignvec_gguf import AlignmentVector, blockcodec, diagnose, ggml, merge, policy, requant
from alignvec_gguf.avfile import AVInfo, write_av
from alignvec_gguf.errors import CompatibilityError, FormatError
from alignvec_gguf.identity import signature
from alignvec_gguf.imatrix import load_imatrix
from alignvec_gguf.policy import IMATRIX_FALLBACK
from tests.support import tinymodels as tm
from tests.support.oracle import field, tensor_bytes, tensor_shape

merge_mod = importlib.import_module("alignvec_gguf.merge")  # the module (the package exports merge())

TOKENS = [1, 5, 17, 42, 99, 200, 7, 3]
ALL_TYPES = sorted(ggml.QUANTIZABLE - {QT.F32}, key=lambda t: t.name)
# ggml's IQ1/IQ2/IQ3 quantizers run at ~0.1 M elements/s: their bases hold that type in a few matrices only
SLOW = {QT.IQ1_S, QT.IQ1_M, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S}
SLOW_ONLY = "blk.0.attn_k"


@pytest.fixture(scope="module")
def typed_bases(llama_pair, tmp_path_factory):
    """The F32 test base with every matrix quantized to one type, built on demand."""
    root = tmp_path_factory.mktemp("typed")
    made: dict[QT, object] = {}

    def get(qtype: QT):
        if qtype not in made:
            only = SLOW_ONLY if qtype in SLOW else ""
            made[qtype] = tm.requantize_gguf(llama_pair.base_gguf, root / f"base-{qtype.name}.gguf", qtype, only=only)
        return made[qtype]

    return get


def _exact_target(base_reader, name, av, lam):
    t = next(t for t in base_reader.tensors if t.name == name)
    shape = tensor_shape(t)
    w = ggml.dequantize(tensor_bytes(base_reader, t), t.tensor_type, t.n_elements).reshape(-1, shape[-1])
    return w + np.float32(lam) * av.delta(name).reshape(-1, shape[-1])


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_merge_keeps_every_type_and_matches_ggml(llama_pair, typed_bases, tmp_path, qtype):
    """Every type ggml quantizes: kept (or its documented fallback), no worse than ggml's own requantization."""
    base = typed_bases(qtype)
    lam = 0.5
    report = merge(base, {llama_pair.av: lam}, tmp_path / "m.gguf", requant="same")
    b, m = GGUFReader(base), GGUFReader(report.path)
    av = AlignmentVector(llama_pair.av)
    by_name = {t.name: t for t in b.tensors}
    for t in m.tensors:
        bt = by_name[t.name]
        if t.name not in av.names:
            assert np.array_equal(tensor_bytes(m, t), tensor_bytes(b, bt))
            continue
        if len(tensor_shape(t)) == 1:  # norms stay F32 and get exact arithmetic
            assert t.tensor_type == QT.F32
            np.testing.assert_array_equal(np.asarray(t.data), _exact_target(b, t.name, av, lam).ravel())
            continue
        base_type = bt.tensor_type
        want = IMATRIX_FALLBACK.get(base_type, base_type)
        assert t.tensor_type == want, t.name
        target = _exact_target(b, t.name, av, lam)
        ours = ggml.dequantize(tensor_bytes(m, t), want, t.n_elements)
        if want == base_type:  # ggml's own requantization of the same sum
            ref = ggml.dequantize(ggml.quantize(target, base_type), base_type, t.n_elements)
            assert np.array_equal(ours, ref), t.name
        err = np.sqrt(np.mean((ours - target.ravel()) ** 2))
        assert err <= np.sqrt(np.mean(target**2)) * 0.5, t.name  # sane even for 1-bit types
    assert qtype in {t.tensor_type for t in b.tensors}
    if qtype in IMATRIX_FALLBACK:
        assert any("importance matrix" in w and IMATRIX_FALLBACK[qtype].name in w for w in report.warnings)
    logits = tm.llama_logits(report.path, TOKENS)
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("qtype", sorted(blockcodec.CODECS, key=lambda t: t.name), ids=lambda t: t.name)
def test_grid_codecs_agree_with_ggml(qtype):
    rows = np.random.default_rng(3).standard_normal((8, 512)).astype(np.float32)
    raw = ggml.quantize(rows, qtype)
    codec = blockcodec.CODECS[qtype]
    blocks = raw.reshape(-1, codec.type_size)
    q, _, _ = codec.unpack(blocks)
    assert q.min() >= codec.qmin and q.max() <= codec.qmax
    assert np.array_equal(codec.pack(blocks, q), blocks)  # the layout round-trips bit for bit
    np.testing.assert_array_equal(blockcodec.grid_values(raw, qtype), ggml.dequantize(raw, qtype, rows.size))
    same, refresh = requant.requantize_on_grid(raw, qtype, np.zeros(rows.size, np.float32))
    assert np.array_equal(same, raw) and not refresh.any()
    # a shift of exactly one step (on a table: the gap to the next entry) moves every code by one where the
    # range allows: the grid is the base's
    _, step, _ = codec.unpack(blocks)
    up = np.minimum(q + 1, codec.qmax)
    one = (codec.values(up) - codec.values(q)) * blockcodec.per_element(step, codec.block_size)
    moved, _ = requant.requantize_on_grid(raw, qtype, one.reshape(-1).astype(np.float32))
    q2, _, _ = codec.unpack(moved.reshape(-1, codec.type_size))
    inside = (q < codec.qmax) & (blockcodec.per_element(step, codec.block_size) != 0)
    assert inside.mean() > 0.8
    assert np.array_equal(q2[inside], q[inside] + 1)


@pytest.mark.parametrize("qtype", sorted(blockcodec.TABLE_TYPES, key=lambda t: t.name), ids=lambda t: t.name)
def test_table_grids_round_to_neighbouring_entries(qtype):
    """On a non-uniform table a step is the gap to the next entry: nearest picks the nearer neighbour, dither
    goes up with the probability of the fraction of the gap (unbiased), and a re-encode keeps the bytes."""
    rng = np.random.default_rng(11)
    rows = rng.standard_normal((64, 512)).astype(np.float32)
    raw = ggml.quantize(rows, qtype)
    codec = blockcodec.CODECS[qtype]
    blocks = raw.reshape(-1, codec.type_size)
    q, step, _ = codec.unpack(blocks)
    step = blockcodec.per_element(step, codec.block_size)
    base = ggml.dequantize(raw, qtype, rows.size).reshape(q.shape)
    # every element that can go up is asked to go a fraction f of its gap up
    ok = (q < codec.qmax) & (step > 0)
    f = rng.uniform(0.05, 0.95, q.shape).astype(np.float32)
    gap = (codec.values(np.minimum(q + 1, codec.qmax)) - codec.values(q)) * step
    shift = np.where(ok, f * gap, 0).astype(np.float32)

    def new_codes(rounding: str, seed: int = 0) -> np.ndarray:
        out, refresh = requant.requantize_on_grid(raw, qtype, shift.reshape(-1), rounding, seed=seed)
        assert not refresh.any()
        got = codec.unpack(out.reshape(-1, codec.type_size))[0]
        assert set(np.unique(got[ok] - q[ok])) <= {0, 1}  # only ever the neighbouring entry
        return got

    assert np.array_equal(new_codes("nearest")[ok], q[ok] + (f[ok] > 0.5))
    ups = np.mean([new_codes("dither", seed)[ok] - q[ok] for seed in range(8)], axis=0)
    # P(up) = f: the mean over 8 seeds and many elements, binned by f, tracks f
    bins = np.digitize(f[ok], np.linspace(0.05, 0.95, 10))
    for b in np.unique(bins):
        sel = bins == b
        assert abs(ups[sel].mean() - f[ok][sel].mean()) < 0.03
    merged = ggml.dequantize(requant.requantize_on_grid(raw, qtype, shift.reshape(-1), "dither", seed=1)[0], qtype,
                             rows.size).reshape(q.shape)  # fmt: skip
    kept = float(((merged - base) * shift).sum() / (shift * shift).sum())
    assert 0.95 < kept < 1.05


def test_roundings_on_a_coarse_grid():
    """A shift far below half a step: nearest erases it, dither keeps it on average, calibrated keeps its projection."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 1024)).astype(np.float32)
    raw = ggml.quantize(w, QT.Q4_K)
    base = ggml.dequantize(raw, QT.Q4_K, w.size)
    shift = (0.02 * rng.standard_normal(w.size)).astype(np.float32)

    def change(rounding: str, budget: float | None = None) -> np.ndarray:
        out, _ = requant.requantize_on_grid(raw, QT.Q4_K, shift, rounding, seed=1, noise_budget=budget)
        return ggml.dequantize(out, QT.Q4_K, w.size) - base

    def kept(d: np.ndarray) -> float:
        return float(d @ shift / (shift @ shift))

    nearest, dither, whole = change("nearest"), change("dither"), change("calibrated", np.inf)
    assert abs(kept(nearest)) < 0.05
    assert 0.9 < kept(dither) < 1.1
    assert 0.9 < kept(whole) < 1.1
    # for the same kept share, the calibrated threshold adds less error than dither
    assert np.sum((whole - shift) ** 2) < np.sum((dither - shift) ** 2)
    # the default noise budget keeps part of the knob for less added error; a larger budget keeps more
    step2 = float(np.mean(blockcodec.per_element(blockcodec.CODECS[QT.Q4_K].unpack(raw.reshape(-1, 144))[1], 256) ** 2))

    def added_noise(d: np.ndarray) -> float:  # beyond round-to-nearest, as a share of the grid's noise step²/12
        return float(np.mean((d - shift) ** 2) - np.mean((nearest - shift) ** 2)) / (step2 / 12)

    default, wider = change("calibrated"), change("calibrated", 0.15)
    assert 0.2 < kept(default) < kept(wider) < kept(whole)
    assert added_noise(default) < 1.3 * requant.NOISE_BUDGET < added_noise(whole)
    # reproducible, and monotone in λ: a larger λ moves no element back
    assert np.array_equal(change("dither"), dither)
    big, _ = requant.requantize_on_grid(raw, QT.Q4_K, 2 * shift, "dither", seed=1)
    moved_small = dither != 0
    assert np.all(np.sign(ggml.dequantize(big, QT.Q4_K, w.size) - base)[moved_small] == np.sign(dither[moved_small]))


def test_calibrated_threshold_keeps_the_projection_within_the_noise_budget():
    x = np.random.default_rng(1).normal(0, 0.07, 100_000)
    w = np.ones_like(x)

    def moves(t: float) -> np.ndarray:
        return np.floor(np.abs(x) + 1 - t)

    def added(t: float) -> float:  # noise beyond round-to-nearest, in units of the grid's 1/12
        return 12 * float(np.mean((moves(t) - np.abs(x)) ** 2) - np.mean(np.minimum(x * x, (1 - np.abs(x)) ** 2)))

    t = requant.calibrate_threshold(x, w, noise_budget=np.inf)
    assert 0.01 < t < 0.5
    assert abs((moves(t) * np.abs(x)).sum() / (x * x).sum() - 1) < 0.01  # the whole projection
    assert added(t) > 0.1
    for budget in (0.05, 0.1, 0.2):
        tb = requant.calibrate_threshold(x, w, noise_budget=budget)
        assert t < tb < 0.5
        assert added(tb) == pytest.approx(budget, rel=0.05)
    # a shift of several steps: round to nearest keeps almost all of it, the threshold stays near 0.5
    assert requant.calibrate_threshold(np.random.default_rng(2).normal(0, 3, 10_000), np.ones(10_000)) > 0.45


# --- importance matrices ---------------------------------------------------------------------------


def write_legacy_imatrix(path, entries: dict[str, np.ndarray], ncall: int = 4, dataset: str = "wiki") -> None:
    """llama.cpp's legacy imatrix.dat (common/imatrix-loader.cpp): values stored as sum/count*ncall."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, values in entries.items():
            f.write(struct.pack("<i", len(name)) + name.encode())
            f.write(struct.pack("<ii", ncall, values.size))
            f.write((values * ncall).astype("<f4").tobytes())
        f.write(struct.pack("<ii", 10, len(dataset)) + dataset.encode())


def write_gguf_imatrix(path, entries: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """llama.cpp's GGUF imatrix: NAME.in_sum2 (n_expert x n_per_row) and NAME.counts (n_expert)."""
    w = GGUFWriter(path, "imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["wiki"])
    w.add_uint32("imatrix.chunk_count", 10)
    w.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in entries.items():
        w.add_tensor(name + ".in_sum2", sums.astype(np.float32))
        w.add_tensor(name + ".counts", counts.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_imatrix_formats_are_normalized_like_llama_quantize(tmp_path):
    vals = np.arange(1, 9, dtype=np.float32)
    write_legacy_imatrix(tmp_path / "i.dat", {"blk.0.attn_q.weight": vals})
    legacy = load_imatrix(tmp_path / "i.dat")
    assert legacy.legacy and legacy.datasets == ["wiki"]
    np.testing.assert_allclose(legacy.for_tensor("blk.0.attn_q.weight", (4, 8)), vals.reshape(1, 8))
    sums = np.arange(16, dtype=np.float32).reshape(2, 8)
    write_gguf_imatrix(tmp_path / "i.gguf", {"blk.0.ffn_up_exps.weight": (sums, np.array([4.0, 0.0]))})
    g = load_imatrix(tmp_path / "i.gguf")
    got = g.for_tensor("blk.0.ffn_up_exps.weight", (2, 3, 8))
    np.testing.assert_allclose(got[0], sums[0] / 4)
    np.testing.assert_allclose(got[1], np.ones(8))  # an expert never activated: 1, as llama-quantize does
    assert g.for_tensor("missing.weight", (4, 8)) is None
    with pytest.raises(CompatibilityError, match="imatrix made for this model"):
        g.for_tensor("blk.0.ffn_up_exps.weight", (3, 3, 8))
    (tmp_path / "bad.dat").write_bytes(b"\x05\x00\x00\x00garbage")
    with pytest.raises(FormatError):
        load_imatrix(tmp_path / "bad.dat")


def test_imatrix_is_used_and_lifts_the_fallback(llama_pair, typed_bases, tmp_path):
    base = typed_bases(QT.IQ2_XXS)
    av = AlignmentVector(llama_pair.av)
    rng = np.random.default_rng(5)
    reader = GGUFReader(base)
    imats = {
        t.name: rng.uniform(0.5, 2.0, tensor_shape(t)[-1]).astype(np.float32)
        for t in reader.tensors
        if len(tensor_shape(t)) > 1
    }
    write_legacy_imatrix(tmp_path / "imatrix.dat", imats)
    fallback = merge(base, {llama_pair.av: 0.5}, tmp_path / "fb.gguf", requant="same")
    assert {w for b, w in fallback.touched.values() if b == QT.IQ2_XXS} == {QT.Q2_K}
    out = merge(base, {llama_pair.av: 0.5}, tmp_path / "im.gguf", requant="same", imatrix=tmp_path / "imatrix.dat")
    merged = GGUFReader(out.path)
    checked = 0
    for t in merged.tensors:
        if t.name not in av.names or SLOW_ONLY not in t.name:
            continue
        assert t.tensor_type == QT.IQ2_XXS
        target = _exact_target(reader, t.name, av, 0.5)
        assert np.array_equal(tensor_bytes(merged, t), ggml.quantize(target, QT.IQ2_XXS, imats[t.name]))
        checked += 1
    assert checked and not [w for w in out.warnings if "importance matrix" in w]
    # a K-quant with an imatrix: ggml's weighted quantization of the same sum, bit for bit
    q4 = typed_bases(QT.Q4_K)
    out = merge(q4, {llama_pair.av: 0.5}, tmp_path / "q4.gguf", requant="same", imatrix=tmp_path / "imatrix.dat")
    t = next(t for t in GGUFReader(out.path).tensors if t.name == "blk.1.attn_q.weight")
    target = _exact_target(GGUFReader(q4), t.name, av, 0.5)
    assert np.array_equal(tensor_bytes(GGUFReader(out.path), t), ggml.quantize(target, QT.Q4_K, imats[t.name]))


# --- shapes: stacked experts, float bases, split files ---------------------------------------------


def test_stacked_expert_tensors_use_each_experts_importance(tmp_path):
    """A 3-D (n_expert x rows x n_per_row) tensor: quantized per expert with that expert's imatrix row."""
    rng = np.random.default_rng(7)
    n_exp, rows, cols = 4, 32, 256
    w = rng.standard_normal((n_exp, rows, cols)).astype(np.float32)
    norm = (1 + 0.1 * rng.standard_normal(cols)).astype(np.float32)
    base = tmp_path / "moe.gguf"
    packed = ggml.quantize(w.reshape(-1, cols), QT.Q4_K)
    gw = GGUFWriter(base, "llama")
    gw.add_tensor_info("blk.0.ffn_up_exps.weight", (n_exp, rows, cols), np.dtype(np.float32), packed.nbytes, QT.Q4_K)
    gw.add_tensor_info("blk.0.ffn_norm.weight", (cols,), np.dtype(np.float32), norm.nbytes)
    gw.write_header_to_file()
    gw.write_kv_data_to_file()
    gw.write_ti_data_to_file()
    gw.write_tensor_data(packed)
    gw.write_tensor_data(norm)
    gw.close()
    reader = GGUFReader(base)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up_exps.weight")
    shapes = [(t.name, tensor_shape(t)) for t in reader.tensors]
    assert dict(shapes)["blk.0.ffn_up_exps.weight"] == (n_exp, rows, cols)
    delta = (0.05 * rng.standard_normal((n_exp, rows, cols))).astype(np.float32)
    info = AVInfo("llama", "moe", "", "", "base", "aligned", signature(shapes), "")
    write_av(tmp_path / "moe.avec.gguf", "llama", [("blk.0.ffn_up_exps.weight", delta)], info)
    imat = rng.uniform(0.1, 3.0, (n_exp, cols)).astype(np.float32)
    write_gguf_imatrix(tmp_path / "moe.imatrix.gguf", {"blk.0.ffn_up_exps.weight": (imat * 5, np.full(n_exp, 5.0))})
    out = merge(base, {tmp_path / "moe.avec.gguf": 1.0}, tmp_path / "m.gguf", imatrix=tmp_path / "moe.imatrix.gguf",
                requant="same")  # fmt: skip
    merged = GGUFReader(out.path)
    mt = next(t for t in merged.tensors if t.name == "blk.0.ffn_up_exps.weight")
    assert tensor_shape(mt) == (n_exp, rows, cols)
    target = ggml.dequantize(tensor_bytes(reader, t), QT.Q4_K, t.n_elements).reshape(-1, cols) + delta.reshape(-1, cols)
    want = np.concatenate([ggml.quantize(target[e * rows : (e + 1) * rows], QT.Q4_K, imat[e]) for e in range(n_exp)])
    assert np.array_equal(tensor_bytes(merged, mt), want)
    assert np.array_equal(ggml.quantize(target, QT.Q4_K, imat), want)  # the binding splits experts itself


def test_float_bases_keep_their_types(llama_pair, typed_bases, tmp_path):
    for qtype in (QT.F16, QT.BF16):
        out = merge(typed_bases(qtype), {llama_pair.av: 1.0}, tmp_path / f"{qtype.name}.gguf")
        types = {t.name: t.tensor_type for t in GGUFReader(out.path).tensors}
        assert {types[n] for n, _ in out.touched.items() if not n.endswith("norm.weight")} == {qtype}
        assert {types[n] for n in out.touched if n.endswith("norm.weight")} == {QT.F32}


def test_split_base_reads_like_one_file(llama_pair, typed_bases, tmp_path):
    single = typed_bases(QT.Q4_K)
    first = tm.requantize_gguf(llama_pair.base_gguf, tmp_path / "split.gguf", QT.Q4_K, split_max_tensors=6)
    assert first.name.endswith("-00001-of-00004.gguf")
    a = merge(single, {llama_pair.av: 0.5}, tmp_path / "a.gguf", requant="same")
    b = merge(first, {llama_pair.av: 0.5}, tmp_path / "b.gguf", requant="same")
    ra, rb = GGUFReader(a.path), GGUFReader(b.path)
    assert [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
    for ta, tb in zip(ra.tensors, rb.tensors, strict=True):
        assert np.array_equal(tensor_bytes(ra, ta), tensor_bytes(rb, tb)), ta.name
    assert field(rb, "split.count") is None  # the output is one file
    np.testing.assert_allclose(tm.llama_logits(b.path, TOKENS), tm.llama_logits(a.path, TOKENS), atol=1e-5)
    first.with_name(first.name.replace("00001-of", "00003-of")).unlink()
    with pytest.raises(Exception, match="missing"):
        merge(first, {llama_pair.av: 0.5}, tmp_path / "c.gguf")


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
def test_grid_requantization_from_a_chunked_source_equals_the_whole_array(qtype):
    """A merge feeds the change chunk by chunk from one reused buffer: same bytes as from the whole array."""
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((2100, 1024)).astype(np.float32)  # more than one chunk of 2^19 elements
    raw = ggml.quantize(rows, qtype)
    shift = (0.3 * rng.standard_normal(rows.size)).astype(np.float32)
    buffer = np.empty(1 << 19, np.float32)
    calls = []

    def source(a: int, b: int) -> np.ndarray:
        calls.append((a, b))
        out = buffer[: b - a]
        out[...] = shift[a:b]
        return out

    for rounding in ("nearest", "calibrated", "dither"):
        whole = requant.requantize_on_grid(raw, qtype, shift, rounding, seed=3)
        chunked = requant.requantize_on_grid(raw, qtype, source, rounding, seed=3)
        assert np.array_equal(whole[0], chunked[0]) and np.array_equal(whole[1], chunked[1])
    assert len({b - a for a, b in calls}) > 1  # both sampled runs and chunks came from the source
    # in place (the merge's regridded copy of a tensor): the same bytes, written over the input
    for rounding in ("nearest", "dither"):
        copy = raw.copy()
        whole = requant.requantize_on_grid(raw, qtype, shift, rounding, seed=3)
        inplace = requant.requantize_on_grid(copy, qtype, source, rounding, seed=3, in_place=True)
        assert np.shares_memory(inplace[0], copy) and np.array_equal(whole[0], inplace[0])
    with pytest.raises(ValueError, match="writable"):
        requant.requantize_on_grid(np.frombuffer(raw.tobytes(), np.uint8), qtype, shift, in_place=True)
    # into a given buffer (the merge's reused output buffers): the same bytes, the input untouched
    given, before = np.full(raw.nbytes, 7, np.uint8), raw.copy()
    into = requant.requantize_on_grid(raw, qtype, source, "dither", seed=3, out=given)
    whole = requant.requantize_on_grid(raw, qtype, shift, "dither", seed=3)
    assert np.shares_memory(into[0], given) and np.array_equal(into[0], whole[0]) and np.array_equal(raw, before)
    with pytest.raises(ValueError, match="out must be"):
        requant.requantize_on_grid(raw, qtype, shift, out=given[:-1])


def test_vector_ranges_equal_the_whole_delta(llama_pair):
    from alignvec_gguf import AlignmentVector

    av = AlignmentVector(llama_pair.av)
    for name in av.names:
        whole = av.delta(name).reshape(-1)
        n = whole.size
        cut = n // 64 * 32
        assert np.array_equal(av.delta_range(name, 0, cut), whole[:cut])
        out = np.empty(n - cut, np.float32)
        assert av.delta_range(name, cut, n, out) is out and np.array_equal(out, whole[cut:])


# --- no silent erasure: the kept share, measured and recorded -----------------------------------------


def _kept_shares(base, merged, av, lam) -> dict[str, float]:
    """Per touched tensor, over every element: <merged − base, λΔ> / |λΔ|² (the oracle for the merge's sample)."""
    b, m = GGUFReader(base), GGUFReader(merged)
    bt = {t.name: t for t in b.tensors}
    out = {}
    for t in m.tensors:
        if t.name not in av.names:
            continue
        want = np.float64(lam) * av.delta(t.name).reshape(-1).astype(np.float64)
        got = ggml.dequantize(tensor_bytes(m, t), t.tensor_type, t.n_elements).astype(np.float64)
        got -= ggml.dequantize(tensor_bytes(b, bt[t.name]), bt[t.name].tensor_type, t.n_elements)
        if want @ want > 0:
            out[t.name] = float(got @ want / (want @ want))
    return out


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_kept_share_warning_fires_exactly_below_the_threshold(llama_pair, typed_bases, tmp_path, qtype):
    """Round-to-nearest at a small λ: the merge measures what each tensor kept, records it in the file, and
    warns once, naming the types, exactly for the tensors below KEPT_SHARE_WARN."""
    base = typed_bases(qtype)
    lam = 0.2
    report = merge(base, {llama_pair.av: lam}, tmp_path / "m.gguf", requant="same")
    av = AlignmentVector(llama_pair.av)
    truth = _kept_shares(base, report.path, av, lam)
    shares = {n: k.share for n, k in report.kept.items() if k.ref > 0}
    assert set(shares) == set(truth)
    sizes = {t.name: t.n_elements for t in GGUFReader(base).tensors}
    for name, share in truth.items():  # tensors of up to 2^16 elements are measured whole, others on rows
        assert shares[name] == pytest.approx(share, abs=1e-4 if sizes[name] <= 1 << 16 else 0.03), name
    recorded = field(GGUFReader(report.path), merge_mod.K_MERGED_KEPT)
    assert recorded == pytest.approx([report.kept_share, report.min_kept_share], abs=1e-9)
    assert report.min_kept_share == min(shares.values())
    low = [n for n, s in shares.items() if s < diagnose.KEPT_SHARE_WARN]
    warned = [w for w in report.warnings if "of the requested change" in w]
    if not low:
        assert not warned
    else:
        assert len(warned) == 1
        assert warned[0].startswith(f"{len(low)} of {len(shares)} touched tensors (")
        types = {report.touched[n][1].name for n in low}
        assert all(t in warned[0] for t in types) and "--requant unbiased" in warned[0]
    # exactly at the threshold: moved just above and just below a tensor's share, the count follows
    for share in sorted(shares.values())[:3]:
        for threshold in (share + 1e-6, share - 1e-6):
            r = diagnose.MergeReport(report.path, report.touched, kept=report.kept, policy="same")
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(diagnose, "KEPT_SHARE_WARN", threshold)
                msg = diagnose.kept_warning(r)
            n_low = sum(s < threshold for s in shares.values())
            assert (msg is None) == (n_low == 0)
            assert msg is None or msg.startswith(f"{n_low} of {len(shares)} touched tensors")


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_default_policy_keeps_the_change_on_every_type(llama_pair, typed_bases, tmp_path, qtype):
    """The default (unbiased) at a small λ keeps at least half of the change on every tensor of every type: on
    the base's grid where it has one, else at Q8_0 with a note (the codebook and ternary types)."""
    base = typed_bases(qtype)
    report = merge(base, {llama_pair.av: 0.2}, tmp_path / "m.gguf")
    assert report.policy == policy.DEFAULT_POLICY == "unbiased"
    assert report.min_kept_share >= diagnose.KEPT_SHARE_WARN
    assert not [w for w in report.warnings if "of the requested change" in w]
    written = {b: w for b, w in report.touched.values() if b == qtype}
    assert written, "the base holds touched tensors of this type"
    if qtype in policy.NO_GRID_TYPES:
        assert set(written.values()) == {QT.Q8_0}
        assert any(w.startswith(f"{qtype.name} has no grid rounding") for w in report.warnings)
    truth = _kept_shares(base, report.path, AlignmentVector(llama_pair.av), 0.2)
    assert min(truth.values()) >= diagnose.KEPT_SHARE_WARN - 0.03


def test_a_scale_too_small_to_invert_sends_a_changed_block_to_a_fresh_quantization(recwarn):
    """MXFP4's E8M0 scale reaches 2^-128, whose inverse overflows float32: a change there must leave the grid
    (the merge quantizes the block afresh), an unchanged block must stay as it is, and nothing may warn."""
    blocks = np.zeros((2, 17), np.uint8)
    blocks[0, 0], blocks[1, 0] = 0, 1  # E8M0 codes: 2^-128 and 2^-127 (halved, as ggml stores them)
    blocks[:, 1:] = 0x21
    shift = np.full(64, 0.5, np.float32)
    shift[:3] = 0
    out, refresh = requant.requantize_on_grid(blocks.reshape(-1), QT.MXFP4, shift, "nearest")
    assert refresh.tolist() == [True, True]
    out, refresh = requant.requantize_on_grid(blocks.reshape(-1), QT.MXFP4, np.zeros(64, np.float32), "nearest")
    assert refresh.tolist() == [False, False] and out.tobytes() == blocks.tobytes()
    assert not [w for w in recwarn.list if issubclass(w.category, RuntimeWarning)]
