"""`mtp-ext eval`: teacher-forced top-k accuracy of MTP by marginalisation (the paper's Fig. 1);
under torchrun every rank scores its share and rank 0 prints and writes."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtp_ext._io import UserError, atomic_write_text
from mtp_ext.cli import common

__all__ = ["NAME", "add_parser", "plot_accuracy", "run"]

NAME = "eval"


def add_parser(commands) -> None:
    """Adds the `mtp-ext eval` subcommand to `commands`, the subparsers of `mtp-ext`."""
    parser = commands.add_parser(NAME, help="teacher-forced top-k accuracy of marginalisation MTP")
    common.add_model_arguments(parser, help="built-in name (smollm2-135m, gemma3-270m), checkpoint directory, or "
                                     "a hub id with --allow-download")
    parser.add_argument("--data", default=common.DEFAULT_DATA,
                        help="built-in corpus (austen, shakespeare, bible-en-es) or a .txt / .jsonl file")
    parser.add_argument("--steps", type=common.positive_int, default=2, help="predict x_{t+1} .. x_{t+steps}")
    parser.add_argument("--top-p", type=common.probability, default=0.99, help="nucleus of every intermediate level")
    parser.add_argument("--max-candidates", type=common.positive_int, default=64, help="cap on each nucleus")
    parser.add_argument("--max-nodes", type=common.positive_int, default=256, help="cap on the nodes of a draft tree")
    parser.add_argument("--tokens", type=common.positive_int, default=4096, help="evaluated positions")
    parser.add_argument("--seq-len", type=common.positive_int, default=512, help="tokens per sequence (open-ended text)")
    parser.add_argument("--batch-size", type=common.positive_int, default=4)
    parser.add_argument("--top-k", type=common.positive_int, nargs="+", default=[1, 5])
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, help="draw the accuracy per step (Fig. 1 style) here (PNG)")
    common.add_world_arguments(parser)
    common.add_placement_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
    """Runs `mtp-ext eval`: prints the table, and writes --json and --plot if given.

    Returns:
        The report (what --json holds).
    """
    from mtp_ext.evaluate import evaluate_mtp
    from mtp_ext.models import describe_weights

    common.set_threads(args)
    common.check_output_file(args.json, "--json")
    common.check_output_file(args.plot, "--plot")
    corpus = common.read_corpus(args.data)
    with common.world_for(args) as world:
        model, tokenizer = common.load_model_for(args, world)
        sequences, task = common.sequences_for(args.data, tokenizer, args.tokens, args.seq_len, corpus)
        if not sequences:
            raise UserError(f"{args.data!r} holds too little text for one sequence of {args.seq_len} tokens")
        result = evaluate_mtp(model, sequences, steps=args.steps, top_k=tuple(args.top_k), top_p=args.top_p,
                              max_candidates=args.max_candidates, max_nodes=args.max_nodes,
                              batch_size=args.batch_size, world=world)
        report = {"model": args.model, "weights": describe_weights(model), "data": args.data, "task": task,
                  "world": world.describe(), **result.to_dict()}
        if not world.main:
            return report
    print(f"\nmodel {args.model} ({report['weights']}), data {args.data} ({task})"
          + (f", {world.size} ranks" if world.distributed else "") + "\n")
    print(result.table(tuple(args.top_k)))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        plot_accuracy([report], args.plot)
        print(f"wrote {args.plot}")
    return report


def plot_accuracy(reports: list[dict], path: Path, k: int = 5) -> None:
    """Bars of top-k accuracy per step for each (model, data) report, with the bounds as error
    bars: the paper's Fig. 1.

    Args:
        reports: what `run` returns (eval.json), one per (model, data).
        path: the PNG file.
        k: the top-k shown.
    """
    plt = common.pyplot()
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
    common.save_figure(plt, figure, path)
