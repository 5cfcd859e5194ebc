"""Memory and speed of ``alignvec convert`` on a ~1B-parameter sharded bf16 pair, against mergekit.

Builds (once, under --workdir) a Llama-shaped pair like TinyLlama-1.1B: hidden 2048, intermediate 5632,
22 layers, vocabulary 32000, written as sharded bf16 safetensors one tensor at a time; the aligned
model is the base plus a small random Δ. Then it runs, each in a fresh process with the inputs warm in
the page cache:

- ``alignvec convert BASE ALIGNED -o OUT --dtype D`` (this package);
- mergekit's task-arithmetic merge of the same pair (``mergekit-yaml``, weight 1, bf16 out), if a
  mergekit installation is found (--mergekit-python, $MERGEKIT_PYTHON, or /work/mergekit-venv). Install
  it in its own virtual environment, never in this project's: ``python -m venv mk && mk/bin/pip install
  mergekit==0.1.5``.

Each process is sampled every 10 ms for ``RssAnon`` (anonymous memory: file-backed pages of
memory-mapped inputs are reclaimable and do not count) summed over its process tree; peak RSS is the
kernel's own high-water mark (``ru_maxrss`` from ``wait4``). The goal: ``peak_anon_mb`` ≤ 4 × the
largest tensor in f32 + 300 MB, and faster than mergekit.

Usage: python benchmarks/convert.py [--workdir DIR] [--dtype f32|f16|bf16|q8_0] [--layers N]
[--mergekit-python PATH]. Needs several GB of disk (pair 4.4 GB + outputs) and RAM. The last line is JSON.
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

REPO = Path(__file__).resolve().parent.parent
MERGEKIT_VENV = Path("/work/mergekit-venv")


def llama_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 64,
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
    shapes = [("model.embed_tokens.weight", (v, h))]
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


def build_pair(root: Path, layers: int, shard_mb: int = 500) -> tuple[Path, Path, int, int]:
    """Write base/ and aligned/ as sharded bf16 safetensors, one tensor in memory at a time per shard."""
    config = llama_config(layers)
    shapes = tensor_shapes(config)
    n_params = sum(int(torch.Size(s).numel()) for _, s in shapes)
    largest = max(int(torch.Size(s).numel()) for _, s in shapes)
    dirs = (root / "base", root / "aligned")
    if all((d / "model.safetensors.index.json").is_file() for d in dirs):
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


def _anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``cmd``; its wall time, peak anonymous memory (sampled) and peak RSS (kernel high-water mark)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_anon = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_anon
        while not done.is_set():
            peak_anon = max(peak_anon, sum(_anon_kb(p) for p in _tree(proc.pid)))
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
    return {"seconds": seconds, "peak_anon_mb": peak_anon / 1024, "peak_rss_mb": usage.ru_maxrss / 1024}


def warm(*dirs: Path) -> None:
    """Read the inputs once so that both tools start with them in the page cache."""
    for d in dirs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def find_mergekit(option: str | None) -> Path | None:
    for candidate in (option, os.environ.get("MERGEKIT_PYTHON"), str(MERGEKIT_VENV / "bin" / "python")):
        if candidate and Path(candidate).is_file():
            probe = subprocess.run([candidate, "-c", "import mergekit"], capture_output=True)
            if probe.returncode == 0:
                return Path(candidate)
    return None


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
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "alignvec-bench")
    parser.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"], help="AV storage type")
    parser.add_argument("--layers", type=int, default=22, help="22: about 1.1B parameters")
    parser.add_argument(
        "--mergekit-python",
        help=f"python of a venv with mergekit (default: $MERGEKIT_PYTHON, then {MERGEKIT_VENV}/bin/python)",
    )
    parser.add_argument("--skip-mergekit", action="store_true")
    args = parser.parse_args()

    root = args.workdir
    root.mkdir(parents=True, exist_ok=True)
    base, aligned, n_params, largest = build_pair(root, args.layers)
    result: dict[str, object] = {"params": n_params, "dtype": args.dtype}
    result["largest_tensor_mb"] = round(largest * 4 / 2**20, 1)  # in float32

    out = root / "vector.avec.gguf"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
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
            args.dtype,
        ],
        env=env,
    )
    result.update({k: round(v, 1) for k, v in ours.items()})
    result["output_mb"] = round(out.stat().st_size / 2**20, 1)
    out.unlink()
    budget = 4 * largest * 4 / 2**20 + 300
    result["anon_budget_mb"] = round(budget, 1)
    result["within_budget"] = ours["peak_anon_mb"] <= budget

    python = None if args.skip_mergekit else find_mergekit(args.mergekit_python)
    if python is None:
        print(
            "mergekit not found: pass --mergekit-python or install mergekit==0.1.5 into its own venv "
            f"(e.g. {MERGEKIT_VENV}); skipping the comparison",
            file=sys.stderr,
        )
        result["mergekit"] = "missing"
    else:
        warm(base, aligned)
        theirs = run_mergekit(python, base, aligned, root)
        result.update({f"mergekit_{k}": round(v, 1) for k, v in theirs.items()})
        result["faster_than_mergekit"] = ours["seconds"] < theirs["seconds"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
