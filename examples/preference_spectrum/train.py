"""Training for the preference-spectrum example, written by hand in PyTorch: SFT, DPO and the scoring.

- ``sft``: next-token loss (AdamW), for the base model and the second fine-tuning stage.
- ``dpo``: Direct Preference Optimization (Rafailov et al. 2023) against a frozen reference, with SGD and
  momentum. SGD rather than Adam because Adam moves every weight by about the learning rate, a thin Δ
  that 4-bit requantization (merge policy ``same`` into a Q4_K_M base) rounds away; SGD concentrates Δ on
  the weights that matter, where it survives (see README.md).
- ``preference_accuracy``: the paper's metric with transformers (length-normalised log-likelihood of
  each level's response), for the build log and for models that are never converted (the joint retrain).
  ``alignvec eval`` computes the same metric through llama.cpp on merged GGUF files.

Long module: the four training loops (SFT, DPO, and their top-block forms for the real model) share one
batching, scoring and optimizer-step vocabulary; apart, each file would re-import all of it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

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


def _update(opt: torch.optim.Optimizer, sched: Any, params: Iterable[torch.nn.Parameter], loss: torch.Tensor) -> float:
    """One optimizer step on ``loss``, gradients clipped to norm 1, and the schedule's; returns the loss's value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    return loss.item()


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
        loss_value = _update(opt, sched, model.parameters(), loss)
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
        loss_value = _update(opt, sched, model.parameters(), loss)
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


