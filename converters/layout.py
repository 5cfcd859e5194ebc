"""The GGUF layout of a Hugging Face checkpoint, exactly as llama.cpp's ``convert_hf_to_gguf.py`` makes it.

One :class:`Architecture` per supported HF architecture: the GGUF architecture (which fixes the tensor
names through ``gguf.get_tensor_name_map``), the tensors llama.cpp drops, and the per-tensor transform.
Adding an architecture is one entry in ``ARCHITECTURES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import torch

from alignvec_gguf.errors import CompatibilityError

Transform = Callable[[str, torch.Tensor, dict[str, Any]], torch.Tensor]


def _hparam(config: dict[str, Any], *keys: str) -> Any:
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


def llama_transform(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """LlamaModel.modify_tensors: permute q (n_head) and k (n_head_kv) weights and biases."""
    n_head = _hparam(config, "n_heads", "num_attention_heads")
    n_head_kv = _hparam(config, "n_kv_heads", "num_key_value_heads", "num_attention_heads")
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return rope_permute(tensor, n_head)
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return rope_permute(tensor, n_head_kv)
    return tensor


@dataclass(frozen=True)
class Architecture:
    gguf_arch: gguf.MODEL_ARCH
    transform: Transform
    # Config keys that must agree between base and aligned (they fix shapes and transforms).
    shape_keys: tuple[str, ...]


_LLAMA_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)

ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(gguf.MODEL_ARCH.LLAMA, llama_transform, _LLAMA_KEYS),
    "MistralForCausalLM": Architecture(gguf.MODEL_ARCH.LLAMA, llama_transform, _LLAMA_KEYS),
}

# Checkpoint tensors that llama.cpp's converter drops (TextModel.prepare_tensors).
_DROPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


class Layout:
    """Maps one HF architecture's tensors to GGUF names and layout."""

    def __init__(self, hf_architecture: str, config: dict[str, Any]):
        if hf_architecture not in ARCHITECTURES:
            raise CompatibilityError(
                f"architecture {hf_architecture!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
            )
        self.hf_architecture = hf_architecture
        self.arch = ARCHITECTURES[hf_architecture]
        self.config = config
        n_layers = int(_hparam(config, "num_hidden_layers", "n_layers"))
        self._map = gguf.get_tensor_name_map(self.arch.gguf_arch, n_layers)

    @property
    def gguf_arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch.gguf_arch]

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name of a checkpoint tensor, or None for tensors llama.cpp drops."""
        if hf_name.endswith(_DROPPED_SUFFIXES):
            return None
        name = self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CompatibilityError(f"cannot map tensor {hf_name!r} to a GGUF name for {self.hf_architecture}")
        return name

    def transform(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        return self.arch.transform(hf_name, tensor, self.config)
