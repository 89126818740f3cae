"""Tests of mtp_ext.multihead_unembed_topk and mtp_ext.multihead_cross_entropy against
mtp_ext.reference (full logits per head in float32, then a stable sort / cross_entropy).

The kernels compute the logits in GEMM tiles, whose float32 sums may round differently from
the reference's one GEMM: random inputs are compared with a tolerance (and a top-k is checked to
be a valid top-k of the exact logits), integer-valued inputs (exact logits, many ties) exactly.
"""
import pytest
import torch
from torch import Tensor

import mtp_ext
from mtp_ext import reference

CUDA_KERNELS = torch.cuda.is_available() and mtp_ext.build_info()["cuda"]
requires_cuda = pytest.mark.skipif(
    not CUDA_KERNELS, reason="needs a CUDA device and mtp_ext built with its CUDA kernels"
)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (heads, rows, hidden size, vocab) around the top-k kernels' vocabulary tile of 4096.
SHAPES = [(1, 1, 8, 1), (2, 3, 16, 100), (3, 5, 24, 4095), (4, 7, 32, 4097), (2, 4, 64, 9000)]


def draw_inputs(heads: int, rows: int, size: int, vocab: int, generator: torch.Generator, dtype=torch.float32,
                device="cpu") -> tuple[Tensor, Tensor]:
    """hidden [heads, rows, size] and weight [vocab, size] giving logits of spread about 3."""
    hidden = torch.randn((heads, rows, size), generator=generator)
    weight = torch.randn((vocab, size), generator=generator) * (3 / size**0.5)
    return hidden.to(device, dtype), weight.to(device, dtype)


