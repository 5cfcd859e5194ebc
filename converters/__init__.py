"""Alignment vectors from Hugging Face checkpoints (needs PyTorch: ``pip install alignvec-gguf[convert]``)."""

from __future__ import annotations

from .convert import ConvertReport, convert
from .layout import ARCHITECTURES, Layout

__all__ = ["ARCHITECTURES", "ConvertReport", "Layout", "convert"]
