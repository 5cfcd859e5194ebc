"""The GGUF I/O layer: the writers' explicit states, the one reader against gguf-py's, and lazy metadata.

- ``GGUFStreamWriter`` and ``SpooledGGUFWriter`` refuse calls out of order with a
  :class:`WriterStateError` naming the state, and what they write in order reads back through gguf-py's
  reader (the independent oracle) with the bytes that were given.
- :class:`GGUFModel` reads what gguf-py reads: values, value types, array lengths, tensors by name and
  typed views; ``split=False`` opens exactly the file named.
- Opening a model with a 262,144-token vocabulary for live knobs (``live.check_base``), for an Ollama
  Modelfile (``export.write_modelfile``) or for ``alignvec inspect`` costs a header walk like
  ``GGUFModel``, not gguf-py's eager parse of every item: each is timed against ``GGUFReader`` on the
  same file in the same test, so the bound holds on any CPU.
"""

from __future__ import annotations

import io
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUFReader, GGUFValueType
from gguf import GGMLQuantizationType as QT

from alignvec_gguf import export, ggufread, live
from alignvec_gguf.errors import FormatError
from alignvec_gguf.ggufread import GGUFModel, open_file
from alignvec_gguf.ggufwrite import (
    DeclaredGGUFWriter,
    GGUFStreamWriter,
    SpooledGGUFWriter,
    TensorSlot,
    WriterState,
    WriterStateError,
    pack_kv,
    patch_header,
)
from alignvec_gguf.inspect import describe
from tests.support import oracle


def _slots(*tensors: tuple[str, np.ndarray, QT]) -> list[TensorSlot]:
    return [TensorSlot(name, data.shape, qtype, data.nbytes) for name, data, qtype in tensors]


def _kv() -> tuple[int, bytes]:
    items = [pack_kv("general.architecture", "llama"), pack_kv("general.name", "tiny")]
    return len(items), b"".join(items)


A = np.arange(64, dtype=np.float32).reshape(2, 32)
B = np.linspace(-1, 1, 32, dtype=np.float32).astype(np.float16)


# --- GGUFStreamWriter: EMPTY -> HEADER -> TENSORS -> DONE ------------------------------------------------
def test_stream_writer_refuses_a_tensor_before_the_header() -> None:
    w = GGUFStreamWriter(io.BytesIO())
    with pytest.raises(WriterStateError, match=r"cannot write a tensor in state EMPTY .*needs state HEADER or TENSORS"):
        w.write_tensor(A)
    with pytest.raises(WriterStateError, match="cannot finish in state EMPTY"):
        w.finish()
    assert w.state is WriterState.EMPTY


def test_stream_writer_refuses_a_second_header_and_missing_tensors() -> None:
    w = GGUFStreamWriter(io.BytesIO())
    n, kv = _kv()
    slots = _slots(("a", A, QT.F32), ("b", B, QT.F16))
    w.write_header(n, kv, slots)
    assert w.state is WriterState.HEADER
    with pytest.raises(WriterStateError, match="cannot write the header in state HEADER"):
        w.write_header(n, kv, slots)
    w.write_tensor(A)
    assert w.state is WriterState.TENSORS
    with pytest.raises(WriterStateError, match="cannot write the header in state TENSORS"):
        w.write_header(n, kv, slots)
    with pytest.raises(WriterStateError, match=r"cannot finish in state TENSORS: tensor b and 0 more were never"):
        w.finish()
    with pytest.raises(ValueError, match="tensor b: 4 bytes given, its slot holds 64"):
        w.write_tensor(np.zeros(1, np.float32))
    w.write_tensor(B)  # the wrong size above consumed nothing
    with pytest.raises(WriterStateError, match="no slot is left"):
        w.write_tensor(B)
    w.finish()
    assert w.state is WriterState.DONE
    for call in (lambda: w.write_tensor(A), w.finish, lambda: w.write_header(n, kv, slots)):
        with pytest.raises(WriterStateError, match=r"in state DONE \(finished\)"):
            call()


