"""End to end: speculative_generate with each drafter against model.generate, greedy, on the
real SmolLM2-135M (dequantised Q4_1) and 10 prompts of held-out text, 128 new tokens each, one
prompt at a time. $BENCH_TEXT picks the text: "austen" (default; the last novel, which the
heads of results/heads/ and the token head were not trained on), "shakespeare" (the last
play) or "bible" (the World English Bible, verses in order). speculative_generate runs the
model's linears through small_batch_linears (a few rows per pass, each layer on whichever of
small_batch_linear and F.linear is faster here), so model.generate also runs a second time
with them ("small_linears"): the speed-up over that is what the drafts themselves bring. What a
user of transformers would pick instead without training, prompt lookup decoding
(`prompt_lookup_num_tokens` 3 and 10), runs both ways too. Skipped, saying why, where the model
or the text is not prepared, for the heads drafter where no trained frozen-backbone heads are
found in $MTP_EXT_HEADS_DIR (default results/heads/; each subdirectory one checkpoint, the
first that loads is used), and for the token head drafter where $MTP_EXT_TOKEN_HEAD_DIR
(default results/token_head/; for "lookup_token_head_mixed" results/token_head_mixed/) holds no
TokenHead for SmolLM2. "default" is what speculative_generate drafts with unless told ("auto":
with the token head that `make prepare` installs for SmolLM2, lookup:token-head of
results/token_head_mixed/).

Slow on a CPU (each round generates 1,280 tokens), hence one round; $BENCH_PROMPTS and
$BENCH_NEW_TOKENS shrink it; $BENCH_BATCH decodes that many prompts at once (model.generate at
the same batch size; Hugging Face's prompt lookup takes batch 1 only, so it is skipped there);
$BENCH_TREE sets the heads' tree as "branching per depth/node budget" (default:
HeadsDrafter's, "3/4" on a CPU); $BENCH_SAMPLE=1 samples at temperature 0.7 and top-p 0.9 instead
of decoding greedily (every contender, each prompt with its own seed; the outputs then differ
from model.generate's by chance, so only the rates are compared: that sampling is lossless is a
test, python_tests/test_speculative.py):

    nice -n 10 .venv/bin/python -m pytest bench/bench_speculative.py --benchmark-json=bench/speculative.json
    .venv/bin/python bench/summarize.py bench/speculative.json

extra_info holds tokens/s, the mean tokens per verification step and whether every output
equals model.generate's.

On a shared machine a slow spell of a minute can halve one contender's speed. test_interleaved
runs the contenders named in $BENCH_INTERLEAVE prompt by prompt instead, the order rotating, so
that such a spell falls on all of them (greedy, or sampling with each batch's own seed):

    BENCH_INTERLEAVE=generate,small_linears,small_linears_prompt_lookup_3,small_linears_prompt_lookup_10,lookup,default \
        .venv/bin/python -m pytest bench/bench_speculative.py -k interleaved --benchmark-json=bench/speculative-interleaved-austen.json
"""
import os
import time
from pathlib import Path

import pytest
import torch

from mtp_ext.models.adapters import small_batch_linears
from mtp_ext.speculative import (
    HeadsDrafter,
    LookupDrafter,
    LookupFirstDrafter,
    MarginalDrafter,
    TokenHeadDrafter,
    default_drafter_name,
    resolve_drafter,
    speculative_generate,
)

TEXT = os.environ.get("BENCH_TEXT", "austen")
PROMPTS = int(os.environ.get("BENCH_PROMPTS", 10))
BATCH = int(os.environ.get("BENCH_BATCH", 1))
PROMPT_TOKENS = 64
NEW_TOKENS = int(os.environ.get("BENCH_NEW_TOKENS", 128))
TREE = os.environ.get("BENCH_TREE")
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.9} if os.environ.get("BENCH_SAMPLE") == "1" else {}
RESULTS = Path(__file__).resolve().parents[1] / "results"
HEADS_DIR = Path(os.environ.get("MTP_EXT_HEADS_DIR", RESULTS / "heads"))
TOKEN_HEAD_DIR = Path(os.environ.get("MTP_EXT_TOKEN_HEAD_DIR", RESULTS / "token_head"))
MIXED_TOKEN_HEAD_DIR = RESULTS / "token_head_mixed"  # trained on Austen, Shakespeare and the Bible

generate_outputs = {}  # prompt index -> model.generate's output, for the identity check


@pytest.fixture(scope="module")
def model_and_prompts():
    from mtp_ext import data as corpora
    from mtp_ext.models import load_model, model_cache_dir

    if not (model_cache_dir("smollm2-135m") / "config.json").is_file():
        pytest.skip("SmolLM2-135M is not prepared (make prepare)")
    try:
        text = held_out_text(corpora)
    except corpora.MissingDependencyError as error:
        pytest.skip(f"the {TEXT} text is not prepared: {error}")
    model, tokenizer = load_model("smollm2-135m")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    stride = len(ids) // 10  # the same first prompts whatever PROMPTS is
    prompts = [torch.tensor([ids[i * stride: i * stride + PROMPT_TOKENS]]) for i in range(PROMPTS)]
    # Batches of $BENCH_BATCH prompts (all of PROMPT_TOKENS tokens: no padding).
    return model, [torch.cat(prompts[i:i + BATCH]) for i in range(0, PROMPTS, BATCH)]


