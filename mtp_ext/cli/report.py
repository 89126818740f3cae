"""`mtp-ext report`: one Markdown table and the Fig. 1 chart from eval.json / analysis.json."""
from __future__ import annotations

import argparse
from pathlib import Path

from mtp_ext._io import UserError, atomic_write_text, read_json, required_keys
from mtp_ext.cli import common
from mtp_ext.cli.eval_mtp import plot_accuracy

__all__ = ["NAME", "add_parser", "report_table", "run"]

NAME = "report"
EVAL_KEYS = ("model", "data", "task", "steps")
EVAL_STEP_KEYS = ("step", "positions", "accuracy", "accuracy_lower", "accuracy_upper", "captured_mass")
ANALYSIS_KEYS = ("model", "data", "summary")
ANALYSIS_SUMMARY_KEYS = ("positions", "mean_entropy", "mean_nucleus_size")


def add_parser(commands) -> None:
    """Adds the `mtp-ext report` subcommand to `commands`, the subparsers of `mtp-ext`."""
    parser = commands.add_parser(NAME, help="one table and the Fig. 1 chart from eval / analyze results")
    parser.add_argument("dirs", type=Path, nargs="+", help="directories holding eval.json and/or analysis.json")
    parser.add_argument("--out", type=Path, required=True, help="directory for report.md and fig1.png")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> str:
    """Runs `mtp-ext report`: writes report.md (and fig1.png, given evaluations) into --out.

    Returns:
        The Markdown table.
    """
    out = common.output_dir(args.out)
    evaluations, analyses = [], {}
    for directory in args.dirs:
        if not directory.is_dir():
            raise UserError(f"{directory} is not a directory")
        if (directory / "eval.json").is_file():
            evaluations.append(read_eval_json(directory / "eval.json"))
        if (directory / "analysis.json").is_file():
            analysis = read_analysis_json(directory / "analysis.json")
            analyses[(analysis["model"], analysis["data"])] = analysis["summary"]
    if not evaluations and not analyses:
        raise UserError("none of the directories holds eval.json or analysis.json")
    table = report_table(evaluations, analyses)
    atomic_write_text(out / "report.md", table + "\n")
    print(table)
    if evaluations:
        plot_accuracy(evaluations, out / "fig1.png")
    print(f"wrote {out}/report.md" + (", fig1.png" if evaluations else ""))
    return table


def read_eval_json(path: Path) -> dict:
    """An eval.json that `mtp-ext eval --json` wrote; a UserError naming the file and what it
    lacks otherwise."""
    remedy = "write it again with mtp-ext eval --json"
    report = required_keys(read_json(path, "the evaluation", remedy), EVAL_KEYS, path, "the evaluation", remedy)
    if not isinstance(report["steps"], list):
        raise UserError(f"the evaluation {path}: 'steps' is not a list; {remedy}")
    for index, step in enumerate(report["steps"]):
        required_keys(step, EVAL_STEP_KEYS, path, f"step {index + 1} of the evaluation", remedy)
    return report


def read_analysis_json(path: Path) -> dict:
    """An analysis.json that `mtp-ext analyze` wrote; a UserError naming the file and what it
    lacks otherwise."""
    remedy = "write it again with mtp-ext analyze"
    analysis = required_keys(read_json(path, "the analysis", remedy), ANALYSIS_KEYS, path, "the analysis", remedy)
    required_keys(analysis["summary"], ANALYSIS_SUMMARY_KEYS, path, "the summary of the analysis", remedy)
    return analysis


def report_table(evaluations: list[dict], analyses: dict) -> str:
    """One Markdown line per (model, data, step) of every evaluation, with the analysis of the
    same model and data beside it (and one line per analysis without an evaluation).

    Args:
        evaluations: eval.json reports (read_eval_json).
        analyses: (model, data) -> the summary of an analysis.json (read_analysis_json).

    Returns:
        The table.
    """
    lines = ["| model | data | task | step | positions | top-1 | top-5 (bounds) | captured mass | "
             "nucleus 0.99 | nucleus 0.9 | entropy |", "|" + "---|" * 11]
    for report in evaluations:
        analysis = analyses.get((report["model"], report["data"]), {})
        sizes = analysis.get("mean_nucleus_size", {})
        for step in report["steps"]:
            accuracy, lower, upper = step["accuracy"], step["accuracy_lower"], step["accuracy_upper"]
            lines.append(
                f"| {report['model']} | {report['data']} | {report['task']} | {step['step']} | {step['positions']} "
                f"| {accuracy.get('top1', float('nan')):.3f} | {accuracy.get('top5', float('nan')):.3f} "
                f"({lower.get('top5', float('nan')):.3f}-{upper.get('top5', float('nan')):.3f}) "
                f"| {step['captured_mass']:.3f} | {_number(sizes.get('0.99'))} | {_number(sizes.get('0.9'))} "
                f"| {_number(analysis.get('mean_entropy'), 3)} |")
    for (model, data), analysis in analyses.items():
        if not any((r["model"], r["data"]) == (model, data) for r in evaluations):
            sizes = analysis["mean_nucleus_size"]
            lines.append(f"| {model} | {data} | - | - | {analysis['positions']} | - | - | - "
                         f"| {_number(sizes.get('0.99'))} | {_number(sizes.get('0.9'))} "
                         f"| {_number(analysis['mean_entropy'], 3)} |")
    return "\n".join(lines)


def _number(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
