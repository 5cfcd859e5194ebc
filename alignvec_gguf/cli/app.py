"""``alignvec``'s entry point: parse, dispatch to the command, and turn every failure into one line on stderr
with exit status 2 (bad input, permissions, I/O, memory), 130 (interrupted) or 143 (terminated)."""

from __future__ import annotations

import logging
import re
import signal
import sys
import threading

from ..errors import AlignVecError
from .parser import EXIT_USAGE, build_parser

MAX_ERROR_CHARS = 2000


def one_line(text: str) -> str:
    """An error message as one printable line: control characters (newlines, escapes, NUL) from file
    metadata or paths are shown escaped, and an overlong message is cut in the middle."""
    text = re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", lambda m: repr(m[0])[1:-1], text.strip())
    if len(text) > MAX_ERROR_CHARS:
        half = MAX_ERROR_CHARS // 2
        text = f"{text[:half]} [... {len(text) - 2 * half} characters ...] {text[-half:]}"
    return text


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that temporaries are removed on the way out."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Run ``alignvec`` with ``argv`` (default: the process's arguments) and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s")
    for noisy in ("gguf", "gguf.gguf_writer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return int(args.func(args))
    except AlignVecError as e:
        return _fail(args.command, str(e))
    except OSError as e:  # permissions, I/O errors: still one line, no traceback
        where = f": {e.filename}" if e.filename else ""
        return _fail(args.command, f"{e.strerror or e}{where}")
    except MemoryError:
        return _fail(args.command, "out of memory; close other programs or use a smaller model")
    except KeyboardInterrupt:
        print("alignvec: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("alignvec: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _fail(command: str, message: str) -> int:
    print(f"alignvec {command}: error: {one_line(message)}", file=sys.stderr)
    return EXIT_USAGE