def draw_integer_inputs(heads: int, rows: int, size: int, vocab: int, generator: torch.Generator,
                        dtype=torch.float32, device="cpu") -> tuple[Tensor, Tensor]:
    """Small integers (exact in every dtype and every summation order), and weight rows
    repeated across the vocabulary: exact ties, also between tiles."""
    hidden = torch.randint(-2, 3, (heads, rows, size), generator=generator)
    distinct = torch.randint(-2, 3, (max(vocab // 7, 1), size), generator=generator)
    weight = distinct[torch.randint(0, distinct.shape[0], (vocab,), generator=generator)]
    return hidden.to(device, dtype), weight.to(device, dtype)


def exact_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    return torch.matmul(hidden.double().cpu(), weight.double().cpu().t())


def assert_valid_topk(result: mtp_ext.UnembedTopk, hidden: Tensor, weight: Tensor, k: int):
    """Values as the reference's (to float32 GEMM rounding), each the logit of its id, distinct
    ids per row, lse as the reference's."""
    heads, rows = hidden.shape[:2]
    assert result.values.shape == result.ids.shape == (heads, rows, k)
    assert result.lse.shape == (heads, rows)
    assert (result.values.dtype, result.ids.dtype, result.lse.dtype) == (torch.float32, torch.int64, torch.float32)
    values, _, lse = reference.multihead_unembed_topk(hidden.cpu(), weight.cpu(), k)
    torch.testing.assert_close(result.values.cpu(), values, rtol=1e-5, atol=1e-5)
    logits = exact_logits(hidden, weight)
    torch.testing.assert_close(logits.gather(2, result.ids.cpu()).float(), result.values.cpu(), rtol=1e-5, atol=1e-5)
    assert (result.ids.cpu().sort(-1).values.diff(dim=-1) > 0).all()
    torch.testing.assert_close(result.lse.cpu(), lse, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- unembed top-k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,rows,size,vocab", SHAPES)
@pytest.mark.parametrize("k", [1, 5, 64])
def test_topk_matches_reference(heads, rows, size, vocab, k, dtype, device, generator):
    k = min(k, vocab)
    hidden, weight = draw_inputs(heads, rows, size, vocab, generator, dtype, device)
    result = mtp_ext.multihead_unembed_topk(hidden, weight, k)
    assert result.values.device == hidden.device
    assert_valid_topk(result, hidden, weight, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 3, 17, 64])
# 18 rows take the CPU kernel's GEMM, 3 rows its dot products.
@pytest.mark.parametrize("heads,rows", [(3, 6), (1, 3)])
def test_topk_ties_go_to_the_lower_id(heads, rows, k, dtype, device, generator):
    hidden, weight = draw_integer_inputs(heads, rows, 12, 9001, generator, dtype, device)
    values, ids, lse = mtp_ext.multihead_unembed_topk(hidden, weight, k)
    expected_values, expected_ids, expected_lse = reference.multihead_unembed_topk(hidden.cpu(), weight.cpu(), k)
    assert torch.equal(values.cpu(), expected_values)
    assert torch.equal(ids.cpu(), expected_ids)
    torch.testing.assert_close(lse.cpu(), expected_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_of_the_whole_vocabulary_is_a_stable_sort(device, generator):
    hidden, weight = draw_integer_inputs(2, 3, 4, 50, generator, device=device)
    values, ids, _ = mtp_ext.multihead_unembed_topk(hidden, weight, 50)
    expected = torch.sort(exact_logits(hidden, weight).float(), dim=-1, descending=True, stable=True)
    assert torch.equal(values.cpu(), expected.values) and torch.equal(ids.cpu(), expected.indices)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_larger_than_a_tile(device, generator):
    hidden, weight = draw_integer_inputs(2, 3, 8, 9000, generator, device=device)
    values, ids, lse = mtp_ext.multihead_unembed_topk(hidden, weight, 5000)
    expected_values, expected_ids, expected_lse = reference.multihead_unembed_topk(hidden.cpu(), weight.cpu(), 5000)
    assert torch.equal(values.cpu(), expected_values) and torch.equal(ids.cpu(), expected_ids)
    torch.testing.assert_close(lse.cpu(), expected_lse)


def test_topk_same_result_with_any_thread_count(generator, restore_num_threads):
    # One thread walks all tiles with one running state; two threads split them and merge.
    hidden, weight = draw_integer_inputs(3, 40, 16, 20000, generator)
    torch.set_num_threads(1)
    one_thread = mtp_ext.multihead_unembed_topk(hidden, weight, 16)
    torch.set_num_threads(2)
    two_threads = mtp_ext.multihead_unembed_topk(hidden, weight, 16)
    assert torch.equal(one_thread.values, two_threads.values) and torch.equal(one_thread.ids, two_threads.ids)
    torch.testing.assert_close(one_thread.lse, two_threads.lse)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_huge_logits(device, generator):
    # Logits of magnitude about 1e5: the running log-sum-exp rescales instead of overflowing.
    hidden, weight = draw_inputs(2, 3, 16, 5000, generator, device=device)
    result = mtp_ext.multihead_unembed_topk(hidden * 3e4, weight, 8)
    assert torch.isfinite(result.lse).all()
    assert_valid_topk(result, hidden * 3e4, weight, 8)


def test_topk_empty_rows():
    result = mtp_ext.multihead_unembed_topk(torch.zeros((3, 0, 4)), torch.zeros((10, 4)), 2)
    assert result.values.shape == result.ids.shape == (3, 0, 2) and result.lse.shape == (3, 0)


def test_topk_non_contiguous_inputs(generator):
    hidden, weight = draw_inputs(3, 4, 16, 5000, generator)
    hidden, weight = hidden.transpose(0, 1).contiguous().transpose(0, 1), weight.t().contiguous().t()
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    assert_valid_topk(mtp_ext.multihead_unembed_topk(hidden, weight, 8), hidden, weight, 8)


# ----------------------------------------------------------------------------- cross-entropy


def draw_targets(heads: int, rows: int, vocab: int, generator: torch.Generator, ignore_index=-100,
                 ignored=0.2, device="cpu") -> Tensor:
    targets = torch.randint(0, vocab, (heads, rows), generator=generator)
    targets[torch.rand((heads, rows), generator=generator) < ignored] = ignore_index
    return targets.to(device)


def loss_and_grads(function, hidden: Tensor, weight: Tensor, *args):
    """function(hidden, weight, *args) and its gradients for hidden and weight."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = function(hidden, weight, *args)
    if not loss.requires_grad:  # the reference's loss when every target is ignored
        return loss, torch.zeros_like(hidden), torch.zeros_like(weight)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def assert_cross_entropy_matches_reference(hidden, weight, targets, head_weights=None, ignore_index=-100):
    loss, grad_hidden, grad_weight = loss_and_grads(mtp_ext.multihead_cross_entropy, hidden, weight, targets,
                                                    head_weights, ignore_index)
    cpu_weights = None if head_weights is None else head_weights.cpu()
    expected = loss_and_grads(reference.multihead_cross_entropy, hidden.cpu(), weight.cpu(), targets.cpu(),
                              cpu_weights, ignore_index)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad_hidden.dtype == hidden.dtype and grad_weight.dtype == weight.dtype
    # Gradients round to the input dtype at the end.
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[hidden.dtype]
    torch.testing.assert_close(loss.cpu(), expected[0], rtol=1e-5, atol=1e-6)
    # A gradient entry is a sum with cancellation: its error scales with the largest entries.
    for got, want in zip((grad_hidden, grad_weight), expected[1:]):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.cpu(), want, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,rows,size,vocab", SHAPES)
def test_cross_entropy_matches_reference(heads, rows, size, vocab, dtype, device, generator):
    hidden, weight = draw_inputs(heads, rows, size, vocab, generator, dtype, device)
    targets = draw_targets(heads, rows, vocab, generator, device=device)
    assert_cross_entropy_matches_reference(hidden, weight, targets)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_in_several_chunks(device, generator):
    # 2 * 400 rows of a 49,152 vocabulary do not fit one chunk of 2^25 logits.
    hidden, weight = draw_inputs(2, 400, 8, 49152, generator, device=device)
    targets = draw_targets(2, 400, 49152, generator, device=device)
    assert_cross_entropy_matches_reference(hidden, weight, targets)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_head_weights_and_ignore_index(device, generator):
    hidden, weight = draw_inputs(3, 20, 16, 300, generator, device=device)
    targets = draw_targets(3, 20, 300, generator, ignore_index=-1, ignored=0.4, device=device)
    head_weights = torch.tensor([0.5, 2.0, 0.0], device=device)
    assert_cross_entropy_matches_reference(hidden, weight, targets, head_weights, ignore_index=-1)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_head_without_targets_adds_nothing(device, generator):
    hidden, weight = draw_inputs(2, 6, 16, 50, generator, device=device)
    targets = draw_targets(2, 6, 50, generator, ignored=0.0, device=device)
    targets[1] = -100
    loss, grad_hidden, _ = loss_and_grads(mtp_ext.multihead_cross_entropy, hidden, weight, targets)
    only_head_0 = mtp_ext.multihead_cross_entropy(hidden[:1], weight, targets[:1], torch.tensor([0.5], device=device))
    torch.testing.assert_close(loss, only_head_0)
    assert torch.equal(grad_hidden[1], torch.zeros_like(grad_hidden[1]))
    ignored_rows = targets[0] == -100
    assert grad_hidden[0][~ignored_rows].abs().sum() > 0


def test_cross_entropy_without_grad_skips_the_gradients(generator):
    hidden, weight = draw_inputs(2, 5, 8, 100, generator)
    targets = draw_targets(2, 5, 100, generator)
    head_weights = torch.full((2,), 0.5)
    outputs = torch.ops.mtp_ext.multihead_cross_entropy(hidden, weight, targets, head_weights, -100, False, False)
    assert outputs[2].numel() == 0 and outputs[3].numel() == 0
    torch.testing.assert_close(outputs[0], reference.multihead_cross_entropy(hidden, weight, targets))
    with torch.no_grad():
        assert torch.equal(mtp_ext.multihead_cross_entropy(hidden.requires_grad_(), weight, targets), outputs[0])


def test_cross_entropy_head_weights_gradient_is_the_head_losses(generator):
    hidden, weight = draw_inputs(3, 8, 8, 60, generator)
    targets = draw_targets(3, 8, 60, generator)
    head_weights = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    mtp_ext.multihead_cross_entropy(hidden, weight, targets, head_weights).backward()
    for head in range(3):
        one_head = torch.zeros(3).index_fill_(0, torch.tensor(head), 1.0)
        expected = reference.multihead_cross_entropy(hidden, weight, targets, one_head)
        torch.testing.assert_close(head_weights.grad[head], expected)


def test_cross_entropy_gradcheck(generator):
    hidden, weight = draw_inputs(2, 3, 4, 7, generator, torch.float64)
    targets = torch.tensor([[0, 6, -100], [3, 3, 1]])
    head_weights = torch.tensor([0.3, 0.9], dtype=torch.float64, requires_grad=True)
    hidden.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w, hw: mtp_ext.multihead_cross_entropy(h, w, targets, hw), (hidden, weight, head_weights)
    )


def test_cross_entropy_grad_output_scales_the_gradients(generator):
    hidden, weight = draw_inputs(2, 4, 8, 30, generator)
    targets = draw_targets(2, 4, 30, generator)
    _, grad_hidden, grad_weight = loss_and_grads(mtp_ext.multihead_cross_entropy, hidden, weight, targets)
    _, scaled_hidden, scaled_weight = loss_and_grads(
        lambda h, w, t: 3.0 * mtp_ext.multihead_cross_entropy(h, w, t), hidden, weight, targets
    )
    torch.testing.assert_close(scaled_hidden, 3.0 * grad_hidden)
    torch.testing.assert_close(scaled_weight, 3.0 * grad_weight)


@pytest.mark.parametrize("heads,rows", [(2, 0), (0, 3)])
def test_cross_entropy_empty_shapes(heads, rows, generator):
    hidden, weight = draw_inputs(heads, rows, 4, 10, generator)
    loss, grad_hidden, grad_weight = loss_and_grads(mtp_ext.multihead_cross_entropy, hidden, weight,
                                                    torch.zeros((heads, rows), dtype=torch.long))
    assert loss.item() == 0.0 and grad_hidden.shape == (heads, rows, 4)
    assert torch.equal(grad_weight, torch.zeros_like(weight))


def test_cross_entropy_huge_logits(generator):
    hidden, weight = draw_inputs(2, 5, 16, 400, generator)
    targets = draw_targets(2, 5, 400, generator)
    assert_cross_entropy_matches_reference(hidden * 1e4, weight, targets)


# ----------------------------------------------------------------------------- torch.library


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_unembed_topk(dtype, device, generator):
    hidden, weight = draw_inputs(2, 3, 8, 100, generator, dtype, device)
    torch.library.opcheck(torch.ops.mtp_ext.multihead_unembed_topk, (hidden, weight, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, False)])
def test_opcheck_cross_entropy(grads, device, generator):
    hidden, weight = draw_inputs(2, 3, 8, 100, generator, device=device)
    targets = draw_targets(2, 3, 100, generator, device=device)
    hidden.requires_grad_(grads[0])
    weight.requires_grad_(grads[1])
    head_weights = torch.tensor([0.25, 0.75], device=device)
    torch.library.opcheck(torch.ops.mtp_ext.multihead_cross_entropy,
                          (hidden, weight, targets, head_weights, -100, *grads))


def test_compile_fullgraph_matches_eager(generator):
    hidden, weight = draw_inputs(2, 3, 8, 100, generator)
    targets = draw_targets(2, 3, 100, generator)
    torch._dynamo.reset()
    topk = torch.compile(mtp_ext.multihead_unembed_topk, fullgraph=True, backend="aot_eager")
    for got, expected in zip(topk(hidden, weight, 5), mtp_ext.multihead_unembed_topk(hidden, weight, 5)):
        assert torch.equal(got, expected)
    cross_entropy = torch.compile(mtp_ext.multihead_cross_entropy, fullgraph=True, backend="aot_eager")
    compiled = loss_and_grads(cross_entropy, hidden, weight, targets)
    eager = loss_and_grads(mtp_ext.multihead_cross_entropy, hidden, weight, targets)
    for got, expected in zip(compiled, eager):
        assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- bad input

HIDDEN = torch.randn((2, 3, 8), generator=torch.Generator().manual_seed(0))
WEIGHT = torch.randn((10, 8), generator=torch.Generator().manual_seed(1))
TARGETS = torch.tensor([[1, 2, 3], [4, -100, 9]])

BAD_TOPK = {
    "hidden_2d": ((HIDDEN[0], WEIGHT, 2), RuntimeError, "hidden must be 3-D"),
    "weight_3d": ((HIDDEN, WEIGHT[None], 2), RuntimeError, "weight must be 2-D"),
    "hidden_size": ((HIDDEN, WEIGHT[:, :7], 2), RuntimeError, "hidden size mismatch"),
    "hidden_int": ((HIDDEN.long(), WEIGHT.long(), 2), RuntimeError, "hidden must be float32, bfloat16 or float16"),
    "hidden_float64": ((HIDDEN.double(), WEIGHT.double(), 2), RuntimeError, "hidden must be float32"),
    "dtypes_differ": ((HIDDEN, WEIGHT.half(), 2), RuntimeError, "weight must have hidden's dtype"),
    "k_zero": ((HIDDEN, WEIGHT, 0), RuntimeError, r"k must lie in \[1, vocab = 10\], got 0"),
    "k_above_vocab": ((HIDDEN, WEIGHT, 11), RuntimeError, r"k must lie in \[1, vocab = 10\], got 11"),
    "k_float": ((HIDDEN, WEIGHT, 2.5), ValueError, "k must be an integer"),
    "weight_on_meta": ((HIDDEN, WEIGHT.to("meta"), 2), ValueError, "weight is on meta but hidden is on cpu"),
}


@pytest.mark.parametrize("bad", list(BAD_TOPK))
def test_topk_bad_input_raises(bad):
    args, error, message = BAD_TOPK[bad]
    with pytest.raises(error, match=message):
        mtp_ext.multihead_unembed_topk(*args)


BAD_CROSS_ENTROPY = {
    "hidden_2d": ((HIDDEN[0], WEIGHT, TARGETS), RuntimeError, "hidden must be 3-D"),
    "hidden_size": ((HIDDEN, WEIGHT[:, :7], TARGETS), RuntimeError, "hidden size mismatch"),
    "dtypes_differ": ((HIDDEN, WEIGHT.double(), TARGETS), RuntimeError, "weight must have hidden's dtype"),
    "targets_1d": ((HIDDEN, WEIGHT, TARGETS[0]), RuntimeError, r"targets must have shape \[heads, rows\] = \[2, 3\]"),
    "targets_shape": ((HIDDEN, WEIGHT, TARGETS[:, :2]), RuntimeError, r"targets must have shape \[heads, rows\]"),
    "targets_int32": ((HIDDEN, WEIGHT, TARGETS.int()), RuntimeError, "targets must be int64"),
    "target_vocab": ((HIDDEN, WEIGHT, TARGETS.clone().fill_(10)), RuntimeError,
                     r"targets must lie in \[0, vocab = 10\) or equal ignore_index = -100, got targets\[0, 0\] = 10"),
    "target_negative": ((HIDDEN, WEIGHT, torch.tensor([[1, 2, 3], [4, -1, 9]])), RuntimeError,
                        r"got targets\[1, 1\] = -1"),
    "head_weights_length": ((HIDDEN, WEIGHT, TARGETS, torch.ones(3)), RuntimeError,
                            r"head_weights must have shape \[heads\] = \[2\], got \[3\]"),
    "head_weights_int": ((HIDDEN, WEIGHT, TARGETS, torch.ones(2, dtype=torch.long)), RuntimeError,
                         "head_weights must be a floating-point tensor"),
    "targets_on_meta": ((HIDDEN, WEIGHT, TARGETS.to("meta")), ValueError, "targets is on meta but hidden is on cpu"),
}


@pytest.mark.parametrize("bad", list(BAD_CROSS_ENTROPY))
def test_cross_entropy_bad_input_raises(bad):
    args, error, message = BAD_CROSS_ENTROPY[bad]
    with pytest.raises(error, match=message):
        mtp_ext.multihead_cross_entropy(*args)


def test_cross_entropy_other_ignore_index_is_a_bad_target():
    with pytest.raises(RuntimeError, match=r"got targets\[1, 1\] = -100"):
        mtp_ext.multihead_cross_entropy(HIDDEN, WEIGHT, TARGETS, ignore_index=-1)


# ----------------------------------------------------------------------------- CUDA (run on a GPU)


@pytest.mark.cuda
@requires_cuda
def test_cuda_weight_on_cpu_raises():
    with pytest.raises(RuntimeError, match="weight is on cpu but hidden is on cuda"):
        torch.ops.mtp_ext.multihead_unembed_topk(HIDDEN.cuda(), WEIGHT, 2)
    with pytest.raises(RuntimeError, match="targets are on cpu but hidden is on cuda"):
        torch.ops.mtp_ext.multihead_cross_entropy(HIDDEN.cuda(), WEIGHT.cuda(), TARGETS, torch.ones(2).cuda(),
                                                  -100, False, False)


@pytest.mark.cuda
@requires_cuda
def test_cuda_bad_target_raises():
    with pytest.raises(RuntimeError, match=r"got targets\[0, 0\] = 10"):
        mtp_ext.multihead_cross_entropy(HIDDEN.cuda(), WEIGHT.cuda(), TARGETS.clone().fill_(10).cuda())


@pytest.mark.cuda
@requires_cuda
def test_cuda_cross_entropy_gradcheck(generator):
    hidden, weight = draw_inputs(2, 3, 4, 7, generator, torch.float64, "cuda")
    targets = torch.tensor([[0, 6, -100], [3, 3, 1]], device="cuda")
    hidden.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: mtp_ext.multihead_cross_entropy(h, w, targets), (hidden, weight))


# ----------------------------------------------------------------------------- NaN, threads, second derivative


def test_topk_of_nan_logits_ranks_them_first():
    # NaN ranks above every number, as in torch.sort: fewer than k numbers must still give k ids.
    hidden = torch.full((1, 1, 4), float("nan"))
    weight = torch.randn(10, 4)
    values, ids, lse = mtp_ext.multihead_unembed_topk(hidden, weight, 3)
    assert ids.tolist() == [[[0, 1, 2]]]
    assert torch.isnan(values).all() and torch.isnan(lse).all()


@pytest.mark.parametrize("k", [1, 4, 10])
def test_topk_with_a_nan_weight_row_equals_reference(k, generator):
    hidden, weight = draw_inputs(2, 3, 8, 10, generator)
    weight[6] = float("nan")
    values, ids, lse = mtp_ext.multihead_unembed_topk(hidden, weight, k)
    expected_values, expected_ids, expected_lse = reference.multihead_unembed_topk(hidden, weight, k)
    assert ids[..., 0].eq(6).all() and torch.isnan(values[..., 0]).all() and torch.isnan(lse).all()
    assert ((ids >= 0) & (ids < 10)).all()
    assert torch.equal(ids[..., :2], expected_ids[..., :2])  # NaN first, then the clear best
    torch.testing.assert_close(values[..., 1:], expected_values[..., 1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [3, 9, 40, 300])
@pytest.mark.usefixtures("restore_num_threads")
def test_topk_is_bit_identical_across_thread_counts(rows, generator):
    hidden, weight = draw_inputs(1, rows, 64, 49_152, generator)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(mtp_ext.multihead_unembed_topk(hidden, weight, 5))
    for other in results[1:]:
        for got, expected in zip(other, results[0]):
            assert torch.equal(got, expected)


def test_cross_entropy_second_derivative_equals_reference(generator):
    # create_graph=True: the gradient must itself be differentiable (it once gave 0 silently).
    hidden, weight = draw_inputs(2, 5, 6, 11, generator, torch.float64)
    targets = torch.tensor([[0, 3, -100, 10, 2], [4, 4, 1, -100, 7]])
    head_weights = torch.tensor([0.3, 0.7], dtype=torch.float64)

    def second_derivatives(loss_fn):
        h, w, hw = (t.clone().requires_grad_() for t in (hidden, weight, head_weights))
        grad_h, grad_w = torch.autograd.grad(loss_fn(h, w, targets, hw), (h, w), create_graph=True)
        return torch.autograd.grad((grad_h**2).sum() + grad_w.sum() ** 2, (h, w, hw))

    got = second_derivatives(mtp_ext.multihead_cross_entropy)
    expected = second_derivatives(reference.multihead_cross_entropy)
    assert got[0].abs().max() > 0
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_cross_entropy_gradgradcheck(generator):
    hidden, weight = draw_inputs(2, 3, 4, 7, generator, torch.float64)
    targets = torch.tensor([[0, 6, -100], [3, 3, 1]])
    hidden.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda h, w: mtp_ext.multihead_cross_entropy(h, w, targets), (hidden, weight))