def test_stream_writer_output_reads_back_through_gguf_py(tmp_path: Path) -> None:
    path = tmp_path / "stream.gguf"
    n, kv = _kv()
    with open(path, "wb") as f:
        w = GGUFStreamWriter(f, GGUF_DEFAULT_ALIGNMENT)
        w.write_header(n, kv, _slots(("a", A, QT.F32), ("b", B, QT.F16)))
        w.write_tensor(A)
        w.write_tensor(B)
        w.finish()
    reader = oracle.open_gguf(path)
    assert oracle.field(reader, "general.name") == "tiny"
    got = {t.name: t for t in reader.tensors}
    assert oracle.tensor_shape(got["a"]) == (2, 32) and got["b"].tensor_type == QT.F16
    assert oracle.tensor_bytes(reader, got["a"]).tobytes() == A.tobytes()
    assert oracle.tensor_bytes(reader, got["b"]).tobytes() == B.tobytes()


# --- DeclaredGGUFWriter: EMPTY (metadata, declarations) -> HEADER -> TENSORS -> DONE ----------------------
def test_declared_writer_keeps_its_order_and_reads_back_through_gguf_py(tmp_path: Path) -> None:
    path = tmp_path / "declared.gguf"
    with DeclaredGGUFWriter(path, "llama") as w:
        w.add("general.name", "tiny", GGUFValueType.STRING)
        w.declare("a", A.dtype, A.shape)
        w.declare("b", B.dtype, B.shape)
        with pytest.raises(WriterStateError, match="cannot write a tensor in state EMPTY"):
            w.write_tensor(A)
        end = w.begin()
        for late in (lambda: w.declare("c", A.dtype, A.shape), lambda: w.add("x", "y", GGUFValueType.STRING)):
            with pytest.raises(WriterStateError, match="in state HEADER"):
                late()
        w.write_tensor(A)
        with pytest.raises(WriterStateError, match="1 declared tensors never written"):
            w.finish()
        w.write_tensor(B)
        with pytest.raises(WriterStateError, match="no slot is left"):
            w.write_tensor(B)
        w.finish()
    assert w.state is WriterState.DONE
    assert path.read_bytes()[:end].endswith(b"tiny")  # the metadata ends there: placeholders are patched below it
    reader = oracle.open_gguf(path)
    assert oracle.field(reader, "general.name") == "tiny" and oracle.field(reader, "general.architecture") == "llama"
    got = {t.name: t for t in reader.tensors}
    assert oracle.tensor_bytes(reader, got["a"]).tobytes() == A.tobytes() and got["b"].tensor_type == QT.F16
    assert oracle.tensor_bytes(reader, got["b"]).tobytes() == B.tobytes()


def test_patch_header_fills_placeholders_once_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "patched.gguf"
    items = [pack_kv("x.digest", "?" * 8), pack_kv("x.kept", [0.25, 0.75]), pack_kv("x.other", "?" * 8)]
    with open(path, "wb") as f:
        w = GGUFStreamWriter(f)
        end = w.write_header(len(items), b"".join(items), _slots(("a", A, QT.F32)))
        w.write_tensor(A)
        w.finish()
    before = path.read_bytes()
    for bad, why in (
        ({b"?" * 8: b"x" * 8}, "not unique"),  # in two items
        ({b"#" * 8: b"x" * 8}, "absent"),
        ({pack_kv("x.kept", [0.25, 0.75]): b"short"}, "of another length"),
    ):
        with pytest.raises(ValueError, match=f"placeholder of .* bytes is {why}; nothing was patched"):
            patch_header(path, end, {pack_kv("x.kept", [0.25, 0.75]): pack_kv("x.kept", [0.5, 0.5]), **bad})
        assert path.read_bytes() == before
    patch_header(path, end, {pack_kv("x.kept", [0.25, 0.75]): pack_kv("x.kept", [0.5, 1.0])})
    reader = oracle.open_gguf(path)
    assert oracle.field(reader, "x.kept") == [0.5, 1.0] and oracle.field(reader, "x.digest") == "?" * 8
    assert oracle.tensor_bytes(reader, reader.tensors[0]).tobytes() == A.tobytes()


