"""Build the preference-spectrum models: a base, three domain DPO alignment vectors, a second-stage
checkpoint for transfer, and a joint retrain for the cost comparison. The bundled demo data comes from here.

    python examples/preference_spectrum/build.py                   # the tiny models (a few minutes)
    python examples/preference_spectrum/build.py --model smollm2   # the real model (smollm2.py; ~25 min)

llama.cpp's source tree (for its ``convert_hf_to_gguf.py``) is found as the tests find it (``steps.py``).
Everything goes under ``--build-dir``; the package's shipped files change only with ``--refresh-demo-data``.

Steps of ``--model tiny`` (seeded; a few minutes on 2 CPU cores; needs torch, transformers, sentencepiece):

1. Dataset (``data.py``): 3 domains x 10 topics x 6 question templates, one response per level.
2. Tokenizer: SentencePiece BPE, vocab 1024, byte fallback.
3. BASE: a tiny ``LlamaForCausalLM`` (hidden 256, feed-forward 512, 2 layers: K-quants apply) trained
   from scratch to answer plain prompts at the generic level and to follow level instructions (so prompt
   engineering works on it, as on an instruct model).
4. Per domain, DPO from the base on that domain's training questions with plain prompts and the pairs
   expert ≻ generic, expert ≻ avoidance, generic ≻ avoidance: the aligned model; AV = θ_aligned − θ_base
   through ``converters.convert`` (q8_0 storage).
5. STAGE2: the base fine-tuned further on general text (everyday questions), for the transfer test.
6. JOINT: one DPO model trained from the base for one multidomain mix (timed, for the retrain comparison).
7. The base and stage-2 models through llama.cpp's ``convert_hf_to_gguf.py`` (F32) and
   ``llama_model_quantize`` (Q4_K_M).

Outputs: ``--build-dir`` (default ``build/preference_spectrum/``, not committed) gets the checkpoints,
``base.f32.gguf``, ``stage2.Q4_K_M.gguf``, ``stage2.f32.gguf``, ``stats.json`` (timings and accuracies that
``benchmarks/paper_claims.py`` reads) and, in ``bundle/``, what the package ships: ``base.Q4_K_M.gguf``,
the three ``{domain}.avec.gguf``, ``heldout.json`` and ``PROVENANCE.md`` (copied over
``alignvec_gguf/demo_data/`` only with ``--refresh-demo-data``).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402
from steps import ROOT, convert_to_gguf, find_llama_cpp_src, quantize, refresh  # noqa: E402
from train import BOS, EOS, UNK, Pair, dpo, encode, preference_accuracy, sft  # noqa: E402

log = logging.getLogger("preference_spectrum")

DEMO_DATA = ROOT / "alignvec_gguf" / "demo_data"
BASE_GGUF = "base.Q4_K_M.gguf"
HELDOUT_FILE = "heldout.json"
VOCAB = 1024
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
BATCH = 32
# The mix the joint retrain is trained for (one of the 27; its training time stands for each of them).
JOINT_MIX = {"medical": "expert", "legal": "avoidance", "financial": "generic"}
DEFAULTS = {
    "seed": 0,
    "base_steps": 250,
    "base_lr": 3e-3,
    "dpo_steps": 40,
    "dpo_lr": 0.3,
    "dpo_beta": 0.1,
    "stage2_steps": 40,
    "stage2_lr": 3e-4,
    "anchor_weight": 3.0,
}
DPO_BATCH = 16


def set_seed(seed: int) -> None:
    """Seed every generator the build uses."""
    random.seed(seed)
    torch.manual_seed(seed)


def train_tokenizer(train: list[data.Item], out: Path) -> spm.SentencePieceProcessor:
    """SentencePiece BPE over every prompt form and response, saved as ``out`` (``tokenizer.model``)."""
    lines = [f"{data.prompt(it.question)} {it.response(lv)}" for it in train for lv in data.LEVELS]
    lines += [data.prompt("q", data.INSTRUCTIONS[lv]) for lv in data.LEVELS] * 10
    lines += [f"{p} {a}" for p, a in data.general_text()]
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


def base_corpus(sp: spm.SentencePieceProcessor, train: list[data.Item]) -> list[tuple[list[int], int]]:
    """Plain prompts answered mostly at the generic level, and instruction + prompt -> that level's response.

    Plain prompts get the generic response six times for each avoidance or expert one: like an instruct
    model, the base has seen every level, prefers generic, and follows an explicit level instruction.
    """
    mix = {"generic": 6, "avoidance": 1, "expert": 1}
    plain = [
        encode(sp, data.prompt(it.question), it.response(lv)) for it in train for lv, n in mix.items() for _ in range(n)
    ]
    instructed = [
        encode(sp, data.prompt(it.question, data.INSTRUCTIONS[lv]), it.response(lv))
        for it in train
        for lv in data.LEVELS
    ]
    return plain + instructed


def preference_pairs(
    sp: spm.SentencePieceProcessor, items: list[data.Item], targets: dict[str, str] | None = None
) -> list[Pair]:
    """DPO pairs on plain prompts: the spectrum order (expert ≻ generic ≻ avoidance), or target ≻ rest per domain."""
    pairs = []
    for it in items:
        prompt = data.prompt(it.question)
        if targets is None:
            order = [("expert", "generic"), ("expert", "avoidance"), ("generic", "avoidance")]
        else:
            order = [(targets[it.domain], lv) for lv in data.LEVELS if lv != targets[it.domain]]
        for good, bad in order:
            pairs.append(Pair(encode(sp, prompt, it.response(good)), encode(sp, prompt, it.response(bad))))
    return pairs


def save_hf(model: LlamaForCausalLM, tokenizer: Path, out: Path) -> None:
    """``save_pretrained`` (safetensors) plus the SentencePiece model and a minimal tokenizer config."""
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(tokenizer, out / "tokenizer.model")
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>"}
    config |= {"unk_token": "<unk>", "model_max_length": MODEL["max_position_embeddings"]}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def check_tokenizer(gguf: Path, sp: spm.SentencePieceProcessor, records: list[dict]) -> None:
    """llama.cpp must tokenize prompt + response exactly as training did."""
    from alignvec_gguf.cpu import new_llama

    llm = new_llama(gguf, vocab_only=True, verbose=False)
    for rec in records:
        for response in rec["responses"].values():
            ours = encode(sp, rec["prompt"], response)[0][:-1]
            theirs = llm.tokenize(f"{rec['prompt']} {response}".encode(), add_bos=True)
            if ours != theirs:
                sys.exit(f"build.py: llama.cpp tokenizes {rec['prompt']!r} + response differently from training")


def _log_accuracy(label: str, model: LlamaForCausalLM, sp: spm.SentencePieceProcessor, records: list[dict]) -> dict:
    out = {}
    for domain in data.DOMAINS:
        acc = preference_accuracy(model, sp, [r for r in records if r["domain"] == domain], data.LEVELS)
        out[domain] = acc
        log.info("%-8s %-9s %s", label, domain, "  ".join(f"{lv} {acc[lv]:.2f}" for lv in data.LEVELS))
    return out


PROVENANCE = """\
# Provenance of the bundled demo data

