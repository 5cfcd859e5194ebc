"""alignvec-gguf: alignment vectors as a dial for llama.cpp.

``θ = θ_base + Σ λ_i · AV_i``, merged into a (quantized) GGUF base and loaded as a
``llama_cpp.Llama``. This package needs numpy, gguf and llama-cpp-python; never torch.
"""

from __future__ import annotations

from ._version import __version__
from .avfile import AlignmentVector, AVInfo, write_av
from .cache import cached_merge
from .diagnose import MergeReport
from .errors import AlignVecError, CompatibilityError, DiskFullError, FormatError, InputError
from .merge import merge
from .runtime import load

__all__ = [
    "AVInfo",
    "AlignVecError",
    "AlignmentVector",
    "CompatibilityError",
    "DiskFullError",
    "FormatError",
    "InputError",
    "MergeReport",
    "cached_merge",
    "load",
    "merge",
    "write_av",
    "__version__",
]
