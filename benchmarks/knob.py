"""How much of the knob survives requantization, per base type and requant policy.

Builds a tiny Llama pair (transformers, random weights; the aligned model is the base plus a full-rank
Δ of --scale × std(w) per tensor), converts the base with llama.cpp's converter and quantizer, merges
the AV at λ, and compares the shift of llama.cpp's logits, merged − base, with the same shift on F32:

  share   = <shift_q, shift_f32> / |shift_f32|²   (1.0: the whole knob survives)
  cosine  = cos(shift_q, shift_f32)
  size    = merged file size / base file size

Usage: python benchmarks/knob.py [--lam 1.0] [--scale 0.02]. Needs the test extras (pip install -e '.[convert,dev]').
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import tinymodels as tm  # noqa: E402

from alignvec_gguf import merge  # noqa: E402
from converters import convert  # noqa: E402

SEQUENCES = [[1, 5, 17, 42, 99, 200, 7, 3, 150, 33, 64, 250], [1, 300, 12, 8, 77, 123, 45, 6, 90, 210, 11, 2]]


def logits(path: Path) -> np.ndarray:
    return np.concatenate([tm.llama_logits(path, seq) for seq in SEQUENCES])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--scale", type=float, default=0.02, help="Δ as a fraction of each tensor's std")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="alignvec-knob-"))
    src = tm.llama_cpp_source(Path(__file__).resolve().parent.parent / ".cache")
    tok = tm.train_tokenizer(root / "tok")
    base = tm.make_model(tm.llama_config(), 0)
    base_dir = tm.save(base, None, root / "base", tok)
    aligned_dir = tm.save(base, tm.perturbed(base, 1, scale=args.scale), root / "aligned", tok)
    av = convert(base_dir, aligned_dir, root / "v.avec.gguf").path
    f32 = tm.hf_to_gguf(src, base_dir, root / "base-f32.gguf")
    ref_shift = logits(merge(f32, {av: args.lam}, root / "m-f32.gguf").path) - logits(f32)

    results: dict[str, dict[str, float]] = {}
    for variant in ("Q8_0", "Q4_K_M"):
        qbase = tm.quantize_gguf(f32, root / f"base-{variant}.gguf", f"MOSTLY_{variant}")
        base_logits = logits(qbase)
        for policy in ("same", "q8_0"):
            out = merge(qbase, {av: args.lam}, root / f"m-{variant}-{policy}.gguf", requant=policy).path
            shift = logits(out) - base_logits
            share = float((shift * ref_shift).sum() / (ref_shift**2).sum())
            cos = float((shift * ref_shift).sum() / np.linalg.norm(shift) / np.linalg.norm(ref_shift))
            size = out.stat().st_size / qbase.stat().st_size
            results[f"{variant}/{policy}"] = {"share": round(share, 3), "cosine": round(cos, 3), "size": round(size, 3)}
            print(f"{variant:7} requant={policy:5}  share {share:6.3f}  cosine {cos:6.3f}  size x{size:.2f}")
    print(json.dumps({"lam": args.lam, "scale": args.scale, **results}))


if __name__ == "__main__":
    main()
