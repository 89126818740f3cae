"""evaluate_mtp: the packed teacher-forced evaluation agrees with the plain ways (re-running
the prefix per candidate, copying the cache per candidate) and with MarginalMTP.predict."""
import pytest
import torch

import mtp_ext
from mtp_ext import reference
from mtp_ext.evaluate import StepAccuracy, evaluate_mtp

from tiny_models import ARCHITECTURES, tiny_model

VOCAB = 13
TOP_K = (1, 3)


def random_sequence(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def accuracy_from(marginals, targets, captured, step):
    accuracy = StepAccuracy(step)
    accuracy.add(marginals, torch.tensor(targets), (1 - captured).clamp(min=0), TOP_K)
    return accuracy.summary()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("method", ["rerun", "cache_copy"])
def test_step2_matches_plain_marginalisation(architecture, method):
    model = tiny_model(architecture, VOCAB, seed=11)
    sequence = random_sequence(12, seed=5)
    result = evaluate_mtp(model, [sequence], steps=2, top_k=TOP_K, top_p=0.9, max_candidates=4, progress=False)
    step1, marginals, captured = reference.teacher_forced_marginals(model, torch.tensor(sequence), 0.9, 4, method)
    assert result.steps[0] == accuracy_from(step1, sequence[1:], torch.ones(len(sequence) - 1), 1)
    expected = accuracy_from(marginals, sequence[2:], captured, 2)
    for key in ("positions", "accuracy", "accuracy_lower", "accuracy_upper", "certain_topk_share"):
        assert result.steps[1][key] == expected[key], key
    assert result.steps[1]["captured_mass"] == pytest.approx(expected["captured_mass"], abs=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_step_matches_predict_on_each_prefix(architecture):
    model = tiny_model(architecture, VOCAB, seed=2)
    sequence = random_sequence(9, seed=8)
    settings = dict(top_p=0.8, max_candidates=3, max_nodes=9)
    result = evaluate_mtp(model, [sequence, sequence[:7]], steps=3, top_k=TOP_K, batch_size=2,
                          progress=False, tokens_per_pass=16, **settings)
    mtp = mtp_ext.MarginalMTP(model, **settings)
    for step in range(1, 4):
        accuracy = StepAccuracy(step)
        for row in (sequence, sequence[:7]):
            for anchor in range(len(row) - step):
                prediction = mtp.predict_detailed(torch.tensor([row[: anchor + 1]]), steps=step)
                left_out = (1 - prediction.captured_mass[-1]).clamp(min=0)
                accuracy.add(prediction.distributions[-1], torch.tensor([row[anchor + step]]), left_out, TOP_K)
        expected = accuracy.summary()
        got = result.steps[step - 1]
        for key in ("positions", "accuracy", "accuracy_lower", "accuracy_upper"):
            assert got[key] == expected[key], (step, key)


def test_full_trees_make_the_bounds_tight_and_pruned_ones_loose():
    model = tiny_model("llama", VOCAB, seed=4)
    sequences = [random_sequence(10, seed) for seed in range(3)]
    exact = evaluate_mtp(model, sequences, steps=2, top_k=TOP_K, top_p=1.0, max_candidates=VOCAB, progress=False)
    for name in ("top1", "top3"):
        step = exact.steps[1]
        assert step["accuracy_lower"][name] == step["accuracy"][name] == step["accuracy_upper"][name]
    pruned = evaluate_mtp(model, sequences, steps=2, top_k=TOP_K, top_p=0.3, max_candidates=1, progress=False)
    step = pruned.steps[1]
    assert step["captured_mass"] < 0.999
    assert step["accuracy_lower"]["top3"] <= step["accuracy"]["top3"] <= step["accuracy_upper"]["top3"]
    assert step["accuracy_lower"]["top3"] < step["accuracy_upper"]["top3"]


def test_translation_pairs_score_only_targets():
    model = tiny_model("gpt2", VOCAB, seed=6)
    pairs = [([1, 2, 3, 4], [5, 6, 7]), ([2, 2], [8, 9, 10, 11])]
    result = evaluate_mtp(model, pairs, steps=2, top_k=TOP_K, progress=False)
    assert result.steps[0]["positions"] == 3 + 4
    assert result.steps[1]["positions"] == 3 + 4  # x_{t+2} in the target, t >= 0
    assert result.settings["sequences"] == 2
    assert "top-1" in result.table(TOP_K)


def test_bad_requests():
    model = tiny_model("llama", VOCAB, context=16)
    with pytest.raises(ValueError, match="steps"):
        evaluate_mtp(model, [[1, 2, 3]], steps=0, progress=False)
    with pytest.raises(ValueError, match="no sequences"):
        evaluate_mtp(model, [], progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_mtp(model, [[1]], progress=False)
    with pytest.raises(ValueError, match="context of 16"):
        evaluate_mtp(model, [list(range(16))], steps=2, progress=False)
    with pytest.raises(ValueError, match="top_p"):
        evaluate_mtp(model, [[1, 2, 3]], top_p=0, progress=False)
