"""`mtp-ext eval-heads`: held-out top-k accuracy of MTP heads beside marginalisation, on the
same positions, with 95% intervals from a bootstrap over the held-out sequences (the positions
of one sequence share its text, so they are not independent).

Each held-out sequence is scored on its own. With --json, a sequence's scores are appended to
JSON.parts.jsonl as soon as they are known, so that an evaluation that stops (hours, with
marginalisation at step 4) goes on where it stopped when it is run again with the same
arguments and checkpoints; the parts file is removed once the report is written.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mtp_ext._io import UserError, atomic_write_text
from mtp_ext.cli import common

__all__ = ["NAME", "add_parser", "differences_table", "merge_parts", "paired_differences", "plot_fig5", "plot_layer_weights",
           "run", "whs_layer_shares"]

NAME = "eval-heads"
TOP_K = (1, 5)
SHARE_FIELDS = ("accuracy", "accuracy_lower", "accuracy_upper", "certain_topk_share")


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
    parser.add_argument("--json", type=Path,
                        help="write the results as JSON here (and resume from JSON.parts.jsonl if it exists)")
    parser.add_argument("--plot", type=Path, help="Fig. 5-style bars (PNG), and each WHS checkpoint's layer weights "
                                                  "beside it (PLOT-whs-NAME.png)")
    parser.set_defaults(run=run, interrupted=interrupted)


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves: the sequences scored so far, resumed by the same command."""
    return common.kept_on_interrupt(None if args.json is None else _parts_path(args.json), "--json",
                                    "the sequences scored so far")


def run(args: argparse.Namespace) -> dict:
    """Runs `mtp-ext eval-heads`: prints the table, and writes the report to --json (and the
    plots to --plot) if given.

    Returns:
        The report.
    """
    from tqdm.auto import tqdm

    from mtp_ext.heads import load_heads
    from mtp_ext.heads.model import check_heads_dir
    from mtp_ext.models import describe_weights

    common.set_threads(args)
    common.check_output_file(args.json, "--json")
    common.check_output_file(args.plot, "--plot")
    for directory in args.heads_dir:
        check_heads_dir(directory, "--heads-dir")
    documents = common.read_documents(args.data)
    backbone, tokenizer = common.load_model_for(args)
    _, held_out, split = common.heads_data(args, documents, tokenizer, 1, args.tokens)
    # A joint checkpoint overwrites the backbone's weights: each gets a fresh copy.
    heads = {str(directory): load_heads(directory, common.load_model_for(args)[0]) for directory in args.heads_dir}
    marginal_steps = args.marginal_steps or max(model.num_heads + 1 for model in heads.values())
    key = _run_key(args, held_out, marginal_steps)
    parts_path = _parts_path(args.json) if args.json is not None else None
    parts = _read_parts(parts_path, key)
    with tqdm(total=len(held_out), initial=len(parts), desc="held-out sequences", unit="seq") as bar:
        for index, sequence in enumerate(held_out):
            if index in parts:
                continue
            parts[index] = _score_sequence(args, backbone, heads, sequence, marginal_steps)
            if parts_path is not None:
                _append_part(parts_path, key, index, parts[index])
            bar.update(1)
    marginal, results, intervals = merge_parts([parts[index] for index in range(len(held_out))])
    for name, accuracies in results.items():
        for accuracy, step in zip(accuracies, marginal["steps"]):
            if accuracy.positions != step["positions"]:
                raise RuntimeError(f"{name}: step {accuracy.step} scored {accuracy.positions} positions, "
                                   f"marginalisation {step['positions']}")
    labels = [directory.resolve().name for directory in args.heads_dir]
    names = labels if len(set(labels)) == len(labels) else list(results)  # short names where they stay distinct
    table = common.heads_table(dict(zip(names, results.values())), marginal["steps"],
                               dict(zip(names, intervals.values())))
    differences = paired_differences([parts[index] for index in range(len(held_out))], dict(zip(results, names)))
    whs_layers = {label: whs_layer_shares(heads[name], held_out) for name, label in zip(results, names)
                  if heads[name].weighted_hidden_states}
    report = {"model": args.model, "weights": describe_weights(backbone), "data": args.data, "split": split,
              "sequences": len(held_out), "seq_len": args.seq_len, "marginalisation": marginal,
              "intervals": {"method": "percentile bootstrap over the held-out sequences", "level": 0.95,
                            "resamples": _resamples()},
              "heads": {name: {"config": model.config_dict(),
                               "steps": [{**vars(accuracy), "interval": interval}
                                         for accuracy, interval in zip(results[name], intervals[name])]}
                        for name, model in heads.items()},
              "differences": differences, "table": table, "differences_table": differences_table(differences),
              "whs_layers": whs_layers}
    print(f"\nmodel {args.model}, data {args.data} (held out: {split['by']} split), top-1 / top-5 per step "
          "[top-5 95% interval] (step 1: the backbone's own next-token prediction)\n")
    print(table)
    print("\npaired differences of top-1 / top-5 shares [95% intervals, the same sequences resampled for both]\n")
    print(report["differences_table"])
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(report, indent=2))
        parts_path.unlink(missing_ok=True)
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot_fig5(report, dict(zip(results, names)), args.plot)
        for label, layers in whs_layers.items():
            plot_layer_weights(layers, f"{args.model}, WHS heads {label}",
                               args.plot.with_name(f"{args.plot.stem}-whs-{label}.png"))
        print(f"wrote {args.plot}")
    return report


