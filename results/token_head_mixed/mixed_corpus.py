"""Writes the training corpus of results/token_head_mixed/: Austen, Shakespeare and the English
Bible, less what bench/bench_speculative.py prompts from (Austen's last novel, Shakespeare's last
play, Genesis), cut into pieces of about 20,000 characters and interleaved evenly, so that any prefix
of the corpus (train-token-head's windows come from the start) and its last share (held out)
mix the three.

    .venv/bin/python results/token_head_mixed/mixed_corpus.py OUT.jsonl
"""
import json
import sys

from mtp_ext import data as corpora

PIECE = 20_000


def pieces(documents: list[str]) -> list[str]:
    """The documents cut at the first line break after every PIECE characters."""
    cut = []
    for document in documents:
        start = 0
        while start < len(document):
            end = document.find("\n", start + PIECE)
            end = len(document) if end < 0 else end + 1
            cut.append(document[start:end])
            start = end
    return cut


def main(out: str) -> None:
    sources = [pieces(corpora.load_text("austen")[:-1]), pieces(corpora.load_text("shakespeare")[:-1]),
               pieces(corpora.load_text("bible-en-es")[1:])]
    # Each source spread evenly over the corpus: piece i of n at (i + 0.5) / n.
    placed = sorted(((index + 0.5) / len(source), number, text) for number, source in enumerate(sources)
                    for index, text in enumerate(source))
    mixed = [text for _, _, text in placed]
    with open(out, "w", encoding="utf-8") as file:
        for text in mixed:
            file.write(json.dumps({"text": text}) + "\n")
    print(f"wrote {len(mixed)} pieces ({', '.join(str(len(source)) for source in sources)} of Austen, "
          f"Shakespeare, the Bible) to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
