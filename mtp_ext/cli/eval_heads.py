"""`mtp-ext eval-heads`: held-out top-k accuracy of MTP heads beside marginalisation, on the
same positions."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtp_ext._io import atomic_write_text
from mtp_ext.cli import common

__all__ = ["NAME", "add_parser", "run"]

NAME = "eval-heads"


def add_parser(commands) -> None:
    """Adds the `mtp-ext eval-heads` subcommand to `commands`, the subparsers of `mtp-ext`."""
    parser = commands.add_parser(NAME, help="held-out top-k accuracy of MTP heads beside marginalisation")
    common.add_heads_data_arguments(parser)
    parser.add_argument("--heads-dir", type=Path, nargs="+", required=True, help="train-heads checkpoints")
    parser.add_argument("--tokens", type=common.positive_int, default=1024, help="held-out positions (of step 1)")
    parser.add_argument("--marginal-steps", type=common.positive_int, default=None,
                        help="marginalise up to this step (default: the heads' last step; 1: none)")
    parser.add_argument("--top-p", type=common.probability, default=0.99)
    parser.add_argument("--max-candidates", type=common.positive_int, default=16)
    parser.add_argument("--max-nodes", type=common.positive_int, default=64)
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
    """Runs `mtp-ext eval-heads`: prints the table, and writes the report to --json if given.

    Returns:
        The report.
    """
    from mtp_ext.evaluate import evaluate_mtp
    from mtp_ext.heads import evaluate_heads, load_heads
    from mtp_ext.heads.model import check_heads_dir
    from mtp_ext.models import describe_weights

    common.set_threads(args)
    common.check_output_file(args.json, "--json")
    for directory in args.heads_dir:
        check_heads_dir(directory, "--heads-dir")
    documents = common.read_documents(args.data)
    backbone, tokenizer = common.load_model_for(args)
    _, held_out, split = common.heads_data(args, documents, tokenizer, 1, args.tokens)
    results, configs = {}, {}
    for directory in args.heads_dir:
        # A joint checkpoint overwrites the backbone's weights: each gets a fresh copy.
        heads = load_heads(directory, common.load_model_for(args)[0])
        results[str(directory)] = evaluate_heads(heads, held_out, batch_size=1)
        configs[str(directory)] = heads.config_dict()
    marginal_steps = args.marginal_steps or max(len(accuracies) for accuracies in results.values())
    marginal = evaluate_mtp(backbone, held_out, steps=marginal_steps, top_p=args.top_p,
                            max_candidates=args.max_candidates, max_nodes=args.max_nodes, batch_size=1)
    for name, accuracies in results.items():
        for accuracy, step in zip(accuracies, marginal.steps):
            if accuracy.positions != step["positions"]:
                raise RuntimeError(f"{name}: step {accuracy.step} scored {accuracy.positions} positions, "
                                   f"marginalisation {step['positions']}")
    labels = [directory.resolve().name for directory in args.heads_dir]
    if len(set(labels)) == len(labels):  # short column names where they stay distinct
        table = common.heads_table(dict(zip(labels, results.values())), marginal.steps)
    else:
        table = common.heads_table(results, marginal.steps)
    report = {"model": args.model, "weights": describe_weights(backbone), "data": args.data, "split": split,
              "sequences": len(held_out), "seq_len": args.seq_len, "marginalisation": marginal.to_dict(),
              "heads": {name: {"config": configs[name], "steps": [vars(a) for a in accuracies]}
                        for name, accuracies in results.items()}, "table": table}
    print(f"\nmodel {args.model}, data {args.data} (held out: {split['by']} split), top-1 / top-5 per step "
          "(step 1: the backbone's own next-token prediction)\n")
    print(table)
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return report
