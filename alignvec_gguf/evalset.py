"""The eval set of preference accuracy: held-out questions, one response per level, grouped by domain.

The eval set is JSON: a list of ``{"domain": ..., "prompt": ..., "responses": {level: text}}``; the
response follows the prompt after one space, as the bundled tiny models were trained, unless the item
says otherwise with ``"separator"`` (``""`` for prompts in a chat template, which end where the
assistant's turn begins). Special tokens written in the text (``<|im_start|>`` ...) are parsed as such.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import FormatError, InputError

LEVELS = ("avoidance", "generic", "expert")
Shares = dict[str, float]  # level -> share of questions


@dataclass(frozen=True)
class EvalItem:
    """One held-out question: its domain, the prompt and one response per level."""

    domain: str
    prompt: str
    responses: dict[str, str]
    separator: str = " "  # between the prompt and a response

    def text(self, level: str) -> str:
        """The prompt followed by the response at ``level``."""
        return f"{self.prompt}{self.separator}{self.responses[level]}"


def load_eval_set(path: str | os.PathLike[str]) -> list[EvalItem]:
    """Read and check an eval set (see the module docstring for the format)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"eval set {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"eval set {path} is not readable JSON ({e}); give a JSON list of questions") from None
    if not isinstance(raw, list) or not raw:
        raise FormatError(f"eval set {path} must be a non-empty JSON list of {{domain, prompt, responses}} objects")
    items = []
    for i, rec in enumerate(raw):
        ok = isinstance(rec, dict) and isinstance(rec.get("domain"), str) and isinstance(rec.get("prompt"), str)
        responses = rec.get("responses") if isinstance(rec, dict) else None
        if not ok or not isinstance(responses, dict) or set(responses) != set(LEVELS):
            raise FormatError(
                f"eval set {path}, item {i}: expected {{'domain': str, 'prompt': str, 'responses': "
                f"{{{', '.join(LEVELS)}: str}}}}"
            )
        if not all(isinstance(responses[lv], str) and responses[lv] for lv in LEVELS):
            raise FormatError(f"eval set {path}, item {i}: every response must be a non-empty string")
        separator = rec.get("separator", " ")
        if not isinstance(separator, str):
            raise FormatError(f"eval set {path}, item {i}: 'separator' must be a string")
        items.append(EvalItem(rec["domain"], rec["prompt"], {lv: responses[lv] for lv in LEVELS}, separator))
    return items


def by_domain(items: Sequence[EvalItem]) -> dict[str, list[EvalItem]]:
    """Items grouped by domain, in order of first appearance."""
    groups: dict[str, list[EvalItem]] = {}
    for item in items:
        groups.setdefault(item.domain, []).append(item)
    return groups
