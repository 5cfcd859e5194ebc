"""The GGUF layout of a Hugging Face checkpoint, exactly as llama.cpp's ``convert_hf_to_gguf.py`` makes it.

Every supported architecture is one :class:`Architecture` entry in ``ARCHITECTURES``: data that names
the GGUF architecture (which fixes the tensor names through ``gguf.get_tensor_name_map``) and the
transforms llama.cpp's ``conversion/`` package applies to that family. Adding an architecture is one
entry here (plus a test); a transform no entry uses yet is a field and a few lines in :class:`Layout`.

What each field reproduces (llama.cpp 0.3.36 source, ``conversion/``):

- ``permute_qk``: ``LlamaModel.modify_tensors`` reorders q/k rows (and biases) from HF's rotate-half RoPE
  to GGML's interleaved pairs, with ``n_head`` for q and ``n_head_kv`` for k. Qwen, Gemma and Phi-3
  use NeoX RoPE in llama.cpp and keep HF's order.
- ``norm_shift``: Gemma 2 and 3 store every ``*norm.weight`` as ``1 + w`` (``GemmaRMSNorm`` multiplies
  by ``1 + weight``). Δ is taken after the shift, so the constant cancels.
- ``skip``: checkpoint tensors the converter drops (Gemma 2 drops ``lm_head.weight``: it is tied).
- ``experts``: Mixtral's per-expert ``w1``/``w2``/``w3`` matrices are stacked into one 3-D tensor per
  layer and kind (``ffn_gate_exps``, ``ffn_down_exps``, ``ffn_up_exps``), expert index outermost.
- ``truncate_vocab``: Gemma 3 cuts ``embed_tokens`` to the tokenizer's vocabulary (rows past it are
  padding that llama.cpp never stores).

Fused tensors (Phi-3's ``qkv_proj`` and ``gate_up_proj``) are stored fused by llama.cpp as well, so
they map one to one. Tied embeddings need no rule: a tied checkpoint has no ``lm_head.weight``, the
GGUF has no ``output.weight`` and llama.cpp reuses ``token_embd`` for the output, so Δ lands on
``token_embd`` once and the merged model stays tied.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch

from alignvec_gguf.errors import CompatibilityError, FormatError, InputError

# Checkpoint tensors that llama.cpp's converter drops for every architecture (TextModel.prepare_tensors).
DROPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


def hparam(config: dict[str, Any], *keys: str) -> Any:
    """The first of ``keys`` that ``config`` sets (llama.cpp's ``find_hparam``)."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    raise CompatibilityError(f"config.json lacks {' / '.join(keys)}")


def rope_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation: HF's rotate-half RoPE rows -> GGML's interleaved pairs."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


# Config keys that fix shapes and transforms: base and aligned must agree on them.
_SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


@dataclass(frozen=True)
class ExpertStack:
    """Per-expert checkpoint matrices that llama.cpp stacks into one 3-D GGUF tensor per layer and kind.

    ``pattern`` matches one expert's tensor with groups ``bid`` (layer), ``xid`` (expert) and ``kind``;
    ``stacked`` is the name llama.cpp gives the stack before mapping it to GGUF (formatted with
    ``bid`` and ``kind``); ``count_keys`` are the config keys for the number of experts.
    """

    pattern: str
    stacked: str
    count_keys: tuple[str, ...]


@dataclass(frozen=True)
class Architecture:
    """How llama.cpp's converter lays out one Hugging Face architecture (see the module docstring)."""

    gguf_arch: gguf.MODEL_ARCH
    reference: str  # the llama.cpp class that defines the layout, for readers and error messages
    permute_qk: bool = False
    norm_shift: float = 0.0
    skip: tuple[str, ...] = ()
    experts: ExpertStack | None = None
    truncate_vocab: bool = False
    shape_keys: tuple[str, ...] = _SHAPE_KEYS


MIXTRAL_EXPERTS = ExpertStack(
    pattern=r"model\.layers\.(?P<bid>\d+)\.block_sparse_moe\.experts\.(?P<xid>\d+)\.(?P<kind>w[123])\.weight",
    stacked="layers.{bid}.feed_forward.experts.{kind}.weight",
    count_keys=("num_local_experts",),
)

ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(gguf.MODEL_ARCH.LLAMA, "llama.py LlamaModel", permute_qk=True),
    "MistralForCausalLM": Architecture(gguf.MODEL_ARCH.LLAMA, "llama.py LlamaModel", permute_qk=True),
    "MixtralForCausalLM": Architecture(
        gguf.MODEL_ARCH.LLAMA,
        "llama.py LlamaModel",
        permute_qk=True,
        experts=MIXTRAL_EXPERTS,
        shape_keys=(*_SHAPE_KEYS, "num_local_experts"),
    ),
    "Qwen2ForCausalLM": Architecture(gguf.MODEL_ARCH.QWEN2, "qwen.py Qwen2Model"),
    "Qwen3ForCausalLM": Architecture(gguf.MODEL_ARCH.QWEN3, "qwen.py Qwen3Model"),
    "Gemma2ForCausalLM": Architecture(
        gguf.MODEL_ARCH.GEMMA2, "gemma.py Gemma2Model", norm_shift=1.0, skip=("lm_head.weight",)
    ),
    "Gemma3ForCausalLM": Architecture(
        gguf.MODEL_ARCH.GEMMA3, "gemma.py Gemma3Model", norm_shift=1.0, truncate_vocab=True
    ),
    "Phi3ForCausalLM": Architecture(gguf.MODEL_ARCH.PHI3, "phi.py Phi3MiniModel"),
}


