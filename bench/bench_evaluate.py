"""End to end: evaluate_mtp (packed trees, one pass per level) against the plain ways of
computing the same step-2 marginals, on the SmolLM2 architecture, in one run.

Real SmolLM2-135M weights are used when they are prepared (make prepare); otherwise random
weights of the same config (the extra_info says which). Throughput is positions per second.
"""
import pytest
import torch

from conftest import smollm2_model
from mtp_ext import reference
from mtp_ext.evaluate import StepAccuracy, evaluate_mtp

SEQUENCE_LENGTH = 34  # 32 positions with a step-2 target
TOP_P = 0.99
MAX_CANDIDATES = 8


@pytest.fixture(scope="module")
def model_and_sequence():
    model, weights, _ = smollm2_model()
    generator = torch.Generator().manual_seed(0)
    sequence = torch.randint(0, model.config.vocab_size, (SEQUENCE_LENGTH,), generator=generator)
    # A natural-looking sequence: greedy continuation of a random start, so nuclei are realistic.
    with torch.no_grad():
        sequence = model.generate(sequence[None, :4], max_new_tokens=SEQUENCE_LENGTH - 4, do_sample=False,
                                  min_new_tokens=SEQUENCE_LENGTH - 4)[0]
    return model, sequence, weights


def step2_hits(marginals, sequence, captured):
    accuracy = StepAccuracy(2)
    accuracy.add(marginals, sequence[2:], (1 - captured).clamp(min=0), (1, 5))
    return accuracy.hits


@pytest.mark.parametrize("method", ["packed", "rerun", "cache_copy"])
def test_evaluate_step2(benchmark, model_and_sequence, method):
    model, sequence, weights = model_and_sequence
    positions = SEQUENCE_LENGTH - 2
    benchmark.group = f"evaluate_mtp steps=2, {positions} positions, cap {MAX_CANDIDATES}"
    benchmark.extra_info.update(contender=method, baseline="rerun", weights=weights,
                                threads=torch.get_num_threads())

    def run():
        if method == "packed":
            result = evaluate_mtp(model, [sequence.tolist()], steps=2, top_p=TOP_P, max_candidates=MAX_CANDIDATES,
                                  progress=False)
            return result.steps[1]["accuracy"]
        _, marginals, captured = reference.teacher_forced_marginals(model, sequence, TOP_P, MAX_CANDIDATES, method)
        hits = step2_hits(marginals, sequence, captured)
        return {f"top{k}": hits[k] / positions for k in hits}

    accuracy = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info["positions_per_second"] = positions / benchmark.stats.stats.median
    benchmark.extra_info["step2_accuracy"] = accuracy
