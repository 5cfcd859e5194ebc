"""A model's identity: its tensor layout (signature) and its weights (fingerprint), over a :class:`GGUFModel`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGMLQuantizationType

if TYPE_CHECKING:  # ggufread imports signature from here
    from .ggufread import GGUFModel

# Tensors that llama.cpp's converter generates from the config rather than from checkpoint
# weights; they are not part of the signature because an AV can never touch them.
GENERATED_TENSORS = frozenset({"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})


def signature(pairs: Iterable[tuple[str, Sequence[int]]]) -> str:
    """sha256 over the sorted (GGUF tensor name, numpy-order shape) pairs, generated tensors left out."""
    h = hashlib.sha256()
    for name, shape in sorted((n, tuple(int(d) for d in s)) for n, s in pairs if n not in GENERATED_TENSORS):
        h.update(f"{name}:{'x'.join(map(str, shape))}\n".encode())
    return h.hexdigest()


# Tensors that llama.cpp stores as F32 in every file type: its converter writes 1-D tensors, norms and MoE
# routers as F32, and its quantizer never quantizes them (src/llama-quant.cpp). Their values survive
# quantization bit for bit, so they can be compared on any base.
_ANCHOR_SUFFIXES = (".bias", "norm.weight", "ffn_gate_inp.weight")
_FLOAT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16})
FINGERPRINT_PREFIX = "v2."
_PART = 30  # hex digits per part: "v2." + 30 + "." + 30 = 64 characters, like a sha256 digest


def is_anchor(name: str) -> bool:
    """Whether llama.cpp keeps this tensor at F32 in every file type (see ``Fingerprint``)."""
    return name.endswith(_ANCHOR_SUFFIXES)


class Fingerprint:
    """Content hash of a model's weights in GGUF layout, in two parts: ``v2.<all>.<anchors>``.

    ``all`` hashes every tensor's float32 values; ``anchors`` hashes only the tensors llama.cpp keeps at
    F32 in every file type (norms, biases, MoE routers; :func:`is_anchor`). The converter feeds it the
    base checkpoint's tensors; a merge recomputes what the base GGUF allows (:func:`check_fingerprint`):
    both parts on a float base, the anchors on a quantized one, where the matrices are no longer the
    values the vector was made from. Each part is 120 bits of sha256.

    ``add`` may be called several times for one tensor with consecutive chunks (C order), e.g. one
    expert at a time of a stacked tensor; the hash is the same as for the whole tensor at once.
    """

    def __init__(self) -> None:
        self._parts: dict[str, Any] = {}

    def add(self, name: str, values: np.ndarray) -> None:
        if name in GENERATED_TENSORS:
            return
        data = np.ascontiguousarray(values, dtype=np.float32)
        h = self._parts.get(name)
        if h is None:
            h = self._parts[name] = hashlib.sha256()
        h.update(data.data)

    def names(self) -> list[str]:
        return sorted(self._parts)

    def _digest(self, names: Iterable[str]) -> str:
        h = hashlib.sha256()
        for name in sorted(names):
            h.update(f"{name}:{self._parts[name].hexdigest()}\n".encode())
        return h.hexdigest()

    def whole_digest(self) -> str:
        """sha256 over every tensor (the v1 fingerprint, which AVs written before v2 carry)."""
        return self._digest(self._parts)

    def anchor_digest(self) -> str:
        return self._digest(n for n in self._parts if is_anchor(n))

    def has_anchors(self) -> bool:
        return any(is_anchor(n) for n in self._parts)

    def hexdigest(self) -> str:
        """The fingerprint as recorded in ``alignvec.base.fingerprint``: ``v2.<all>.<anchors>``."""
        return f"{FINGERPRINT_PREFIX}{self.whole_digest()[:_PART]}.{self.anchor_digest()[:_PART]}"


@dataclass(frozen=True)
class FingerprintCheck:
    """Whether a base GGUF holds the weights an AV was made from.

    ``status``: ``same`` (every part the base allows to check matches), ``different`` (some part
    differs: another fine-tuning stage, or another precision) or ``unverified`` (nothing comparable,
    e.g. a v1 fingerprint on a quantized base). ``checked`` names what was compared.
    """

    status: str
    checked: str
    detail: str = ""


def _anchor_fingerprint(model: GGUFModel) -> Fingerprint | None:
    """The anchors of a base GGUF, or None if one of them is not stored at F32 (then they cannot match)."""
    fp = Fingerprint()
    for t in model.tensors:
        if not is_anchor(t.name) or t.name in GENERATED_TENSORS:
            continue
        if t.tensor_type != GGMLQuantizationType.F32:
            return None
        fp.add(t.name, t.values())
    return fp


def check_fingerprint(recorded: str, model: GGUFModel, computed: Fingerprint | None = None) -> FingerprintCheck:
    """Compare an AV's recorded base fingerprint with a base GGUF.

    ``computed`` is the fingerprint of every base tensor dequantized to float32, if the caller has it
    (a merge computes it while streaming a float base). What can be checked depends on the base:

    - all F32: every weight, exactly;
    - F16 / BF16: every weight if they match exactly, else the anchors (a mismatch of the matrices
      may be the storage precision alone);
    - quantized: the anchors only (norms, biases, MoE routers). A fine-tuning stage that changed
      matrices alone (e.g. a merged LoRA) goes unnoticed there.
    """
    if not recorded:
        return FingerprintCheck("unverified", "nothing", "the vector records no fingerprint")
    tensors = [t for t in model.tensors if t.name not in GENERATED_TENSORS]
    all_f32 = all(t.tensor_type == GGMLQuantizationType.F32 for t in tensors)
    all_float = all(t.tensor_type in _FLOAT_TYPES for t in tensors)
    if not recorded.startswith(FINGERPRINT_PREFIX):  # v1: one sha256 over every weight
        if computed is None or not all_float:
            return FingerprintCheck("unverified", "nothing", "a whole-model fingerprint cannot be checked on this base")
        same = computed.whole_digest() == recorded
        return FingerprintCheck("same" if same else "different", "all weights", "" if same else "its weights differ")

    whole, _, anchors = recorded[len(FINGERPRINT_PREFIX) :].partition(".")
    if computed is not None and all_float and computed.whole_digest()[:_PART] == whole:
        return FingerprintCheck("same", "all weights")
    anchor_fp = _anchor_fingerprint(model)
    comparable = anchor_fp is not None and anchor_fp.has_anchors()
    if comparable and anchor_fp is not None and anchor_fp.anchor_digest()[:_PART] != anchors:
        return FingerprintCheck("different", "norms and biases", "its norms and biases differ")
    if computed is not None and all_f32:
        return FingerprintCheck("different", "all weights", "its weights differ")
    if comparable:
        return FingerprintCheck("same", "norms and biases")
    return FingerprintCheck("unverified", "nothing", "no tensor of this base is stored exactly")