@dataclass(frozen=True)
class PlanItem:
    """One GGUF tensor and the checkpoint tensors it is made of (several when experts are stacked)."""

    gguf_name: str
    sources: tuple[str, ...]

    @property
    def stacked(self) -> bool:
        return len(self.sources) > 1


def tokenizer_vocab_size(model_dir: Path, config: dict[str, Any]) -> int:
    """The vocabulary size llama.cpp's Gemma 3 converter keeps rows of ``embed_tokens`` for.

    With ``tokenizer.model`` it is the config's vocabulary (``vocab_size_per_layer_input`` first, then
    ``vocab_size``, else the SentencePiece model's size); with only ``tokenizer.json`` it is the
    tokenizer's vocabulary plus its added tokens.
    """
    if (model_dir / "tokenizer.model").is_file():
        for key in ("vocab_size_per_layer_input", "vocab_size"):
            if config.get(key):
                return int(config[key])
        try:
            from sentencepiece import SentencePieceProcessor
        except ImportError:
            raise InputError(
                f"{model_dir}: reading tokenizer.model needs sentencepiece (pip install sentencepiece)"
            ) from None
        sp = SentencePieceProcessor()
        sp.LoadFromFile(str(model_dir / "tokenizer.model"))
        return int(sp.vocab_size())
    tokenizer_json = model_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        try:
            data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
            return len(data["model"]["vocab"]) + len(data["added_tokens"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{tokenizer_json} is not a readable tokenizer.json ({e})") from e
    raise CompatibilityError(
        f"{model_dir} has neither tokenizer.model nor tokenizer.json; llama.cpp sizes Gemma 3's token_embd from "
        "the tokenizer, so copy the tokenizer files next to config.json"
    )


class Layout:
    """Maps one checkpoint's tensors to GGUF names and values, as llama.cpp's converter does."""

    def __init__(self, hf_architecture: str, config: dict[str, Any], model_dir: Path | None = None):
        if hf_architecture not in ARCHITECTURES:
            raise CompatibilityError(
                f"architecture {hf_architecture!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
            )
        self.hf_architecture = hf_architecture
        self.arch = ARCHITECTURES[hf_architecture]
        self.config = config
        self.model_dir = model_dir
        self.n_layers = int(hparam(config, "num_hidden_layers", "n_layers"))
        self._map = gguf.get_tensor_name_map(self.arch.gguf_arch, self.n_layers)
        self._experts = re.compile(self.arch.experts.pattern) if self.arch.experts else None
        self._n_vocab: int | None = None

    @property
    def gguf_arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch.gguf_arch]

    def _map_name(self, name: str) -> str:
        gname = self._map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise CompatibilityError(
                f"cannot map tensor {name!r} to a GGUF name for {self.hf_architecture} "
                f"(llama.cpp's {self.arch.reference} cannot either)"
            )
        return gname

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name of an unstacked checkpoint tensor, or None for tensors llama.cpp drops."""
        if hf_name.endswith(DROPPED_SUFFIXES) or hf_name in self.arch.skip:
            return None
        return self._map_name(hf_name)

    def plan(self, hf_names: list[str]) -> list[PlanItem]:
        """The GGUF tensors of a checkpoint, each with its source tensors, in the order of ``hf_names``."""
        items: list[PlanItem] = []
        stacks: dict[tuple[int, str], dict[int, str]] = {}
        for name in hf_names:
            match = self._experts.fullmatch(name) if self._experts else None
            if match:
                stacks.setdefault((int(match["bid"]), match["kind"]), {})[int(match["xid"])] = name
                continue
            gname = self.gguf_name(name)
            if gname is not None:
                items.append(PlanItem(gname, (name,)))
        if stacks:
            assert self.arch.experts is not None
            n_experts = int(hparam(self.config, *self.arch.experts.count_keys))
            for (bid, kind), experts in sorted(stacks.items()):
                if sorted(experts) != list(range(n_experts)):
                    missing = sorted(set(range(n_experts)) - set(experts))
                    raise CompatibilityError(
                        f"layer {bid} has experts {sorted(experts)} of {kind} but config says {n_experts} "
                        f"(missing {missing[:4]}); is the checkpoint complete?"
                    )
                stacked = self.arch.experts.stacked.format(bid=bid, kind=kind)
                items.append(PlanItem(self._map_name(stacked), tuple(experts[x] for x in range(n_experts))))
        return items

    @property
    def n_vocab(self) -> int:
        if self._n_vocab is None:
            if self.model_dir is None:
                raise CompatibilityError(f"{self.hf_architecture} needs the model directory to size token_embd")
            self._n_vocab = tokenizer_vocab_size(self.model_dir, self.config)
        return self._n_vocab

    def transform(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """One checkpoint tensor as llama.cpp writes it (before stacking); never modifies ``tensor``.

        llama.cpp computes in float16 or float32 as stored and reads every other dtype as float32. Only
        the arithmetic here (Gemma's + 1) depends on that, so other dtypes are converted just for it and
        otherwise left to the caller: row permutations and slices are exact in any dtype.
        """
        arch = self.arch
        if arch.permute_qk:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = rope_permute(tensor, int(hparam(self.config, "n_heads", "num_attention_heads")))
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                n_head_kv = hparam(self.config, "n_kv_heads", "num_key_value_heads", "num_attention_heads")
                tensor = rope_permute(tensor, int(n_head_kv))
        if arch.truncate_vocab and "embed_tokens.weight" in hf_name:
            tensor = tensor[: self.n_vocab]
        if arch.norm_shift and hf_name.endswith("norm.weight"):
            if tensor.dtype not in (torch.float16, torch.float32):
                tensor = tensor.to(torch.float32)
            tensor = tensor + arch.norm_shift
        return tensor

    def gguf_shape(self, item: PlanItem, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The numpy-order shape of a GGUF tensor, from the shape of (each of) its source tensor(s)."""
        shape = source_shape
        if self.arch.truncate_vocab and "embed_tokens.weight" in item.sources[0]:
            shape = (min(shape[0], self.n_vocab), *shape[1:])
        return (len(item.sources), *shape) if item.stacked else shape
