"""Code the crash and concurrency tests run inside their child processes (it is pasted into a ``python -c``
script after ``spec = json.loads(sys.argv[1])`` and ``import time``)."""

from __future__ import annotations

# Child code that slows every tensor write by spec["slow"] seconds, whichever writer is in use.
SLOW_WRITES = r"""
def _slow_down(cls, name, seconds):
    write = getattr(cls, name)
    def slow(self, *args, **kwargs):
        time.sleep(seconds)
        return write(self, *args, **kwargs)
    setattr(cls, name, slow)
if spec.get("slow"):
    import gguf
    from alignvec_gguf import ggufwrite
    _slow_down(gguf.GGUFWriter, "write_tensor_data", spec["slow"])
    if hasattr(ggufwrite, "GGUFStreamWriter"):  # the merge's own writer
        _slow_down(ggufwrite.GGUFStreamWriter, "write_tensor", spec["slow"])
"""
