"""Build the bundled tiny demo: two tiny Llama models on one preference spectrum, and their AV.

A synthetic corpus of medical questions (``corpus.py``) has a plain answer and a clinical answer per
question. A SentencePiece tokenizer and a tiny ``LlamaForCausalLM`` are trained on the plain answers
(the BASE); a copy is fine-tuned on the clinical answers (the ALIGNED model). The base goes through
llama.cpp's own converter and quantizer (Q4_K_M); the alignment vector AV = θ_aligned − θ_base goes
through ``converters.convert``. The results land in ``alignvec_gguf/demo_data/``.

    python examples/tiny_demo/build.py --llama-cpp-src /path/to/llama_cpp_python-0.3.36/vendor/llama.cpp

Reproducible with a fixed seed; a few minutes on 2 CPU cores. Needs torch, transformers, sentencepiece.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import Example, examples, prompt  # noqa: E402

log = logging.getLogger("tiny_demo")

ROOT = Path(__file__).resolve().parents[2]
DEMO_DATA = ROOT / "alignvec_gguf" / "demo_data"
BASE_GGUF = "base.Q4_K_M.gguf"
AV_FILE = "expert.avec.gguf"
PROMPTS_FILE = "prompts.json"
DEMO_QUESTIONS = (
    "What should I do about a persistent headache?",
    "How can I treat a dry cough?",
    "Is high blood pressure something to worry about?",
)

VOCAB = 1024  # with byte_fallback, 256 of these are byte pieces
MODEL = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
)
UNK, BOS, EOS = 0, 1, 2


def set_seed(seed: int) -> None:
    """Seed every generator the build uses."""
    random.seed(seed)
    torch.manual_seed(seed)


def train_tokenizer(data: list[Example], out: Path) -> spm.SentencePieceProcessor:
    """A BPE SentencePiece tokenizer over both answer styles, saved as ``out`` (``tokenizer.model``)."""
    lines = [f"{prompt(e.question)} {answer}" for e in data for answer in (e.generic, e.expert)]
    corpus = out.with_suffix(".txt")
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out.with_suffix("")),
        vocab_size=VOCAB,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=UNK,
        bos_id=BOS,
        eos_id=EOS,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(out))


def encode(sp: spm.SentencePieceProcessor, question: str, answer: str) -> tuple[list[int], int]:
    """BOS + prompt + answer + EOS, and where the answer starts."""
    head = [BOS, *sp.encode(prompt(question))]
    return head + sp.encode(answer) + [EOS], len(head)


def batches(seqs: list[tuple[list[int], int]], batch_size: int, answer_only: bool, rng: random.Random):
    """Endless shuffled padded batches: (input_ids, attention_mask, labels)."""
    while True:
        order = list(range(len(seqs)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [seqs[j] for j in order[i : i + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), EOS, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, (seq, start) in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
                first = start if answer_only else 1
                labels[row, first : len(seq)] = torch.tensor(seq[first:])
            yield ids, mask, labels


def train(model: LlamaForCausalLM, seqs: list[tuple[list[int], int]], *, steps: int, lr: float, seed: int,
          answer_only: bool, label: str) -> float:
    """AdamW with linear warmup and cosine decay; returns the final loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    data = batches(seqs, 32, answer_only, random.Random(seed))
    model.train()
    loss_value = float("nan")
    start = time.perf_counter()
    for step in range(steps):
        ids, mask, labels = next(data)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss)
        if step % 50 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.4f (%.0fs)", label, step + 1, steps, loss_value, time.perf_counter() - start)
    model.eval()
    return loss_value


@torch.no_grad()
def greedy(model: LlamaForCausalLM, sp: spm.SentencePieceProcessor, question: str, n: int = 60) -> str:
    """Greedy answer to a question, for the build log."""
    ids = torch.tensor([[BOS, *sp.encode(prompt(question))]])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    return sp.decode(out[0, ids.shape[1] :].tolist())


def save_hf(model: LlamaForCausalLM, tokenizer: Path, out: Path) -> None:
    """``save_pretrained`` (safetensors) plus the SentencePiece model and a minimal tokenizer config."""
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(tokenizer, out / "tokenizer.model")
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>"}
    config |= {"unk_token": "<unk>", "model_max_length": MODEL["max_position_embeddings"]}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def convert_to_gguf(model_dir: Path, out: Path, llama_cpp_src: Path) -> None:
    """llama.cpp's own ``convert_hf_to_gguf.py``, run as a tool from its source tree, at F32."""
    script = llama_cpp_src / "convert_hf_to_gguf.py"
    if not script.is_file():
        sys.exit(f"build.py: {script} not found; pass --llama-cpp-src .../vendor/llama.cpp or set LLAMA_CPP_SRC")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(llama_cpp_src / "gguf-py"), str(llama_cpp_src)]))
    cmd = [sys.executable, str(script), str(model_dir), "--outtype", "f32", "--outfile", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"build.py: llama.cpp's converter failed:\n{result.stderr[-3000:]}")


def quantize(src: Path, out: Path) -> None:
    """Q4_K_M with llama.cpp's quantizer (``llama_model_quantize``)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        sys.exit(f"build.py: llama_model_quantize failed on {src}")


def check_tokenizer(gguf: Path, sp: spm.SentencePieceProcessor, prompts: Sequence[str]) -> None:
    """llama.cpp must tokenize the demo prompts exactly as the model was trained on them."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    for text in prompts:
        ours = [BOS, *sp.encode(text)]
        theirs = llm.tokenize(text.encode(), add_bos=True)
        if ours != theirs:
            sys.exit(f"build.py: llama.cpp tokenizes {text!r} as {theirs}, training used {ours}")


