"""``python -m alignvec_gguf.cli``: the ``alignvec`` command."""

from __future__ import annotations

import sys

from .app import main

sys.exit(main())