def _score_sequence(args, backbone, heads: dict, sequence, marginal_steps: int) -> dict:
    """One held-out sequence's scores: marginalisation's step summaries and each checkpoint's
    HeadAccuracy values, all as JSON-ready dicts."""
    from mtp_ext.evaluate import evaluate_mtp
    from mtp_ext.heads import evaluate_heads

    marginal = evaluate_mtp(backbone, [sequence], steps=marginal_steps, top_k=TOP_K, top_p=args.top_p,
                            max_candidates=args.max_candidates, max_nodes=args.max_nodes, batch_size=1,
                            progress=False)
    return {"marginal": {key: value for key, value in marginal.to_dict().items() if key != "settings"},
            "marginal_settings": marginal.settings,
            "heads": {name: [vars(accuracy) for accuracy in evaluate_heads(model, [sequence], TOP_K, batch_size=1,
                                                                          progress=False)]
                      for name, model in heads.items()}}


def merge_parts(parts: list[dict]) -> tuple[dict, dict, dict]:
    """The report's numbers from the scores of each sequence: counts summed, shares of the
    sums, and a bootstrap interval over the sequences for each top-k share.

    Args:
        parts: per sequence, what _score_sequence returns.

    Returns:
        (marginalisation: {"steps": summaries, each with "interval": {"top{k}": [low, high]},
        "mean_nucleus_size", "mean_nucleus_mass", "positions", "seconds", "settings"},
        heads: name -> [HeadAccuracy] merged, intervals: name -> per step {"top{k}": [low, high]}).
    """
    from mtp_ext._stats import bootstrap_share_interval
    from mtp_ext.heads.training import HeadAccuracy

    marginal_steps = []
    for row, first in enumerate(parts[0]["marginal"]["steps"]):
        steps = [part["marginal"]["steps"][row] for part in parts]
        positions = [step["positions"] for step in steps]
        merged = {"step": first["step"], "positions": sum(positions)}
        for field in SHARE_FIELDS:
            merged[field] = {name: sum(_count(step[field][name], step["positions"]) for step in steps)
                             / max(merged["positions"], 1) for name in first[field]}
        merged["captured_mass"] = sum(step["captured_mass"] * step["positions"] for step in steps) / max(
            merged["positions"], 1)
        merged["interval"] = {name: list(bootstrap_share_interval(
            [_count(step["accuracy"][name], step["positions"]) for step in steps], positions))
            for name in first["accuracy"]}
        marginal_steps.append(merged)
    first_positions = [part["marginal"]["positions"] for part in parts]
    total = max(sum(first_positions), 1)
    marginal = {"steps": marginal_steps, "positions": sum(first_positions),
                "mean_nucleus_size": sum(p["marginal"]["mean_nucleus_size"] * n for p, n in zip(parts, first_positions))
                / total,
                "mean_nucleus_mass": sum(p["marginal"]["mean_nucleus_mass"] * n for p, n in zip(parts, first_positions))
                / total,
                "seconds": sum(part["marginal"]["seconds"] for part in parts),
                "settings": {**parts[0]["marginal_settings"], "sequences": len(parts)}}
    results, intervals = {}, {}
    for name in parts[0]["heads"]:
        results[name], intervals[name] = [], []
        for row, first in enumerate(parts[0]["heads"][name]):
            steps = [part["heads"][name][row] for part in parts]
            positions = [step["positions"] for step in steps]
            total = max(sum(positions), 1)
            hits = {k: [_count(step["accuracy"][k], step["positions"]) for step in steps] for k in first["accuracy"]}
            results[name].append(HeadAccuracy(first["step"], sum(positions),
                                               {k: sum(values) / total for k, values in hits.items()},
                                               sum(step["loss"] * step["positions"] for step in steps) / total))
            intervals[name].append({k: list(bootstrap_share_interval(values, positions)) for k, values in hits.items()})
    return marginal, results, intervals


def _count(share: float, positions: int) -> int:
    return round(share * positions)  # the shares are counts / positions: exact after rounding


