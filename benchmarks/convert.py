"""Memory and speed of ``alignvec convert`` on a sharded bf16 pair, against mergekit's task arithmetic.

Builds (once, under --workdir) a Llama-shaped pair, written as sharded bf16 safetensors one tensor at a
time; the aligned model is the base plus a small random Δ. ``--size 1b`` (the default) is shaped like
TinyLlama-1.1B (hidden 2048, intermediate 5632, 22 layers, vocabulary 32000; 2 × 2.2 GB); ``--size 7b``
like Mistral-7B (hidden 4096, intermediate 14336, 32 layers, GQA 32/8, vocabulary 32000; 2 × 14.5 GB),
with as many of its 32 layers as the disk holds with 15 GB to spare beside the pair and one output (the
output says so in one line when it drops layers), the vector stored F16 unless --dtype says otherwise,
and the pair deleted at the end unless --keep. Then it runs, each in a fresh process with the inputs warm
in the page cache:

- ``alignvec convert BASE ALIGNED -o OUT --dtype D`` (this package);
- mergekit's task-arithmetic merge of the same pair (``mergekit-yaml``, weight 1, bf16 out), in its own
  virtual environment: --mergekit-python, $MERGEKIT_PYTHON or /work/mergekit-venv if given or present,
  else one created on first use under ~/.cache/alignvec/mergekit-venv (``pip install mergekit==0.1.5
  torch==2.13.0``, the CPU build this project pins; never into this project's venv) and kept; one line
  says so where that is impossible.

Each process is sampled every 10 ms for ``RssAnon`` (anonymous memory: file-backed pages of
memory-mapped inputs are reclaimable and do not count) and for ``VmHWM`` (the kernel's high-water mark of
the resident set, reset by exec: ``wait4``'s ``ru_maxrss`` would report this process's own), each summed
over its process tree; CPU seconds are the process tree's user +
system time (``wait4``), which a busy shared machine stretches far less than the wall clock. The goal:
``peak_anon_mb`` ≤ 4 × the largest tensor in f32 + 300 MB, and faster than mergekit.

Usage: python benchmarks/convert.py [--size 1b|7b] [--workdir DIR] [--dtype f32|f16|bf16|q8_0] [--layers N]
[--mergekit-python PATH] [--keep]. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: tests.support

from tests.support import REPO, pin  # noqa: E402

MERGEKIT_VENV = Path("/work/mergekit-venv")
MERGEKIT_CACHED = Path.home() / ".cache" / "alignvec" / "mergekit-venv"
MERGEKIT_VERSION = "0.1.5"
TORCH_PIN = f"torch=={pin('torch')}"  # pyproject.toml's [convert] pin: its CPU build
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, layers=22, num_attention_heads=32, num_key_value_heads=4),
    "7b": dict(hidden_size=4096, intermediate_size=14336, layers=32, num_attention_heads=32, num_key_value_heads=8),
}
SPARE_BYTES = 15e9  # disk left free beside the pair and one output, for everyone else on the machine


def llama_config(layers: int, size: str = "1b") -> dict:
    shape = SHAPES[size]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape["hidden_size"],
        "intermediate_size": shape["intermediate_size"],
        "num_hidden_layers": layers,
        "num_attention_heads": shape["num_attention_heads"],
        "num_key_value_heads": shape["num_key_value_heads"],
        "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (f, h)),
            (f"{p}.mlp.up_proj.weight", (f, h)),
            (f"{p}.mlp.down_proj.weight", (h, f)),
        ]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def n_params(config: dict) -> int:
    return sum(int(torch.Size(s).numel()) for _, s in tensor_shapes(config))


def layers_that_fit(size: str, layers: int, free_bytes: float, out_bytes_per_param: float) -> int:
    """The most layers (up to ``layers``) whose bf16 pair plus one output leaves SPARE_BYTES of the disk free."""
    while layers > 1:
        params = n_params(llama_config(layers, size))
        if params * (4 + out_bytes_per_param) + SPARE_BYTES <= free_bytes:
            break
        layers -= 1
    return layers


def build_pair(root: Path, layers: int, shape_name: str = "1b", shard_mb: int = 500) -> tuple[Path, Path, int, int]:
    """Write base/ and aligned/ as sharded bf16 safetensors, one tensor in memory at a time per shard."""
    config = llama_config(layers, shape_name)
    shapes = tensor_shapes(config)
    n_params = sum(int(torch.Size(s).numel()) for _, s in shapes)
    largest = max(int(torch.Size(s).numel()) for _, s in shapes)
    dirs = (root / "base", root / "aligned")
    if all((d / "model.safetensors.index.json").is_file() for d in dirs):
        if json.loads((dirs[0] / "config.json").read_text()) == config:
            return dirs[0], dirs[1], n_params, largest
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator().manual_seed(0)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes:
        n = int(torch.Size(shape).numel()) * 2
        if size + n > shard_mb * 2**20 and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    weight_map: dict[str, str] = {}
    by_name = dict(shapes)
    for i, names in enumerate(shards):
        shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        base: dict[str, torch.Tensor] = {}
        aligned: dict[str, torch.Tensor] = {}
        for name in names:
            shape = by_name[name]
            w = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            base[name] = w.to(torch.bfloat16)
            # a fine-tune: Δ about 2% of the weights' scale (large enough to survive bf16 rounding)
            aligned[name] = (w + torch.randn(shape, generator=g) * (0.02 * 0.02 if len(shape) > 1 else 0.01)).to(
                torch.bfloat16
            )
            del w
            weight_map[name] = shard
        save_file(base, str(dirs[0] / shard), metadata={"format": "pt"})
        save_file(aligned, str(dirs[1] / shard), metadata={"format": "pt"})
        del base, aligned
        print(f"wrote shard {i + 1}/{len(shards)}", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": n_params * 2}, "weight_map": weight_map}
    for d in dirs:
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return dirs[0], dirs[1], n_params, largest


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _anon_kb(pid: int) -> int:
    return _status_kb(pid, "RssAnon:")


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``cmd``; its wall time, peak anonymous memory (sampled) and peak RSS (kernel high-water mark)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_anon = peak_hwm = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_anon, peak_hwm
        while not done.is_set():
            tree = _tree(proc.pid)
            peak_anon = max(peak_anon, sum(_anon_kb(p) for p in tree))
            # VmHWM is reset by exec; wait4's ru_maxrss keeps this (forking) process's high-water mark
            peak_hwm = max(peak_hwm, sum(_status_kb(p, "VmHWM:") for p in tree))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_anon_mb": peak_anon / 1024,
        "peak_rss_mb": peak_hwm / 1024,
    }


def warm(*dirs: Path) -> None:
    """Read the inputs once so that both tools start with them in the page cache."""
    for d in dirs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def find_mergekit(option: str | None) -> Path | None:
    candidates = (
        option,
        os.environ.get("MERGEKIT_PYTHON"),
        MERGEKIT_VENV / "bin" / "python",
        MERGEKIT_CACHED / "bin" / "python",
    )
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            probe = subprocess.run([str(candidate), "-c", "import mergekit"], capture_output=True)
            if probe.returncode == 0:
                return Path(candidate)
    return None


def ensure_mergekit(option: str | None) -> tuple[Path | None, str]:
    """mergekit's python: one found (:func:`find_mergekit`), else a venv created now under MERGEKIT_CACHED and
    kept for the next run; (None, the reason in one line) where that is impossible."""
    if (found := find_mergekit(option)) is not None:
        return found, f"mergekit at {found}"
    t0 = time.perf_counter()
    venv = MERGEKIT_CACHED
    shutil.rmtree(venv, ignore_errors=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        # torch pinned as this project pins it (its CPU build): mergekit's "torch>=2.0.0" would take a CUDA one
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"mergekit=={MERGEKIT_VERSION}", TORCH_PIN],
    ]
    print(f"creating mergekit's own venv at {venv} (once; minutes)", file=sys.stderr, flush=True)
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return None, f"mergekit unavailable: {' '.join(step[-3:])} failed: {last}"
    found = find_mergekit(str(venv / "bin" / "python"))
    if found is None:
        return None, f"mergekit unavailable: installed into {venv} but it does not import"
    return found, f"mergekit {MERGEKIT_VERSION} installed into {venv} in {time.perf_counter() - t0:.0f} s"


def run_mergekit(python: Path, base: Path, aligned: Path, root: Path) -> dict[str, float]:
    out = root / "mergekit-out"
    shutil.rmtree(out, ignore_errors=True)
    config = root / "task_arithmetic.yml"
    config.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {aligned}\n    parameters:\n      weight: 1.0\ndtype: bfloat16\n"
    )
    script = "import sys; from mergekit.scripts.run_yaml import main; sys.exit(main())"
    cmd = [str(python), "-c", script, str(config), str(out), "--quiet", "--no-copy-tokenizer"]
    help_text = subprocess.run([str(python), "-c", script, "--help"], capture_output=True, text=True).stdout
    if "--copy-tokenizer" not in help_text:
        cmd.remove("--no-copy-tokenizer")
    try:
        return measure(cmd)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), default="1b", help="the shape of the pair")
    parser.add_argument(
        "--workdir", type=Path, help="default: $TMPDIR/alignvec-bench (1b), ~/.cache/alignvec/bench/convert-7b"
    )
    parser.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"], help="AV storage type (f32; 7b: f16)")
    parser.add_argument("--layers", type=int, help="layers of the pair (default: all of the shape's that fit)")
    parser.add_argument(
        "--mergekit-python",
        help=f"mergekit's python (default: $MERGEKIT_PYTHON, {MERGEKIT_VENV}, else a venv made in {MERGEKIT_CACHED})",
    )
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--keep", action="store_true", help="7b: keep the pair (about 29 GB) for the next run")
    args = parser.parse_args()

    big = args.size == "7b"
    dtype = args.dtype or ("f16" if big else "f32")
    root = args.workdir or (
        Path.home() / ".cache" / "alignvec" / "bench" / "convert-7b"
        if big
        else Path(os.environ.get("TMPDIR", "/tmp")) / "alignvec-bench"
    )
    root.mkdir(parents=True, exist_ok=True)
    full_layers = SHAPES[args.size]["layers"]
    layers = args.layers or full_layers
    if big and not args.layers:
        have = sum(f.stat().st_size for f in root.rglob("*.safetensors"))  # a kept pair counts as free space
        free = shutil.disk_usage(root).free + have
        out_bytes = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 1.07}[dtype]
        layers = layers_that_fit(args.size, full_layers, free, max(out_bytes, 2))  # mergekit writes bf16
        if layers < full_layers:
            need = n_params(llama_config(full_layers, args.size)) * (4 + max(out_bytes, 2)) + SPARE_BYTES
            print(
                f"the full {args.size} pair and one output need {need / 1e9:.0f} GB with 15 GB to spare, the disk has "
                f"{free / 1e9:.0f} GB: using {layers} of its {full_layers} layers",
                file=sys.stderr,
            )
    base, aligned, n_params_, largest = build_pair(root, layers, args.size)
    result: dict[str, object] = {"size": args.size, "layers": layers, "params": n_params_, "dtype": dtype}
    result["pair_gb"] = round(2 * n_params_ * 2 / 1e9, 1)
    result["largest_tensor_mb"] = round(largest * 4 / 2**20, 1)  # in float32

    out = root / "vector.avec.gguf"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    try:
        warm(base, aligned)
        ours = measure(
            [
                sys.executable,
                "-m",
                "alignvec_gguf.cli",
                "-q",
                "convert",
                str(base),
                str(aligned),
                "-o",
                str(out),
                "--dtype",
                dtype,
            ],
            env=env,
        )
        result.update({k: round(v, 1) for k, v in ours.items()})
        result["output_mb"] = round(out.stat().st_size / 2**20, 1)
        out.unlink()
        budget = 4 * largest * 4 / 2**20 + 300
        result["anon_budget_mb"] = round(budget, 1)
        result["within_budget"] = ours["peak_anon_mb"] <= budget

        python, note = (
            (None, "skipped (--skip-mergekit)") if args.skip_mergekit else ensure_mergekit(args.mergekit_python)
        )
        print(note, file=sys.stderr)
        if python is None:
            result["mergekit"] = note
        else:
            warm(base, aligned)
            theirs = run_mergekit(python, base, aligned, root)
            result.update({f"mergekit_{k}": round(v, 1) for k, v in theirs.items()})
            result["faster_than_mergekit"] = ours["seconds"] < theirs["seconds"]
    finally:
        out.unlink(missing_ok=True)
        if big and not args.keep:
            for d in (base, aligned):
                shutil.rmtree(d, ignore_errors=True)
    result["load_average"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
