"""The llama.cpp steps both builds share (build.py's tiny models and smollm2.py's real one).

llama.cpp's own converter run from its source tree, its quantizer through llama-cpp-python, and copying a
built bundle over the package's shipped demo data.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("preference_spectrum")

ROOT = Path(__file__).resolve().parents[2]


def convert_to_gguf(model_dir: Path, out: Path, llama_cpp_src: Path) -> None:
    """llama.cpp's own ``convert_hf_to_gguf.py``, run as a tool from its source tree, at F32."""
    script = llama_cpp_src / "convert_hf_to_gguf.py"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(llama_cpp_src / "gguf-py"), str(llama_cpp_src)]))
    cmd = [sys.executable, str(script), str(model_dir), "--outtype", "f32", "--outfile", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"build.py: llama.cpp's converter failed:\n{result.stderr[-3000:]}")


def quantize(src: Path, out: Path, ftype: str = "Q4_K_M") -> None:
    """``ftype`` (Q4_K_M, Q8_0, ...) with llama.cpp's quantizer (``llama_model_quantize``)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        sys.exit(f"build.py: llama_model_quantize failed on {src}")


def find_llama_cpp_src(given: Path | None) -> Path:
    """llama.cpp's source tree: ``given``, else as the tests find it (``$LLAMA_CPP_SRC`` or the sdist in .cache)."""
    if given is None:
        sys.path.insert(0, str(ROOT))
        from tests.support import tinymodels

        given = tinymodels.llama_cpp_source(Path(os.environ.get("ALIGNVEC_TEST_CACHE", ROOT / ".cache")))
    if not (given / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"build.py: {given} has no convert_hf_to_gguf.py; unset LLAMA_CPP_SRC or point it at llama.cpp")
    return given


def refresh(bundle: Path, target: Path) -> None:
    """Copy the built bundle's files over the package's shipped data (``--refresh-demo-data`` only)."""
    target.mkdir(parents=True, exist_ok=True)
    for f in sorted(bundle.iterdir()):
        if f.is_file():
            shutil.copy(f, target / f.name)
    log.info("refreshed %s from %s", target, bundle)