def held_out_text(corpora) -> str:
    """About 60,000 characters of $BENCH_TEXT that no committed drafter was trained on."""
    if TEXT == "austen":
        return corpora.load_text("austen")[-1][-60000:]
    if TEXT == "shakespeare":
        return corpora.load_text("shakespeare")[-1][-60000:]
    if TEXT == "bible":
        return " ".join(english for english, _ in corpora.load_pairs("bible-en-es")[:600])
    raise ValueError(f"BENCH_TEXT must be austen, shakespeare or bible, got {TEXT!r}")


def tree_shape() -> dict:
    """HeadsDrafter's tree arguments from $BENCH_TREE ("4,3,2,2/16"), or none for its default."""
    if not TREE:
        return {}
    branching, _, max_nodes = TREE.partition("/")
    shape = {"branching": tuple(int(width) for width in branching.split(","))}
    if max_nodes:
        shape["max_nodes"] = int(max_nodes)
    return shape


def trained_heads_drafter(model):
    """A HeadsDrafter for the first loadable checkpoint in HEADS_DIR, or a skip. Jointly trained
    heads are passed over: loading them would replace the backbone's weights."""
    reasons = []
    for directory in sorted(path for path in HEADS_DIR.glob("*") if path.is_dir()):
        if (directory / "backbone.safetensors").is_file():
            reasons.append(f"{directory.name}: joint (changes the backbone)")
            continue
        try:
            return HeadsDrafter.load(directory, model, **tree_shape()), directory.name
        except (ValueError, OSError, ImportError) as error:
            reasons.append(f"{directory.name}: {error}")
    pytest.skip(f"no trained heads for SmolLM2 under {HEADS_DIR} ({'; '.join(reasons) or 'none there'})")


def trained_token_head_drafter(model, directory: Path = TOKEN_HEAD_DIR):
    """A TokenHeadDrafter for the head in `directory`, or a skip."""
    try:
        return TokenHeadDrafter.load(directory, model), directory.name
    except (ValueError, OSError, ImportError) as error:
        pytest.skip(f"no trained token head for SmolLM2 in {directory}: {error}")


def run_generate(model, prompts, first_seed=0, **lookup):
    outputs = []
    for seed, prompt in enumerate(prompts, first_seed):
        torch.manual_seed(seed)
        outputs.append(model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                      **(SAMPLING or {"do_sample": False}), **lookup))
    return outputs, None


def run_generate_small_linears(model, prompts, first_seed=0, **lookup):
    with small_batch_linears(model):
        return run_generate(model, prompts, first_seed, **lookup)


def run_speculative(model, prompts, drafter, first_seed=0):
    results = [speculative_generate(model, prompt, drafter=drafter, max_new_tokens=NEW_TOKENS,
                                    generator=torch.Generator().manual_seed(seed), **SAMPLING)
               for seed, prompt in enumerate(prompts, first_seed)]
    return [result.sequences for result in results], [result.stats for result in results]


def greedy_ladder_lookup() -> LookupDrafter:
    """The lookup drafter climbing the greedy ladder under sampling too (what SAMPLING_CHAIN replaces)."""
    drafter = LookupDrafter()
    drafter.SAMPLING_CHAIN = LookupDrafter.ADAPTIVE_CHAIN
    return drafter


def lookup_first_drafter(model, directory: Path = TOKEN_HEAD_DIR):
    token_head, name = trained_token_head_drafter(model, directory)
    return LookupFirstDrafter(token_head), f"lookup, else {name}"


PEERS = {"generate": (run_generate, {}), "prompt_lookup_3": (run_generate, {"prompt_lookup_num_tokens": 3}),
         "prompt_lookup_10": (run_generate, {"prompt_lookup_num_tokens": 10}),
         "small_linears": (run_generate_small_linears, {}),
         "small_linears_prompt_lookup_3": (run_generate_small_linears, {"prompt_lookup_num_tokens": 3}),
         "small_linears_prompt_lookup_10": (run_generate_small_linears, {"prompt_lookup_num_tokens": 10})}
DRAFTERS = {"marginal": lambda _: (MarginalDrafter(), "marginal"), "heads": trained_heads_drafter,
            "token_head": trained_token_head_drafter, "lookup": lambda _: (LookupDrafter(), "lookup (adaptive chain)"),
            "lookup_fixed_3": lambda _: (LookupDrafter(max_nodes=4), "lookup, chains of 3"),
            "lookup_greedy_ladder": lambda _: (greedy_ladder_lookup(), "lookup, the greedy ladder whatever the rule"),
            "lookup_token_head": lookup_first_drafter,
            "lookup_token_head_mixed": lambda model: lookup_first_drafter(model, MIXED_TOKEN_HEAD_DIR),
            "default": lambda model: (resolve_drafter("auto", model), default_drafter_name(model))}


