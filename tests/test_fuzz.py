"""Fuzzing the readers with hypothesis: on any mutant of a valid model or vector, only AlignVecError escapes.

The mutations are the fuzzer's (tests/support/mutations.py: byte flips, truncation, insertions, header fields set to
interesting values, logical edits of types, shapes, names and values), with hypothesis choosing, so
that a failure shrinks to a small example. 4 × 300 examples with a fixed seed run here (about 8 s);
the benchmark runs ten thousand in a subprocess that may crash.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import REPO, fuzzseeds, mutations
from tests.support import fuzzing as fuzz

FUZZ = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=10),  # per input: generous, a hang still fails
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


class Draws:
    """The fuzzer's Chooser, with hypothesis making every choice (so failures shrink)."""

    def __init__(self, data: st.DataObject):
        self.data = data

    def randrange(self, stop: int) -> int:
        return self.data.draw(st.integers(0, stop - 1))

    def choice(self, seq: Any) -> Any:
        return self.data.draw(st.sampled_from(seq))

    def randbytes(self, n: int) -> bytes:
        return self.data.draw(st.binary(min_size=n, max_size=n))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Any]:
    root = tmp_path_factory.mktemp("fuzz")
    seeds = fuzzseeds.make_seeds(root)
    return root, seeds, fuzz.Runner(root)


def run(world: tuple[Path, dict[str, Any], Any], target: str, data: bytes) -> str:
    root, _, runner = world
    path = root / ("case.gguf" if target == "gguf" else "case.avec.gguf")
    path.write_bytes(data)
    outcome, detail = runner.run(target, path)
    assert outcome in ("ok", "rejected"), detail
    return outcome


@FUZZ
@given(data=st.data())
def test_mutated_models(world, data):
    _, seeds, _ = world
    r = Draws(data)
    seed = seeds[r.choice(sorted(seeds))]
    run(world, "gguf", mutations.mutate(seed, r))


@FUZZ
@given(data=st.data())
def test_mutated_vectors(world, data):
    _, seeds, _ = world
    r = Draws(data)
    seed = seeds[r.choice(("full.avec.gguf", "q8.avec.gguf", "lora.avec.gguf"))]
    run(world, "av", mutations.mutate(seed, r))


@FUZZ
@given(data=st.data())
def test_logical_mutants(world, data):
    """Well-formed files with hostile content: value types, tensor types, shapes, names."""
    root, seeds, _ = world
    r = Draws(data)
    name = r.choice(sorted(seeds))
    run(world, "gguf" if name == "base.gguf" else "av", mutations.mutate_logical(seeds[name], root, r))


@FUZZ
@given(head=st.sampled_from([b"", b"GGUF", b"GGUF\x03\x00\x00\x00", b"GGUF\x02\x00\x00\x00"]), tail=st.binary())
def test_noise(world, head, tail):
    run(world, "gguf", head + tail)
    run(world, "av", head + tail)


def test_the_property_can_fail(world, monkeypatch):
    """An exception that is not an AlignVecError is reported as escaped, not swallowed."""
    _, seeds, runner = world
    import alignvec_gguf.ggufread as ggufread

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a parser bug")

    monkeypatch.setattr(ggufread, "check_gguf", broken)
    path = world[0] / "case.gguf"
    path.write_bytes(seeds["base.gguf"].data)
    assert runner.run("gguf", path)[0] == "escaped"
    assert "ValueError: a parser bug" in runner.run("gguf", path)[1]


def test_benchmark_reports_json(tmp_path):
    """benchmarks/fuzz.py in a worker subprocess: a short run ends with its JSON line, nothing escaped."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "fuzz.py"),
            "--cases",
            "60",
            "--seed",
            "3",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cases"] == 60
    assert (result["escaped_errors"], result["crashes"], result["hangs"]) == (0, 0, 0), proc.stdout
    assert sum(sum(c.values()) for c in result["per_target"].values()) == 60
    assert proc.returncode == 0
