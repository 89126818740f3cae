"""What one verification pass costs by the number of tokens it verifies: SmolLM2-135M (float32)
over a KV cache of 128 tokens of held-out Austen, R new tokens in one forward inside
small_batch_linears (as speculative_generate runs it), R = 1 .. 16 on a CPU. The ratios to R = 1
are what a drafter's extra nodes cost on this machine; with the tokens per pass that
bench/lookup_acceptance.py replays exactly, they predict a drafter's speed without timing it.
$BENCH_BATCH runs that many rows at once (the same tokens in each), R new tokens per row: what
a pass of a batch costs, against the batch's one-token step. $BENCH_DEVICE=cuda measures on the
GPU, R up to 64 (the lookup ladder's longer chains there); where SmolLM2 is not prepared (a GPU
machine gets no real weights) random weights of its config and random tokens stand in: a pass's
cost does not depend on the values.

    .venv/bin/python -m pytest bench/bench_pass_cost.py --benchmark-json=bench/pass-cost.json
    BENCH_BATCH=8 .venv/bin/python -m pytest bench/bench_pass_cost.py --benchmark-json=bench/pass-cost-batch8.json
    BENCH_DEVICE=cuda python -m pytest bench/bench_pass_cost.py --benchmark-json=pass-cost-cuda.json
    .venv/bin/python bench/summarize.py bench/pass-cost.json
"""
import os

import pytest
import torch

from conftest import smollm2_model, synchronize
from mtp_ext.models.adapters import small_batch_linears

DEVICE = os.environ.get("BENCH_DEVICE", "cpu")
ROWS = (1, 2, 3, 4, 6, 8, 12, 16) if DEVICE == "cpu" else (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
PREFIX = 128
BATCH = int(os.environ.get("BENCH_BATCH", 1))


@pytest.fixture(scope="module")
def model_and_tokens():
    from mtp_ext import data as corpora

    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("BENCH_DEVICE=cuda without a GPU")
    model, weights, tokenizer = smollm2_model(DEVICE)
    if tokenizer is None:
        ids = torch.randint(0, model.config.vocab_size, (PREFIX + max(ROWS),), generator=torch.Generator().manual_seed(0))
        return model, ids.repeat(BATCH, 1).to(DEVICE), weights
    try:
        text = corpora.load_text("austen")[-1][-60000:]
    except corpora.MissingDependencyError as error:
        pytest.skip(f"the austen text is not prepared: {error}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][: PREFIX + max(ROWS)]
    return model, torch.tensor([ids] * BATCH, device=DEVICE), weights


@pytest.mark.parametrize("rows", ROWS)
def test_pass_cost(benchmark, model_and_tokens, rows):
    from transformers import DynamicCache

    model, ids, weights = model_and_tokens
    benchmark.group = (f"SmolLM2-135M, one pass over a {PREFIX}-token KV cache, inside small_batch_linears, "
                       f"batch {BATCH}" + ("" if DEVICE == "cpu" else f", {DEVICE}"))
    benchmark.extra_info.update(contender=f"rows_{rows}", baseline="rows_1", batch=BATCH, device=DEVICE,
                                weights=weights, threads=torch.get_num_threads())
    with torch.no_grad(), small_batch_linears(model):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :PREFIX], past_key_values=cache, use_cache=True)

        def one_pass():
            extra = cache.get_seq_length() - PREFIX
            if extra:
                cache.crop(-extra)  # back to the prefix (transformers takes the tokens to drop)
            model(input_ids=ids[:, PREFIX:PREFIX + rows], past_key_values=cache, use_cache=True)
            synchronize(DEVICE)

        benchmark.pedantic(one_pass, rounds=30, warmup_rounds=3)