Built by `examples/preference_spectrum/build.py` (see `examples/preference_spectrum/README.md`) with:

    python examples/preference_spectrum/build.py --refresh-demo-data{changed}

- Dataset: `examples/preference_spectrum/data.py`, 3 domains (medical, legal, financial) x 10 topics x
  6 question templates with a persona, one response per level (avoidance, generic, expert); two templates
  per topic held out ({n_train} train, {n_heldout} held-out questions). Synthetic; not advice.
- Tokenizer: SentencePiece BPE, vocab {vocab}, byte_fallback.
- Base: `LlamaForCausalLM` (hidden 256, intermediate 512, 2 layers, 4 heads, 2 KV heads, untied),
  trained from scratch on plain prompts answered mostly at the generic level (generic : avoidance : expert
  = 6 : 1 : 1) and on level instruction + prompt -> that level's response (AdamW, lr {base_lr:g},
  {base_steps} steps, {base_seconds:.0f} s, final loss {base_loss:.3f}).
- Domain AVs: DPO from the base on the domain's training questions, plain prompts, pairs expert ≻ generic,
  expert ≻ avoidance, generic ≻ avoidance (β {dpo_beta:g}, SGD momentum 0.9, lr {dpo_lr:g}, {dpo_steps} steps,
  batch {batch}, anchor weight {anchor_weight:g} on the other domains' likelihoods; {dpo_seconds:.0f} s for
  the three); AV = θ_aligned − θ_base by `converters.convert(dtype="q8_0")`.
