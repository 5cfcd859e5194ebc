"""Hostile GGUF models and alignment vectors: a typed error, one line and exit status 2, files untouched.

Long module: a table of hostile files, a few lines a row, sharing the tiny seeds and the checks below.

Each row builds one bad file (bytes written with struct, or a valid tiny file edited) and checks
three things: the API raises the typed error (:class:`FormatError` for a broken file,
:class:`CompatibilityError` where the file is sound but does not fit); ``alignvec inspect`` and
``alignvec merge`` (with the bad file as base or as vector) exit with status 2 and exactly one
line on stderr, no traceback; the base is unchanged and no output (or temporary) is left.

The tiny base and vectors come from tests/support/fuzzseeds.py (the same seeds the fuzzer mutates). Rows
already covered by tests/test_errors.py are not repeated: architecture, shapes, unknown tensor,
signature, truncated vector, noise, a model given as vector, NaN in an F32 full-form vector.

"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFValueType

from alignvec_gguf import ggufheader
from alignvec_gguf.avfile import AlignmentVector
from alignvec_gguf.errors import AlignVecError, CompatibilityError, FormatError
from alignvec_gguf.ggufread import GGUFModel
from alignvec_gguf.ggufread import open_file as open_gguf
from alignvec_gguf.merge import merge
from tests.support import fuzzseeds, mutations, oracle
from tests.support.commands import assert_one_line_error
from tests.support.files import sha256

STR, ARR, U32 = GGUFValueType.STRING, GGUFValueType.ARRAY, GGUFValueType.UINT32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tiny")
    return {"root": root, **fuzzseeds.make_seeds(root)}


def check_cli(
    run_cli: Callable[..., tuple[int, str]], tiny: dict[str, Any], bad: Path, role: str, *needles: str
) -> None:
    """``merge`` with ``bad`` as base or vector: status 2, one line, no traceback, base unchanged, no output."""
    base = tiny["root"] / "base.gguf" if role == "av" else bad
    av = bad if role == "av" else tiny["root"] / "full.avec.gguf"
    before = sha256(base)
    out = bad.parent / "merged.gguf"
    rc, err = run_cli("merge", base, "-v", f"{av}=0.5", "-o", out)
    assert_one_line_error(rc, err, *needles)
    assert sha256(base) == before
    assert not out.exists()
    assert not list(bad.parent.glob(".merged.gguf.*")), "a temporary file was left behind"


def write(tmp_path: Path, data: bytes, role: str) -> Path:
    path = tmp_path / ("bad.avec.gguf" if role == "av" else "bad.gguf")
    path.write_bytes(data)
    return path


def patch(seed: Any, kind: str, value: int, nth: int = 0) -> bytes:
    """The seed with its ``nth`` header field of ``kind`` (see fuzzseeds.Slot) set to ``value``."""
    slot = [s for s in seed.slots if s.kind == kind][nth]
    data = bytearray(seed.data)
    data[slot.offset : slot.offset + slot.size] = value.to_bytes(slot.size, "little")
    return bytes(data)


def edit(tiny: dict[str, Any], seed: str, change: Callable[[list[Any], list[Any]], None]) -> bytes:
    """The seed rebuilt after ``change(kvs, tensors)`` edited its metadata or tensors in place."""
    kvs, tensors = mutations.read_logical(tiny[seed].data, tiny["root"])
    change(kvs, tensors)
    return mutations.serialize(kvs, tensors)


def set_kv(key: str, vtype: GGUFValueType, value: Any, item: GGUFValueType | None = None) -> Callable[..., None]:
    def change(kvs: list[Any], tensors: list[Any]) -> None:
        kvs[:] = [kv for kv in kvs if kv[0] != key] + [(key, vtype, value, item)]

    return change


def drop_kv(key: str) -> Callable[..., None]:
    def change(kvs: list[Any], tensors: list[Any]) -> None:
        kvs[:] = [kv for kv in kvs if kv[0] != key]

    return change


def set_tensor(i: int, **fields: Any) -> Callable[..., None]:
    """Replace fields of tensor ``i``: name, qtype, ne, data."""

    def change(kvs: list[Any], tensors: list[Any]) -> None:
        name, qtype, ne, data = tensors[i]
        new = {"name": name, "qtype": qtype, "ne": ne, "data": data, **fields}
        tensors[i] = (new["name"], new["qtype"], new["ne"], new["data"])

    return change


# --- a broken file: FormatError from open_gguf, and through inspect and merge --------------------------
# (id, seed, builder(seed, tiny) -> bytes, needle in the message)
U64 = 1 << 64
HEADER_CASES: list[tuple[str, str, Callable[[Any, dict[str, Any]], bytes], str]] = [
    ("empty file", "base.gguf", lambda s, t: b"", "not a valid GGUF"),
    ("wrong magic", "base.gguf", lambda s, t: b"GGUX" + s.data[4:], "not a valid GGUF"),
    ("ggml legacy magic", "base.gguf", lambda s, t: b"tjgg" + s.data[4:], "not a valid GGUF"),
    ("version 1", "base.gguf", lambda s, t: patch(s, "version", 1), "version 1"),
    ("version 4", "base.gguf", lambda s, t: patch(s, "version", 4), "version 4"),
    ("version 999", "base.gguf", lambda s, t: patch(s, "version", 999), "version 999"),
    ("big-endian", "base.gguf", lambda s, t: patch(s, "version", 3 << 24), "big-endian"),
    ("tensor count 2^50", "base.gguf", lambda s, t: patch(s, "count", 1 << 50, 0), "tensors"),
    ("tensor count off by one", "base.gguf", lambda s, t: patch(s, "count", 6, 0), "name of tensor 5"),
    ("kv count 2^40", "base.gguf", lambda s, t: patch(s, "count", 1 << 40, 1), "metadata keys"),
    ("kv count 2^64-1", "lora.avec.gguf", lambda s, t: patch(s, "count", U64 - 1, 1), "metadata keys"),
    ("key length 2^62", "base.gguf", lambda s, t: patch(s, "strlen", 1 << 62, 0), "limit"),
    ("string length 2^62", "base.gguf", lambda s, t: patch(s, "strlen", 1 << 62, 1), "limit"),
    ("string past the end", "lora.avec.gguf", lambda s, t: patch(s, "strlen", 70000, 1), "truncated"),
    ("array of 2^40 items", "base.gguf", lambda s, t: patch(s, "alen", 1 << 40), "items"),
    ("array past the end", "lora.avec.gguf", lambda s, t: patch(s, "alen", 5000, 1), "truncated"),
    ("empty array", "base.gguf", lambda s, t: patch(s, "alen", 0), "empty"),
    ("array item type 99", "base.gguf", lambda s, t: patch(s, "atype", 99), "unknown value type 99"),
    ("array of arrays", "lora.avec.gguf", lambda s, t: patch(s, "atype", int(ARR)), "arrays of arrays"),
    ("value type 13", "base.gguf", lambda s, t: patch(s, "vtype", 13), "unknown value type 13"),
    ("value type 2^31", "lora.avec.gguf", lambda s, t: patch(s, "vtype", 1 << 31, 3), "unknown value type"),
    ("bool 2", "base.gguf", lambda s, t: _bool_two(s), "bool"),
    ("duplicate key", "base.gguf", lambda s, t: edit(t, s.name, lambda k, _: k.append(k[1])), "appears twice"),
    ("reserved key", "lora.avec.gguf", lambda s, t: edit(t, s.name, set_kv("GGUF.kv_count", U32, 1)), "reserved"),
    ("key not UTF-8", "base.gguf", lambda s, t: _replace(s, b"general.name", b"general.\xffame"), "UTF-8"),
    (
        "value not UTF-8",
        "lora.avec.gguf",
        lambda s, t: edit(t, s.name, set_kv("alignvec.domain", STR, b"\xffx")),
        "UTF-8",
    ),
    ("name not UTF-8", "base.gguf", lambda s, t: _replace(s, b"output_norm", b"output\xe2norm"), "UTF-8"),
    ("name of 64 bytes", "base.gguf", lambda s, t: edit(t, s.name, set_tensor(4, name="n" * 64)), "limit is 63"),
    ("alignment a string", "base.gguf", lambda s, t: edit(t, s.name, set_kv("general.alignment", STR, "32")), "UINT32"),
    ("alignment 0", "base.gguf", lambda s, t: edit(t, s.name, set_kv("general.alignment", U32, 0)), "power of two"),
    ("alignment 48", "base.gguf", lambda s, t: edit(t, s.name, set_kv("general.alignment", U32, 48)), "power of two"),
    ("n_dims 0", "base.gguf", lambda s, t: patch(s, "ndims", 0), "0 dimensions"),
    ("n_dims 5", "base.gguf", lambda s, t: patch(s, "ndims", 5, 1), "5 dimensions"),
    ("n_dims 1000", "lora.avec.gguf", lambda s, t: patch(s, "ndims", 1000, 2), "1000 dimensions"),
    ("dim 0", "base.gguf", lambda s, t: patch(s, "dim", 0, 1), "at least 1"),
    ("dim 2^63", "base.gguf", lambda s, t: patch(s, "dim", 1 << 63, 1), "past the end"),
    ("dims overflow 2^64", "base.gguf", lambda s, t: _overflow(t), "past the end"),
    ("tensor type 4 (removed)", "base.gguf", lambda s, t: patch(s, "ttype", 4), "unknown type id 4"),
    ("tensor type 2^32-1", "lora.avec.gguf", lambda s, t: patch(s, "ttype", (1 << 32) - 1), "unknown type id"),
    ("row not whole blocks", "base.gguf", lambda s, t: _q8_row(t), "block of 32"),
    ("offset past the end", "base.gguf", lambda s, t: patch(s, "toffset", 1 << 40, 4), "past the end"),
    ("offset 2^64-32", "lora.avec.gguf", lambda s, t: patch(s, "toffset", U64 - 32, 0), "past the end"),
    ("offset misaligned", "base.gguf", lambda s, t: patch(s, "toffset", 4, 0), "alignment 32"),
    ("overlapping tensors", "base.gguf", lambda s, t: patch(s, "toffset", 0, 1), "overlaps"),
    (
        "duplicate tensor name",
        "base.gguf",
        lambda s, t: edit(t, s.name, set_tensor(1, name="token_embd.weight")),
        "twice",
    ),
]


def _bool_two(seed: Any) -> bytes:
    slot = [s for s in seed.slots if s.kind == "scalar"][-1]  # tokenizer.ggml.add_bos_token, the last KV
    data = bytearray(seed.data)
    data[slot.offset] = 2
    return bytes(data)


def _replace(seed: Any, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and old in seed.data
    return seed.data.replace(old, new, 1)


def _overflow(tiny: dict[str, Any]) -> bytes:
    # ne 2^32 x 2^32 wraps to 0 in gguf-py's uint64 product: an empty view where a tensor should be
    return edit(tiny, "base.gguf", set_tensor(0, ne=(1 << 32, 1 << 32)))


def _q8_row(tiny: dict[str, Any]) -> bytes:
    return edit(tiny, "base.gguf", set_tensor(2, ne=(33, 32), data=bytes(34 * 32)))


@pytest.mark.parametrize("role", ["base", "av"])
@pytest.mark.parametrize("case", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_broken_file(case, role, tiny, tmp_path, run_cli):
    """The broken bytes given as the base model and as the vector (the seed is a model or a vector)."""
    _, seed_name, build, needle = case
    bad = write(tmp_path, build(tiny[seed_name], tiny), role)
    with pytest.raises(FormatError) as e:
        open_gguf(bad)
    assert needle in str(e.value) and bad.name in str(e.value) and "\n" not in str(e.value)
    rc, err = run_cli("inspect", bad)
    assert_one_line_error(rc, err, needle, bad.name)
    check_cli(run_cli, tiny, bad, role, needle)


def test_caps_on_strings_and_arrays(tiny, tmp_path, run_cli, monkeypatch):
    """The caps hold before gguf-py sees a byte: lowered here so that a small file exceeds them."""
    bad = write(tmp_path, tiny["base.gguf"].data, "base")
    monkeypatch.setattr(ggufheader, "MAX_ARRAY_ITEMS", 7)  # the base has 4 tokens + 4 scores
    with pytest.raises(FormatError, match="all arrays together may have 7"):
        open_gguf(bad)
    monkeypatch.setattr(ggufheader, "MAX_ARRAY_ITEMS", 8)
    open_gguf(bad)
    monkeypatch.setattr(ggufheader, "MAX_STRING", 3)  # "llama" is 5 bytes
    rc, err = run_cli("inspect", bad)
    assert_one_line_error(rc, err, "value of general.architecture", "limit is 3")
    monkeypatch.setattr(ggufheader, "MAX_STRING", 16)
    monkeypatch.setattr(ggufheader, "MAX_HEADER", 300)  # the header is 704 bytes
    rc, err = run_cli("inspect", bad)
    assert_one_line_error(rc, err, "runs past 0 MiB, the limit for a header")


# --- truncation at every section boundary of a real base model and a real vector ------------------------
SECTIONS = ["magic", "version", "counts", "each key", "each tensor info", "padding", "data"]


def _cuts(path: Path, section: str) -> list[int]:
    _, bounds, data_offset = fuzzseeds.layout(path)
    size = path.stat().st_size
    n_kv = len(oracle.open_gguf(path).fields) - 3
    kv_ends = bounds[3 : 3 + n_kv]
    info_ends = bounds[3 + n_kv : -1]
    return {
        "magic": [0, 2, 4],
        "version": [6, 8],
        "counts": [16, 20, 24],
        "each key": [e - d for e in kv_ends for d in (0, 1)],
        "each tensor info": [e - d for e in info_ends for d in (0, 1)],
        "padding": [data_offset - 1, data_offset],
        "data": [data_offset + 1, (data_offset + size) // 2, size - 1],
    }[section]


@pytest.mark.parametrize("role", ["base", "av"])
@pytest.mark.parametrize("section", SECTIONS)
def test_truncated_everywhere(section, role, llama_pair, quantized_bases, tmp_path, run_cli):
    """Each cut: the typed error, ``inspect`` and ``merge`` (the real pair: the base is the vector's own)."""
    source = llama_pair.av if role == "av" else quantized_bases["Q4_K_M"]
    data = source.read_bytes()
    base = tmp_path / "base.gguf"
    if role == "av":
        shutil.copy(quantized_bases["Q4_K_M"], base)
    cuts = _cuts(source, section)
    assert cuts
    for cut in cuts:
        bad = write(tmp_path, data[:cut], role)
        with pytest.raises(FormatError) as e:
            AlignmentVector(bad) if role == "av" else GGUFModel(bad)
        message = str(e.value)
        assert ("truncated" in message or "not a valid GGUF" in message) and bad.name in message, (cut, message)
        rc, err = run_cli("inspect", bad)
        assert_one_line_error(rc, err, bad.name)
        merged_base = base if role == "av" else bad
        before = sha256(merged_base)
        av = bad if role == "av" else llama_pair.av
        rc, err = run_cli("merge", merged_base, "-v", f"{av}=0.5", "-o", tmp_path / "out.gguf")
        assert_one_line_error(rc, err, bad.name)
        assert sha256(merged_base) == before and not (tmp_path / "out.gguf").exists()


# --- a sound file with hostile content: typed errors from the AV reader and the merge ------------------
NAN16 = np.array([np.nan] * 4, dtype=np.float16).tobytes()
INF16 = np.array([np.inf] * 4, dtype=np.float16).tobytes()


def _poke(tiny: dict[str, Any], seed: str, i: int, raw: bytes) -> bytes:
    """Overwrite the first bytes of tensor ``i``'s data."""

    def change(kvs: list[Any], tensors: list[Any]) -> None:
        name, qtype, ne, data = tensors[i]
        tensors[i] = (name, qtype, ne, raw + data[len(raw) :])

    return edit(tiny, seed, change)


def _halves(tiny: dict[str, Any], change: Callable[[list[Any]], None]) -> bytes:
    return edit(tiny, "lora.avec.gguf", lambda kvs, tensors: change(tensors))


def _huge_attn_q_pair(tiny: dict[str, Any]) -> bytes:
    """Finite F32 factors whose product is not: 1e30 · 1e30 · rank."""

    def change(tensors: list[Any]) -> None:
        for i in (2, 3):
            tensors[i] = (tensors[i][0], 0, tensors[i][2], np.full(128, 1e30, np.float32).tobytes())

    return _halves(tiny, change)


# (id, builder(tiny) -> bytes, error type, needle in the message)
AV_CASES: list[tuple[str, Callable[[dict[str, Any]], bytes], type[AlignVecError], str]] = [
    ("NaN in F16 lora_b", lambda t: _poke(t, "lora.avec.gguf", 1, NAN16), FormatError, "NaN"),
    ("Inf in F16 lora_a", lambda t: _poke(t, "lora.avec.gguf", 2, INF16), FormatError, "NaN or infinite"),
    ("Inf in a Q8_0 scale", lambda t: _poke(t, "q8.avec.gguf", 0, INF16[:2]), FormatError, "NaN or infinite"),
    ("-Inf in F32 full", lambda t: _poke(t, "full.avec.gguf", 3, struct.pack("<f", -np.inf)), FormatError, "NaN"),
    (
        "adapter.type other",
        lambda t: edit(t, "full.avec.gguf", set_kv("adapter.type", STR, "control_vector")),
        FormatError,
        "adapter.type 'control_vector'",
    ),
    ("adapter.type missing", lambda t: edit(t, "lora.avec.gguf", drop_kv("adapter.type")), FormatError, "None"),
    (
        "format_version 2",
        lambda t: edit(t, "full.avec.gguf", set_kv("alignvec.format_version", U32, 2)),
        FormatError,
        "format version 2",
    ),
    (
        "format_version a string",
        lambda t: edit(t, "full.avec.gguf", set_kv("alignvec.format_version", STR, "1")),
        FormatError,
        "alignvec.format_version is STRING, expected an integer",
    ),
    (
        "format_version an array",
        lambda t: edit(t, "lora.avec.gguf", set_kv("alignvec.format_version", ARR, [1], U32)),
        FormatError,
        "ARRAY of UINT32, expected an integer",
    ),
    (
        "general.type model",
        lambda t: edit(t, "full.avec.gguf", set_kv("general.type", STR, "model")),
        FormatError,
        "not an alignment vector",
    ),
    ("name missing", lambda t: edit(t, "full.avec.gguf", drop_kv("alignvec.name")), FormatError, "lacks metadata"),
    (
        "architecture missing",
        lambda t: edit(t, "full.avec.gguf", drop_kv("general.architecture")),
        FormatError,
        "lacks metadata general.architecture",
    ),
    (
        "name a number",
        lambda t: edit(t, "lora.avec.gguf", set_kv("alignvec.name", U32, 7)),
        FormatError,
        "alignvec.name is UINT32, expected a string",
    ),
    (
        "form says lora in a full vector",
        lambda t: edit(t, "full.avec.gguf", set_kv("alignvec.form", STR, "lora")),
        FormatError,
        "alignvec.form",
    ),
    (
        "alpha NaN",
        lambda t: edit(t, "lora.avec.gguf", set_kv("adapter.lora.alpha", GGUFValueType.FLOAT32, np.nan)),
        FormatError,
        "adapter.lora.alpha is nan",
    ),
    (
        "alpha negative",
        lambda t: edit(t, "lora.avec.gguf", set_kv("adapter.lora.alpha", GGUFValueType.FLOAT32, -4.0)),
        FormatError,
        ">= 0",
    ),
    (
        "alpha a string",
        lambda t: edit(t, "lora.avec.gguf", set_kv("adapter.lora.alpha", STR, "4")),
        FormatError,
        "expected a number",
    ),
    (
        "rank a string",
        lambda t: edit(t, "lora.avec.gguf", set_kv("alignvec.lora.rank", STR, "x")),
        FormatError,
        "alignvec.lora.rank is STRING",
    ),
    (
        "dropped norms of another length",
        lambda t: edit(
            t, "lora.avec.gguf", set_kv("alignvec.lora.dropped_norm", ARR, [1.0, 2.0], GGUFValueType.FLOAT32)
        ),
        FormatError,
        "lists 1 tensors, with 2 norms",
    ),
    (
        "dropped a string, not a list",
        lambda t: edit(t, "lora.avec.gguf", set_kv("alignvec.lora.dropped", STR, "ab")),
        FormatError,
        "expected an array of strings",
    ),
    (
        "stored as Q4_K",
        lambda t: edit(t, "full.avec.gguf", set_tensor(3, qtype=12, ne=(256, 64), data=bytes(144 * 64))),
        FormatError,
        "Q4_K",
    ),
    ("stored as I32", lambda t: edit(t, "full.avec.gguf", set_tensor(1, qtype=26)), FormatError, "I32"),
    ("lora_b missing", lambda t: _halves(t, lambda ts: ts.pop(1)), FormatError, "has no token_embd.weight.lora_b"),
    ("lora_a missing", lambda t: _halves(t, lambda ts: ts.pop(2)), FormatError, "has no blk.0.attn_q.weight.lora_a"),
    (
        "lora ranks differ",
        lambda t: _halves(t, lambda ts: ts.__setitem__(2, (ts[2][0], 1, (32, 5), bytes(2 * 32 * 5)))),
        FormatError,
        "ranks differ",
    ),
    (
        "lora_a 1-D",
        lambda t: _halves(t, lambda ts: ts.__setitem__(2, (ts[2][0], 1, (128,), bytes(2 * 128)))),
        FormatError,
        "not a rank-r pair",
    ),
    (
        "lora pair of another size",
        lambda t: _halves(t, lambda ts: ts.__setitem__(2, (ts[2][0], 1, (64, 4), bytes(2 * 64 * 4)))),
        CompatibilityError,
        "shape",
    ),
    ("lora delta overflows", _huge_attn_q_pair, FormatError, "overflows float32"),
    (
        "lora tensor without suffix",
        lambda t: _halves(t, lambda ts: ts.__setitem__(0, ("token_embd.weight", *ts[0][1:]))),
        FormatError,
        "not a .lora_a/.lora_b half",
    ),
]


@pytest.mark.parametrize("case", AV_CASES, ids=[c[0] for c in AV_CASES])
def test_hostile_vector(case, tiny, tmp_path, run_cli):
    _, build, error, needle = case
    bad = write(tmp_path, build(tiny), "av")
    base = tiny["root"] / "base.gguf"
    with pytest.raises(error) as e:
        merge(base, {str(bad): 0.5}, tmp_path / "api.gguf")
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "api.gguf").exists()
    check_cli(run_cli, tiny, bad, "av", needle)


def test_split_keys_of_the_wrong_type(tiny, tmp_path, run_cli):
    bad = write(tmp_path, edit(tiny, "base.gguf", set_kv("split.count", STR, "two")), "base")
    with pytest.raises(FormatError, match="split.count is STRING, expected an integer"):
        GGUFModel(bad)
    check_cli(run_cli, tiny, bad, "base", "split.count")


def test_the_seeds_are_sound(tiny, tmp_path):
    """The rows above fail because of their one change: the files they start from merge cleanly."""
    for name in ("full.avec.gguf", "q8.avec.gguf", "lora.avec.gguf"):
        rebuilt = write(tmp_path, edit(tiny, name, lambda kvs, tensors: None), "av")
        merge(tiny["root"] / "base.gguf", {str(rebuilt): 0.5}, tmp_path / "ok.gguf")
        assert (tmp_path / "ok.gguf").stat().st_size > 0
