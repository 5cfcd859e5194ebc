"""A float32 Hugging Face checkpoint from a GGUF file: the HF base of a model that is published only as GGUF.

transformers reads GGUF files (``from_pretrained(dir, gguf_file=name)``, with ``accelerate``) and
dequantizes every tensor to float32, undoing llama.cpp's layout transforms (the Llama q/k row
permutation). It refuses to ``save_pretrained`` a model loaded that way, so the checkpoint is rebuilt
from the model's config without its ``quantization_config``, given the loaded state dict, and saved as
safetensors with the tokenizer (and its chat template) that transformers reads from the same file.

The result's weights are the GGUF's own values (for a quantized file, its dequantized grid values), so
it is the exact float base of what a user of that file runs: fine-tune it, convert the difference
with ``alignvec convert``, and merge it into the very same GGUF.

:func:`hf_from_gguf` caches the checkpoint beside the GGUF (``NAME.hf-f32/``): written into a
temporary directory and renamed into place when complete, once per process group (a lock), and
rebuilt when the GGUF's content changed (its sha256 is recorded in ``alignvec-source.json``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from alignvec_gguf.atomic import file_lock
from alignvec_gguf.errors import FormatError, InputError
from alignvec_gguf.realmodel import sha256_file

log = logging.getLogger(__name__)

SOURCE_RECORD = "alignvec-source.json"
_SUFFIX = ".hf-f32"


def _record(gguf: Path, digest: str) -> dict[str, str | int]:
    import transformers

    return {"gguf": gguf.name, "sha256": digest, "size": gguf.stat().st_size, "transformers": transformers.__version__}


def _is_built(out: Path, digest: str) -> bool:
    try:
        recorded = json.loads((out / SOURCE_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and recorded.get("sha256") == digest and (out / "config.json").is_file()


def build_hf(gguf: Path, out: Path) -> None:
    """Write the float32 HF checkpoint of ``gguf`` into the (new, empty) directory ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import accelerate  # noqa: F401  (transformers needs it to load GGUF files)
    except ImportError as e:
        raise InputError("reading a GGUF with transformers needs accelerate: pip install accelerate") from e
    folder, name = str(gguf.parent), gguf.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise FormatError(f"transformers cannot read {gguf.name}: {str(e).splitlines()[0][:300]}") from e
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # assign: the loaded tensors become the parameters (no second copy); ties are re-made after it
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise FormatError(
            f"{gguf.name}: the rebuilt model does not fit its weights (missing {missing}, extra {unexpected})"[:300]
        )
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def hf_from_gguf(gguf: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """The float32 HF checkpoint directory of ``gguf`` (default ``NAME.hf-f32/`` beside it), built once.

    Needs torch, transformers and accelerate (``pip install alignvec-gguf[convert,dev]``). Loading and
    dequantizing a 135M-parameter model takes about 20-40 s on 2 cores; later calls hash the GGUF and
    return the directory.
    """
    gguf = Path(gguf)
    if not gguf.is_file():
        raise InputError(f"GGUF {gguf} does not exist")
    target = Path(out) if out is not None else gguf.with_name(gguf.stem + _SUFFIX)
    digest = sha256_file(gguf)
    if _is_built(target, digest):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.with_name(f".{target.name}.lock")):
        if _is_built(target, digest):
            return target
        log.info("building the float32 checkpoint of %s in %s", gguf.name, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint is as readable as the GGUF beside it
        try:
            build_hf(gguf, tmp)
            (tmp / SOURCE_RECORD).write_text(json.dumps(_record(gguf, digest), indent=1))
            if target.exists():  # a stale build of another GGUF content
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
