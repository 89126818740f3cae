"""The paper's findings on MTP heads, each decided from eval-heads' paired differences (the same
held-out positions for every variant, a bootstrap over the held-out sequences that resamples
them for both sides of a difference at once). Prints a Markdown table.

    .venv/bin/python results/heads/findings.py results/heads/convergence/eval-heads.json

A claim "A above B" holds at a step where the 95% interval of A - B lies above 0, does not hold
where it lies below 0, and cannot be told where it holds 0. Against marginalisation the exact
marginal is only known to lie between the capped tree's bounds, so "A falls short of
marginalisation" holds where A - (the lower bound) lies below 0, does not hold where A - (the
upper bound) lies above 0, and cannot be told in between. Every step from 2 that both sides have
(step 1 is the backbone's own prediction, shared by every frozen variant), top-1 and top-5.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

LOWER = "marginalisation's lower bound"
UPPER = "marginalisation's upper bound"
TOP_K = ("top1", "top5")

# (claim, A, B, how): "above": A above B; "short": A short of marginalisation; "below": A below B.
CLAIMS = (
    ("training helps: frozen heads above the untrained ones", "frozen", "untrained", "above"),
    ("frozen heads fall short of marginalisation", "frozen", None, "short"),
    ("WHS narrows the gap: WHS above frozen", "whs", "frozen", "above"),
    ("WHS does not close it: WHS short of marginalisation", "whs", None, "short"),
    ("joint training narrows the gap: joint above frozen", "joint", "frozen", "above"),
    ("joint above WHS", "joint", "whs", "above"),
    ("joint does not close it: joint short of marginalisation", "joint", None, "short"),
)
# Joint training changes the backbone: its own next-token prediction (step 1) against the
# backbone's (the untrained heads' step 1).
NEXT_TOKEN_COST = ("joint training costs next-token accuracy: joint's step 1 below the backbone's", "joint",
                   "untrained")


def pairs_of(report: dict) -> dict[tuple[str, str], dict[int, dict]]:
    """(A, B) -> step -> {"top{k}": {"difference", "interval"}}, and (B, A) negated for two sets of
    heads (eval-heads reports each against those listed before it, whichever order they came in)."""
    pairs = {}
    for pair in report["differences"]:
        steps = {step["step"]: step for step in pair["steps"]}
        pairs[(pair["a"], pair["b"])] = steps
        if not pair["b"].startswith("marginalisation"):
            pairs.setdefault((pair["b"], pair["a"]), {number: negated(step) for number, step in steps.items()})
    return pairs


def negated(step: dict) -> dict:
    """B - A from A - B: the difference and its interval turned round."""
    return {key: value if key == "step" else {"difference": -value["difference"],
                                               "interval": [-value["interval"][1], -value["interval"][0]]}
            for key, value in step.items()}


def above(cell: dict) -> str:
    low, high = cell["interval"]
    return "holds" if low > 0 else "does not hold" if high < 0 else "cannot tell"


def text(cell: dict) -> str:
    return f"{cell['difference']:+.3f} [{cell['interval'][0]:+.3f}, {cell['interval'][1]:+.3f}]"


def verdicts(report: dict) -> list[str]:
    """The table's lines: one per claim and step."""
    pairs = pairs_of(report)
    lines = ["| finding | step | top-1: verdict, A - B [95% interval] | top-5: verdict, A - B [95% interval] |",
             "|---|---:|---|---|"]
    for claim, a, b, how in CLAIMS:
        used = [(a, LOWER), (a, UPPER)] if how == "short" else [(a, b)]
        if any(key not in pairs for key in used):
            continue
        for step in sorted(set.intersection(*(set(pairs[key]) for key in used)) - {1}):
            cells = []
            for k in TOP_K:
                if how == "above":
                    cell = pairs[(a, b)][step][k]
                    cells.append(f"{above(cell)}, {text(cell)}")
                else:
                    below_lower, above_upper = pairs[(a, LOWER)][step][k], pairs[(a, UPPER)][step][k]
                    verdict = ("holds" if below_lower["interval"][1] < 0 else
                               "does not hold" if above_upper["interval"][0] > 0 else "cannot tell (between the bounds)")
                    cells.append(f"{verdict}, vs lower bound {text(below_lower)}, vs upper {text(above_upper)}")
            lines.append(f"| {claim} | {step} | " + " | ".join(cells) + " |")
    claim, a, b = NEXT_TOKEN_COST
    if (a, b) in pairs and 1 in pairs[(a, b)]:
        below = negated(pairs[(a, b)][1])  # B - A: above 0 where joint's step 1 lies below the backbone's
        cells = [f"{above(below[k])}, {text(pairs[(a, b)][1][k])}" for k in TOP_K]
        lines.append(f"| {claim} | 1 | " + " | ".join(cells) + " |")
    return lines


def main(path: str) -> None:
    print("\n".join(verdicts(json.loads(Path(path).read_text()))))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: findings.py EVAL_HEADS_JSON")
    main(sys.argv[1])
