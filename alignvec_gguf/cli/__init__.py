"""The ``alignvec`` command line: commands over the library, which never imports this package.

- :mod:`.app`: :func:`main` (the ``alignvec`` entry point): parse, dispatch, and turn errors into one line and
  exit status 2 (a traceback is a bug).
- :mod:`.parser`: every command, flag and help text (the CLI contract, in one place).
- :mod:`.args`: values given on the command line (``-v PATH=LAMBDA``).
- one module per group of commands: :mod:`.models` (merge, run, serve), :mod:`.convert`, :mod:`.info`
  (inspect, doctor, cache), :mod:`.evaluate` (eval with its search, fidelity), :mod:`.demo`; and
  :mod:`.report`, the eval and search output (text tables, JSON, the PNG plot).
"""

from __future__ import annotations

from .app import main

__all__ = ["main"]
