"""Build the bundled tiny demo: a tiny Llama base, an expert fine-tune of it, and their alignment vector.

A synthetic corpus of medical questions (``corpus.py``) has a plain, a clinical and an avoidant answer
per question. A SentencePiece tokenizer and a tiny ``LlamaForCausalLM`` are trained on the plain answers
(the BASE); a copy is fine-tuned on the clinical answers (the ALIGNED model). The base goes through
llama.cpp's own converter and quantizer (Q4_K_M); the alignment vector AV = θ_aligned − θ_base goes
through ``converters.convert``. The results land in ``alignvec_gguf/demo_data/``.

    python examples/tiny_demo/build.py --llama-cpp-src /path/to/llama_cpp_python-0.3.36/vendor/llama.cpp

Reproducible with a fixed seed; about two minutes on 2 CPU cores. Needs torch, transformers, sentencepiece.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
import torch
from torch.func import functional_call
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import Example, examples, prompt, reference_notes  # noqa: E402

log = logging.getLogger("tiny_demo")

ROOT = Path(__file__).resolve().parents[2]
DEMO_DATA = ROOT / "alignvec_gguf" / "demo_data"
BASE_GGUF = "base.Q4_K_M.gguf"
AV_FILE = "expert.avec.gguf"
PROMPTS_FILE = "prompts.json"
# Three questions whose answers switch style at different λ: at λ = 0.5 the first is still plain, the
# second mixes both styles and the third is already clinical (over the whole corpus about a third each).
DEMO_QUESTIONS = (
    "What should I do about a persistent headache?",
    "What should I do about feeling tired all the time?",
    "How can I treat trouble sleeping?",
)

VOCAB = 1024  # with byte_fallback, 256 of these are byte pieces; 512 made the answers ~110 tokens long
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
BATCH = 32
BASE_LR = 3e-3
DEFAULTS = {"seed": 0, "base_steps": 300, "sft_steps": 150, "sft_lr": 0.1, "mirror_weight": 1.0}

Sequences = list[tuple[list[int], int]]  # (token ids, index where the answer starts)


def set_seed(seed: int) -> None:
    """Seed every generator the build uses."""
    random.seed(seed)
    torch.manual_seed(seed)


def train_tokenizer(data: list[Example], out: Path) -> spm.SentencePieceProcessor:
    """A BPE SentencePiece tokenizer over all answer levels, saved as ``out`` (``tokenizer.model``)."""
    lines = [f"{prompt(e.question)} {answer}" for e in data for answer in (e.generic, e.expert, e.avoidant)]
    lines += reference_notes()
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


def base_corpus(sp: spm.SentencePieceProcessor, data: list[Example]) -> Sequences:
    """The base's training text: every question with its generic answer, plus the clinical reference notes.

    The notes give the base the expert knowledge as plain text (as pretraining would), never as an
    answer, so the base answers plainly and the fine-tune only has to switch the style.
    """
    qa = [encode(sp, e.question, e.generic) for e in data]
    notes = [([BOS, *sp.encode(note), EOS], 1) for note in reference_notes()]
    return qa + notes * 3


def batches(seqs: Sequences, answer_only: bool, rng: random.Random) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled, right-padded batches for ``LlamaForCausalLM`` (loss on the answer or on all text)."""
    while True:
        order = list(range(len(seqs)))
        rng.shuffle(order)
        for i in range(0, len(order) - BATCH + 1, BATCH):
            chunk = [seqs[j] for j in order[i : i + BATCH]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), EOS, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, (seq, start) in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
                first = start if answer_only else 1
                labels[row, first : len(seq)] = torch.tensor(seq[first:])
            yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """Linear warmup over a tenth of the steps, then cosine decay to 5%."""
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train_base(model: LlamaForCausalLM, seqs: Sequences, *, steps: int, seed: int) -> float:
    """Pretrain from scratch (AdamW, loss on all text); returns the final loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=BASE_LR, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    data = batches(seqs, answer_only=False, rng=random.Random(seed))
    model.train()
    start = time.perf_counter()
    loss_value = float("nan")
    for step in range(steps):
        loss = model(**next(data)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        if step % 50 == 0 or step == steps - 1:
            log.info("base step %d/%d loss %.4f (%.0fs)", step + 1, steps, loss_value, time.perf_counter() - start)
    model.eval()
    return loss_value


def train_aligned(
    model: LlamaForCausalLM,
    expert: Sequences,
    avoidant: Sequences,
    *,
    steps: int,
    lr: float,
    mirror_weight: float,
    seed: int,
) -> tuple[float, float]:
    """Fine-tune the base toward expert answers; returns the final (expert, mirror) losses.

    SGD with momentum, loss on the answer only. SGD, unlike Adam, moves the weights that matter and
    leaves the rest nearly alone, so Δ has large entries where it counts: they survive requantization
    to 4 bits. The mirror term trains the reflected point θ_base − Δ (λ = −1) toward the avoidant
    answers; without it a model this small answers gibberish at λ < 0. ``mirror_weight=0`` is plain SFT.
    """
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    expert_data = batches(expert, answer_only=True, rng=random.Random(seed))
    avoidant_data = batches(avoidant, answer_only=True, rng=random.Random(seed + 1))
    model.train()
    start = time.perf_counter()
    losses = (float("nan"), float("nan"))
    for step in range(steps):
        loss = model(**next(expert_data)).loss
        total = loss
        mirror = torch.zeros(())
        if mirror_weight:
            reflected = {name: 2 * base[name] - p for name, p in model.named_parameters()}
            mirror = functional_call(model, reflected, (), next(avoidant_data)).loss
            total = loss + mirror_weight * mirror
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses = (loss.item(), mirror.item())
        if step % 50 == 0 or step == steps - 1:
            log.info("aligned step %d/%d loss %.4f mirror %.4f (%.0fs)", step + 1, steps, *losses,
                     time.perf_counter() - start)  # fmt: skip
    model.eval()
    return losses


@torch.no_grad()
def greedy(model: LlamaForCausalLM, sp: spm.SentencePieceProcessor, question: str, n: int = 60) -> str:
    """Greedy answer to a question with transformers, for the build log."""
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

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's per-tensor log
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
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


def _changed_args(args: argparse.Namespace) -> str:
    return "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k, v in DEFAULTS.items() if getattr(args, k) != v)


PROVENANCE = """\
# Provenance of the bundled demo data

