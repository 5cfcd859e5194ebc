"""Tiny real models for the tests: transformers Llama checkpoints, a SentencePiece tokenizer, and base
GGUFs made by llama.cpp's own converter (from the llama-cpp-python source distribution) and quantizer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
VOCAB = 320

CORPUS = [
    "the patient reports a persistent headache and mild fever since monday",
    "a contract is binding when both parties agree to its terms in writing",
    "diversify your savings across index funds bonds and cash reserves",
    "consult a qualified professional before making any important decision",
    "interest rates affect mortgages loans and the value of government bonds",
    "symptoms such as chest pain require immediate medical attention",
    "the court ruled that the lease agreement was void from the start",
]


def llama_cpp_source(cache: Path) -> Path:
    """llama.cpp's source tree (``vendor/llama.cpp``) from the llama-cpp-python sdist, fetched once."""
    if env := os.environ.get("LLAMA_CPP_SRC"):
        return Path(env)
    root = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    src = root / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache)]
            + [f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"],
            check=True,
            capture_output=True,
        )
    with tarfile.open(sdist) as tar:
        members = [
            m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and "/vendor/llama.cpp/ggml" not in m.name
        ]
        tar.extractall(cache, members=members, filter="data")
    return src


def train_tokenizer(out_dir: Path) -> Path:
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    text = out_dir / "corpus.txt"
    text.write_text("\n".join(CORPUS * 20) + "\n")
    prefix = out_dir / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(prefix),
        vocab_size=VOCAB,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def llama_config(arch: str = "LlamaForCausalLM", hidden: int = 256, **overrides: object):  # noqa: ANN201
    from transformers import LlamaConfig, MistralConfig

    kwargs: dict[str, object] = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=0.05,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    if arch == "MistralForCausalLM":
        return MistralConfig(sliding_window=None, **kwargs)
    return LlamaConfig(**kwargs)


def make_model(config, seed: int):  # noqa: ANN001, ANN201
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():  # norms away from 1 so that their deltas and transforms are visible
        for _name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.eval()


def perturbed(model, seed: int, scale: float = 0.05, untouched: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """A fine-tune stand-in: every tensor moved by scale·std(w)·noise, except names containing ``untouched``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in model.state_dict().items():
        if any(u in name for u in untouched):
            out[name] = w.clone()
            continue
        std = float(w.float().std()) if w.numel() > 1 else 1.0
        out[name] = w + scale * std * torch.randn(w.shape, generator=g)
    return out


def save(model, state: dict[str, torch.Tensor] | None, path: Path, tokenizer: Path, **kwargs: object) -> Path:  # noqa: ANN001
    import shutil

    if state is not None:
        model = type(model)(model.config).eval()
        model.load_state_dict(state)
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    shutil.copy(tokenizer, path / "tokenizer.model")
    return path


def interpolated(base_model, aligned_state: dict[str, torch.Tensor], lam: float):  # noqa: ANN001, ANN201
    """The HF model with weights θ_base + λ(θ_aligned − θ_base)."""
    base_state = base_model.state_dict()
    model = type(base_model)(base_model.config).eval()
    model.load_state_dict({k: base_state[k] + lam * (aligned_state[k] - base_state[k]) for k in base_state})
    return model


def hf_to_gguf(src: Path, model_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """Run llama.cpp's own convert_hf_to_gguf.py (the oracle for the GGUF layout)."""
    env = dict(os.environ, PYTHONPATH=f"{src / 'gguf-py'}{os.pathsep}{src}", NO_LOCAL_GGUF="")
    result = subprocess.run(
        [
            sys.executable,
            str(src / "convert_hf_to_gguf.py"),
            str(model_dir),
            "--outtype",
            outtype,
            "--outfile",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"llama.cpp converter failed:\n{result.stderr[-4000:]}")
    return out


def quantize_gguf(src: Path, out: Path, ftype_name: str) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize), e.g. ftype_name='MOSTLY_Q4_K_M'."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype_name}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with {rc}")
    return out


def llama_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of ``tokens``."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return logits


def hf_logits(model, tokens: list[int]) -> np.ndarray:  # noqa: ANN001
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()
