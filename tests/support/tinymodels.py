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

from tests.support import llamatools
from tests.support.llamatools import LLAMA_CPP_PYTHON_VERSION

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
    with tarfile.open(llamatools.sdist(cache)) as tar:
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
    """A tiny Llama-family config (Llama or Mistral); see :func:`arch_config`."""
    return arch_config(arch, hidden, **overrides)


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
    return _moved(model, seed, untouched, lambda w, g: _nudged(w, scale, g))


def _moved(model, seed: int, untouched: tuple[str, ...], move) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Every tensor of ``model`` through ``move(w, generator)`` in state-dict order (one seeded generator), except
    names containing one of ``untouched``, which stay as they are."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: w.clone() if any(u in name for u in untouched) else move(w, g) for name, w in model.state_dict().items()
    }


def _nudged(w: torch.Tensor, scale: float, g: torch.Generator) -> torch.Tensor:
    """``w`` moved by scale·std(w)·noise (std 1 for a single value)."""
    std = float(w.float().std()) if w.numel() > 1 else 1.0
    return w + scale * std * torch.randn(w.shape, generator=g)


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
    from alignvec_gguf.cpu import new_llama

    llm = new_llama(path, n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return logits


def hf_logits(model, tokens: list[int]) -> np.ndarray:  # noqa: ANN001
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def lowrank_perturbed(  # noqa: ANN001 (model: a transformers model)
    model, seed: int, rank: int = 16, scale: float = 0.3, noise: float = 0.5, untouched: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """A fine-tune stand-in whose Δ is genuinely low-rank-ish: for every matrix W, Δ = L + N.

    L has rank ``rank`` (random orthonormal factors, singular values decaying as 1/√(i+1)) and
    ‖L‖_F = scale·‖W‖_F; N is Gaussian noise with ‖N‖_F ≈ noise·scale·‖W‖_F. 1-D tensors (norms) move
    by scale·std(w)·noise as in :func:`perturbed`, so the low-rank form has something to drop.
    """

    def move(w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if w.ndim != 2:
            return _nudged(w, scale, g)
        m, n = w.shape
        k = min(rank, m, n)
        u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
        sigma = 1.0 / torch.sqrt(torch.arange(1, k + 1, dtype=torch.float32))
        low = (u * sigma) @ v.T
        low *= scale * float(w.norm()) / float(low.norm())
        noise_part = torch.randn(w.shape, generator=g) * (noise * scale * float(w.norm()) / (m * n) ** 0.5)
        return w + low + noise_part

    return _moved(model, seed, untouched, move)


# --- Other architectures, tied embeddings and a local Hugging Face cache (issue 4) ---

ARCH_TIED = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "MixtralForCausalLM": False,
    "Qwen2ForCausalLM": True,  # like Qwen2.5-0.5B
    "Qwen3ForCausalLM": False,
    "Gemma2ForCausalLM": True,
    "Gemma3ForCausalLM": True,
    "Phi3ForCausalLM": False,
}


def arch_config(arch: str, hidden: int = 256, **overrides: object):  # noqa: ANN201
    """A tiny config of one supported architecture: 2 layers, K-quant-friendly sizes (rows of 256, 512)."""
    import transformers

    kwargs: dict[str, object] = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.05,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=ARCH_TIED[arch],
    )
    if arch.startswith("Gemma"):
        kwargs.update(head_dim=hidden // 4, sliding_window=64, query_pre_attn_scalar=hidden // 4)
    else:
        kwargs.update(rms_norm_eps=1e-5)
    if arch == "Qwen3ForCausalLM":
        kwargs.update(head_dim=hidden // 4)
    if arch == "MixtralForCausalLM":
        kwargs.update(num_local_experts=4, num_experts_per_tok=2)
    if arch == "MistralForCausalLM":
        kwargs.update(sliding_window=None)
    kwargs.update(overrides)
    name = {"Gemma3ForCausalLM": "Gemma3TextConfig"}.get(arch, arch.replace("ForCausalLM", "Config"))
    return getattr(transformers, name)(**kwargs)


def tie(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Make a perturbed state respect the model's tied embeddings (lm_head is embed_tokens)."""
    if model.config.tie_word_embeddings and "lm_head.weight" in state:
        state = dict(state)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def fill_hf_cache(cache: Path, repo_id: str, model_dir: Path, refs: tuple[str, ...] = ("main",)) -> str:
    """Put a model directory into a Hugging Face hub cache (HF_HUB_CACHE layout) as one commit.

    Files go to ``blobs/`` under their sha256 and are linked from ``snapshots/<commit>/``; every name
    in ``refs`` (branches, tags) points at the commit, which is returned.
    """
    import hashlib
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    commit = hashlib.sha1("".join(f"{p.relative_to(model_dir)}:{p.stat().st_size}" for p in files).encode())
    commit_id = hashlib.sha1(f"{repo_id}:{commit.hexdigest()}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit_id
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for p in files:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = snapshot / p.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit_id)
    return commit_id


def hf_to_gguf_all(src: Path, jobs: list[tuple[Path, Path]], outtype: str = "f32") -> list[Path]:
    """``hf_to_gguf`` for several (model_dir, out) pairs, two converter processes at a time."""
    env = dict(os.environ, PYTHONPATH=f"{src / 'gguf-py'}{os.pathsep}{src}", NO_LOCAL_GGUF="")
    script = str(src / "convert_hf_to_gguf.py")
    pending = list(jobs)
    while pending:
        batch, pending = pending[:2], pending[2:]
        procs = [
            subprocess.Popen(
                [sys.executable, script, str(d), "--outtype", outtype, "--outfile", str(o)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for d, o in batch
        ]
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"llama.cpp converter failed:\n{err[-4000:]}")
    return [o for _, o in jobs]


# --- Bases of every ggml type, split bases (issue 3) ---


def requantize_gguf(  # noqa: ANN001
    src: Path, out: Path, qtype, imatrix: dict | None = None, split_max_tensors: int = 0, only: str = ""
) -> Path:
    """Write the F32 GGUF ``src`` with every matrix quantized to ``qtype`` by ggml (1-D tensors stay F32).

    ``imatrix`` maps tensor names to importance vectors (types that need one get ones where it lacks an
    entry). ``split_max_tensors`` > 0 writes a split model, ``NAME-0000k-of-0000N.gguf``, as gguf-split does.
    ``only``: quantize just the matrices whose name contains it to ``qtype``, the others to Q8_0 (the
    IQ1/IQ2 quantizers are slow).
    """
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    from alignvec_gguf import ggml
    from tests.support.oracle import field, tensor_shape

    reader = GGUFReader(src)
    writer = GGUFWriter(out, field(reader, "general.architecture"), split_max_tensors=split_max_tensors)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = f.types[0]
        sub_type = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub_type)
    for t in reader.tensors:
        shape = tensor_shape(t)
        data = np.asarray(t.data, dtype=np.float32).reshape(-1, shape[-1])
        if len(shape) > 1 and ggml.can_quantize(qtype, shape[-1], has_imatrix=True):
            qt = qtype if only in t.name else ggml.QT.Q8_0
            imat = (imatrix or {}).get(t.name)
            if imat is None and ggml.requires_imatrix(qt):
                imat = np.ones(shape[-1], dtype=np.float32)
            writer.add_tensor(t.name, ggml.quantize(data, qt, imat).reshape(data.shape[0], -1), raw_dtype=qt)
        else:
            writer.add_tensor(t.name, data.reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return writer.format_shard_names(out)[0]


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader

    return {t.name: np.asarray(t.data, dtype=np.float32) for t in GGUFReader(path).tensors}


def assert_layout_oracle(av_path: Path, base_gguf: Path, aligned_gguf: Path) -> None:
    """Δ in the vector == llama.cpp's conversion of aligned − that of base, exactly, for every tensor."""
    from alignvec_gguf.avfile import AlignmentVector

    base, aligned = gguf_tensors(base_gguf), gguf_tensors(aligned_gguf)
    av = AlignmentVector(av_path)
    assert set(av.names) <= set(base)
    for name in base:
        expected = aligned[name] - base[name]
        if name not in av.names:
            assert not expected.any(), f"{name} changed but is missing from the vector"
            continue
        assert av.shape(name) == expected.shape, name
        np.testing.assert_array_equal(av.delta(name), expected, err_msg=name)


def edited_copy(src: Path, dst: Path) -> Path:
    """A copy of the GGUF ``src`` with the lowest bit of its last tensor's first byte flipped (a float32's mantissa:
    still finite, still plausible), so only a content digest can tell it from the original."""
    import shutil

    from gguf import GGUFReader

    shutil.copy(src, dst)
    last = max(GGUFReader(dst).tensors, key=lambda t: t.data_offset)
    with open(dst, "r+b") as f:
        f.seek(int(last.data_offset))
        byte = f.read(1)
        f.seek(int(last.data_offset))
        f.write(bytes([byte[0] ^ 1]))
    return dst
