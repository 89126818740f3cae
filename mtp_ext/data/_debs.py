"""Fetch Debian packages with `apt-get download` and unpack them with `dpkg -x`, without installing.

Standard library only and free of package-relative imports, so that scripts/prepare_offline.sh can
run it as a plain script before mtp_ext (and its compiled extension) is importable:

    python mtp_ext/data/_debs.py DEST PACKAGE [PACKAGE ...]

unpacks each PACKAGE under DEST/root and prints DEST/root.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


class DebFetchError(RuntimeError):
    """apt-get or dpkg is missing or failed."""


def _apt_options(dest: Path, private_lists: bool) -> list[str]:
    opts = []
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # As root apt drops to the _apt user, who cannot write into a private cache dir (only a warning).
        opts.append("-oAPT::Sandbox::User=root")
    if private_lists:
        # Without root the system lists dir is read-only; a private one works (needs its own `update`).
        lists, cache = dest / "apt" / "lists", dest / "apt" / "cache"
        (lists / "partial").mkdir(parents=True, exist_ok=True)
        (cache / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        opts += [f"-oDir::State::Lists={lists}", f"-oDir::Cache={cache}", "-oDebug::NoLocking=1"]
    return opts


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _download(package: str, dest: Path) -> Path:
    """Download `package`'s .deb into `dest` (system apt lists first, then a private lists dir)."""
    for private in (False, True):
        opts = _apt_options(dest, private)
        if private:
            upd = _run(["apt-get", *opts, "update"], dest)
            if upd.returncode != 0:
                raise DebFetchError(f"apt-get update (private lists in {dest}/apt) failed:\n{upd.stderr.strip()}")
        res = _run(["apt-get", *opts, "download", package], dest)
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if res.returncode == 0 and debs:
            return debs[-1]
    raise DebFetchError(f"`apt-get download {package}` failed:\n{res.stderr.strip()}")


def fetch_debs(packages: list[str], dest: str | os.PathLike[str]) -> Path:
    """Make sure each Debian package in `packages` is unpacked under `dest`/root; return that root.

    Idempotent: a package already unpacked (marker file present) is skipped, and a .deb already in
    `dest` is not downloaded again.
    """
    dest = Path(dest)
    root = dest / "root"
    todo = [p for p in packages if not (root / f".unpacked-{p}").exists()]
    if not todo:
        return root
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise DebFetchError(
                f"`{tool}` is not available, so the Debian package(s) {', '.join(todo)} cannot be fetched. "
                f"On a Debian/Ubuntu machine run `apt-get download {' '.join(todo)}` and "
                f"`dpkg -x <file>.deb {root}` for each file."
            )
    dest.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    for package in todo:
        debs = sorted(dest.glob(f"{package}_*.deb"))
        deb = debs[-1] if debs else _download(package, dest)
        res = _run(["dpkg", "-x", str(deb), str(root)], dest)
        if res.returncode != 0:
            raise DebFetchError(f"`dpkg -x {deb} {root}` failed:\n{res.stderr.strip()}")
        (root / f".unpacked-{package}").write_text(deb.name + "\n")
    return root


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print(fetch_debs(argv[1:], argv[0]))
    except DebFetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
