"""Tokens per verification pass of context-lookup drafting, replayed on model.generate's greedy
outputs: Hugging Face's prompt lookup (its own PromptLookupCandidateGenerator: the first earlier
match of the last n <= 2 tokens) against mtp_ext's LookupDrafter (the latest match, n <= 3), at
fixed chain lengths and with the adaptive length.

Greedy speculative decoding emits exactly model.generate's tokens, and a pass emits the accepted
prefix of its chain plus one token, so replaying the drafters on the greedy output gives their
tokens per pass exactly, without timing anything; what a pass of n tokens costs is measured
apart (bench_linear.py, bench_speculative.py).

    .venv/bin/python bench/lookup_acceptance.py [OUT.json]

Prompts as in bench_speculative.py ($BENCH_PROMPTS, $BENCH_NEW_TOKENS; every text).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

FIXED_LENGTHS = (1, 2, 3, 4, 6, 8)
TEXTS = ("austen", "shakespeare", "bible")


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


def replay_hf(outputs: list[list[int]], prompt_tokens: int, length: int) -> float:
    """Tokens per pass of Hugging Face's prompt lookup drafting `length` tokens."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    generator = PromptLookupCandidateGenerator(num_output_tokens=length, max_matching_ngram_size=2, max_length=10**6)
    passes = emitted = 0
    for output in outputs:
        position = prompt_tokens + 1  # the first new token comes from the prompt's pass
        while position < len(output):
            candidates, _ = generator.get_candidates(torch.tensor([output[:position]]))
            chain = candidates[0, position:].tolist()
            gained = accepted(chain, output[position:]) + 1
            passes, emitted, position = passes + 1, emitted + gained, position + gained
    return emitted / passes


def replay_mtp_ext(outputs: list[list[int]], prompt_tokens: int, length: int | None) -> float:
    """Tokens per pass of LookupDrafter: a fixed chain of `length` tokens, or None: adaptive."""
    from mtp_ext.speculative import LookupDrafter, VerifiedPass
    from mtp_ext.tree import DraftForest

    passes = emitted = 0
    for output in outputs:
        drafter = LookupDrafter(max_nodes=None if length is None else length + 1)
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
            passes, emitted, position = passes + 1, emitted + gained, position + gained
            if position >= len(output):
                break
            context[0].extend(output[len(context[0]):position])  # the decoder's context grows in place
            root = torch.tensor([output[position - 1]])
            previous = VerifiedPass(forest, None, None, torch.tensor([hits]), root, None, context=context)
    return emitted / passes


def main() -> None:
    import bench_speculative as bench
    from mtp_ext.models import load_model

    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2-135m")
    table = {}
    for text_name in TEXTS:
        outputs = greedy_outputs(model, tokenizer, text_name)
        row = {f"hf_{n}": replay_hf(outputs, bench.PROMPT_TOKENS, n) for n in FIXED_LENGTHS}
        row.update({f"mtp_ext_{n}": replay_mtp_ext(outputs, bench.PROMPT_TOKENS, n) for n in FIXED_LENGTHS})
        row["mtp_ext_adaptive"] = replay_mtp_ext(outputs, bench.PROMPT_TOKENS, None)
        table[text_name] = row
        print(text_name, " ".join(f"{name} {value:.2f}" for name, value in row.items()), flush=True)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps({"prompts": bench.PROMPTS, "new_tokens": bench.NEW_TOKENS,
                                                 "tokens_per_pass": table}, indent=2))


if __name__ == "__main__":
    main()
