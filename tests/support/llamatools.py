"""llama.cpp's own command-line tools (llama-server, the RPC server, llama-export-lora, llama-quantize), built
once from the llama.cpp source inside the pinned llama-cpp-python sdist and cached outside the clone.

Shared by the tests (``tests/test_llama_tools.py``) and the benchmarks (``benchmarks/live.py``,
``benchmarks/merge.py``), which import it from the repository root as the rest of ``tests.support``::

    from tests.support import llamatools
    bindir = llamatools.ensure()            # builds on first use (minutes), then returns at once
    server = bindir / "llama-server"

Where the tools live: ``$ALIGNVEC_LLAMA_TOOLS`` if set, else ``~/.cache/alignvec/llama-tools/<version>-<isa>``
(``<isa>``: ``avx2`` or ``avx512``). ``$LLAMA_CPP_BIN`` points at tools built by hand instead and is used as
it is. The build is ``-DGGML_NATIVE=OFF`` with explicit AVX2/FMA/F16C flags (plus AVX-512 only where the CPU
has it), so the AMX kernel, which crashes on Intel AMX CPUs, is never compiled in; only the needed targets
are built, under ``nice``, and a file lock makes concurrent processes build once (the others wait and use
the result). ``$ALIGNVEC_LLAMA_TOOLS_BUILD=0`` forbids building: then only cached tools are used. The
benchmarks build what they miss; the tests only with ``$ALIGNVEC_LLAMA_TOOLS_BUILD=1``, and skip otherwise.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from tests.support import REPO, pin

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = pin("llama-cpp-python")  # pyproject.toml's pin; its sdist holds llama.cpp's source
# cmake target -> the executable's file name (the RPC server is called ggml-rpc-server in this llama.cpp)
TARGETS = {
    "llama-server": "llama-server",
    "ggml-rpc-server": "ggml-rpc-server",
    "llama-export-lora": "llama-export-lora",
    "llama-quantize": "llama-quantize",
}
BUILD_RECORD = "build.json"
# What a build of all four took here (2 cores shared with other jobs), for CI budgets before a first build.
EXPECTED_BUILD_S = 2350


class ToolsUnavailable(RuntimeError):
    """The tools are neither cached nor buildable here; the message says why and what to do."""


def isa() -> str:
    """The instruction-set level the tools are built for: ``avx512`` where the CPU has AVX-512F, else ``avx2``."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return "avx512" if " avx512f" in flags else "avx2"


def cmake_flags(level: str | None = None) -> list[str]:
    """The configure flags: no native tuning (no AMX), explicit SIMD, RPC on, nothing fetched, static binaries."""
    level = level or isa()
    flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DGGML_NATIVE=OFF",
        "-DGGML_AVX=ON",
        "-DGGML_AVX2=ON",
        "-DGGML_FMA=ON",
        "-DGGML_F16C=ON",
        "-DGGML_BMI2=ON",
        f"-DGGML_AVX512={'ON' if level == 'avx512' else 'OFF'}",
        "-DGGML_AMX_TILE=OFF",
        "-DGGML_AMX_INT8=OFF",
        "-DGGML_AMX_BF16=OFF",
        "-DGGML_RPC=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_BUILD_UI=OFF",  # llama-server's web UI: needs npm, or a download; the API is all we use
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DGGML_CCACHE=OFF",
    ]
    if shutil.which("ninja"):
        flags += ["-G", "Ninja"]
    return flags


def tools_dir() -> Path:
    """Where the cached tools live (``bin/`` below it)."""
    if env := os.environ.get("ALIGNVEC_LLAMA_TOOLS"):
        return Path(env)
    return Path.home() / ".cache" / "alignvec" / "llama-tools" / f"{LLAMA_CPP_PYTHON_VERSION}-{isa()}"


def record() -> dict | None:
    """What the cached build recorded (seconds, flags, targets), or None before the first build."""
    path = tools_dir() / "bin" / BUILD_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cached(targets: tuple[str, ...] = tuple(TARGETS)) -> Path | None:
    """The directory holding ``targets`` if they are built (or in ``$LLAMA_CPP_BIN``), else None."""
    if env := os.environ.get("LLAMA_CPP_BIN"):
        bindir = Path(env)
        return bindir if all((bindir / TARGETS[t]).is_file() for t in targets) else None
    bindir = tools_dir() / "bin"
    rec = record()
    if rec is None or not all((bindir / TARGETS[t]).is_file() for t in targets):
        return None
    return bindir