# --- SpooledGGUFWriter: tensors first, metadata until finish ---------------------------------------------
def test_spooled_writer_states_and_output(tmp_path: Path) -> None:
    path = tmp_path / "spooled.gguf"
    with SpooledGGUFWriter(path, "llama") as w:
        assert w.state is WriterState.EMPTY
        w.add_tensor("a", A)
        assert w.state is WriterState.TENSORS
        w.add_tensor("b", B)
        w.add("x.empty", "", GGUFValueType.STRING)
        w.add("x.list", ["p", "q"], GGUFValueType.ARRAY, GGUFValueType.STRING)
        with pytest.raises(ValueError, match="x.bad: an array needs its item type"):
            w.add("x.bad", [1.0], GGUFValueType.ARRAY)
        w.finish()
        assert w.state is WriterState.DONE
        with pytest.raises(WriterStateError, match="cannot add a tensor in state DONE"):
            w.add_tensor("c", A)
        with pytest.raises(WriterStateError, match="cannot add metadata in state DONE"):
            w.add("y", 1, GGUFValueType.UINT32)
        with pytest.raises(WriterStateError, match="cannot finish in state DONE"):
            w.finish()
    reader = oracle.open_gguf(path)
    assert oracle.field(reader, "x.empty") == "" and oracle.field(reader, "x.list") == ["p", "q"]
    assert [t.name for t in reader.tensors] == ["a", "b"]
    assert oracle.tensor_bytes(reader, reader.tensors[1]).tobytes() == B.tobytes()


def test_spooled_writer_closed_early_writes_nothing_more(tmp_path: Path) -> None:
    w = SpooledGGUFWriter(tmp_path / "x.gguf", "llama")
    w.add_tensor("a", A)
    w.close()
    with pytest.raises(WriterStateError, match="cannot finish in state DONE"):
        w.finish()


