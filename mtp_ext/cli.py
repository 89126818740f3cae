"""The `mtp-ext` command.

    mtp-ext eval --model smollm2-135m --data austen --steps 2 --top-p 0.99 --tokens 4096
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DATA = "austen"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtp-ext", description="Multi-token prediction for next-token LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    evaluate = commands.add_parser("eval", help="teacher-forced top-k accuracy of marginalisation MTP")
    evaluate.add_argument("--model", default=DEFAULT_MODEL,
                          help="built-in name (smollm2-135m, gemma3-270m), checkpoint directory or hub id")
    evaluate.add_argument("--data", default=DEFAULT_DATA,
                          help="built-in corpus (austen, shakespeare, bible-en-es) or a .txt / .jsonl file")
    evaluate.add_argument("--steps", type=int, default=2, help="predict x_{t+1} .. x_{t+steps}")
    evaluate.add_argument("--top-p", type=float, default=0.99, help="nucleus of every intermediate level")
    evaluate.add_argument("--max-candidates", type=int, default=64, help="cap on each nucleus")
    evaluate.add_argument("--max-nodes", type=int, default=256, help="cap on the nodes of a draft tree")
    evaluate.add_argument("--tokens", type=int, default=4096, help="evaluated positions")
    evaluate.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (open-ended text)")
    evaluate.add_argument("--batch-size", type=int, default=4)
    evaluate.add_argument("--top-k", type=int, nargs="+", default=[1, 5])
    evaluate.add_argument("--json", type=Path, help="write the results as JSON here")
    evaluate.add_argument("--plot", type=Path, help="draw the accuracy per step (Fig. 1 style) here (PNG)")
    evaluate.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser


def sequences_for(data: str, tokenizer, tokens: int, seq_len: int):
    """Token sequences of open-ended text, or (prompt, target) pairs for a parallel corpus."""
    from mtp_ext import data as corpora

    if data in corpora.PAIR_CORPORA or _is_pairs_file(data):
        pairs = corpora.load_pairs(data)
        examples, scored = [], 0
        for example in corpora.translation_examples(tokenizer, pairs, max_examples=None):
            examples.append(example)
            scored += len(example[1])
            if scored >= tokens:
                break
        return examples, "translation"
    return corpora.token_sequences(tokenizer, corpora.load_text(data), seq_len, max_tokens=tokens), "open-ended"


def _is_pairs_file(data: str) -> bool:
    """A .jsonl file whose first record has a source and a target."""
    path = Path(data)
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return False
    with path.open() as handle:
        first = json.loads(handle.readline() or "{}")
    return "source" in first and "target" in first


def run_eval(args: argparse.Namespace) -> dict:
    import torch

    from mtp_ext.evaluate import evaluate_mtp
    from mtp_ext.models import describe_weights, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    for path in (args.json, args.plot):
        if path is not None:
            _check_writable(path)
    model, tokenizer = load_model(args.model)
    sequences, task = sequences_for(args.data, tokenizer, args.tokens, args.seq_len)
    if not sequences:
        raise SystemExit(f"error: {args.data!r} holds too little text for one sequence of {args.seq_len} tokens")
    result = evaluate_mtp(model, sequences, steps=args.steps, top_k=tuple(args.top_k), top_p=args.top_p,
                          max_candidates=args.max_candidates, max_nodes=args.max_nodes,
                          batch_size=args.batch_size)
    report = {"model": args.model, "weights": describe_weights(model), "data": args.data, "task": task,
              **result.to_dict()}
    print(f"\nmodel {args.model} ({report['weights']}), data {args.data} ({task})\n")
    print(result.table(tuple(args.top_k)))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        plot_accuracy([report], args.plot)
        print(f"wrote {args.plot}")
    return report


def plot_accuracy(reports: list[dict], path: Path, k: int = 5) -> None:
    """Bars of top-k accuracy per step for each (model, data) report, with the bounds as error
    bars: the paper's Fig. 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = f"top{k}"
    steps = sorted({step["step"] for report in reports for step in report["steps"]})
    width = 0.8 / max(len(steps), 1)
    figure, axes = plt.subplots(figsize=(max(4, 1.6 * len(reports) + 2), 3.5))
    for offset, step_number in enumerate(steps):
        values, lower, upper = [], [], []
        for report in reports:
            step = next((s for s in report["steps"] if s["step"] == step_number), None)
            value = step["accuracy"].get(name, float("nan")) if step else float("nan")
            values.append(value)
            lower.append(value - step["accuracy_lower"].get(name, value) if step else 0)
            upper.append(step["accuracy_upper"].get(name, value) - value if step else 0)
        positions = [index + offset * width for index in range(len(reports))]
        axes.bar(positions, values, width, yerr=[lower, upper], capsize=3, label=f"x(t+{step_number})")
    axes.set_xticks([index + width * (len(steps) - 1) / 2 for index in range(len(reports))])
    axes.set_xticklabels([f"{r['model']}\n{r['data']}" for r in reports], fontsize=8)
    axes.set_ylabel(f"top-{k} accuracy")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=8)
    axes.set_title("MTP by marginalisation")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _check_writable(path: Path) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir() or not os.access(directory, os.W_OK):
        raise SystemExit(f"error: cannot write {path}: {directory} is not a writable directory")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "eval":
            run_eval(args)
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
