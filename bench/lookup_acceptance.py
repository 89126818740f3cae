"""Tokens per verification pass of context-lookup drafting, replayed on model.generate's greedy
outputs: Hugging Face's prompt lookup (its own PromptLookupCandidateGenerator: the first earlier
match of the last n <= 2 tokens) against mtp_ext's LookupDrafter (the latest match, n <= 3), at
fixed chain lengths and with the adaptive length; and how many tokens of a chain of 3 are
accepted after a match of 1, 2 or 3 tokens.

Greedy speculative decoding emits exactly model.generate's tokens, and a pass emits the accepted
prefix of its chain plus one token, so replaying the drafters on the greedy output gives their
tokens per pass exactly, without timing anything; what a pass of n tokens costs is measured
apart (bench_pass_cost.py). Given that measurement (a pytest-benchmark JSON), each rule's
predicted speed is its tokens over the summed cost of its passes, x one-token decoding.

    .venv/bin/python bench/lookup_acceptance.py [OUT.json] [--pass-cost bench/pass-cost.json ...]
        [--token-head results/token_head_mixed]

--token-head DIR replays that TokenHead too, alone and behind the lookup chain (the default
drafter's rule), at batch 1.

Each --pass-cost JSON (bench_pass_cost.py at $BENCH_BATCH) replays the rules at its batch size:
the benchmark's prompts in batches, each pass padded to its longest chain as
speculative_generate pads it, a finished row gone from the batch. A pass is charged by the
tokens it holds (rows x tokens per row) at the cost measured for the next count measured above
at that batch size, or, below the batch's own counts, at the largest smaller batch size measured.

Prompts as in bench_speculative.py ($BENCH_PROMPTS, $BENCH_NEW_TOKENS; every text). The greedy
outputs are kept in bench/greedy-outputs.json (made again when the prompts or lengths differ).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

FIXED_LENGTHS = (1, 2, 3, 4, 6, 8)
# Adaptive rules replayed: ladders of chain lengths as LookupDrafter.ADAPTIVE_CHAIN holds them
# (doubling from 2 or 3; the lengths where the pass cost levels off, from 1, 2, 3 or 7; short ones for
# a batch, whose pass is as long as its longest chain).
# The last four, up to 31 tokens, are for a GPU's pass costs (bench_pass_cost.py with
# BENCH_DEVICE=cuda measures up to 64): (10, 20, 31) is LookupDrafter's rule there.
ADAPTIVE_RULES = ((2, 4, 8, 15), (3, 6, 12, 15), (1, 3, 7, 15), (2, 3, 7, 15), (3, 7, 15), (7, 15), (3, 7), (1, 2), (2, 3),
                  (1, 3), (10, 20, 31), (4, 8, 16, 31), (8, 16, 31), (15, 31))
TEXTS = ("austen", "shakespeare", "bible")
OUTPUTS = Path(__file__).resolve().parent / "greedy-outputs.json"


class Replay:
    """What a replayed rule did: tokens emitted and, per pass, the rows still decoding and the
    tokens verified per row (a batch's rows are padded to its longest chain)."""

    def __init__(self, rows: int = 1):
        self.rows = rows
        self.emitted = 0
        self.passes: list[tuple[int, int]] = []  # per pass: (live rows, the root and the longest drafted chain)

    def add(self, chain_length: int, gained: int, live_rows: int = 1) -> None:
        self.passes.append((live_rows, chain_length + 1))
        self.emitted += gained

    def tokens_per_pass(self) -> float:
        """Tokens emitted per pass and row of the batch."""
        return self.emitted / self.rows / len(self.passes)

    def speed(self, cost: dict[int, float]) -> float:
        """Tokens per unit of time, x one-token decoding of the whole batch (every row to the
        end, as model.generate decodes it), with `cost`: a pass's cost by the tokens it holds
        (a count between measured ones takes the next measured above)."""
        counts = sorted(cost)

        def of(tokens: int) -> float:
            return cost[next((count for count in counts if count >= tokens), counts[-1])]

        one_token_passes = self.emitted / self.rows * of(self.rows)
        return one_token_passes / sum(of(rows * tokens) for rows, tokens in self.passes)


def all_greedy_outputs(texts) -> dict[str, list[list[int]]]:
    """model.generate's greedy continuations of the benchmark's prompts of every text, kept in
    OUTPUTS."""
    import bench_speculative as bench

    settings = {"prompts": bench.PROMPTS, "prompt_tokens": bench.PROMPT_TOKENS, "new_tokens": bench.NEW_TOKENS}
    if OUTPUTS.is_file():
        kept = json.loads(OUTPUTS.read_text())
        if kept["settings"] == settings and set(texts) <= set(kept["outputs"]):
            return kept["outputs"]
    from mtp_ext.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    outputs = {text_name: greedy_outputs(model, tokenizer, text_name) for text_name in texts}
    OUTPUTS.write_text(json.dumps({"settings": settings, "outputs": outputs}))
    return outputs


def greedy_outputs(model, tokenizer, text_name: str) -> list[list[int]]:
    """model.generate's greedy continuations of the benchmark's prompts of one text."""
    import bench_speculative as bench
    from mtp_ext import data as corpora

    bench.TEXT = text_name
    ids = tokenizer(bench.held_out_text(corpora), add_special_tokens=False, verbose=False)["input_ids"]
    stride = len(ids) // 10
    outputs = []
    for index in range(bench.PROMPTS):
        prompt = torch.tensor([ids[index * stride: index * stride + bench.PROMPT_TOKENS]])
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=bench.NEW_TOKENS,
                                do_sample=False)
        outputs.append(output[0].tolist())
    return outputs