def sdist(into: Path) -> Path:
    """The pinned llama-cpp-python sdist in ``into``, downloaded there by pip unless it is there already."""
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if (into / name).is_file():
        return into / name
    into.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(into)]
    proc = subprocess.run([*pip, f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"], capture_output=True, text=True)
    if proc.returncode != 0 or not (into / name).is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ToolsUnavailable(f"cannot download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist: {tail[0]}")
    return into / name


def _sdist(work: Path) -> Path:
    """The llama-cpp-python sdist: the tests' cached copy if there is one, else downloaded into ``work``."""
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    for cache in (os.environ.get("ALIGNVEC_TEST_CACHE"), REPO / ".cache"):
        if cache and (Path(cache) / name).is_file():
            return Path(cache) / name
    return sdist(work)


def _source(work: Path) -> Path:
    """llama.cpp's whole source tree (ggml included) from the sdist, extracted once under ``work/src``."""
    src = work / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file() and (src / ".complete").is_file():
        return src
    shutil.rmtree(work / "src", ignore_errors=True)
    with tarfile.open(_sdist(work)) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        tar.extractall(work / "src", members=members, filter="data")
    (src / ".complete").touch()
    return src


def build(targets: tuple[str, ...] = tuple(TARGETS), jobs: int | None = None) -> Path:
    """Build ``targets`` into the cache (under a lock; a no-op when they are there) and return ``bin/``."""
    if env := os.environ.get("LLAMA_CPP_BIN"):
        if (found := cached(targets)) is not None:
            return found
        raise ToolsUnavailable(f"LLAMA_CPP_BIN={env} lacks {', '.join(TARGETS[t] for t in targets)}")
    if os.environ.get("ALIGNVEC_LLAMA_TOOLS_BUILD", "1") == "0":
        raise ToolsUnavailable("llama.cpp's tools are not built and ALIGNVEC_LLAMA_TOOLS_BUILD=0 forbids building them")
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise ToolsUnavailable(f"building llama.cpp's tools needs {tool}, which is not installed")
    work = tools_dir()
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a second process waits here, then finds the tools built
            log.warning("another process is building llama.cpp's tools in %s; waiting for it", work)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (found := cached(targets)) is not None:
            return found
        t0 = time.monotonic()
        src = _source(work)
        build_dir = work / "build"
        flags = cmake_flags()
        log.warning("building llama.cpp's %s in %s (minutes; once)", ", ".join(targets), build_dir)
        _run(["cmake", "-S", str(src), "-B", str(build_dir), *flags], work / "configure.log")
        jobs = jobs or os.cpu_count() or 1
        _run(
            ["nice", "-n", "10", "cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *targets],
            work / "build.log",
        )
        bindir = work / "bin"
        bindir.mkdir(exist_ok=True)
        for t in targets:
            exe = build_dir / "bin" / TARGETS[t]
            if not exe.is_file():
                raise ToolsUnavailable(f"the build finished without {exe}; see {work / 'build.log'}")
            tmp = bindir / f".{TARGETS[t]}.tmp"
            shutil.copy2(exe, tmp)
            os.replace(tmp, bindir / TARGETS[t])
        seconds = time.monotonic() - t0
        previous = record() or {}
        built = sorted(set(previous.get("targets", [])) | set(targets))
        rec = {
            "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
            "targets": built,
            "flags": flags,
            "jobs": jobs,
            "seconds": round(seconds, 1),
            "seconds_total": round(seconds + previous.get("seconds_total", 0.0), 1),
        }
        tmp = bindir / f".{BUILD_RECORD}.tmp"
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, bindir / BUILD_RECORD)
        log.warning("built llama.cpp's tools in %.0f s", seconds)
        return bindir


def _run(cmd: list[str], logfile: Path) -> None:
    with open(logfile, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace").strip().splitlines()[-3:]
        raise ToolsUnavailable(f"{' '.join(cmd[:3])} ... failed (see {logfile}): {' | '.join(tail)}")


def ensure(targets: tuple[str, ...] = tuple(TARGETS), *, build_missing: bool = True) -> Path:
    """The tools' directory: cached ones at once, else built now (:class:`ToolsUnavailable` if impossible, or
    if ``build_missing`` is false: the tests build only when asked, since a first build takes many minutes)."""
    if (found := cached(targets)) is not None:
        return found
    if not build_missing:
        minutes = round(((record() or {}).get("seconds_total") or EXPECTED_BUILD_S) / 60)
        raise ToolsUnavailable(
            f"llama.cpp's tools are not built (once, about {minutes} min on 2 cores): "
            "run python -m tests.support.llamatools, or set ALIGNVEC_LLAMA_TOOLS_BUILD=1 to let the tests build them"
        )
    return build(targets)


if __name__ == "__main__":  # python -m tests.support.llamatools: build (or find) the tools, print where and how long
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        where = ensure()
    except ToolsUnavailable as e:
        print(f"llama.cpp tools unavailable: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"bin": str(where), **(record() or {})}))
