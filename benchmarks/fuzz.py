"""Fuzzing the file readers with hostile GGUF models and alignment vectors: nothing but AlignVecError may escape.

The command over the fuzz engine in ``tests/support/fuzzing.py`` (its seeds in ``fuzzseeds.py`` and its
mutations in ``mutations.py`` beside it, shared with tests/test_fuzz.py and test_hostile_files.py): mutants
of small valid models and vectors, and random bytes, run in a worker subprocess through two targets (``gguf``:
the model readers, a merge plan and a merge; ``av``: the vector reader, the compatibility checks, every delta
and a merge). Outcomes: ``ok``, ``rejected`` (an AlignVecError: the wanted failure), ``escaped`` (any other
exception: a bug), ``crash``, ``hang``. ``--atheris RUNS`` adds coverage-guided fuzzing (``pip install
atheris``).

Usage: python benchmarks/fuzz.py [--cases N] [--seed S] [--timeout SECONDS] [--merge-every N] [--workdir DIR]
[--atheris RUNS]
Default 10,000 cases, each that passes every check also merged: about 25 s on this 2-core machine
(100,000 with --merge-every 3: about 4 minutes; --atheris 20000 adds about 3 minutes). The last line
is JSON; the exit status is 1 when anything escaped, crashed or hung.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.fuzzing import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
