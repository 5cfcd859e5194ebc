"""Checkpoints named by hub id (``org/name`` or ``org/name@revision``), fetched with ``huggingface_hub``.

Only what the converter reads is downloaded: ``config.json``, the ``model*.safetensors`` weights and
their index (the files llama.cpp's converter reads, so a repository's extra ``consolidated.safetensors``
or ``original/`` copies are skipped), and the tokenizer files (Gemma 3 sizes its embedding from the
tokenizer). Pickle weights (``pytorch_model*.bin``) are fetched only with ``allow_pickle``. The usual
Hugging Face cache and token apply (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN``); with
``HF_HUB_OFFLINE=1`` a filled cache is enough. An AV records the source as ``org/name@<commit>``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from alignvec_gguf.errors import InputError

HUB_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]*))?"
)
CONFIG_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
SAFETENSORS_PATTERNS = ("model*.safetensors", "model.safetensors.index.json")
PICKLE_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ModelRef:
    """A checkpoint directory on this machine and what to record as its source."""

    path: Path
    source: str  # a resolved local path, or org/name@commit
    name: str  # a short name: the directory's or the repository's


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``org/name[@revision]`` -> (repo id, revision or None); None if ``spec`` is not a hub id."""
    match = HUB_ID.fullmatch(spec)
    return (match["repo"], match["revision"]) if match else None


def _has(folder: Path, prefix: str, suffix: str) -> bool:
    return any(p.name.startswith(prefix) and p.name.endswith(suffix) for p in folder.iterdir())


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _download(repo: str, revision: str | None, role: str, patterns: tuple[str, ...], cache_dir: Path | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{role} {repo}" + (f"@{revision}" if revision else "")
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=list(patterns), cache_dir=cache_dir)
    except GatedRepoError:
        raise InputError(
            f"{what} is gated: accept its conditions on its hub page, then log in (hf auth login) or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise InputError(
            f"{what} is not a local directory, and no hub model {repo} was found (if it is private, log in with "
            "hf auth login or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise InputError(
            f"{what}: hub model {repo} has no revision {revision!r} (give a branch, tag or commit)"
        ) from None
    except IncompleteSnapshotError as e:
        raise InputError(
            f"{what}: the cached copy is incomplete and the hub cannot be reached ({_first_line(e)})"
        ) from e
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise InputError(
            f"{what} is neither a local directory nor in the Hugging Face cache, and {why}; "
            "download it once while online (or point HF_HUB_CACHE at a cache that has it)"
        ) from None
    except HFValidationError as e:
        raise InputError(f"{what} is not a valid hub id ({_first_line(e)})") from None
    except OSError as e:  # HTTP errors, disk full, permissions: one line, no traceback
        raise InputError(f"cannot fetch {what}: {_first_line(e)}") from e
    return Path(folder)


def resolve(
    spec: str | os.PathLike[str],
    role: str,
    *,
    allow_pickle: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ModelRef:
    """A local directory as it is, or a hub id fetched (or found in the cache) and pinned to its commit."""
    path = Path(spec)
    if path.exists():
        resolved = path.resolve()
        return ModelRef(path, str(resolved), resolved.name)
    parsed = parse_hub_id(str(spec))
    if parsed is None:
        raise InputError(
            f"{role} {spec} does not exist (give a local Hugging Face model directory or a hub id org/name[@revision])"
        )
    repo, revision = parsed
    cache = Path(cache_dir) if cache_dir is not None else None
    folder = _download(repo, revision, role, CONFIG_PATTERNS + SAFETENSORS_PATTERNS, cache)
    commit = folder.name  # the snapshot folder is named by its commit: pin the rest to it
    has_safetensors = _has(folder, "model", ".safetensors") or (folder / "model.safetensors.index.json").is_file()
    if not has_safetensors:
        if not allow_pickle:
            raise InputError(
                f"{role} {repo}@{commit} has no model*.safetensors weights; if it has pickle (.bin) weights, pass "
                "--allow-pickle to load them with torch.load(weights_only=True)"
            )
        folder = _download(repo, commit, role, PICKLE_PATTERNS, cache)
    return ModelRef(folder, f"{repo}@{commit}", repo.split("/", 1)[1])
