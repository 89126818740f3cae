"""Command line: `python -m mtp_ext.models prepare [NAME ...]` converts built-in models into the cache
(all of them by default)."""
from __future__ import annotations

import sys

from ..data._common import run_prepare_command
from . import BUILTIN_MODELS, prepare_model


def main(argv: list[str] | None = None) -> int:
    return run_prepare_command(argv, "python -m mtp_ext.models", ("model", "models"), BUILTIN_MODELS,
                               lambda name, cache_dir, force: str(prepare_model(name, cache_dir, force=force)))


if __name__ == "__main__":
    sys.exit(main())
