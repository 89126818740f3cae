"""What issue's "done when" asks of each trained variant, read from its training record: steps,
training tokens (epochs over the cached windows count), wall time, the held-out loss of the
heads (steps 2-4) at the last point of its curve, and whether the curve has flattened: every
held-out point in the last 10% of the steps within 2% of the final held-out loss. Prints a
Markdown table; a variant still training can be read from its checkpoint (training_state.pt).

    .venv/bin/python results/heads/convergence_check.py results/heads/convergence/train-*.json
    .venv/bin/python results/heads/convergence_check.py /work/heads-convergence/whs/training_state.pt

A record whose curve holds no point in its last 10% of steps (eval-every too sparse) reports
"no points" rather than a verdict.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

LAST_SHARE = 0.1  # the last 10% of the steps
TOLERANCE = 0.02  # within 2% of the final held-out loss


def training_record(path: Path) -> dict:
    """The "training" record of a train.json, or the record inside a training checkpoint."""
    if path.suffix == ".pt":
        import torch

        return torch.load(path, map_location="cpu", weights_only=False)["record"]
    return json.loads(path.read_text())["training"]


def heads_loss(point: dict) -> float:
    """The mean held-out cross-entropy of the heads' steps (2 and later) at one curve point."""
    losses = [score["loss"] for score in point["held_out"] if score["step"] >= 2]
    return sum(losses) / len(losses)


def flattening(curve: list[dict], steps: int) -> tuple[str, float]:
    """(verdict, largest relative distance from the final loss among the last 10% of steps)."""
    if not curve:
        return "no curve", float("nan")
    final = heads_loss(curve[-1])
    late = [point for point in curve[:-1] if point["step"] >= steps * (1 - LAST_SHARE)]
    if not late:
        return "no points", float("nan")
    distance = max(abs(heads_loss(point) - final) / final for point in late)
    return ("flat" if distance <= TOLERANCE else "not flat"), distance


def main(paths: list[str]) -> None:
    print("| record | steps | training tokens | epochs | hours | held-out heads loss (first -> last) "
          "| last 10% within 2% of the final |")
    print("|---|---:|---:|---:|---:|---|---|")
    for name in paths:
        record = training_record(Path(name))
        curve = record.get("curve", [])
        verdict, distance = flattening(curve, record["step"])
        losses = f"{heads_loss(curve[0]):.3f} -> {heads_loss(curve[-1]):.3f}" if curve else "-"
        print(f"| {name} | {record['step']} | {record['tokens_seen']:,} | {record.get('epochs', 0):.2f} | "
              f"{record.get('seconds', 0) / 3600:.2f} | {losses} | {verdict} ({distance:.1%}) |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