def write_provenance(out: Path, args: argparse.Namespace, stats: dict[str, object]) -> None:
    """PROVENANCE.md: what the bundled files are and the command that rebuilds them."""
    lines = [
        "# Provenance of the bundled demo data",
        "",
        "Built by `examples/tiny_demo/build.py` (see `examples/tiny_demo/README.md`) with:",
        "",
        "    python examples/tiny_demo/build.py --llama-cpp-src .../llama_cpp_python-0.3.36/vendor/llama.cpp"
        + (f" --seed {args.seed}" if args.seed != 0 else ""),
        "",
        "- Corpus: `examples/tiny_demo/corpus.py`, 16 medical complaints x 6 question templates, each with a",
        "  plain (generic) answer and a clinical (expert) answer. Synthetic, written for this demo.",
        f"- Tokenizer: SentencePiece BPE, vocab {VOCAB}, byte_fallback, trained on the corpus.",
        "- Base: `LlamaForCausalLM` (hidden 256, intermediate 512, 2 layers, 4 heads, 2 KV heads, untied), trained",
        f"  from scratch on question + generic answer ({args.base_steps} steps, final loss {stats['base_loss']:.3f}).",
        f"- Aligned: the base fine-tuned on question + expert answer, loss on the answer only ({args.sft_steps} steps,",
        f"  final loss {stats['sft_loss']:.3f}).",
        f"- `{BASE_GGUF}`: the base through llama.cpp's `convert_hf_to_gguf.py --outtype f32` (from the",
        "  llama-cpp-python 0.3.36 source distribution), then `llama_model_quantize` to Q4_K_M.",
        f"- `{AV_FILE}`: `converters.convert(base, aligned, dtype='q8_0')`, AV = θ_aligned − θ_base in GGUF",
        f"  layout ({stats['av_tensors']} tensors, max |Δ| {stats['max_delta']:.3g}).",
        f"- `{PROMPTS_FILE}`: demo prompts in the training template.",
        f"- Seed {args.seed}; torch {torch.__version__}, sentencepiece {spm.__version__}.",
        "",
    ]
    out.write_text("\n".join(lines), encoding="utf-8")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-cpp-src", type=Path, default=os.environ.get("LLAMA_CPP_SRC"),
                   help="llama.cpp source tree with convert_hf_to_gguf.py (default: $LLAMA_CPP_SRC)")
    p.add_argument("--build-dir", type=Path, default=ROOT / "build" / "tiny_demo", help="HF checkpoints, F32 GGUF")
    p.add_argument("--out-dir", type=Path, default=DEMO_DATA, help="where the bundled files go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-steps", type=int, default=400)
    p.add_argument("--sft-steps", type=int, default=200)
    args = p.parse_args(argv)
    if args.llama_cpp_src is None:
        p.error("give --llama-cpp-src DIR (llama.cpp's source tree, e.g. .../vendor/llama.cpp) or set LLAMA_CPP_SRC")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Build everything; see the module docstring."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    set_seed(args.seed)
    build = args.build_dir
    build.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    data = examples()
    sp = train_tokenizer(data, build / "tokenizer.model")
    log.info("tokenizer: %d pieces", sp.get_piece_size())

    config = LlamaConfig(vocab_size=sp.get_piece_size(), bos_token_id=BOS, eos_token_id=EOS, **MODEL)
    model = LlamaForCausalLM(config)
    stats: dict[str, object] = {}
    stats["base_loss"] = train(model, [encode(sp, e.question, e.generic) for e in data], steps=args.base_steps,
                               lr=3e-3, seed=args.seed, answer_only=False, label="base")
    save_hf(model, build / "tokenizer.model", build / "base")
    stats["sft_loss"] = train(model, [encode(sp, e.question, e.expert) for e in data], steps=args.sft_steps,
                              lr=1e-3, seed=args.seed + 1, answer_only=True, label="aligned")
    save_hf(model, build / "tokenizer.model", build / "aligned")
    aligned_sample = greedy(model, sp, DEMO_QUESTIONS[0])
    base_sample = greedy(LlamaForCausalLM.from_pretrained(build / "base"), sp, DEMO_QUESTIONS[0])
    log.info("transformers, base:    %s", base_sample)
    log.info("transformers, aligned: %s", aligned_sample)

    f32 = build / "base-f32.gguf"
    convert_to_gguf(build / "base", f32, args.llama_cpp_src)
    quantize(f32, args.out_dir / BASE_GGUF)
    prompts = [prompt(q) for q in DEMO_QUESTIONS]
    check_tokenizer(args.out_dir / BASE_GGUF, sp, prompts)

    from converters import convert

    report = convert(
        build / "base",
        build / "aligned",
        args.out_dir / AV_FILE,
        name="expert",
        domain="medical",
        description="tiny demo: plain answers -> clinical expert answers (synthetic SFT)",
        dtype="q8_0",
    )
    stats["av_tensors"] = report.tensors_written
    stats["max_delta"] = report.max_abs_delta
    (args.out_dir / PROMPTS_FILE).write_text(json.dumps(prompts, indent=2) + "\n", encoding="utf-8")
    write_provenance(args.out_dir / "PROVENANCE.md", args, stats)
    for f in sorted(args.out_dir.iterdir()):
        log.info("%-22s %9d bytes", f.name, f.stat().st_size)
    log.info("done in %.0fs", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
