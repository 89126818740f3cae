"""Tests of mtp_ext.marginal_accumulate against mtp_ext.reference (softmax in float32, then
the weighted sum)."""
import math

import pytest
import torch
from torch import Tensor

import mtp_ext
from mtp_ext import reference

CUDA_KERNELS = torch.cuda.is_available() and mtp_ext.build_info()["cuda"]
requires_cuda = pytest.mark.skipif(
    not CUDA_KERNELS, reason="needs a CUDA device and mtp_ext built with its CUDA kernels"
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Sizes around the kernels' chunks (CPU: 512 and 2048 entries; CUDA: 128 packs of 16 bytes, or
# of one entry when the vocabulary is not a multiple of the pack).
SHAPES = [(1, 1, 1), (2, 3, 7), (3, 5, 511), (4, 1, 513), (2, 7, 2049), (5, 16, 3001), (3, 6, 4104), (2, 3, 49152)]


def draw_weights(batch: int, candidates: int, generator: torch.Generator) -> Tensor:
    """Path probabilities [batch, candidates]: about a third of them 0 (padding), each row's
    live weights summing to at most 1."""
    weights = torch.rand((batch, candidates), generator=generator)
    weights[torch.rand((batch, candidates), generator=generator) < 0.35] = 0.0
    return weights / weights.sum(1, keepdim=True).clamp(min=1.0)


def draw_logits(batch: int, candidates: int, vocab: int, generator: torch.Generator, weights: Tensor,
                dtype=torch.float32) -> Tensor:
    """Language-model-like logits [batch, candidates, vocab]: a spread-out body, spikes, some
    -inf entries; rows of weight 0 hold garbage (NaN, +inf) that must never be read."""
    logits = torch.randn((batch, candidates, vocab), generator=generator) * 3
    spikes = torch.randint(0, vocab, (batch, candidates, 2), generator=generator)
    logits.scatter_add_(2, spikes, 10 + 5 * torch.rand((batch, candidates, 2), generator=generator))
    logits[torch.rand(logits.shape, generator=generator) < 0.05] = -math.inf
    logits.scatter_(2, spikes[..., :1], 1.0)  # at least one finite logit per row
    logits[weights == 0] = torch.where(torch.rand(vocab, generator=generator) < 0.5, math.nan, math.inf)
    return logits.to(dtype)


def assert_close_to_reference(result: Tensor, weights: Tensor, logits: Tensor):
    assert result.dtype == torch.float32 and result.shape == (logits.shape[0], logits.shape[2])
    expected = reference.marginal_accumulate(weights.cpu(), logits.cpu())
    # torch's fp32 softmax itself sums a 262144-entry row with a relative error near 2e-5.
    torch.testing.assert_close(result.cpu(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,candidates,vocab", SHAPES)
def test_matches_reference(batch, candidates, vocab, dtype, generator):
    weights = draw_weights(batch, candidates, generator)
    logits = draw_logits(batch, candidates, vocab, generator, weights, dtype)
    assert_close_to_reference(mtp_ext.marginal_accumulate(weights, logits), weights, logits)


def test_normalised_weights_give_a_distribution(generator):
    weights = torch.softmax(torch.randn((4, 9), generator=generator), dim=1)
    logits = torch.randn((4, 9, 1000), generator=generator) * 4
    marginal = mtp_ext.marginal_accumulate(weights, logits)
    torch.testing.assert_close(marginal.sum(1), torch.ones(4))
    assert (marginal >= 0).all()


def test_large_logits_do_not_overflow(generator):
    # Per-row maxima make the softmax stable far beyond exp's range.
    weights = torch.tensor([[0.5, 0.5]])
    logits = torch.randn((1, 2, 300), generator=generator) + torch.tensor([[[1e4]], [[-1e4]]]).reshape(1, 2, 1)
    assert_close_to_reference(mtp_ext.marginal_accumulate(weights, logits), weights, logits)


def test_one_hot_rows(generator):
    # A row with a single finite logit is a point mass: the marginal is the weights scattered.
    logits = torch.full((2, 3, 10), -math.inf)
    tokens = torch.tensor([[1, 4, 1], [9, 0, 2]])
    logits.scatter_(2, tokens[..., None], 0.0)
    weights = torch.tensor([[0.2, 0.3, 0.5], [0.0, 1.0, 0.25]])
    expected = torch.zeros((2, 10)).scatter_add_(1, tokens, weights)
    assert torch.equal(mtp_ext.marginal_accumulate(weights, logits), expected)


def test_zero_weights_give_zeros_and_read_nothing(generator):
    logits = torch.full((2, 3, 50), math.nan)
    assert torch.equal(mtp_ext.marginal_accumulate(torch.zeros((2, 3)), logits), torch.zeros((2, 50)))


def test_empty_shapes():
    assert mtp_ext.marginal_accumulate(torch.zeros((3, 0)), torch.zeros((3, 0, 5))).tolist() == [[0.0] * 5] * 3
    assert mtp_ext.marginal_accumulate(torch.zeros((0, 4)), torch.zeros((0, 4, 5))).shape == (0, 5)


VIEWS = {
    "vocab_strided": lambda x: x[..., ::2],  # stride(2) != 1: copied
    "candidates_sliced": lambda x: x[:, 1:],  # unit vocab stride: read in place
    "batch_strided": lambda x: x[::2],
    "transposed": lambda x: x.transpose(0, 1).contiguous().transpose(0, 1),
    "expanded": lambda x: x[:, :1].expand(-1, 4, -1),  # candidate stride 0
}


@pytest.mark.parametrize("view", list(VIEWS))
def test_non_contiguous_logits(view, generator):
    logits = VIEWS[view](torch.randn((6, 5, 1030), generator=generator) * 3)
    assert not logits.is_contiguous()
    weights = torch.rand(logits.shape[:2], generator=generator)
    result = mtp_ext.marginal_accumulate(weights, logits)
    assert torch.equal(result, mtp_ext.marginal_accumulate(weights, logits.contiguous()))
    assert_close_to_reference(result, weights, logits)


def test_same_result_with_any_thread_count(generator, restore_num_threads):
    weights = draw_weights(3, 20, generator)
    logits = draw_logits(3, 20, 7000, generator, weights)
    torch.set_num_threads(1)
    one_thread = mtp_ext.marginal_accumulate(weights, logits)
    torch.set_num_threads(2)
    assert torch.equal(mtp_ext.marginal_accumulate(weights, logits), one_thread)


# ----------------------------------------------------------------------------- torch.library


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_cpu(dtype, generator):
    weights = draw_weights(3, 4, generator)
    logits = torch.randn((3, 4, 100), generator=generator).to(dtype)
    torch.library.opcheck(torch.ops.mtp_ext.marginal_accumulate, (weights, logits))


def test_compile_fullgraph_matches_eager(generator):
    weights = draw_weights(3, 4, generator)
    logits = torch.randn((3, 4, 100), generator=generator)
    torch._dynamo.reset()
    compiled = torch.compile(mtp_ext.marginal_accumulate, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(weights, logits), mtp_ext.marginal_accumulate(weights, logits))


# ----------------------------------------------------------------------------- bad input

GOOD_WEIGHTS = torch.tensor([[0.5, 0.25, 0.0], [1.0, 0.0, 0.0]])
GOOD_LOGITS = torch.randn((2, 3, 8), generator=torch.Generator().manual_seed(0))


def _with_logit(b: int, n: int, value: float, whole_row: bool = False) -> Tensor:
    logits = GOOD_LOGITS.clone()
    if whole_row:
        logits[b, n] = value
    else:
        logits[b, n, 3] = value
    return logits


def _with_weight(value: float) -> Tensor:
    weights = GOOD_WEIGHTS.clone()
    weights[1, 2] = value
    return weights


BAD_INPUTS = {
    "weights_1d": (GOOD_WEIGHTS[0], GOOD_LOGITS, "weights must be 2-D"),
    "weights_float64": (GOOD_WEIGHTS.double(), GOOD_LOGITS, "weights must be float32"),
    "weights_negative": (_with_weight(-0.1), GOOD_LOGITS, r"weights must be finite and >= 0, got weights\[1, 2\]"),
    "weights_nan": (_with_weight(math.nan), GOOD_LOGITS, r"weights must be finite and >= 0, got weights\[1, 2\]"),
    "weights_inf": (_with_weight(math.inf), GOOD_LOGITS, r"weights must be finite and >= 0, got weights\[1, 2\]"),
    "logits_2d": (GOOD_WEIGHTS, GOOD_LOGITS[0], "logits must be 3-D"),
    "logits_int": (GOOD_WEIGHTS, GOOD_LOGITS.long(), "logits must be float32, bfloat16 or float16"),
    "logits_float64": (GOOD_WEIGHTS, GOOD_LOGITS.double(), "logits must be float32, bfloat16 or float16"),
    "logits_candidates": (GOOD_WEIGHTS, GOOD_LOGITS[:, :2], r"logits must have shape \[batch, candidates, vocab\]"),
    "logits_batch": (GOOD_WEIGHTS, GOOD_LOGITS[:1], r"logits must have shape \[batch, candidates, vocab\]"),
    "logits_no_vocab": (GOOD_WEIGHTS, GOOD_LOGITS[..., :0], "logits must have at least one vocabulary entry"),
    "live_row_nan": (GOOD_WEIGHTS, _with_logit(0, 1, math.nan), r"logits\[0, 1\] holds NaN or \+inf"),
    "live_row_pos_inf": (GOOD_WEIGHTS, _with_logit(1, 0, math.inf), r"logits\[1, 0\] holds NaN or \+inf"),
    "live_row_all_neg_inf": (GOOD_WEIGHTS, _with_logit(0, 0, -math.inf, whole_row=True), r"logits\[0, 0\] is all -inf"),
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_bad_input_raises(bad):
    weights, logits, message = BAD_INPUTS[bad]
    with pytest.raises(RuntimeError, match=message):
        mtp_ext.marginal_accumulate(weights, logits)


def test_garbage_in_rows_of_weight_zero_is_allowed():
    logits = _with_logit(0, 2, math.nan, whole_row=True)
    logits[1, 1] = -math.inf
    assert_close_to_reference(mtp_ext.marginal_accumulate(GOOD_WEIGHTS, logits), GOOD_WEIGHTS, logits)


# ----------------------------------------------------------------------------- CUDA (run on a GPU)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,candidates,vocab", SHAPES + [(8, 64, 49152), (2, 4, 262144)])
def test_cuda_equals_cpu(batch, candidates, vocab, dtype, generator):
    weights = draw_weights(batch, candidates, generator)
    logits = draw_logits(batch, candidates, vocab, generator, weights, dtype)
    on_gpu = mtp_ext.marginal_accumulate(weights.cuda(), logits.cuda())
    assert on_gpu.is_cuda
    # Same exponentials, sums added up in another order.
    torch.testing.assert_close(on_gpu.cpu(), mtp_ext.marginal_accumulate(weights, logits), rtol=1e-5, atol=1e-8)
    assert_close_to_reference(on_gpu, weights, logits)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("view", list(VIEWS))
def test_cuda_non_contiguous_logits(view, generator):
    logits = VIEWS[view](torch.randn((6, 5, 1030), generator=generator).cuda() * 3)
    weights = torch.rand(logits.shape[:2], generator=generator).cuda()
    assert_close_to_reference(mtp_ext.marginal_accumulate(weights, logits), weights, logits)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_cuda(dtype, generator):
    weights = draw_weights(3, 4, generator).cuda()
    logits = torch.randn((3, 4, 100), generator=generator).to(dtype).cuda()
    torch.library.opcheck(torch.ops.mtp_ext.marginal_accumulate, (weights, logits))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("bad", ["weights_negative", "weights_nan", "live_row_nan", "live_row_pos_inf",
                                 "live_row_all_neg_inf"])
def test_cuda_bad_values_raise(bad):
    weights, logits, message = BAD_INPUTS[bad]
    with pytest.raises(RuntimeError, match=message):
        mtp_ext.marginal_accumulate(weights.cuda(), logits.cuda())


@pytest.mark.cuda
@requires_cuda
def test_cuda_weights_on_cpu_raise():
    with pytest.raises(RuntimeError, match="weights are on cpu"):
        mtp_ext.marginal_accumulate(GOOD_WEIGHTS, GOOD_LOGITS.cuda())