MARGINAL = "marginalisation"
MARGINAL_LOWER = "marginalisation's lower bound"
MARGINAL_UPPER = "marginalisation's upper bound"


def paired_differences(parts: list[dict], labels: dict) -> list[dict]:
    """Each set of heads against marginalisation (its estimate, and its bounds: what the exact
    marginal's accuracy lies between, whatever the caps left out) and against each set listed
    before it: per step, the
    difference of the top-k shares over the same positions and a paired bootstrap interval
    over the sequences, which tells two close variants apart where their own intervals overlap.

    Args:
        parts: per sequence, what _score_sequence returns.
        labels: checkpoint name (a key of each part's "heads") -> its label, in the order given.

    Returns:
        [{"a": label, "b": label, "steps": [{"step": s, "top{k}": {"difference": A - B,
        "interval": [low, high]}}]}], A a set of heads, B marginalisation or an earlier set.
    """
    from mtp_ext._stats import bootstrap_difference_interval

    def series(rows_of, field: str = "accuracy") -> list[dict]:
        """per row: {"step", "positions": per sequence, "hits": top{k} -> per sequence}"""
        rows = []
        for row, first in enumerate(rows_of(parts[0])):
            steps = [rows_of(part)[row] for part in parts]
            rows.append({"step": first["step"], "positions": [step["positions"] for step in steps],
                         "hits": {k: [_count(step[field][k], step["positions"]) for step in steps]
                                  for k in first[field]}})
        return rows

    heads = {label: series(lambda part, name=name: part["heads"][name]) for name, label in labels.items()}
    baselines = {MARGINAL: series(lambda part: part["marginal"]["steps"]),
                 MARGINAL_LOWER: series(lambda part: part["marginal"]["steps"], "accuracy_lower"),
                 MARGINAL_UPPER: series(lambda part: part["marginal"]["steps"], "accuracy_upper")}
    pairs = [(a, b) for index, a in enumerate(heads) for b in [*baselines, *list(heads)[:index]]]
    differences = []
    for a, b in pairs:
        rows_a, rows_b = heads[a], {**baselines, **heads}[b]
        steps = []
        for row_a, row_b in zip(rows_a, rows_b):
            step = {"step": row_a["step"]}
            for k, hits_a in row_a["hits"].items():
                hits_b = row_b["hits"][k]
                share = sum(hits_a) / sum(row_a["positions"]) - sum(hits_b) / sum(row_b["positions"])
                step[k] = {"difference": share, "interval": list(bootstrap_difference_interval(
                    hits_a, row_a["positions"], hits_b, row_b["positions"]))}
            steps.append(step)
        differences.append({"a": a, "b": b, "steps": steps})
    return differences


