"""User errors, reading the files users give, and writing files so that a reader (or a crash)
never sees half of one.

Standard library only, so that importing mtp_ext.data stays cheap.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# A temporary file without a writer pid in its name (written before the pid was put there) is
# stale when it is older than this process.
_STARTED = time.time()


class UserError(ValueError):
    """A problem with what the user gave (an argument, a file, a checkpoint), with a message that
    names it and says what to do. `mtp-ext` prints the message as one line and exits 2."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist."""


def unreadable(path: os.PathLike[str] | str, what: str, error: BaseException, remedy: str = "") -> UserError:
    """The UserError for a user file `path` (described as `what`) that could not be read:
    the file, the reason (the first line of `error`) and `remedy`, on one line."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return UserError(f"cannot read {what} {path}: {reason}" + (f"; {remedy}" if remedy else ""))


def read_json(path: os.PathLike[str] | str, what: str, remedy: str = "") -> Any:
    """The JSON value in `path`; a UserError naming the file when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise MissingFileError(f"{what} {path} does not exist" + (f"; {remedy}" if remedy else "")) from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise unreadable(path, what, error, remedy) from error


def required_keys(record: Any, keys: tuple[str, ...], path: os.PathLike[str] | str, what: str,
                  remedy: str = "") -> dict:
    """`record` if it is a JSON object holding every key in `keys`, else a UserError naming the
    file and the missing keys."""
    if not isinstance(record, dict):
        raise UserError(f"{what} {path} holds no JSON object" + (f"; {remedy}" if remedy else ""))
    missing = [key for key in keys if key not in record]
    if missing:
        raise UserError(f"{what} {path} lacks {', '.join(repr(key) for key in missing)}"
                        + (f"; {remedy}" if remedy else ""))
    return record


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(temporary path)`, then a rename over `path`; the temporary file goes if anything
    fails. Temporaries of `path` left by dead writers (a SIGKILL skips every cleanup) go first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path) + f"{os.getpid()}.",
                                         suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; caches and runs may be shared between users
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Removes the temporary files atomic_write left beside `path` whose writer is dead (named
    .NAME.PID.XXXX.tmp), or, without a pid in the name, that are older than this process;
    returns them. Temporaries of live writers stay."""
    prefix = _temporary_prefix(path)
    removed = []
    for candidate in path.parent.glob(f"{_glob_escape(prefix)}*.tmp"):
        middle = candidate.name[len(prefix):-len(".tmp")].split(".")
        if len(middle) == 2 and middle[0].isdigit():
            stale = not _process_alive(int(middle[0]))
        elif len(middle) == 1:
            try:
                stale = candidate.stat().st_mtime < _STARTED
            except FileNotFoundError:  # another writer's cleanup got there first
                continue
        else:  # not a name atomic_write makes for `path`
            continue
        if stale:
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _glob_escape(text: str) -> str:
    return "".join(f"[{char}]" if char in "*?[" else char for char in text)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OverflowError:  # not a pid this system can have
        return False
    return True
