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

    .venv/bin/python bench/lookup_acceptance.py [OUT.json] [--pass-cost bench/pass-cost.json]

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
# (doubling from 2 or 3; the lengths where the pass cost levels off, from 1, 2, 3 or 7).
ADAPTIVE_RULES = ((2, 4, 8, 15), (3, 6, 12, 15), (1, 3, 7, 15), (2, 3, 7, 15), (3, 7, 15), (7, 15), (3, 7))
TEXTS = ("austen", "shakespeare", "bible")
OUTPUTS = Path(__file__).resolve().parent / "greedy-outputs.json"


class Replay:
    """What a replayed rule did: tokens emitted and the tokens each pass verified."""

    def __init__(self):
        self.emitted = 0
        self.pass_tokens: list[int] = []  # per pass: the root and the drafted chain

    def add(self, chain_length: int, gained: int) -> None:
        self.pass_tokens.append(chain_length + 1)
        self.emitted += gained

    def tokens_per_pass(self) -> float:
        return self.emitted / len(self.pass_tokens)

    def speed(self, cost: dict[int, float]) -> float:
        """Tokens per unit of time, x one-token decoding, with `cost`: a pass's cost by its tokens
        (relative to one token; a count between measured ones takes the next measured above)."""
        measured = sorted(cost)

        def of(tokens: int) -> float:
            return cost[next((count for count in measured if count >= tokens), measured[-1])]

        return self.emitted / sum(of(tokens) for tokens in self.pass_tokens)


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
                   adaptive: tuple[int, ...] | None = None) -> Replay:
    """LookupDrafter replayed: a fixed chain of `length` tokens, or None: adaptive, along the
    ladder `adaptive` (chain lengths; None: the drafter's own for a CPU)."""
    from mtp_ext.speculative import LookupDrafter, VerifiedPass
    from mtp_ext.tree import DraftForest

    replay = Replay()
    for output in outputs:
        drafter = LookupDrafter(max_nodes=None if length is None else length + 1)
        if adaptive is not None:
            drafter.ADAPTIVE_CHAIN = {"cpu": adaptive}
        position = prompt_tokens + 1
        context = [output[:position]]
        root = torch.tensor([output[position - 1]])
        previous = VerifiedPass(DraftForest.roots(root), None, None, torch.zeros(1, dtype=torch.long), root, None,
                                context=context)
        while position < len(output):
            forest = drafter.draft(previous)
            chain = forest.token_ids[0, 1:forest.counts[0]].tolist()
            hits = accepted(chain, output[position:])
            gained = hits + 1
            replay.add(len(chain), gained)
            position += gained
            if position >= len(output):
                break
            context[0].extend(output[len(context[0]):position])  # the decoder's context grows in place
            root = torch.tensor([output[position - 1]])
            previous = VerifiedPass(forest, None, None, torch.tensor([hits]), root, None, context=context)
    return replay


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


def pass_cost(path: str) -> dict[int, float]:
    """A pass's cost by its tokens, relative to one token, from bench_pass_cost.py's JSON."""
    medians = {bench["extra_info"]["contender"]: bench["stats"]["median"]
               for bench in json.loads(Path(path).read_text())["benchmarks"]}
    return {int(name.split("_")[1]): median / medians["rows_1"] for name, median in medians.items()}


def main() -> None:
    import argparse

    import bench_speculative as bench

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?")
    parser.add_argument("--pass-cost", help="bench_pass_cost.py's JSON: predict each rule's speed")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cost = pass_cost(args.pass_cost) if args.pass_cost else None
    outputs = all_greedy_outputs(TEXTS)
    tokens_per_pass, speed, match_lengths = {}, {}, {}
    for text_name in TEXTS:
        replays = {f"hf_{n}": replay_hf(outputs[text_name], bench.PROMPT_TOKENS, n) for n in FIXED_LENGTHS}
        replays.update({f"mtp_ext_{n}": replay_mtp_ext(outputs[text_name], bench.PROMPT_TOKENS, n)
                        for n in FIXED_LENGTHS})
        replays.update({"mtp_ext_adaptive_" + "_".join(map(str, ladder)): replay_mtp_ext(
            outputs[text_name], bench.PROMPT_TOKENS, None, ladder) for ladder in ADAPTIVE_RULES})
        tokens_per_pass[text_name] = {name: replay.tokens_per_pass() for name, replay in replays.items()}
        match_lengths[text_name] = by_match_length(outputs[text_name], bench.PROMPT_TOKENS)
        if cost is not None:
            speed[text_name] = {name: replay.speed(cost) for name, replay in replays.items()}
        print(text_name, " ".join(f"{name} {value:.2f}" + (f" ({speed[text_name][name]:.2f}x)" if speed else "")
                                  for name, value in tokens_per_pass[text_name].items()), flush=True)
    if args.out:
        report = {"prompts": bench.PROMPTS, "new_tokens": bench.NEW_TOKENS, "tokens_per_pass": tokens_per_pass,
                  "accepted_of_3_by_match_length": match_lengths}
        if cost is not None:
            report.update(pass_cost=cost, predicted_speed_x_one_token_passes=speed)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
