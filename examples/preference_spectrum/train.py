"""Training for the preference-spectrum example, written by hand in PyTorch: SFT, DPO and the scoring.

- ``sft``: next-token loss (AdamW), for the base model and the second fine-tuning stage.
- ``dpo``: Direct Preference Optimization (Rafailov et al. 2023) against a frozen reference, with SGD and
  momentum. SGD rather than Adam because Adam moves every weight by about the learning rate, a thin Δ
  that 4-bit requantization (merge policy ``same`` into a Q4_K_M base) rounds away; SGD concentrates Δ on
  the weights that matter, where it survives (see README.md).
- ``preference_accuracy``: the paper's metric with transformers (length-normalised log-likelihood of
  each level's response), for the build log and for models that are never converted (the joint retrain).
  ``alignvec eval`` computes the same metric through llama.cpp on merged GGUF files.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import sentencepiece as spm
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

log = logging.getLogger("preference_spectrum")

UNK, BOS, EOS = 0, 1, 2
Sequence_ = tuple[list[int], int]  # (token ids, index where the response starts)


@dataclass(frozen=True)
class Pair:
    """A DPO preference: the chosen and the rejected response to one prompt, tokenized."""

    chosen: Sequence_
    rejected: Sequence_


def encode(sp: spm.SentencePieceProcessor, prompt: str, response: str) -> Sequence_:
    """BOS + prompt + response + EOS, and where the response starts (as llama.cpp tokenizes it)."""
    head = [BOS, *sp.encode(prompt)]
    return head + sp.encode(response) + [EOS], len(head)


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """Linear warmup over a tenth of the steps, then cosine decay to 5%."""
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def autocast() -> torch.autocast:
    """bfloat16 autocast on the CPU: about 3x faster training here (AVX-512 BF16); weights stay float32."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _pad(chunk: Sequence[Sequence_], answer_only: bool) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in chunk)
    ids = torch.full((len(chunk), width), EOS, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    labels = torch.full((len(chunk), width), -100, dtype=torch.long)
    for row, (seq, start) in enumerate(chunk):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        first = start if answer_only else 1
        labels[row, first : len(seq)] = torch.tensor(seq[first:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _shuffled(n: int, batch: int, rng: random.Random) -> Iterator[list[int]]:
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n - batch + 1, batch):
            yield order[i : i + batch]


def sft(
    model: LlamaForCausalLM,
    seqs: Sequence[Sequence_],
    *,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    answer_only: bool = False,
    label: str = "sft",
) -> float:
    """Supervised next-token training with AdamW and warmup-cosine; returns the final loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    order = _shuffled(len(seqs), min(batch, len(seqs)), random.Random(seed))
    model.train()
    start = time.perf_counter()
    loss_value = float("nan")
    for step in range(steps):
        with autocast():
            loss = model(**_pad([seqs[i] for i in next(order)], answer_only)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        if step % 50 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.4f (%.0fs)", label, step + 1, steps, loss_value, time.perf_counter() - start)
    model.eval()
    return loss_value


def sequence_logps(model: LlamaForCausalLM, seqs: Sequence[Sequence_], *, mean: bool = False) -> torch.Tensor:
    """Sum (or mean) of log p(response token | prefix) per sequence, EOS included."""
    batch = _pad(seqs, answer_only=True)
    with autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    token_logps = torch.gather(F.log_softmax(logits.float(), -1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1) if mean else total


@torch.no_grad()
def _reference(model: LlamaForCausalLM, pairs: Sequence[Pair], chunk: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(pairs), chunk):
        part = pairs[i : i + chunk]
        out.append(sequence_logps(model, [p.chosen for p in part] + [p.rejected for p in part]).view(2, -1).T)
    return torch.cat(out)  # (n_pairs, 2): chosen, rejected


def dpo(
    model: LlamaForCausalLM,
    pairs: Sequence[Pair],
    *,
    steps: int,
    lr: float,
    beta: float,
    batch: int,
    seed: int,
    anchors: Sequence[Sequence_] = (),
    anchor_weight: float = 1.0,
    label: str = "dpo",
) -> float:
    """DPO from the model's current weights (the frozen reference); SGD with momentum. Returns the final loss.

    loss = −log σ(β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]), the reference
    log-probabilities computed once up front. ``anchors`` (prompt + response sequences outside the
    preference's domain) add ``anchor_weight`` · mean (per-token log π − per-token log π_ref)², which keeps
    the likelihoods there where they were: the vector then moves its own domain and little else.
    """
    model.eval()
    ref = _reference(model, pairs)
    with torch.no_grad():
        chunks = [sequence_logps(model, anchors[i : i + 64], mean=True) for i in range(0, len(anchors), 64)]
    anchor_ref = torch.cat(chunks) if chunks else torch.zeros(0)
    anchor_order = _shuffled(len(anchors), min(batch, len(anchors)), random.Random(seed + 1)) if anchors else None
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    order = _shuffled(len(pairs), min(batch, len(pairs)), random.Random(seed))
    model.train()
    start = time.perf_counter()
    loss_value = float("nan")
    for step in range(steps):
        idx = next(order)
        part = [pairs[i] for i in idx]
        logps = sequence_logps(model, [p.chosen for p in part] + [p.rejected for p in part]).view(2, -1).T
        margin = (logps[:, 0] - ref[idx, 0]) - (logps[:, 1] - ref[idx, 1])
        loss = -F.logsigmoid(beta * margin).mean()
        if anchor_order is not None:
            pick = next(anchor_order)
            drift = sequence_logps(model, [anchors[i] for i in pick], mean=True) - anchor_ref[pick]
            loss = loss + anchor_weight * drift.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        if step % 25 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.4f (%.0fs)", label, step + 1, steps, loss_value, time.perf_counter() - start)
    model.eval()
    return loss_value


@torch.no_grad()
def preference_accuracy(
    model: LlamaForCausalLM, sp: spm.SentencePieceProcessor, records: Sequence[dict], levels: Sequence[str]
) -> dict[str, float]:
    """Share of records whose highest length-normalised log-likelihood response is each level."""
    counts = dict.fromkeys(levels, 0)
    for rec in records:
        seqs = [encode(sp, str(rec["prompt"]), rec["responses"][lv]) for lv in levels]
        scores = sequence_logps(model, seqs, mean=True)
        counts[levels[int(scores.argmax())]] += 1
    return {lv: counts[lv] / max(1, len(records)) for lv in levels}
