"""End to end: SmolLM2-135M (dequantised Q4_1) served by vLLM's CPU build, greedy, on held-out
Bible text (the heads were trained on Austen): vLLM plain (the baseline), vLLM with n-gram
prompt lookup, vLLM with the committed exported heads (results/vllm/medusa-vllm, vLLM's Medusa),
and mtp_ext's speculative_generate with the same heads (results/vllm/medusa: HeadsDrafter's
default tree, and the chain of one guess per head that vLLM's proposer drafts) and
model.generate, at batch 1 (one prompt at a time) and batch 8 (all at once).
Runs in .venv-vllm (make vllm-env), one engine at a time, each after a warm-up pass:

    nice -n 10 .venv-vllm/bin/python -m pytest bench/bench_vllm.py --benchmark-json=bench/vllm.json
    .venv/bin/python bench/summarize.py bench/vllm.json

One round each ($BENCH_PROMPTS prompts of 64 tokens, $BENCH_NEW_TOKENS new tokens each, default 8
and 128): extra_info holds tokens/s, vLLM's mean acceptance length (1 + accepted tokens per
draft) or mtp_ext's mean tokens per verification step, and whether the outputs equal vLLM
plain's (mtp_ext's are compared with model.generate's: vLLM's float32 kernels may round a
near-tie differently).
"""
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here: run this in .venv-vllm (make vllm-env)")

from mtp_ext.integrations.vllm import VllmEngine, llm_arguments  # noqa: E402

PROMPTS = int(os.environ.get("BENCH_PROMPTS", 8))
PROMPT_TOKENS = 64
NEW_TOKENS = int(os.environ.get("BENCH_NEW_TOKENS", 128))
RESULTS = Path(__file__).resolve().parents[1] / "results" / "vllm"
HEADS = RESULTS / "medusa"
EXPORT = RESULTS / "medusa-vllm"
# vLLM's n-gram proposer as its docs set it up.
NGRAM = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}}
CONTENDERS = ("vllm_plain", "vllm_ngram", "vllm_medusa", "generate", "mtp_ext_heads", "mtp_ext_heads_chain")
# HeadsDrafter's tree arguments per contender: its default, and vLLM's chain.
TREES = {"mtp_ext_heads": {}, "mtp_ext_heads_chain": {"branching": (1, 1)}}

outputs = {}  # (contender, batch) -> token id lists, for the identity checks
_engine = {}  # the one live engine: contender -> VllmEngine


@pytest.fixture(scope="module")
def model_dir_and_prompts():
    from transformers import AutoTokenizer

    from mtp_ext import data as corpora
    from mtp_ext.models import model_cache_dir

    model_dir = model_cache_dir("smollm2-135m")
    if not (model_dir / "config.json").is_file():
        pytest.skip("SmolLM2-135M is not prepared (make prepare)")
    try:
        text = " ".join(english for english, _ in corpora.load_pairs("bible-en-es")[:600])
    except corpora.MissingDependencyError as error:
        pytest.skip(f"the Bible is not prepared: {error}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    yield model_dir, corpora.spread_prompts(tokenizer, text, PROMPTS, PROMPT_TOKENS)
    for engine in _engine.values():
        engine.close()


def vllm_engine(contender: str, model_dir: Path) -> VllmEngine:
    """The engine of `contender`, started (and warmed up) on first use; the previous one stops."""
    if contender not in _engine:
        for engine in _engine.values():
            engine.close()
        _engine.clear()
        arguments = {"vllm_plain": {}, "vllm_ngram": NGRAM}.get(contender)
        if arguments is None:
            if not (EXPORT / "config.json").is_file():
                pytest.skip(f"no exported heads in {EXPORT}")
            arguments = llm_arguments(EXPORT)
        _engine[contender] = VllmEngine(model_dir, arguments, max_batch=8)
    return _engine[contender]


@pytest.fixture(scope="module")
def hf_model(model_dir_and_prompts):
    from mtp_ext.models import load_model

    return load_model("smollm2-135m")[0]


def run_hf(model, prompts, batch: int, drafter=None):
    """model.generate, or speculative_generate with `drafter`: (token id lists, mean tokens per
    verification step or None)."""
    from mtp_ext.speculative import speculative_generate

    tokens, steps, per_step = [], 0, 0.0
    for first in range(0, len(prompts), batch):
        input_ids = torch.tensor(prompts[first:first + batch])
        if drafter is None:
            sequences = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                       max_new_tokens=NEW_TOKENS)
        else:
            result = speculative_generate(model, input_ids, drafter=drafter, max_new_tokens=NEW_TOKENS)
            sequences, stats = result.sequences, result.stats
            steps += stats.verification_steps
            per_step += stats.mean_accepted_per_step * stats.verification_steps
        tokens += [row[PROMPT_TOKENS:].tolist() for row in sequences]
    return tokens, (per_step / max(steps, 1) if drafter is not None else None)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("contender", CONTENDERS)
def test_vllm_and_mtp_ext(benchmark, model_dir_and_prompts, request, contender, batch):
    model_dir, prompts = model_dir_and_prompts
    benchmark.group = f"SmolLM2-135M greedy, bible, {PROMPTS} prompts x {NEW_TOKENS} new tokens, batch {batch}"
    benchmark.extra_info.update(contender=contender, baseline="vllm_plain", threads=torch.get_num_threads())
    if contender.startswith("vllm"):
        engine = vllm_engine(contender, model_dir)
        engine.generate(prompts[:batch], NEW_TOKENS, batch)  # warm-up
        run = benchmark.pedantic(engine.generate, args=(prompts, NEW_TOKENS, batch), rounds=1, iterations=1)
        tokens, new_tokens = run.token_ids, sum(map(len, run.token_ids))
        benchmark.extra_info["mean_acceptance_length"] = run.mean_acceptance_length
        reference = outputs.get(("vllm_plain", batch))
    else:
        from mtp_ext.speculative import HeadsDrafter

        model = request.getfixturevalue("hf_model")
        drafter = HeadsDrafter.load(HEADS, model, **TREES[contender]) if contender in TREES else None
        if drafter is not None:
            benchmark.extra_info["tree"] = {"branching": drafter.branching, "max_nodes": drafter.max_nodes}
        run_hf(model, prompts[:batch], batch, drafter)  # warm-up (and the linear-layer choices)
        tokens, per_step = benchmark.pedantic(run_hf, args=(model, prompts, batch, drafter), rounds=1, iterations=1)
        new_tokens = sum(map(len, tokens))
        if per_step is not None:
            benchmark.extra_info["mean_tokens_per_step"] = per_step
        reference = outputs.get(("generate", batch))
    outputs[(contender, batch)] = tokens
    benchmark.extra_info["tokens_per_second"] = new_tokens / benchmark.stats.stats.median
    if reference is not None:
        same = sum(ours == theirs for ours, theirs in zip(tokens, reference))
        benchmark.extra_info["identical_outputs"] = f"{same}/{len(tokens)}"
        assert same == len(tokens), f"{contender} differs from its plain decoding"