def accepted(chain: list[int], target: list[int]) -> int:
    """How many of `chain`'s tokens greedy verification accepts against the true continuation."""
    count = 0
    while count < len(chain) and count < len(target) and chain[count] == target[count]:
        count += 1
    return count


def replay_hf(outputs: list[list[int]], prompt_tokens: int, length: int) -> Replay:
    """Hugging Face's prompt lookup drafting `length` tokens, replayed."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    generator = PromptLookupCandidateGenerator(num_output_tokens=length, max_matching_ngram_size=2, max_length=10**6)
    replay = Replay()
    for output in outputs:
        position = prompt_tokens + 1  # the first new token comes from the prompt's pass
        while position < len(output):
            candidates, _ = generator.get_candidates(torch.tensor([output[:position]]))
            chain = candidates[0, position:].tolist()
            gained = accepted(chain, output[position:]) + 1
            replay.add(len(chain), gained)
            position += gained
    return replay


def replay_mtp_ext(outputs: list[list[int]], prompt_tokens: int, length: int | None,
                   adaptive: tuple[int, ...] | None = None, batch: int = 1) -> Replay:
    """LookupDrafter replayed: a fixed chain of `length` tokens, or None: adaptive, along the
    ladder `adaptive` (chain lengths; None: the drafter's own for a CPU); `batch` outputs at a
    time in one pass, as speculative_generate decodes a batch (a row that has ended drafts
    nothing)."""
    replay = Replay(batch)
    for first in range(0, len(outputs) - batch + 1, batch):
        replay_rows(outputs[first:first + batch], prompt_tokens, length, adaptive, replay)
    return replay


def replay_rows(outputs: list[list[int]], prompt_tokens: int, length: int | None, adaptive: tuple[int, ...] | None,
                replay: Replay) -> None:
    """One batch of replay_mtp_ext: the rows of `outputs` decoded together, into `replay`."""
    from mtp_ext.speculative import LookupDrafter, VerifiedPass
    from mtp_ext.tree import DraftForest

    drafter = LookupDrafter(max_nodes=None if length is None else length + 1)
    if adaptive is not None:
        drafter.ADAPTIVE_CHAIN = drafter.BATCH_CHAIN = {"cpu": adaptive}
    positions = [prompt_tokens + 1] * len(outputs)  # the first new token comes from the prompt's pass
    context = [output[:prompt_tokens + 1] for output in outputs]
    roots = torch.tensor([output[prompt_tokens] for output in outputs])
    previous = VerifiedPass(DraftForest.roots(roots), None, None, torch.zeros(len(outputs), dtype=torch.long), roots,
                            None, context=context)
    while any(position < len(output) for position, output in zip(positions, outputs)):
        forest = drafter.draft(previous)
        hits, longest, gained, live = [], 0, 0, 0
        for row, output in enumerate(outputs):
            if positions[row] >= len(output):
                hits.append(0)
                continue
            live += 1
            chain = forest.token_ids[row, 1:forest.counts[row]].tolist()
            hits.append(accepted(chain, output[positions[row]:]))
            longest = max(longest, len(chain))
            step = min(hits[-1] + 1, len(output) - positions[row])
            gained += step
            positions[row] += step
            context[row].extend(output[len(context[row]):positions[row]])  # the decoder's context grows in place
        replay.add(longest, gained, live)
        roots = torch.tensor([output[min(position, len(output)) - 1] for position, output in zip(positions, outputs)])
        previous = VerifiedPass(forest, None, None, torch.tensor(hits), roots, None, context=context)


def replay_token_head(outputs: list[list[int]], prompt_tokens: int, model, directory: str,
                      lookup_first: bool = True) -> Replay:
    """The token head in DIR replayed at batch 1, behind the lookup chain (`lookup:token-head:DIR`,
    LookupFirstDrafter: what the default drafter is for SmolLM2) or alone: the drafters' own code,
    each pass's tree walked along the true continuation. The head reads the model's final-norm
    state at the last accepted token, here from one forward over each whole output (causal, so
    the states that the decoder's passes give)."""
    from mtp_ext.speculative import LookupFirstDrafter, TokenHeadDrafter, VerifiedPass
    from mtp_ext.tree import DraftForest

    head = TokenHeadDrafter.load(directory, model)
    replay = Replay()
    for output in outputs:
        drafter = LookupFirstDrafter(head) if lookup_first else head
        with torch.no_grad():
            states = model.model(torch.tensor([output])).last_hidden_state  # [1, T, H]
        position = prompt_tokens + 1  # the first new token comes from the prompt's pass
        context = output[:position]
        forest, stop = DraftForest.roots(torch.tensor([output[prompt_tokens]])), 0
        while position < len(output):
            # The state at position - 2 chose the root, output[position - 1]: the one state the
            # pass holds, at whichever slot the walk stopped.
            at_stop = torch.zeros((1, forest.size), dtype=torch.long)
            previous = VerifiedPass(forest, states[:, position - 2:position - 1], at_stop, torch.tensor([stop]),
                                    torch.tensor([output[position - 1]]), None, context=[context])
            forest = drafter.draft(previous)
            hits, stop = walked(forest, output[position:])
            step = min(hits + 1, len(output) - position)
            replay.add(int(forest.counts[0]) - 1, step)
            position += step
            context.extend(output[len(context):position])
    return replay


def walked(forest, target: list[int]) -> tuple[int, int]:
    """Greedy verification of row 0's tree against the true continuation: the tokens accepted
    and the slot of the last accepted node."""
    parents, tokens, count = forest.parents[0].tolist(), forest.token_ids[0].tolist(), int(forest.counts[0])
    node, depth = 0, 0
    while depth < len(target):
        child = next((slot for slot in range(1, count) if parents[slot] == node and tokens[slot] == target[depth]), None)
        if child is None:
            break
        node, depth = child, depth + 1
    return depth, node


def by_match_length(outputs: list[list[int]], prompt_tokens: int, length: int = 3) -> dict[int, dict]:
    """At every position of the greedy outputs, the tokens a chain of `length` from the latest
    match accepts, by the match's length (1-3 tokens; 0: no match): how well a match of each
    length predicts. Returns {match length: {"positions": count, "accepted": mean}}."""
    from mtp_ext.speculative.drafters import _NgramIndex

    sums, counts = [0] * 4, [0] * 4
    for output in outputs:
        context = output[:prompt_tokens + 1]
        indices = [_NgramIndex(context, n, n) for n in (1, 2, 3)]
        for position in range(prompt_tokens + 1, len(output)):
            match = next(((n, chain) for n in (3, 2, 1) if (chain := indices[n - 1].continuation(length))), (0, []))
            sums[match[0]] += accepted(match[1], output[position:])
            counts[match[0]] += 1
            context.append(output[position])
    return {n: {"positions": counts[n], "accepted": sums[n] / counts[n]} for n in range(4) if counts[n]}


def pass_cost(path: str) -> tuple[int, dict[int, float]]:
    """The batch and a pass's median seconds by the tokens it holds (rows x tokens per row),
    from bench_pass_cost.py's JSON."""
    benchmarks = json.loads(Path(path).read_text())["benchmarks"]
    batch = benchmarks[0]["extra_info"].get("batch", 1)
    return batch, {batch * int(bench["extra_info"]["contender"].split("_")[1]): bench["stats"]["median"]
                   for bench in benchmarks}


def batch_costs(measured: dict[int, dict[int, float]]) -> dict[int, dict[int, float]]:
    """Per batch size, a pass's cost by the tokens it holds relative to one token per row of the
    batch: the batch's own measurements, and below its smallest count (a batch whose finished rows
    have left) those of the smaller batch sizes."""
    costs = {}
    for batch, seconds in sorted(measured.items()):
        table = {count: value for smaller, below in measured.items() if smaller < batch
                 for count, value in below.items() if count < min(seconds)}
        table.update(seconds)
        costs[batch] = {count: value / seconds[batch] for count, value in sorted(table.items())}
    return costs


def replays_of(outputs: list[list[int]], prompt_tokens: int, batch: int) -> dict[str, Replay]:
    """Every rule replayed on one text's outputs, `batch` rows at a time (Hugging Face's prompt
    lookup at batch 1 only, as Hugging Face runs it)."""
    replays = {}
    if batch == 1:
        replays.update({f"hf_{n}": replay_hf(outputs, prompt_tokens, n) for n in FIXED_LENGTHS})
    replays.update({f"mtp_ext_{n}": replay_mtp_ext(outputs, prompt_tokens, n, batch=batch) for n in FIXED_LENGTHS})
    replays.update({"mtp_ext_adaptive_" + "_".join(map(str, ladder)): replay_mtp_ext(
        outputs, prompt_tokens, None, ladder, batch) for ladder in ADAPTIVE_RULES})
    return replays


def main() -> None:
    import argparse

    import bench_speculative as bench

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?")
    parser.add_argument("--pass-cost", nargs="+", default=[],
                        help="bench_pass_cost.py's JSON, one per batch size: replay at that batch and predict "
                             "each rule's speed")
    parser.add_argument("--token-head", metavar="DIR",
                        help="also replay the TokenHead in DIR at batch 1, alone and behind the lookup chain")
    args = parser.parse_args()
    torch.set_num_threads(2)
    costs = batch_costs(dict(pass_cost(path) for path in args.pass_cost)) or {1: None}
    outputs = all_greedy_outputs(TEXTS)
    model = None
    if args.token_head:
        from mtp_ext.models import load_model

        model = load_model("smollm2-135m")[0]
    report = {"prompts": bench.PROMPTS, "new_tokens": bench.NEW_TOKENS, "token_head": args.token_head,
              "accepted_of_3_by_match_length": {}}
    for batch, cost in costs.items():
        key = "" if batch == 1 else f"_batch_{batch}"
        tokens_per_pass, speed = report.setdefault("tokens_per_pass" + key, {}), {}
        for text_name in TEXTS:
            replays = replays_of(outputs[text_name], bench.PROMPT_TOKENS, batch)
            if model is not None and batch == 1:
                replays.update({name: replay_token_head(outputs[text_name], bench.PROMPT_TOKENS, model, args.token_head,
                                                        lookup_first) for name, lookup_first in
                                (("token_head", False), ("lookup_token_head", True))})
            tokens_per_pass[text_name] = {name: replay.tokens_per_pass() for name, replay in replays.items()}
            if cost is not None:
                speed[text_name] = {name: replay.speed(cost) for name, replay in replays.items()}
            print(f"{text_name}, batch {batch}:", " ".join(
                f"{name} {value:.2f}" + (f" ({speed[text_name][name]:.2f}x)" if speed else "")
                for name, value in tokens_per_pass[text_name].items()), flush=True)
        if cost is not None:
            report.update({"pass_cost" + key: cost, "predicted_speed_x_one_token_passes" + key: speed})
    for text_name in TEXTS:
        report["accepted_of_3_by_match_length"][text_name] = by_match_length(outputs[text_name], bench.PROMPT_TOKENS)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
