"""The `mtp-ext` command: one module per subcommand, each holding its own parser and handler
(`add_parser(commands)` sets `run`), the shared pieces in common.py.

    mtp-ext eval --model smollm2-135m --data austen --steps 2 --top-p 0.99 --tokens 4096
    mtp-ext analyze --model smollm2-135m --data austen --tokens 4096 --out results/smollm2-austen
    mtp-ext report results/* --out results
    mtp-ext generate --model smollm2-135m --prompt "It is a truth" --drafter marginal --max-new-tokens 64 --compare
    mtp-ext train-heads --model smollm2-135m --data austen --heads 3 --whs --steps 200 --out runs/whs
    mtp-ext eval-heads --model smollm2-135m --data austen --heads-dir runs/frozen runs/whs --json heads.json
    mtp-ext train-token-head --model smollm2-135m --data austen --out runs/token-head
    mtp-ext export-heads runs/medusa --format vllm-medusa --out runs/medusa-vllm

Every user error (a bad argument, a missing or damaged file) ends the command with one line on
stderr, `error: ...`, naming what is wrong, and exit status 2 (argparse's own errors: its usage
line and error, also 2). Arguments and output paths are checked before a model is loaded.
"""
from __future__ import annotations

import argparse
import sys

from mtp_ext._io import UserError
from mtp_ext.cli import analyze, eval_heads, eval_mtp, export_heads, generate, report, train_heads, train_token_head

__all__ = ["COMMANDS", "build_parser", "main"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# In the order `mtp-ext --help` lists them.
COMMANDS = (eval_mtp, analyze, generate, report, train_heads, train_token_head, eval_heads, export_heads)


def build_parser() -> argparse.ArgumentParser:
    """The `mtp-ext` parser, each subcommand's from its own module."""
    parser = argparse.ArgumentParser(prog="mtp-ext", description="Multi-token prediction for next-token LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one `mtp-ext` command.

    Args:
        argv: the arguments after `mtp-ext`; None: sys.argv[1:].

    Returns:
        The exit status: 0, 2 for a user error (said in one line), 130 on Ctrl-C.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its usage and error (or the help)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USER_ERROR
    try:
        args.run(args)
    except (UserError, ValueError, RuntimeError) as error:
        # The project's errors (UserError, and the ValueError / RuntimeError of bad arguments to
        # its functions and ops) name what is wrong; other exceptions are bugs and keep their traceback.
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        after = getattr(args, "interrupted", None)
        print("\ninterrupted" + (f"; {after(args)}" if after else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) or type(error).__name__
