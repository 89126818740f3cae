"""Command line: `python -m mtp_ext.models prepare [NAME ...]` converts built-in models into the cache
(all of them by default)."""
from __future__ import annotations

import argparse
import sys
import time

from . import BUILTIN_MODELS, prepare_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtp_ext.models")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="convert built-in models into the model cache")
    prep.add_argument("names", nargs="*", default=list(BUILTIN_MODELS))
    prep.add_argument("--cache-dir", default=None)
    prep.add_argument("--force", action="store_true", help="convert again even if cached")
    args = parser.parse_args(argv)
    for name in args.names or BUILTIN_MODELS:
        if name not in BUILTIN_MODELS:
            parser.error(f"unknown model {name!r}; built-in models are {', '.join(BUILTIN_MODELS)}")
        start = time.perf_counter()
        path = prepare_model(name, args.cache_dir, force=args.force)
        print(f"{name}: {path} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