def differences_table(differences: list[dict]) -> str:
    """Markdown: one line per pair and step (2 onwards), A - B in top-1 and top-5 with intervals."""
    lines = ["| A | B | step | top-1: A - B [interval] | top-5: A - B [interval] |", "|---|---|---|---|---|"]
    for pair in differences:
        for step in pair["steps"]:
            if step["step"] < 2:
                continue
            cells = [f"{step[k]['difference']:+.3f} [{step[k]['interval'][0]:+.3f}, {step[k]['interval'][1]:+.3f}]"
                     for k in ("top1", "top5")]
            lines.append(f"| {pair['a']} | {pair['b']} | {step['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _resamples() -> int:
    from mtp_ext._stats import BOOTSTRAP_RESAMPLES

    return BOOTSTRAP_RESAMPLES


# ----------------------------------------------------------------------------- the parts file


def _parts_path(json_path: Path) -> Path:
    return json_path.with_name(json_path.name + ".parts.jsonl")


def _run_key(args: argparse.Namespace, held_out: list, marginal_steps: int) -> dict:
    """What the scores depend on: a parts file with another key belongs to another evaluation."""
    checkpoints = {}
    for directory in args.heads_dir:
        weights = [path for path in sorted(Path(directory).glob("*.safetensors"))]
        checkpoints[str(directory)] = [[path.name, os.stat(path).st_size, os.stat(path).st_mtime_ns]
                                       for path in weights]
    return {"model": args.model, "data": args.data, "held_out_share": args.held_out_share, "seq_len": args.seq_len,
            "tokens": args.tokens, "sequences": len(held_out), "marginal_steps": marginal_steps, "top_p": args.top_p,
            "max_candidates": args.max_candidates, "max_nodes": args.max_nodes, "checkpoints": checkpoints}


def _read_parts(path: Path | None, key: dict) -> dict[int, dict]:
    if path is None or not path.is_file():
        return {}
    parts = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a line cut short by a stop: that sequence is scored again
                break
            raise UserError(f"{path}:{number} is not JSON: the partial results are damaged; delete {path}") from None
        if record.get("key") != key:
            raise UserError(f"{path} holds partial results of another evaluation (other arguments or retrained "
                            f"checkpoints); delete it, or write --json elsewhere")
        parts[int(record["sequence"])] = record["scores"]
    return parts


def _append_part(path: Path, key: dict, index: int, scores: dict) -> None:
    with open(path, "a") as file:
        file.write(json.dumps({"key": key, "sequence": index, "scores": scores}) + "\n")
        file.flush()
        os.fsync(file.fileno())


# ----------------------------------------------------------------------------- plots


def plot_fig5(report: dict, labels: dict, path: Path) -> None:
    """Top-1 and top-5 accuracy per step (2 onwards) of marginalisation and each set of heads,
    as bars with their 95% intervals (the paper's Fig. 5), as a PNG.

    Args:
        report: eval-heads' report.
        labels: checkpoint name (a key of report["heads"]) -> its label.
        path: the PNG written.
    """
    import numpy as np

    plt = common.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    series = [("marginalisation", report["marginalisation"]["steps"])] + [
        (labels[name], heads["steps"]) for name, heads in report["heads"].items()]
    steps = [step["step"] for step in series[-1][1] if step["step"] > 1]
    width = 0.8 / len(series)
    for axis, k in zip(axes, TOP_K):
        name = f"top{k}"
        for index, (label, values) in enumerate(series):
            by_step = {value["step"]: value for value in values}
            shown = [step for step in steps if step in by_step]
            heights = np.array([by_step[step]["accuracy"][name] for step in shown])
            errors = np.array([[height - by_step[step]["interval"][name][0], by_step[step]["interval"][name][1] - height]
                               for step, height in zip(shown, heights)]).T
            axis.bar(np.array(shown) + (index - (len(series) - 1) / 2) * width, heights, width, yerr=errors,
                     capsize=2, label=label)
        axis.set_xticks(steps)
        axis.set_xlabel("step (token x_{t+step})")
        axis.set_title(f"top-{k} accuracy, held out")
    axes[0].set_ylabel("share of positions")
    axes[1].legend(fontsize=8)
    figure.suptitle(f"{report['model']}, {report['data']}: heads against marginalisation (95% bootstrap intervals)",
                    fontsize=10)
    common.save_figure(plt, figure, path)


def whs_layer_shares(model, sequences) -> dict:
    """What each WHS head reads: its softmax weights over the embeddings and the layers, and the
    share of the mixed state each gives once their sizes count (weight x the state's mean norm
    over `sequences`, normalised). The residual stream grows through the layers (SmolLM2's
    embeddings are a few hundredths of its last layer's norm), so a large weight on an early
    state can still be a small part of the mix.

    Args:
        model: MTPHeadsModel with weighted_hidden_states.
        sequences: token id lists (the held-out text).

    Returns:
        {"steps": [N], "weights": [N][L + 1], "state_norms": [L + 1], "norm_shares": [N][L + 1]}.
    """
    import torch

    device = model.unembed_weight.device
    norms, positions = None, 0
    with torch.no_grad():
        for sequence in sequences:
            outputs = model.backbone.base_model(input_ids=torch.tensor([list(sequence)], device=device),
                                                output_hidden_states=True)
            sizes = model.states_for_heads(outputs.hidden_states, all_layers=True).float().norm(dim=-1).sum((1, 2))
            norms = sizes if norms is None else norms + sizes
            positions += len(sequence)
        weights = model.layer_weights().detach()
        mean_norms = (norms / positions).to(weights.device)
        shares = weights * mean_norms
        shares = shares / shares.sum(-1, keepdim=True)
    return {"steps": list(model.steps), "weights": weights.cpu().tolist(), "state_norms": mean_norms.cpu().tolist(),
            "norm_shares": shares.cpu().tolist()}


def plot_layer_weights(layers: dict, title: str, path: Path) -> None:
    """Each WHS head's softmax weights over the embeddings (0) and the layers, and the share of
    the mix each gives with the states' sizes (whs_layer_shares), side by side, as a PNG.

    Args:
        layers: what whs_layer_shares returns.
        title: the figure's title.
        path: the PNG written.
    """
    plt = common.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    for axis, key, label in zip(axes, ("weights", "norm_shares"),
                                ("softmax weight", "share of the mix (weight x mean norm)")):
        for head, (step, row) in enumerate(zip(layers["steps"], layers[key])):
            axis.plot(range(len(row)), row, marker=".", label=f"head {head} (step {step})")
        axis.set_xlabel("state (0: embeddings, L: last layer)")
        axis.set_ylabel(label)
        axis.set_yscale("log")  # the middle layers' shares are orders of magnitude below the ends'
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    common.save_figure(plt, figure, path)
