"""Command line: `python -m mtp_ext.data prepare [NAME ...]` prepares built-in corpora into the cache
(all of them by default) and prints a one-line summary of each."""
from __future__ import annotations

import sys

from . import BUILTIN_CORPORA, PAIR_CORPORA, load_pairs, load_text, prepare
from ._common import run_prepare_command


def prepare_corpus(name: str, cache_dir: str | None, force: bool) -> str:
    path = prepare(name, cache_dir, force=force)
    documents = load_text(name, cache_dir)
    pairs = f", {len(load_pairs(name, cache_dir))} pairs" if name in PAIR_CORPORA else ""
    return f"{len(documents)} documents, {sum(map(len, documents))} characters{pairs} -> {path}"


def main(argv: list[str] | None = None) -> int:
    return run_prepare_command(argv, "python -m mtp_ext.data", ("corpus", "corpora"), BUILTIN_CORPORA, prepare_corpus)


if __name__ == "__main__":
    sys.exit(main())
