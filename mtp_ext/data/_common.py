"""Helpers shared by mtp_ext.data and mtp_ext.models: cache locations, dependency errors, atomic writes.

Standard library only, so that importing mtp_ext.data stays cheap.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, Sequence

PREPARE_SCRIPT = "scripts/prepare_offline.sh"


class MissingDependencyError(RuntimeError):
    """A package needed to build an offline model or corpus is not installed.

    The message always carries the exact command that installs it.
    """


def cache_root() -> Path:
    """Root of mtp_ext's caches: $MTP_EXT_CACHE, else ~/.cache/mtp_ext."""
    env = os.environ.get("MTP_EXT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mtp_ext"


def pip_command(*args: str) -> str:
    """The pip command line for the running interpreter (so it installs where it is needed)."""
    return " ".join([shlex.quote(sys.executable), "-m", "pip", "install", *args])


def module_available(module: str) -> bool:
    """True if `module` can be found, without importing it (some packages fail on import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_modules(modules: dict[str, str], what: str) -> None:
    """Raise MissingDependencyError unless every module in `modules` is importable.

    `modules` maps an import name to the pip arguments that install it.
    """
    missing = {m: args for m, args in modules.items() if not module_available(m)}
    if not missing:
        return
    # One command for packages that must not pull dependencies (they would drag in torch), one for the rest.
    no_deps: list[str] = []
    normal: list[str] = []
    for args in missing.values():
        words = shlex.split(args)
        bucket = no_deps if "--no-deps" in words else normal
        bucket.extend(w for w in words if w != "--no-deps" and w not in bucket)
    commands = [pip_command(*normal)] if normal else []
    commands += [pip_command("--no-deps", *no_deps)] if no_deps else []
    raise MissingDependencyError(
        f"{what} needs the Python package(s) {', '.join(sorted(missing))}, which are not installed. "
        f"Install with:\n  " + "\n  ".join(commands) + f"\nor run `bash {PREPARE_SCRIPT}` in the mtp_ext repository."
    )


def run_prepare_command(argv: list[str] | None, prog: str, kind: tuple[str, str], builtin: Sequence[str],
                        prepare_one: Callable[[str, str | None, bool], str]) -> int:
    """`prog prepare [NAME ...] [--cache-dir DIR] [--force]`: `prepare_one(name, cache_dir,
    force)` for each named built-in item (all of them by default; `kind`: what one and several
    are called), printing the line it returns and the seconds it took."""
    import argparse
    import time

    parser = argparse.ArgumentParser(prog=prog)
    commands = parser.add_subparsers(dest="command", required=True)
    one, several = kind
    prepare = commands.add_parser("prepare", help=f"prepare built-in {several} into the cache")
    prepare.add_argument("names", nargs="*", default=list(builtin))
    prepare.add_argument("--cache-dir", default=None)
    prepare.add_argument("--force", action="store_true", help="prepare again even if cached")
    args = parser.parse_args(argv)
    for name in args.names or builtin:
        if name not in builtin:
            parser.error(f"unknown {one} {name!r}; built-in {several} are {', '.join(builtin)}")
        start = time.perf_counter()
        summary = prepare_one(name, args.cache_dir, args.force)
        print(f"{name}: {summary} ({time.perf_counter() - start:.1f} s)")
    return 0
