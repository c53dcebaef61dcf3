"""
`nanoplay` command line: the playground with no subcommand, else one of the subcommands below.

Each subcommand lives in its own module with a `register(subparsers)` function; modules import
torch and friends only when their command runs, so `nanoplay --help` and the TUI start fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys

from .commands.common import AUTO_DTYPE_HELP, DTYPES
from .errors import NanoplayError

# errors of a write that the command cannot mend: they end it with one line, not a traceback
WRITE_ERRORS = {errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG}

COMMAND_MODULES = [
    "nanoplay.commands.gen",
    "nanoplay.commands.score",
    "nanoplay.commands.bench",
    "nanoplay.commands.models",
    "nanoplay.commands.export",
    "nanoplay.commands.eval",
    "nanoplay.commands.report",
    "nanoplay.commands.train",
]


class Parser(argparse.ArgumentParser):
    """
    argparse with nanoplay's error style: a usage error is one line naming the problem and where the help
    is (argparse prints the whole usage block first), and a value such as -inf for a number option is a
    value, not an unknown option (argparse takes only -1 and -.5 for numbers). The subcommands' parsers
    are of this class too (add_subparsers makes its parsers of the parent's class).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+|\d*\.\d+(e[-+]?\d+)?|\d+e[-+]?\d+|inf|infinity|nan)$", re.I)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="nanoplay",
        description="Play with small GPT-2-class models: compare, inspect, train, evaluate.",
    )
    # with no subcommand, `nanoplay` opens the playground (nanoplay.tui) with these options
    parser.add_argument("--model", "-m", action="append", metavar="SPEC",
                        help="a pane's model (repeatable); default: every local checkpoint plus gpt2")
    parser.add_argument("--chat", action="store_true", help="open in chat mode")
    parser.add_argument("--session", metavar="NAME", help="reopen a saved session")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when there is a GPU, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help=f"the panes' weights and compute precision ({AUTO_DTYPE_HELP})")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        from .tui.app import run_app

        run = run_app
    else:
        run = args.run
    if args.command is not None and sys.stdout is None:  # started with `>&-`: print() would fail mid-run
        print("nanoplay: error: standard output is closed: send it to a file or a pipe (> out.txt)", file=sys.stderr)
        return 2
    try:
        code = run(args) or 0
        sys.stdout.flush()  # what is still buffered meets a closed pipe here, not at exit
        return code
    except BrokenPipeError:
        return closed_pipe()
    except OSError as e:
        if e.filename is not None or e.errno not in WRITE_ERRORS:
            raise
        # a write to standard output failed (a full disk, /dev/full): what was written is incomplete
        print(f"nanoplay: error: cannot write standard output: {e.strerror}", file=sys.stderr)
        sys.stdout = None  # the interpreter's final flush would fail again
        return 1
    except NanoplayError as e:
        print(f"nanoplay: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("nanoplay: interrupted", file=sys.stderr)
        return 130


def closed_pipe() -> int:
    """
    The reader of our output went away (`nanoplay gen ... | head -1`): end quietly, as Unix tools do,
    with the status a shell gives a command that SIGPIPE ended (128 + 13). Standard output is pointed
    at /dev/null first, so the interpreter's final flush of what is still buffered cannot fail again
    (Python's documented recipe, docs.python.org/3/library/signal.html#note-on-sigpipe).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + 13


if __name__ == "__main__":
    sys.exit(main())
