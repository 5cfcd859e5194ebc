"""The command line end to end, and the runtime package without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from gguf import GGUFReader

from alignvec_gguf.cli import main
from alignvec_gguf.cli.args import parse_vector
from alignvec_gguf.errors import InputError
from tests.support.oracle import field


def test_convert_merge_inspect_run(llama_pair, quantized_bases, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ALIGNVEC_CACHE_DIR", str(tmp_path / "cache"))
    av = tmp_path / "medical.avec.gguf"
    args = ["--name", "medical-expert", "--domain", "medical", "--description", "expert answers", "--dtype", "q8_0"]
    assert main(["-q", "convert", str(llama_pair.base_dir), str(llama_pair.aligned_dir), "-o", str(av), *args]) == 0
    assert "tensors changed" in capsys.readouterr().out

    assert main(["inspect", str(av), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["kind"] == "alignment_vector"
    assert meta["alignvec.name"] == "medical-expert" and meta["alignvec.domain"] == "medical"
    assert meta["tensors"]["blk.0.attn_q.weight"] == {"type": "Q8_0", "shape": [256, 256]}

    merged = tmp_path / "merged.gguf"
    base = quantized_bases["Q4_K_M"]
    assert main(["-q", "merge", str(base), "-v", f"{av}=0.5", "-v", f"{llama_pair.av}=-0.25", "-o", str(merged)]) == 0
    reader = GGUFReader(merged)
    assert field(reader, "alignvec.merged.vectors") == ["medical-expert", "aligned"]
    assert field(reader, "alignvec.merged.lambdas") == [0.5, -0.25]

    assert main(["inspect", str(merged)]) == 0
    out = capsys.readouterr().out
    assert "alignvec.merged.lambdas" in out and "tensor_count" in out

    assert main(["-q", "run", str(base), "-v", f"{av}=1", "-p", "the patient", "-n", "8"]) == 0
    assert capsys.readouterr().out.strip()
    assert len(list((tmp_path / "cache").glob("*.gguf"))) == 1


def test_parse_vector():
    assert parse_vector("a=b.avec.gguf=-0.5") == ("a=b.avec.gguf", -0.5)
    assert parse_vector("x.avec.gguf=1e-1") == ("x.avec.gguf", 0.1)
    for bad in ("x.avec.gguf", "=1", "x=", "x=inf"):
        with pytest.raises(InputError):
            parse_vector(bad)


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "alignvec_gguf.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("alignvec-gguf ")


def test_runtime_imports_without_torch(llama_pair, quantized_bases, tmp_path):
    """alignvec_gguf must import and merge with torch absent (a None entry in sys.modules blocks it)."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None
        import alignvec_gguf, alignvec_gguf.cli, alignvec_gguf.merge, alignvec_gguf.runtime, alignvec_gguf.cache
        report = alignvec_gguf.merge({str(quantized_bases["Q4_K_M"])!r}, {{{str(llama_pair.av)!r}: 1.0}},
                                     {str(tmp_path / "m.gguf")!r})
        assert report.touched
        try:
            import torch
        except ImportError:
            print("torch blocked")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "torch blocked" in result.stdout


def test_convert_without_torch_says_what_to_install(tmp_path):
    code = "import sys; sys.modules['torch'] = None; from alignvec_gguf.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "convert", "a", "b", "-o", str(tmp_path / "o.avec.gguf")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "alignvec-gguf[convert]" in result.stderr


def test_lambda_zero_loads_the_base_without_merging(llama_pair, quantized_bases, tmp_path):
    from alignvec_gguf import load

    llm = load(quantized_bases["Q4_K_M"], {llama_pair.av: 0.0}, cache_dir=tmp_path, n_ctx=64)
    assert llm.model_path == str(quantized_bases["Q4_K_M"])
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize(
    "error,needle",
    [
        (OSError(28, "No space left on device"), "no space left"),
        (PermissionError(13, "Permission denied"), "Permission"),
    ],
)
def test_write_failures_are_one_line_and_leave_nothing(
    llama_pair, quantized_bases, tmp_path, capsys, monkeypatch, error, needle
):
    from alignvec_gguf.ggufwrite import GGUFStreamWriter

    def fail(self, data):
        raise error

    monkeypatch.setattr(GGUFStreamWriter, "write_tensor", fail)
    out = tmp_path / "m.gguf"
    rc = main(["-q", "merge", str(quantized_bases["Q8_0"]), "-v", f"{llama_pair.av}=1", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_strangers_strings_stay_one_line(llama_pair, quantized_bases, tmp_path, capsys):
    """inspect and the Ollama Modelfile show control characters from a file's metadata escaped."""
    from alignvec_gguf.avfile import AlignmentVector, AVInfo, write_av
    from alignvec_gguf.export import write_modelfile

    av = AlignmentVector(llama_pair.av)
    evil = "x\n\x1b[2Jrm -rf"
    path = tmp_path / "evil.avec.gguf"
    write_av(
        path, av.info.architecture, [(n, av.delta(n)) for n in av.names], AVInfo(**{**av.info.__dict__, "name": evil})
    )
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J" in out
    assert [line for line in out.splitlines() if line.startswith("alignvec.name")] == [
        "alignvec.name                    x\\n\\x1b[2Jrm -rf"
    ]
    merged = tmp_path / "m.gguf"
    assert main(["-q", "merge", str(quantized_bases["Q8_0"]), "-v", f"{path}=1", "-o", str(merged)]) == 0
    text = write_modelfile(merged).read_text()
    assert "\x1b" not in text and not any(line.startswith("rm") for line in text.splitlines())