# --- The real model (build.py --model smollm2): LoRA on the top blocks, the frozen lower blocks run once ---

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(torch.nn.Module):
    """``base(x) + scale · λ · B(A(x))``: a frozen linear layer with a trainable rank-r update (Hu et al. 2021)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.strength = 1.0  # λ: the update is scaled by it (θ_base + λΔ, exactly)
        self.a = torch.nn.Parameter(torch.zeros(rank, base.in_features))
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def reset(self, generator: torch.Generator) -> None:
        """A random (Kaiming-uniform bound), B zero: the update starts at exactly zero."""
        bound = 1.0 / math.sqrt(self.a.shape[1])
        with torch.no_grad():
            self.a.copy_(torch.rand(self.a.shape, generator=generator) * 2 * bound - bound)
            self.b.zero_()

    def delta(self) -> torch.Tensor:
        """The weight update ΔW = scale · B A (rank ≤ r)."""
        return self.scale * (self.b @ self.a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.scale * self.strength) * F.linear(F.linear(x, self.a), self.b)


class TopBlocks:
    """A pretrained causal LM trained only through LoRA adapters on its top ``n_blocks`` decoder layers.

    Everything below those layers is frozen, so the hidden states entering them depend only on the
    tokens: :meth:`lower` computes them once per sequence (the most expensive forward pass of the
    build) and every later step runs the top layers alone. Sequences are right-padded, so the causal
    mask alone keeps padding out of every real position. The LM head is applied to response positions
    only.
    """

    def __init__(self, model: torch.nn.Module, n_blocks: int, rank: int, alpha: float, seed: int) -> None:
        self.model = model
        model.requires_grad_(False)
        model.eval()
        layers = model.model.layers
        self.first = len(layers) - n_blocks
        self.adapters: dict[str, LoRALinear] = {}
        for i in range(self.first, len(layers)):
            for part in (layers[i].self_attn, layers[i].mlp):
                for name in LORA_TARGETS:
                    if hasattr(part, name):
                        adapter = LoRALinear(getattr(part, name), rank, alpha)
                        setattr(part, name, adapter)
                        owner = "self_attn" if part is layers[i].self_attn else "mlp"
                        self.adapters[f"model.layers.{i}.{owner}.{name}.weight"] = adapter
        self.seed = seed
        self.reset(seed)
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters (every adapter's A and B)."""
        return [p for a in self.adapters.values() for p in (a.a, a.b)]

    def reset(self, seed: int) -> None:
        """Every update back to zero, A drawn again from ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        for adapter in self.adapters.values():
            adapter.reset(generator)

    def set_strength(self, lam: float) -> None:
        """Scale every update by λ (the model is then θ_base + λΔ)."""
        for adapter in self.adapters.values():
            adapter.strength = lam

    def deltas(self) -> dict[str, torch.Tensor]:
        """HF parameter name -> ΔW of every adapted matrix."""
        return {name: adapter.delta().detach().clone() for name, adapter in self.adapters.items()}

    def load_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        """Add ``deltas`` (from :meth:`deltas`) into the frozen weights: the next stage's base."""
        with torch.no_grad():
            for name, d in deltas.items():
                self.adapters[name].base.weight += d
        self._cache.clear()  # the lower blocks did not change, but the caller's next base is a new model

    def state_dict_with(self, deltas: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The plain (adapter-free) state dict of the model with ``deltas`` added (None: the frozen weights)."""
        out = {}
        for key, value in self.model.state_dict().items():
            key = key.replace(".base.weight", ".weight")
            if key.endswith((".a", ".b")):
                continue
            out[key] = value + deltas[key] if deltas and key in deltas else value.clone()
        return out

    def _run(self, x: torch.Tensor, layers: Sequence[torch.nn.Module]) -> torch.Tensor:
        positions = torch.arange(x.shape[1]).unsqueeze(0).expand(x.shape[0], -1)
        rotary = self.model.model.rotary_emb(x, positions)
        for layer in layers:
            x = layer(x, attention_mask=None, position_ids=positions, position_embeddings=rotary)
            x = x[0] if isinstance(x, tuple) else x
        return x

    @torch.no_grad()
    def lower(self, seqs: Sequence[Sequence_], pad: int, chunk: int = 16, desc: str = "lower blocks") -> None:
        """Compute and keep the hidden states entering the first adapted layer for every new sequence."""
        from tqdm import tqdm

        todo = list(dict.fromkeys(tuple(ids) for ids, _ in seqs if tuple(ids) not in self._cache))
        todo.sort(key=len)  # similar lengths together: less padding
        layers = self.model.model.layers[: self.first]
        for i in tqdm(range(0, len(todo), chunk), desc=desc, unit="batch", leave=False):
            part = todo[i : i + chunk]
            width = max(map(len, part))
            ids = torch.full((len(part), width), pad, dtype=torch.long)
            for row, seq in enumerate(part):
                ids[row, : len(seq)] = torch.tensor(seq)
            states = self._run(self.model.model.embed_tokens(ids), layers)
            for row, seq in enumerate(part):
                self._cache[seq] = states[row, : len(seq)].clone()

    def logps(self, seqs: Sequence[Sequence_], *, mean: bool = False) -> torch.Tensor:
        """Sum (or mean) of log p(response token | prefix) per sequence, from the cached lower states."""
        width = max(len(ids) for ids, _ in seqs)
        hidden = self.model.config.hidden_size
        x = torch.zeros((len(seqs), width, hidden))
        rows, cols, targets, owner = [], [], [], []
        for row, (ids, start) in enumerate(seqs):
            x[row, : len(ids)] = self._cache[tuple(ids)]
            for pos in range(start, len(ids)):
                rows.append(row)
                cols.append(pos - 1)
                targets.append(ids[pos])
                owner.append(row)
        h = self._run(x, self.model.model.layers[self.first :])
        h = self.model.model.norm(h[torch.tensor(rows), torch.tensor(cols)])
        logp = F.log_softmax(self.model.lm_head(h).float(), -1)
        token_logps = logp.gather(1, torch.tensor(targets).unsqueeze(1)).squeeze(1)
        index = torch.tensor(owner)
        total = torch.zeros(len(seqs)).index_add(0, index, token_logps)
        if not mean:
            return total
        return total / torch.zeros(len(seqs)).index_add(0, index, torch.ones_like(token_logps))


@dataclass(frozen=True)
class Ranked:
    """One prompt's responses in preference order (best first), tokenized: DPO pairs are every (better, worse)."""

    seqs: tuple[Sequence_, ...]


def dpo_top(
    top: TopBlocks,
    items: Sequence[Ranked],
    *,
    steps: int,
    lr: float,
    beta: float,
    batch: int,
    seed: int,
    nll_weight: float = 0.0,
    label: str = "dpo",
) -> float:
    """DPO on the adapters from the current weights (the reference), Adam; returns the final loss.

    Each step takes ``batch`` prompts, scores all their ranked responses once, and averages
    −log σ(β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]) over every ordered pair;
    ``nll_weight`` adds that times the per-token negative log-likelihood of each prompt's best response
    (as in RPO, Pang et al. 2024), so that the aligned model also *writes* in the preferred style, not
    only ranks it first. Adam is fine here: the update is low-rank by construction (B·A), not a thin
    layer over every weight.
    """
    from tqdm import tqdm

    flat = [s for it in items for s in it.seqs]
    with torch.no_grad():
        ref_list = [top.logps(flat[i : i + 32]) for i in range(0, len(flat), 32)]
    ref_all = torch.cat(ref_list)
    offsets, k = [], 0
    for it in items:
        offsets.append(k)
        k += len(it.seqs)
    opt = torch.optim.Adam(top.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    order = _shuffled(len(items), min(batch, len(items)), random.Random(seed))
    loss_value = float("nan")
    bar = tqdm(range(steps), desc=label, unit="step", leave=False)
    for _ in bar:
        picked = next(order)
        seqs = [s for i in picked for s in items[i].seqs]
        ref = torch.cat([ref_all[offsets[i] : offsets[i] + len(items[i].seqs)] for i in picked])
        logps = top.logps(seqs)
        gain = logps - ref
        losses, nll, j = [], [], 0
        for i in picked:
            n = len(items[i].seqs)
            for a in range(n):
                for b in range(a + 1, n):
                    losses.append(-F.logsigmoid(beta * (gain[j + a] - gain[j + b])))
            best_ids, best_start = items[i].seqs[0]
            nll.append(-logps[j] / (len(best_ids) - best_start))
            j += n
        loss = torch.stack(losses).mean()
        if nll_weight:
            loss = loss + nll_weight * torch.stack(nll).mean()
        loss_value = _update(opt, sched, top.parameters(), loss)
        bar.set_postfix_str(f"loss {loss_value:.3f}")
    log.info("%s: %d steps, final loss %.4f (%.0fs)", label, steps, loss_value, bar.format_dict["elapsed"])
    return loss_value


def sft_top(top: TopBlocks, seqs: Sequence[Sequence_], *, steps: int, lr: float, batch: int, seed: int) -> float:
    """Next-token training of the adapters on the response tokens (Adam); returns the final loss."""
    from tqdm import tqdm

    opt = torch.optim.Adam(top.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    order = _shuffled(len(seqs), min(batch, len(seqs)), random.Random(seed))
    loss_value = float("nan")
    bar = tqdm(range(steps), desc="stage2", unit="step", leave=False)
    for _ in bar:
        loss = -top.logps([seqs[i] for i in next(order)], mean=True).mean()
        loss_value = _update(opt, sched, top.parameters(), loss)
        bar.set_postfix_str(f"loss {loss_value:.3f}")
    log.info("stage2: %d steps, final loss %.4f (%.0fs)", steps, loss_value, bar.format_dict["elapsed"])
    return loss_value


@torch.no_grad()
def top_preference_accuracy(top: TopBlocks, records: Sequence[Ranked], levels: Sequence[str]) -> dict[str, float]:
    """The paper's metric on cached sequences: each record's ``seqs`` are in ``levels`` order here."""
    counts = dict.fromkeys(levels, 0)
    for i in range(0, len(records), 8):
        part = records[i : i + 8]
        scores = top.logps([s for rec in part for s in rec.seqs], mean=True).view(len(part), len(levels))
        for best in scores.argmax(1).tolist():
            counts[levels[best]] += 1
    return {lv: counts[lv] / max(1, len(records)) for lv in levels}