def contender_run(contender: str, model, extra_info: dict):
    """(prompts, first_seed=0) -> (outputs, stats or None) for one contender (a skip where it
    cannot run; batch i of prompts samples with seed first_seed + i), its description in extra_info."""
    if contender in PEERS:
        run, lookup = PEERS[contender]
        if lookup and BATCH > 1:
            pytest.skip("Hugging Face's prompt lookup decodes one sequence at a time")
        return lambda prompts, first_seed=0: run(model, prompts, first_seed, **lookup)
    if contender not in DRAFTERS:
        pytest.fail(f"unknown contender {contender!r}: use one of {', '.join(list(PEERS) + list(DRAFTERS))}")
    drafter, name = DRAFTERS[contender](model)
    extra_info["drafter"] = name
    if contender == "heads":
        extra_info["tree"] = {"branching": drafter.branching, "max_nodes": drafter.max_nodes}
    return lambda prompts, first_seed=0: run_speculative(model, prompts, drafter, first_seed)


def mean_tokens_per_step(stats) -> float:
    steps = sum(s.verification_steps for s in stats)
    return sum(s.mean_accepted_per_step * s.verification_steps for s in stats) / max(steps, 1)


def benchmark_group() -> str:
    decoding = "sampling at temperature 0.7, top-p 0.9" if SAMPLING else "greedy"
    return f"SmolLM2-135M {decoding}, {TEXT}, {PROMPTS} prompts x {NEW_TOKENS} new tokens, batch {BATCH}"


@pytest.mark.parametrize("contender", list(PEERS) + list(DRAFTERS))
def test_speculative_vs_generate(benchmark, model_and_prompts, contender):
    model, prompts = model_and_prompts
    function = contender_run(contender, model, benchmark.extra_info)
    benchmark.group = benchmark_group()
    benchmark.extra_info.update(contender=contender, baseline="generate", threads=torch.get_num_threads())
    outputs, stats = benchmark.pedantic(function, args=(prompts,), rounds=1, iterations=1)
    new_tokens = sum(output.numel() - prompt.numel() for output, prompt in zip(outputs, prompts))
    benchmark.extra_info["tokens_per_second"] = new_tokens / benchmark.stats.stats.median
    if contender == "generate":
        generate_outputs.update(enumerate(outputs))
        return
    if stats is not None:
        benchmark.extra_info["mean_tokens_per_step"] = mean_tokens_per_step(stats)
    if generate_outputs and not SAMPLING:
        same = [torch.equal(output, generate_outputs[index]) for index, output in enumerate(outputs)]
        benchmark.extra_info["identical_outputs"] = f"{sum(same)}/{len(same)}"
        assert all(same), "speculative output differs from model.generate's"


INTERLEAVED = [name for name in os.environ.get("BENCH_INTERLEAVE", "").split(",") if name]


def test_interleaved(benchmark, model_and_prompts):
    """The contenders of $BENCH_INTERLEAVE (comma-separated names, "generate" first for the
    identity check) on each batch of prompts in turn, the order rotating from batch to batch, so
    that a slow spell of a shared machine falls on all of them alike rather than on whichever
    ran then; under $BENCH_SAMPLE each batch keeps the seed it has in test_speculative_vs_generate.
    extra_info["contenders"] holds each one's seconds, tokens/s, tokens per step and, greedily,
    whether its outputs equal model.generate's."""
    if not INTERLEAVED:
        pytest.skip("set BENCH_INTERLEAVE=generate,small_linears,... to run contenders interleaved")
    model, prompts = model_and_prompts
    info = {name: {} for name in INTERLEAVED}
    runs = {name: contender_run(name, model, info[name]) for name in INTERLEAVED}
    outputs = {name: [] for name in INTERLEAVED}
    stats = {name: [] for name in INTERLEAVED}
    seconds = dict.fromkeys(INTERLEAVED, 0.0)

    def run_all():
        for index, prompt in enumerate(prompts):
            turn = index % len(INTERLEAVED)
            for name in INTERLEAVED[turn:] + INTERLEAVED[:turn]:
                start = time.perf_counter()
                output, stat = runs[name]([prompt], index)
                seconds[name] += time.perf_counter() - start
                outputs[name] += output
                stats[name] += stat or []

    benchmark.group = benchmark_group() + ", interleaved"
    benchmark.pedantic(run_all, rounds=1, iterations=1)
    new_tokens = {name: sum(output.numel() - prompt.numel() for output, prompt in zip(outputs[name], prompts))
                  for name in INTERLEAVED}
    reference, differing = None if SAMPLING else outputs.get("generate"), []
    for name in INTERLEAVED:
        info[name].update(seconds=seconds[name], tokens_per_second=new_tokens[name] / seconds[name])
        if stats[name]:
            info[name]["mean_tokens_per_step"] = mean_tokens_per_step(stats[name])
        if reference is not None and name != "generate":
            same = [torch.equal(output, want) for output, want in zip(outputs[name], reference)]
            info[name]["identical_outputs"] = f"{sum(same)}/{len(same)}"
            if not all(same):
                differing.append(name)
    benchmark.extra_info.update(contenders=info, threads=torch.get_num_threads())
    assert not differing, f"outputs differ from model.generate's: {differing}"
