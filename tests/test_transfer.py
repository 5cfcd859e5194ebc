"""Transfer across fine-tuning stages: same signature + other weights -> a warning; other signature -> an error.

A vector made from stage A (``llama_pair``: base A, aligned A + Δ) is applied to stage B, a further
fine-tune of A. The merge works, warns with both sources named, and computes θ_B + λΔ exactly (checked
against transformers). What the fingerprint can see depends on the base: every weight on F32, the
tensors llama.cpp always keeps at F32 (norms, biases) on F16 and quantized bases.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from alignvec_gguf import AlignmentVector, AVInfo, CompatibilityError, merge, write_av
from alignvec_gguf.cli import main
from alignvec_gguf.ggufread import GGUFModel
from alignvec_gguf.identity import Fingerprint, check_fingerprint
from converters import convert
from tests.support import tinymodels as tm

TOKENS = [1, 5, 17, 42, 99, 200, 7, 3, 150, 33, 64, 250]
TRANSFER = "was made from"


@dataclass
class Stage:
    state: dict[str, torch.Tensor]
    f32: Path  # llama.cpp's conversion
    q4km: Path


@pytest.fixture(scope="session")
def stages(llama_pair, llama_src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Stage]:
    """B: a further fine-tune of A (every tensor moved); B_mat: one that moved only the matrices."""
    root = tmp_path_factory.mktemp("stages")
    tok = llama_pair.base_dir / "tokenizer.model"
    states = {
        "B": tm.perturbed(llama_pair.base_model, 40, scale=0.05),
        "B_mat": tm.perturbed(llama_pair.base_model, 41, scale=0.05, untouched=("norm",)),
    }
    dirs = {k: tm.save(llama_pair.base_model, s, root / f"stage-{k}", tok) for k, s in states.items()}
    f32 = tm.hf_to_gguf_all(llama_src, [(d, root / f"{k}-f32.gguf") for k, d in dirs.items()])
    return {
        k: Stage(states[k], path, tm.quantize_gguf(path, root / f"{k}-q4km.gguf", "MOSTLY_Q4_K_M"))
        for k, path in zip(dirs, f32, strict=True)
    }


def transfer_warnings(report) -> list[str]:  # noqa: ANN001
    return [w for w in report.warnings if TRANSFER in w]


def test_the_same_base_gives_no_warning_at_any_precision(llama_pair, quantized_bases, tmp_path: Path):
    f16 = tm.quantize_gguf(llama_pair.base_gguf, tmp_path / "base-f16.gguf", "MOSTLY_F16")
    for base in (llama_pair.base_gguf, f16, quantized_bases["Q8_0"], quantized_bases["Q4_K_M"]):
        report = merge(base, {llama_pair.av: 1.0}, tmp_path / "m.gguf")
        assert not transfer_warnings(report), (base.name, report.warnings)
    fp = AlignmentVector(llama_pair.av).info.base_fingerprint
    assert check_fingerprint(fp, GGUFModel(quantized_bases["Q4_K_M"])).checked == "norms and biases"


@pytest.mark.parametrize("lam", [-1.0, 0.8])
def test_another_stage_works_with_a_warning_naming_both(llama_pair, stages, tmp_path: Path, lam: float):
    stage = stages["B"]
    report = merge(stage.f32, {llama_pair.av: lam}, tmp_path / "m.gguf")
    (warning,) = transfer_warnings(report)
    assert str(llama_pair.base_dir.resolve()) in warning and str(stage.f32) in warning
    # θ_B + λ(θ_aligned − θ_A), computed by transformers
    model = type(llama_pair.base_model)(llama_pair.base_model.config).eval()
    base_state = llama_pair.base_model.state_dict()
    model.load_state_dict({k: stage.state[k] + lam * (llama_pair.aligned_state[k] - base_state[k]) for k in base_state})
    ref = tm.hf_logits(model, TOKENS)
    assert np.abs(tm.llama_logits(report.path, TOKENS) - ref).max() <= 2e-3 * np.abs(ref).max()


def test_a_quantized_stage_is_told_apart_by_its_norms(llama_pair, stages, tmp_path: Path):
    (warning,) = transfer_warnings(merge(stages["B"].q4km, {llama_pair.av: 1.0}, tmp_path / "m.gguf"))
    assert "norms and biases differ" in warning and str(stages["B"].q4km) in warning


def test_matrix_only_changes_are_seen_on_f32_but_not_on_quantized_bases(llama_pair, stages, tmp_path: Path):
    """The documented limit: a quantized base keeps only norms and biases exactly."""
    stage = stages["B_mat"]
    assert transfer_warnings(merge(stage.f32, {llama_pair.av: 1.0}, tmp_path / "a.gguf"))
    assert not transfer_warnings(merge(stage.q4km, {llama_pair.av: 1.0}, tmp_path / "b.gguf"))


def test_the_cli_logs_the_warning_and_merges(llama_pair, stages, tmp_path: Path, caplog):
    out = tmp_path / "m.gguf"
    assert main(["merge", str(stages["B"].q4km), "-v", f"{llama_pair.av}=0.5", "-o", str(out)]) == 0
    assert any(TRANSFER in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert out.is_file()


def test_v1_fingerprints_are_still_checked_where_they_can_be(llama_pair, stages, quantized_bases, tmp_path: Path):
    """Vectors written before the two-part fingerprint carry one sha256 over every weight."""
    whole = Fingerprint()
    for t in GGUFReader(llama_pair.base_gguf).tensors:
        whole.add(t.name, np.asarray(t.data))
    av = AlignmentVector(llama_pair.av)
    v1 = tmp_path / "v1.avec.gguf"
    info = AVInfo(**{**av.info.__dict__, "base_fingerprint": whole.whole_digest()})
    write_av(v1, av.info.architecture, ((n, av.delta(n)) for n in av.names), info)
    assert not transfer_warnings(merge(llama_pair.base_gguf, {v1: 1.0}, tmp_path / "a.gguf"))
    assert transfer_warnings(merge(stages["B"].f32, {v1: 1.0}, tmp_path / "b.gguf"))
    # on a quantized base a whole-model hash cannot be recomputed: no check, no false alarm
    assert not transfer_warnings(merge(quantized_bases["Q4_K_M"], {v1: 1.0}, tmp_path / "c.gguf"))
    assert not transfer_warnings(merge(stages["B"].q4km, {v1: 1.0}, tmp_path / "d.gguf"))


def test_another_signature_is_an_error(llama_pair, tokenizer: Path, tmp_path: Path, capsys):
    """A vector for the tied variant of the model: same shapes where it writes, but no output.weight."""
    tied = tm.make_model(tm.llama_config(tie_word_embeddings=True), 50)
    state = tm.tie(tied, tm.perturbed(tied, 51))
    base_dir = tm.save(tied, None, tmp_path / "tied-base", tokenizer)
    aligned_dir = tm.save(tied, state, tmp_path / "tied-aligned", tokenizer)
    av = convert(base_dir, aligned_dir, tmp_path / "tied.avec.gguf").path
    with pytest.raises(CompatibilityError, match="different tensor layout"):
        merge(llama_pair.base_gguf, {av: 1.0}, tmp_path / "m.gguf")
    out = tmp_path / "cli.gguf"
    capsys.readouterr()  # drop what building the models printed
    assert main(["merge", str(llama_pair.base_gguf), "-v", f"{av}=1", "-o", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "different tensor layout" in err[0] and not out.exists()