- `{base_gguf}`: the base through llama.cpp's `convert_hf_to_gguf.py --outtype f32` (llama-cpp-python
  0.3.36 source distribution), then `llama_model_quantize` to Q4_K_M.
- `{heldout}`: the held-out questions with their three responses, as `alignvec eval` reads them.
- Seed {seed}; torch {torch}, transformers {transformers}, sentencepiece {sentencepiece}.
"""


def _changed_args(args: argparse.Namespace) -> str:
    return "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k, v in DEFAULTS.items() if getattr(args, k) != v)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description="Build the preference-spectrum models and the bundled demo data.")
    p.add_argument("--model", choices=("tiny", "smollm2"), default="tiny", help="the tiny Llama or SmolLM2-135M")
    p.add_argument("--llama-cpp-src", type=Path, default=None, help=argparse.SUPPRESS)  # found like the tests do
    p.add_argument("--build-dir", type=Path, default=None, help="default build/preference_spectrum[_smollm2]")
    p.add_argument(
        "--refresh-demo-data",
        action="store_true",
        help="also copy the bundled files over alignvec_gguf/demo_data/ (the package's shipped data)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 tiny, 2 smollm2)")
    p.add_argument("--reuse-base", action="store_true", help="keep build-dir/base if it exists (development)")
    import smollm2

    for key, value in {**DEFAULTS, **smollm2.DEFAULTS}.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    args = p.parse_args(argv)
    if args.model == "tiny":
        args.build_dir = args.build_dir or ROOT / "build" / "preference_spectrum"
        args.threads = args.threads or 1
        for key, value in DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Build everything; see the module docstring."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    args = parse_args(argv)
    args.llama_cpp_src = find_llama_cpp_src(args.llama_cpp_src)
    if args.model == "smollm2":
        import smollm2

        return smollm2.build(args)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    build: Path = args.build_dir
    build.mkdir(parents=True, exist_ok=True)
    args.out_dir = build / "bundle"
    args.out_dir.mkdir(parents=True, exist_ok=True)

    train, heldout = data.dataset(args.seed)
    records = data.eval_records(heldout)
    tokenizer = build / "tokenizer.model"
    sp = train_tokenizer(train, tokenizer)
    stats: dict = {"args": {k: getattr(args, k) for k in DEFAULTS}, "joint_mix": JOINT_MIX}

    config = LlamaConfig(vocab_size=sp.get_piece_size(), bos_token_id=BOS, eos_token_id=EOS, **MODEL)
    if args.reuse_base and (build / "base" / "model.safetensors").is_file():
        base_model = LlamaForCausalLM.from_pretrained(build / "base")
        stats["base_seconds"], stats["base_loss"] = float("nan"), float("nan")
    else:
        base_model = LlamaForCausalLM(config)
        t0 = time.perf_counter()
        stats["base_loss"] = sft(
            base_model,
            base_corpus(sp, train),
            steps=args.base_steps,
            lr=args.base_lr,
            batch=BATCH,
            seed=args.seed,
            label="base",
        )
        stats["base_seconds"] = time.perf_counter() - t0
        save_hf(base_model, tokenizer, build / "base")
    base_model.eval()
    stats["accuracy"] = {"base": _log_accuracy("base", base_model, sp, records)}
    base_state = {k: v.clone() for k, v in base_model.state_dict().items()}

    dpo_seconds = {}
    for i, domain in enumerate(data.DOMAINS):
        base_model.load_state_dict(base_state)
        pairs = preference_pairs(sp, [it for it in train if it.domain == domain])
        anchors = [
            encode(sp, data.prompt(it.question), it.response(lv))
            for it in train
            if it.domain != domain
            for lv in data.LEVELS
        ]
        t0 = time.perf_counter()
        dpo(
            base_model,
            pairs,
            steps=args.dpo_steps,
            lr=args.dpo_lr,
            beta=args.dpo_beta,
            batch=DPO_BATCH,
            seed=args.seed + 10 + i,
            anchors=anchors,
            anchor_weight=args.anchor_weight,
            label=f"dpo {domain}",
        )
        dpo_seconds[domain] = time.perf_counter() - t0
        stats["accuracy"][domain] = _log_accuracy(domain, base_model, sp, records)
        save_hf(base_model, tokenizer, build / domain)
    stats["dpo_seconds"] = dpo_seconds

    base_model.load_state_dict(base_state)
    t0 = time.perf_counter()
    pairs = preference_pairs(sp, train, JOINT_MIX)
    # Same number of updates per domain as one domain's AV gets: three domains' worth of steps.
    dpo(
        base_model,
        pairs,
        steps=3 * args.dpo_steps,
        lr=args.dpo_lr,
        beta=args.dpo_beta,
        batch=DPO_BATCH,
        seed=args.seed + 20,
        label="dpo joint",
    )
    stats["joint_seconds"] = time.perf_counter() - t0
    stats["accuracy"]["joint"] = _log_accuracy("joint", base_model, sp, records)

    base_model.load_state_dict(base_state)
    # General text, with a replay of the base's own data as further fine-tuning stages usually have.
    general = [encode(sp, p, a) for p, a in data.general_text()] * 10
    replay = random.Random(args.seed + 31).sample(base_corpus(sp, train), len(general))
    t0 = time.perf_counter()
    sft(
        base_model,
        general + replay,
        steps=args.stage2_steps,
        lr=args.stage2_lr,
        batch=16,
        seed=args.seed + 30,
        label="stage2",
    )
    stats["stage2_seconds"] = time.perf_counter() - t0
    stats["accuracy"]["stage2"] = _log_accuracy("stage2", base_model, sp, records)
    save_hf(base_model, tokenizer, build / "stage2")

    for name in ("base", "stage2"):
        convert_to_gguf(build / name, build / f"{name}.f32.gguf", args.llama_cpp_src)
        quantize(build / f"{name}.f32.gguf", build / f"{name}.Q4_K_M.gguf")
    shutil.copy(build / "base.Q4_K_M.gguf", args.out_dir / BASE_GGUF)
    check_tokenizer(args.out_dir / BASE_GGUF, sp, records)

    from converters import convert

    for domain in data.DOMAINS:
        report = convert(
            build / "base",
            build / domain,
            args.out_dir / f"{domain}.avec.gguf",
            name=domain,
            domain=domain,
            dtype="q8_0",
            description=f"preference spectrum: DPO toward {domain} expert answers (synthetic)",
        )
        log.info("%s AV: %d tensors, max |Δ| %.3g", domain, report.tensors_written, report.max_abs_delta)
    (args.out_dir / HELDOUT_FILE).write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", "utf-8")

    import transformers

    (args.out_dir / "PROVENANCE.md").write_text(
        PROVENANCE.format(
            changed=_changed_args(args),
            n_train=len(train),
            n_heldout=len(heldout),
            vocab=VOCAB,
            base_gguf=BASE_GGUF,
            heldout=HELDOUT_FILE,
            batch=DPO_BATCH,
            torch=torch.__version__,
            transformers=transformers.__version__,
            sentencepiece=spm.__version__,
            dpo_seconds=sum(dpo_seconds.values()),
            base_seconds=stats["base_seconds"],
            base_loss=stats["base_loss"],
            **stats["args"],
        ),
        encoding="utf-8",
    )
    stats["total_seconds"] = time.perf_counter() - start
    (build / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    for f in sorted(args.out_dir.iterdir()):
        log.info("%-22s %9d bytes", f.name, f.stat().st_size)
    if args.refresh_demo_data:
        refresh(args.out_dir, DEMO_DATA)
    log.info("done in %.0fs", stats["total_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