# --- GGUFModel against gguf-py ---------------------------------------------------------------------------
def test_the_reader_agrees_with_gguf_py(tmp_path: Path) -> None:
    path = tmp_path / "m-00001-of-00002.gguf"  # a shard's name: split=False opens just this file
    with SpooledGGUFWriter(path, "llama") as w:
        w.add_tensor("a", A)
        w.add_tensor("b", B)
        w.add("split.count", 2, GGUFValueType.UINT16)
        w.add("x.floats", [0.5] * 40, GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        w.add("x.flag", True, GGUFValueType.BOOL)
        w.finish()
    model, reader = open_file(path), GGUFReader(path)
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert model.keys() == keys
    for key in keys:
        f = reader.fields[key]
        assert model.field(key) == f.contents(), key
        assert model.field_types(key) == tuple(f.types[:2]), key
        assert model.field_length(key) == (len(f.data) if f.types[0] == GGUFValueType.ARRAY else None), key
    assert model.field("absent", 7) == 7 and model.field_types("absent") is None
    assert "a" in model and "c" not in model
    for t in reader.tensors:
        ours = model.tensor(t.name)
        assert ours.shape == oracle.tensor_shape(t) and ours.tensor_type == t.tensor_type
        assert ours.offset == t.data_offset
        assert np.array_equal(ours.values(), np.asarray(t.data).reshape(ours.shape))
    with pytest.raises(KeyError):
        model.tensor("c")
    assert describe(path)["x.floats"] == "[40 items]" and describe(path)["x.flag"] is True


def test_a_file_that_changes_while_read_is_a_format_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked, then changed: shrunk before the map, or a value rewritten after it; one line, naming the file."""
    path = tmp_path / "moving.gguf"
    with SpooledGGUFWriter(path, "llama") as w:
        w.add_tensor("a", A)
        w.add("x.text", "hello", GGUFValueType.STRING)
        w.finish()
    good = path.read_bytes()
    model = open_file(path)
    at = good.index(b"hello")
    with open(path, "r+b") as f:  # the map sees it: same file, bytes changed in place
        f.seek(at)
        f.write(b"\xff\xfe")
    with pytest.raises(FormatError, match=r"file .*moving.gguf changed while it was being read"):
        model.field("x.text")

    path.write_bytes(good)
    real = ggufread.check_gguf

    def check_then_shrink(p: Path, what: str) -> object:
        header = real(p, what)
        with open(p, "r+b") as f:
            f.truncate(len(good) - 4)
        return header

    monkeypatch.setattr(ggufread, "check_gguf", check_then_shrink)
    with pytest.raises(FormatError, match=r"alignment vector .*moving.gguf changed while it was being read"):
        GGUFModel(path, "alignment vector", split=False)


def test_values_refuses_block_types(tmp_path: Path) -> None:
    path = tmp_path / "q.gguf"
    with SpooledGGUFWriter(path, "llama") as w:
        w.add_tensor("q", np.zeros((1, 34), np.uint8), QT.Q8_0)
        w.finish()
    t = open_file(path).tensor("q")
    assert t.shape == (1, 32) and t.raw().nbytes == 34
    with pytest.raises(ValueError, match="q is Q8_0; only F32 and F16 have a typed view"):
        t.values()


# --- a 262k-token vocabulary: the header walk, not gguf-py's eager parse ---------------------------------
N_VOCAB = 262_144


def _string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _kv_raw(key: str, vtype: GGUFValueType, value: bytes) -> bytes:
    return _string(key.encode()) + struct.pack("<I", vtype) + value


def _array(key: str, item: GGUFValueType, n: int, body: bytes) -> bytes:
    return _kv_raw(key, GGUFValueType.ARRAY, struct.pack("<IQ", item, n) + body)


def write_big_vocab(path: Path) -> None:
    """A Llama-shaped GGUF whose tokenizer has 262,144 tokens, scores and types (Gemma 3's size; no merges,
    which would only double what gguf-py's parse costs the test)."""
    tokens = [f"tok{i}".encode() for i in range(N_VOCAB)]
    kvs = [
        _kv_raw("general.architecture", GGUFValueType.STRING, _string(b"llama")),
        _kv_raw("llama.context_length", GGUFValueType.UINT32, struct.pack("<I", 512)),
        _kv_raw("tokenizer.ggml.model", GGUFValueType.STRING, _string(b"gpt2")),
        _array("tokenizer.ggml.tokens", GGUFValueType.STRING, N_VOCAB, b"".join(_string(t) for t in tokens)),
        _array("tokenizer.ggml.scores", GGUFValueType.FLOAT32, N_VOCAB, np.zeros(N_VOCAB, np.float32).tobytes()),
        _array("tokenizer.ggml.token_type", GGUFValueType.INT32, N_VOCAB, np.ones(N_VOCAB, np.int32).tobytes()),
    ]
    weights = {"output_norm.weight": np.ones(32, np.float32), "output.weight": np.zeros((4, 32), np.float32)}
    slots = [TensorSlot(name, w.shape, QT.F32, w.nbytes) for name, w in weights.items()]
    with open(path, "wb") as f:
        w = GGUFStreamWriter(f)
        w.write_header(len(kvs), b"".join(kvs), slots)
        for data in weights.values():
            w.write_tensor(data)
        w.finish()


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_a_262k_vocabulary_opens_as_fast_as_the_header_walk(tmp_path: Path) -> None:
    path = tmp_path / "big-vocab.gguf"
    write_big_vocab(path)
    eager = _seconds(lambda: GGUFReader(path))  # gguf-py parses every item into numpy objects
    opens = {
        "GGUFModel": lambda: GGUFModel(path),
        "live.check_base": lambda: live.check_base(path, []),
        "export.write_modelfile": lambda: export.write_modelfile(path, tmp_path / "big.Modelfile"),
        "inspect.describe": lambda: describe(path),
    }
    took = {name: min(_seconds(fn) for _ in range(2)) for name, fn in opens.items()}
    # A header walk touches each item once in Python; the eager parse builds numpy objects for each: measured
    # here at 6-10x apart. A quarter of the eager time fails on any eager path and passes on the walk.
    slow = {name: t for name, t in took.items() if t > eager / 4}
    assert not slow, f"slower than a quarter of GGUFReader's {eager:.2f} s: {slow}"
    assert (tmp_path / "big.Modelfile").read_text().startswith("# Ollama Modelfile")
    meta = describe(path)
    assert meta["tensor_count"] == 2 and "tokenizer.ggml.tokens" not in meta
