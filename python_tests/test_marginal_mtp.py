"""MarginalMTP.predict: exact against brute force on tiny models of every supported
architecture, padding, and bad input."""
import itertools

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

import mtp_ext
from mtp_ext.models.adapters import UnsupportedModelError

from tiny_models import ARCHITECTURES, padded_batch, tiny_model

VOCAB = 11


def next_token_probs(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, -1].float()
    return torch.softmax(logits, -1)


def brute_force(model, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """p(x_{t+k}) summed over every path of k-1 tokens, each path run as its own sequence."""
    distributions = []
    for step in range(1, steps + 1):
        total = torch.zeros(VOCAB)
        for path in itertools.product(range(VOCAB), repeat=step - 1):
            weight = 1.0
            for depth in range(len(path)):
                weight *= float(next_token_probs(model, prompt + list(path[:depth]))[path[depth]])
            total += weight * next_token_probs(model, prompt + list(path))
        distributions.append(total)
    return distributions


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("steps", [2, 3])
def test_marginal_equals_brute_force(architecture, steps):
    model = tiny_model(architecture, VOCAB, seed=steps)
    prompt = [3, 1, 4, 1, 5, 9, 2]
    # top_p = 1 and room for every path: the marginal is exact.
    mtp = mtp_ext.MarginalMTP(model, top_p=1.0, max_candidates=VOCAB, max_nodes=VOCAB + VOCAB**2)
    predicted = mtp.predict(torch.tensor([prompt]), steps=steps)
    expected = brute_force(model, prompt, steps)
    assert len(predicted) == steps
    for step, (got, want) in enumerate(zip(predicted, expected), start=1):
        assert got.shape == (1, VOCAB)
        torch.testing.assert_close(got[0], want, atol=1e-5, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_rows_alone(architecture, padding_side):
    model = tiny_model(architecture, VOCAB, seed=7)
    prompts = [[2, 7, 1, 8, 2, 8], [3, 1, 4], [5, 5, 5, 5, 1]]
    input_ids, attention_mask = padded_batch(prompts, padding_side)
    mtp = mtp_ext.MarginalMTP(model, top_p=0.9, max_candidates=5, max_nodes=20)
    batched = mtp.predict(input_ids, attention_mask, steps=3)
    for row, prompt in enumerate(prompts):
        alone = mtp.predict(torch.tensor([prompt]), steps=3)
        for step in range(3):
            torch.testing.assert_close(batched[step][row], alone[step][0], atol=1e-5, rtol=0)


def test_pruned_marginal_is_a_sub_distribution_with_its_captured_mass():
    model = tiny_model("llama", VOCAB, seed=3)
    mtp = mtp_ext.MarginalMTP(model, top_p=0.5, max_candidates=2, max_nodes=4)
    prediction = mtp.predict_detailed(torch.tensor([[1, 2, 3, 4]]), steps=3)
    for distribution, captured in zip(prediction.distributions, prediction.captured_mass):
        torch.testing.assert_close(distribution.sum(1), captured.float(), atol=1e-5, rtol=0)
        assert float(captured) <= 1.0 + 1e-6
    assert prediction.captured_mass[1] < 1.0  # something was pruned
    assert int(prediction.tree_sizes[-1].max()) <= 4


def test_cache_is_left_as_the_prefix_only():
    model = tiny_model("llama", VOCAB, seed=1)
    mtp = mtp_ext.MarginalMTP(model, top_p=0.9, max_candidates=4)
    first = mtp.predict(torch.tensor([[1, 2, 3]]), steps=3)
    second = mtp.predict(torch.tensor([[1, 2, 3]]), steps=3)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_steps_one_is_the_model_distribution():
    model = tiny_model("gpt2", VOCAB)
    (step1,) = mtp_ext.MarginalMTP(model).predict(torch.tensor([[4, 2]]), steps=1)
    torch.testing.assert_close(step1[0], next_token_probs(model, [4, 2]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [0, -1, 1.5])
def test_bad_steps(steps):
    mtp = mtp_ext.MarginalMTP(tiny_model("llama", VOCAB))
    with pytest.raises(ValueError, match="steps"):
        mtp.predict(torch.tensor([[1, 2]]), steps=steps)


def test_unsupported_architecture_is_named():
    model = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=4, intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="'bert'.*supported: llama"):
        mtp_ext.MarginalMTP(model)


def test_input_longer_than_context():
    model = tiny_model("llama", VOCAB, context=8)
    with pytest.raises(ValueError, match="context of 8"):
        mtp_ext.MarginalMTP(model).predict(torch.ones(1, 8, dtype=torch.long), steps=2)


def test_empty_and_mismatched_inputs():
    mtp = mtp_ext.MarginalMTP(tiny_model("llama", VOCAB))
    with pytest.raises(ValueError, match="length >= 1"):
        mtp.predict(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        mtp.predict(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="all 0"):
        mtp.predict(torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("top_p", [0.0, 1.5, float("nan")])
def test_bad_top_p(top_p):
    with pytest.raises(ValueError, match="top_p"):
        mtp_ext.MarginalMTP(tiny_model("llama", VOCAB), top_p=top_p)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not mtp_ext.build_info()["cuda"],
                    reason="needs a CUDA device and the CUDA kernels")
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_cuda_prediction_equals_cpu(architecture):
    model = tiny_model(architecture, VOCAB, seed=9)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    settings = dict(top_p=0.95, max_candidates=4, max_nodes=12)
    on_cpu = mtp_ext.MarginalMTP(model, **settings).predict(prompt, steps=3)
    on_gpu = mtp_ext.MarginalMTP(model.cuda(), **settings).predict(prompt.cuda(), steps=3)
    for cpu_step, gpu_step in zip(on_cpu, on_gpu):
        torch.testing.assert_close(gpu_step.cpu(), cpu_step, atol=1e-4, rtol=0)
