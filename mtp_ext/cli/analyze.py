"""`mtp-ext analyze`: the paper's diagnostics, logit-lens KL, entropy and nucleus sizes (Figs. 2-4);
under torchrun every rank analyses its share and rank 0 prints and writes."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtp_ext._io import UserError, atomic_write_text
from mtp_ext.cli import common

__all__ = ["NAME", "add_parser", "plot_analysis", "run"]

NAME = "analyze"


def add_parser(commands) -> None:
    """Adds the `mtp-ext analyze` subcommand to `commands`, the subparsers of `mtp-ext`."""
    parser = commands.add_parser(NAME, help="logit-lens KL, entropy and nucleus sizes (Figs. 2-4)")
    common.add_model_arguments(parser)
    parser.add_argument("--data", default=common.DEFAULT_DATA)
    parser.add_argument("--tokens", type=common.positive_int, default=4096, help="positions to analyse")
    parser.add_argument("--seq-len", type=common.positive_int, default=512)
    parser.add_argument("--top-p", type=common.probability, nargs="+", default=[0.99, 0.9])
    parser.add_argument("--out", type=Path, required=True, help="directory for analysis.json and the plots")
    common.add_world_arguments(parser)
    common.add_placement_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
    """Runs `mtp-ext analyze`: writes analysis.json and the plots into --out.

    Returns:
        The report written to analysis.json.
    """
    from mtp_ext.analysis import analyze
    from mtp_ext.models import describe_weights

    common.set_threads(args)
    out = common.output_dir(args.out)
    corpus = common.read_corpus(args.data)
    with common.world_for(args) as world:
        model, tokenizer = common.load_model_for(args, world)
        examples, task = common.sequences_for(args.data, tokenizer, args.tokens, args.seq_len, corpus)
        sequences = [list(e[0]) + list(e[1]) if isinstance(e, tuple) else e for e in examples]
        available = sum(len(sequence) for sequence in sequences)
        if available < args.tokens:
            raise UserError(f"{args.data!r} gave {available} tokens but --tokens asks for {args.tokens}")
        result = analyze(model, sequences, top_ps=tuple(args.top_p), world=world)
        report = {"model": args.model, "weights": describe_weights(model), "data": args.data, "task": task,
                  "world": world.describe(), **result.to_dict()}
        if not world.main:
            return report
    atomic_write_text(out / "analysis.json", json.dumps(report))
    plot_analysis(report, out)
    summary = result.summary()
    print(f"\nmodel {args.model}, data {args.data}: {summary['positions']} positions, mean entropy "
          f"{summary['mean_entropy']:.3f} nats, mean nucleus sizes "
          + ", ".join(f"top-{p}: {size:.1f}" for p, size in summary["mean_nucleus_size"].items()))
    print("logit-lens KL per layer: " + " ".join(f"{kl:.2f}" for kl in summary["kl_per_layer"]))
    print(f"wrote {out}/analysis.json, logit_lens_kl.png, entropy.png, nucleus_sizes.png")
    return report


def plot_analysis(report: dict, out: Path) -> None:
    """Figs. 2-4 of the paper for one model and text, as logit_lens_kl.png, entropy.png and
    nucleus_sizes.png.

    Args:
        report: what `run` wrote to analysis.json.
        out: the directory for the plots.
    """
    plt = common.pyplot()
    label = f"{report['model']} / {report['data']}"
    figure, axes = plt.subplots(figsize=(5, 3.5))
    kl = report["kl_per_layer"]
    axes.plot(range(1, len(kl) + 1), kl, marker="o", markersize=3)
    axes.set(xlabel="layer", ylabel="KL(p_layer || p_final) (nats)", title=f"Logit lens: {label}")
    common.save_figure(plt, figure, out / "logit_lens_kl.png")

    figure, axes = plt.subplots(figsize=(7, 3.5))
    first = report["first_entropy"]
    axes.plot(range(len(first)), first, linewidth=0.8)
    axes.set(xlabel="position in the first sequence", ylabel="entropy (nats)",
             title=f"Next-token entropy: {label}")
    common.save_figure(plt, figure, out / "entropy.png")

    figure, axes = plt.subplots(figsize=(5, 3.5))
    for p, pairs in report["nucleus_size_histogram"].items():
        sizes, counts = [size for size, _ in pairs], [count for _, count in pairs]
        axes.hist(sizes, bins=50, weights=counts, alpha=0.6,
                  label=f"top-{p}: mean {report['summary']['mean_nucleus_size'][p]:.1f}")
    axes.set(xlabel="tokens in the nucleus", ylabel="positions", yscale="log", title=f"Nucleus sizes: {label}")
    axes.legend(fontsize=8)
    common.save_figure(plt, figure, out / "nucleus_sizes.png")
