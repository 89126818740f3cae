"""Command line: `python -m mtp_ext.data prepare [NAME ...]` prepares built-in corpora into the cache
(all of them by default) and prints a one-line summary of each."""
from __future__ import annotations

import argparse
import sys
import time

from . import BUILTIN_CORPORA, PAIR_CORPORA, load_pairs, load_text, prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtp_ext.data")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="prepare built-in corpora into the data cache")
    prep.add_argument("names", nargs="*", default=list(BUILTIN_CORPORA))
    prep.add_argument("--cache-dir", default=None)
    prep.add_argument("--force", action="store_true", help="rebuild even if prepared")
    args = parser.parse_args(argv)
    for name in args.names or BUILTIN_CORPORA:
        if name not in BUILTIN_CORPORA:
            parser.error(f"unknown corpus {name!r}; built-in corpora are {', '.join(BUILTIN_CORPORA)}")
        start = time.perf_counter()
        path = prepare(name, args.cache_dir, force=args.force)
        docs = load_text(name, args.cache_dir)
        extra = f", {len(load_pairs(name, args.cache_dir))} pairs" if name in PAIR_CORPORA else ""
        print(f"{name}: {len(docs)} documents, {sum(map(len, docs))} characters{extra} "
              f"({time.perf_counter() - start:.1f} s) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