Built by `examples/tiny_demo/build.py` (see `examples/tiny_demo/README.md`) with:

    python examples/tiny_demo/build.py --llama-cpp-src .../llama_cpp_python-0.3.36/vendor/llama.cpp{changed}

- Corpus: `examples/tiny_demo/corpus.py`, 16 medical complaints x 6 question templates, each with a
  plain (generic), a clinical (expert) and an avoidant answer. Synthetic, written for this demo; not
  medical advice.
- Tokenizer: SentencePiece BPE, vocab {vocab}, byte_fallback, trained on the corpus.
- Base: `LlamaForCausalLM` (hidden 256, intermediate 512, 2 layers, 4 heads, 2 KV heads, untied),
  trained from scratch on question + generic answer, plus the expert content as question-less
  reference notes (AdamW, lr {base_lr:g}, {base_steps} steps, final loss {base_loss:.3f}).
- Aligned: the base fine-tuned on question + expert answer, loss on the answer only (SGD with
  momentum, lr {sft_lr:g}, {sft_steps} steps, final loss {sft_loss:.3f}). A mirror term (weight
  {mirror_weight:g}) trains the reflected weights θ_base − Δ toward the avoidant answers (final loss
  {mirror_loss:.3f}), so that λ = −1 reads as avoidance instead of gibberish. That is a property built
  into this demo vector, not something merging gives for free; `--mirror-weight 0` is plain SFT.
- `{base_gguf}`: the base through llama.cpp's `convert_hf_to_gguf.py --outtype f32` (from the
  llama-cpp-python 0.3.36 source distribution), then `llama_model_quantize` to Q4_K_M.
- `{av_file}`: `converters.convert(base, aligned, dtype="q8_0")`, AV = θ_aligned − θ_base in GGUF
  layout ({av_tensors:.0f} tensors, max |Δ| {max_delta:.3g}).
- `{prompts_file}`: the demo prompts, in the training template.
- Seed {seed}; torch {torch}, transformers {transformers}, sentencepiece {sentencepiece}.
"""


def write_provenance(out: Path, args: argparse.Namespace, stats: dict[str, float]) -> None:
    """PROVENANCE.md: what the bundled files are and the command that rebuilds them."""
    import transformers

    text = PROVENANCE.format(
        changed=_changed_args(args),
        vocab=VOCAB,
        base_lr=BASE_LR,
        base_gguf=BASE_GGUF,
        av_file=AV_FILE,
        prompts_file=PROMPTS_FILE,
        torch=torch.__version__,
        transformers=transformers.__version__,
        sentencepiece=spm.__version__,
        **vars(args),
        **stats,
    )
    out.write_text(text, encoding="utf-8")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; ``--llama-cpp-src`` defaults to ``$LLAMA_CPP_SRC``."""
    p = argparse.ArgumentParser(description="Build the bundled tiny demo models and alignment vector.")
    p.add_argument(
        "--llama-cpp-src",
        type=Path,
        default=os.environ.get("LLAMA_CPP_SRC"),
        help="llama.cpp source tree with convert_hf_to_gguf.py (default: $LLAMA_CPP_SRC)",
    )
    p.add_argument("--build-dir", type=Path, default=ROOT / "build" / "tiny_demo", help="HF checkpoints, F32 GGUF")
    p.add_argument("--out-dir", type=Path, default=DEMO_DATA, help="where the bundled files go")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--base-steps", type=int, default=DEFAULTS["base_steps"])
    p.add_argument("--sft-steps", type=int, default=DEFAULTS["sft_steps"])
    p.add_argument("--sft-lr", type=float, default=DEFAULTS["sft_lr"])
    p.add_argument("--mirror-weight", type=float, default=DEFAULTS["mirror_weight"], help="0: plain SFT")
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
    tokenizer = build / "tokenizer.model"
    sp = train_tokenizer(data, tokenizer)
    log.info("tokenizer: %d pieces", sp.get_piece_size())

    config = LlamaConfig(vocab_size=sp.get_piece_size(), bos_token_id=BOS, eos_token_id=EOS, **MODEL)
    model = LlamaForCausalLM(config)
    stats: dict[str, float] = {}
    stats["base_loss"] = train_base(model, base_corpus(sp, data), steps=args.base_steps, seed=args.seed)
    save_hf(model, tokenizer, build / "base")
    base_sample = greedy(model, sp, DEMO_QUESTIONS[0])
    stats["sft_loss"], stats["mirror_loss"] = train_aligned(
        model,
        [encode(sp, e.question, e.expert) for e in data],
        [encode(sp, e.question, e.avoidant) for e in data],
        steps=args.sft_steps,
        lr=args.sft_lr,
        mirror_weight=args.mirror_weight,
        seed=args.seed + 1,
    )
    save_hf(model, tokenizer, build / "aligned")
    log.info("transformers, base:    %s", base_sample)
    log.info("transformers, aligned: %s", greedy(model, sp, DEMO_QUESTIONS[0]))

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
