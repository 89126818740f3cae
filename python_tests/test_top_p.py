"""Tests of mtp_ext.top_p_candidates, mtp_ext.top_p_mask and mtp_ext.TopPLogitsWarper.

The ground truth is mtp_ext.reference (a full sort and float64 sums). The kernels sum integer
masses, so a nucleus size may differ from the reference only where a cumulative sum lies within
NUCLEUS_TOL of the target: `assert_matches_reference` accepts exactly that and nothing else.
Exact comparisons (masks, Hugging Face) use inputs drawn clear of such borderlines.
"""
import math
from fractions import Fraction

import pytest
import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList
from transformers import TopPLogitsWarper as HFTopPLogitsWarper

import mtp_ext
from mtp_ext import reference

CUDA_KERNELS = torch.cuda.is_available() and mtp_ext.build_info()["cuda"]
requires_cuda = pytest.mark.skipif(
    not CUDA_KERNELS, reason="needs a CUDA device and mtp_ext built with its CUDA kernels"
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOGIT_KINDS = ["flat", "peaked", "lm_like", "ties", "neg_inf", "one_finite", "all_equal"]
# Kinds whose rows have no exact ties: Hugging Face's sort is unstable on ties.
DISTINCT_KINDS = ["flat", "peaked", "lm_like"]
TOP_P_CASES = [1e-6, 0.5, 0.9, 0.99, 1.0, "per_row"]

# How far (in probability) a cumulative sum may lie from the target and still let the kernel's
# nucleus size differ from the reference's (integer masses vs float64 sums).
NUCLEUS_TOL = 1e-6
# The kernels' documented bound: tokens further below the top scaled logit carry no mass.
DEAD_GAP_NATS = 29.0


# ----------------------------------------------------------------------------- inputs


def draw_logits(kind: str, batch: int, vocab: int, generator: torch.Generator) -> Tensor:
    """float32 logits [batch, vocab] of one kind."""
    shape = (batch, vocab)
    if kind == "flat":
        return torch.randn(shape, generator=generator)
    if kind == "peaked":
        return torch.randn(shape, generator=generator) * 8
    if kind == "lm_like":
        # A broad body and a few tokens far above it: most mass in a handful of tokens, a
        # long tail holding the rest.
        logits = torch.randn(shape, generator=generator) * 2
        spikes = torch.randint(0, vocab, (batch, 3), generator=generator)
        heights = 5 + 10 * torch.rand((batch, 3), generator=generator)
        return logits.scatter_add_(1, spikes, heights)
    if kind == "ties":
        return torch.randint(0, 4, shape, generator=generator).float()
    if kind in ("neg_inf", "one_finite"):
        logits = torch.randn(shape, generator=generator) * 3
        if kind == "neg_inf":
            logits[torch.rand(shape, generator=generator) < 0.3] = -math.inf
        else:
            logits.fill_(-math.inf)
        # Every row keeps at least one finite logit (an all -inf row is an error).
        finite_at = torch.randint(0, vocab, (batch, 1), generator=generator)
        return logits.scatter_(1, finite_at, torch.randn((batch, 1), generator=generator))
    if kind == "all_equal":
        return (torch.randn((batch, 1), generator=generator) * 5).expand(shape).clone()
    raise ValueError(kind)


def draw_rows(row_kinds: list[str], vocab: int, generator: torch.Generator, dtype=torch.float32) -> Tensor:
    """One row per entry of row_kinds, each of that kind, cast to dtype."""
    rows = [draw_logits(kind, 1, vocab, generator) for kind in row_kinds]
    return torch.cat(rows).to(dtype)


def mixed_kinds(batch: int, generator: torch.Generator, kinds=LOGIT_KINDS) -> list[str]:
    """Row kinds cycling through `kinds` from a random start (so B = 1 is not always flat)."""
    start = int(torch.randint(0, len(kinds), (1,), generator=generator))
    return [kinds[(start + row) % len(kinds)] for row in range(batch)]


def draw_top_p(batch: int, generator: torch.Generator) -> Tensor:
    """A float32 top_p per row: half the rows one of the fixed cases, half uniform in (0, 1]."""
    fixed = torch.tensor([1e-6, 0.5, 0.9, 0.99, 1.0])
    picked = fixed[torch.randint(0, len(fixed), (batch,), generator=generator)]
    uniform = 1.0 - torch.rand(batch, generator=generator)
    return torch.where(torch.rand(batch, generator=generator) < 0.5, picked, uniform)


def resolve_top_p(case, batch: int, generator: torch.Generator):
    return draw_top_p(batch, generator) if case == "per_row" else case


def top_p_rows(top_p, batch: int) -> Tensor:
    """top_p as the float32 [batch] tensor the kernels see (a Python float is rounded to fp32)."""
    if isinstance(top_p, Tensor):
        return top_p.to(torch.float32).expand(batch)
    return torch.full((batch,), top_p, dtype=torch.float32)


def sorted_view(logits: Tensor, top_p, temperature: float = 1.0):
    """The reference's sorted rows plus what the checks need: (order, sorted_probs, live mask,
    cum_before, cum_incl, target, uncapped nucleus size), all on the CPU."""
    logits = logits.cpu()
    top_p = top_p_rows(top_p.cpu() if isinstance(top_p, Tensor) else top_p, logits.shape[0])
    order, sorted_probs, cum_before, target, nucleus = reference.nucleus_in_order(logits, top_p, temperature)
    sorted_scaled = (logits.float() / temperature).gather(1, order)
    live = torch.exp(sorted_scaled - sorted_scaled[:, :1]) >= reference.MIN_LIVE_RATIO
    cum_incl = cum_before + sorted_probs.double() * live
    return order, sorted_probs, live, cum_before, cum_incl, target, nucleus


def borderline_rows(logits: Tensor, top_p, margin: float) -> Tensor:
    """Rows [B] bool where some live token's cumulative mass lies within `margin` of the target,
    so that the nucleus could legitimately differ. The top token is always in (nothing comes
    before it), and rows at top_p = 1 never are borderline: the mask keeps every finite token."""
    _, _, live, cum_before, _, target, _ = sorted_view(logits, top_p)
    near = live & ((cum_before - target).abs() < margin)
    near[:, 0] = False
    return near.any(dim=1) & (top_p_rows(top_p, logits.shape[0]) < 1.0)


def has_exact_ties(logits: Tensor) -> Tensor:
    """Rows [B] bool holding two equal finite logits."""
    values = logits.float().sort(dim=1).values
    return ((values[:, 1:] == values[:, :-1]) & torch.isfinite(values[:, 1:])).any(dim=1)


def draw_clear_rows(row_kinds, vocab, generator, top_p, *, margin, dtype=torch.float32,
                    distinct=False, tries=100) -> Tensor:
    """Like draw_rows, but rows on a nucleus borderline (or, with distinct, with tied logits)
    are redrawn, so that an exact comparison is well defined."""
    logits = draw_rows(row_kinds, vocab, generator, dtype)
    for _ in range(tries):
        redraw = borderline_rows(logits, top_p, margin)
        if distinct:
            redraw |= has_exact_ties(logits)
        if not redraw.any():
            return logits
        logits[redraw] = draw_rows(row_kinds, vocab, generator, dtype)[redraw]
    raise AssertionError(f"no clear rows for {row_kinds} at top_p={top_p} after {tries} draws")


# ----------------------------------------------------------------------------- the checker


def assert_matches_reference(result, logits: Tensor, top_p, max_candidates: int, temperature: float = 1.0):
    """Asserts that `result` = (ids, probs, counts, mass) is what top_p_candidates must return,
    row by row, up to the documented nucleus-size tolerance."""
    ids, probs, counts, mass = result
    batch, vocab = logits.shape
    cap = max_candidates
    assert ids.shape == (batch, cap) and ids.dtype == torch.int64, (ids.shape, ids.dtype)
    assert probs.shape == (batch, cap) and probs.dtype == torch.float32, (probs.shape, probs.dtype)
    assert counts.shape == (batch,) and counts.dtype == torch.int32, (counts.shape, counts.dtype)
    assert mass.shape == (batch,) and mass.dtype == torch.float32, (mass.shape, mass.dtype)
    ids, probs, counts, mass, logits = (t.cpu() for t in (ids, probs, counts, mass, logits))

    order, sorted_probs, live, cum_before, cum_incl, target, nucleus = sorted_view(logits, top_p, temperature)
    count = counts.long()
    width = min(cap, vocab)
    bad = (count < 1) | (count > width)
    assert not bad.any(), f"counts outside [1, {width}] in rows {bad.nonzero().flatten().tolist()}: {counts[bad]}"

    # The filled slots are the reference order's first `count` ids; the rest are padding.
    filled = torch.arange(cap)[None, :] < count[:, None]
    order_padded = torch.full((batch, cap), -1, dtype=torch.long)
    order_padded[:, :width] = order[:, :width]
    expected_ids = torch.where(filled, order_padded, -1)
    bad = (ids != expected_ids).any(dim=1)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise AssertionError(f"row {row} (count {count[row]}): ids {ids[row].tolist()[:20]} != "
                             f"expected {expected_ids[row].tolist()[:20]}")

    bad = (probs != 0) & ~filled
    assert not bad.any(), f"non-zero probs in unused slots of rows {bad.any(1).nonzero().flatten().tolist()}"
    # The softmax of the fp32 scaled logits, normalised in float64: torch's fp32 softmax sums a
    # 262144-token row with a relative error above 2e-5, more than the kernels' own.
    softmax = torch.softmax((logits.float() / temperature).double(), dim=-1).float()
    expected_probs = torch.where(filled, softmax.gather(1, ids.clamp(min=0)), 0.0)
    torch.testing.assert_close(probs, expected_probs, rtol=1e-5, atol=1e-7, msg=lambda m: f"probs: {m}")
    torch.testing.assert_close(mass, probs.double().sum(dim=1).float(), rtol=1e-5, atol=1e-7,
                               msg=lambda m: f"mass is not the sum of the returned probs: {m}")

    # Documented: tokens more than DEAD_GAP_NATS below the top never enter a nucleus.
    scaled = logits.float() / temperature
    gap = scaled.max(dim=1, keepdim=True).values - scaled.gather(1, ids.clamp(min=0))
    bad = (filled & (gap > DEAD_GAP_NATS)).any(dim=1)
    assert not bad.any(), f"tokens more than {DEAD_GAP_NATS} nats below the top in rows {bad.nonzero().flatten().tolist()}"

    # The count is the reference's, or another size that is also a nucleus within NUCLEUS_TOL:
    # its last token is live and needed (the target is not met without it), and the target is
    # met with it -- or the cap stopped a nucleus that was still growing.
    reference_count = nucleus.clamp(max=cap)
    last = (count - 1).clamp(min=0)[:, None]
    last_live = live.gather(1, last).squeeze(1)
    reached = cum_incl.gather(1, last).squeeze(1) >= target.squeeze(1) - NUCLEUS_TOL
    needed = (count == 1) | (cum_before.gather(1, last).squeeze(1) < target.squeeze(1) + NUCLEUS_TOL)
    cut_by_cap = count == cap
    valid = (count == reference_count) | (last_live & needed & (reached | cut_by_cap))
    if not valid.all():
        row = int((~valid).nonzero()[0])
        k = int(count[row])
        raise AssertionError(
            f"row {row}: count {k}, reference count {int(reference_count[row])} (uncapped "
            f"{int(nucleus[row])}, cap {cap}); target {float(target[row]):.9g}, mass before the last "
            f"token {float(cum_before[row, k - 1]):.9g}, with it {float(cum_incl[row, k - 1]):.9g}"
        )


def candidates_and_check(logits, top_p, max_candidates, temperature):
    result = mtp_ext.top_p_candidates(logits, top_p, max_candidates, temperature)
    assert_matches_reference(result, logits, top_p, max_candidates, temperature)
    return result


def assert_same_tensors(actual, expected):
    """Bit-identical tuples of tensors (same dtype, shape and values, NaN never expected)."""
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, (index, a.dtype, e.dtype, a.shape, e.shape)
        assert torch.equal(a.cpu(), e.cpu()), f"output {index} differs:\n{a}\n{e}"


# ----------------------------------------------------------------------------- the checker can fail


def _corrupt(name: str, result, order: Tensor, softmax: Tensor):
    ids, probs, counts, mass = (t.clone() for t in result)
    k = int(counts[0])
    if name == "swapped_ids":
        ids[0, [0, 1]] = ids[0, [1, 0]]
        probs[0, [0, 1]] = probs[0, [1, 0]]
    elif name == "extra_token":  # consistent ids, probs and mass: only the count is wrong
        ids[0, k] = order[0, k]
        probs[0, k] = softmax[0, order[0, k]]
        counts[0] = k + 1
        mass[0] = probs[0].sum()
    elif name == "missing_token":
        ids[0, k - 1] = -1
        probs[0, k - 1] = 0
        counts[0] = k - 1
        mass[0] = probs[0].sum()
    elif name == "wrong_prob":
        probs[0, 0] *= 1.001
    elif name == "wrong_mass":
        mass[0] += 1e-3
    elif name == "stale_padding":
        probs[0, k] = 1e-3
    elif name == "zero_count":
        counts[0] = 0
    return ids, probs, counts, mass


@pytest.mark.parametrize(
    "corruption",
    ["swapped_ids", "extra_token", "missing_token", "wrong_prob", "wrong_mass", "stale_padding", "zero_count"],
)
def test_checker_rejects_corrupted_result(corruption):
    # Probabilities fall by e per token: 0.632, 0.865, 0.950 cumulated, so top_p 0.9 takes
    # exactly 3 tokens, far from any borderline.
    logits = torch.stack([torch.arange(10, 0, -1).float(), torch.zeros(10)])
    top_p, cap = 0.9, 8
    result = mtp_ext.top_p_candidates(logits, top_p, cap)
    assert_matches_reference(result, logits, top_p, cap)  # the genuine result passes
    assert result.counts[0] == 3
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices
    corrupted = _corrupt(corruption, result, order, torch.softmax(logits, dim=1))
    with pytest.raises(AssertionError):
        assert_matches_reference(corrupted, logits, top_p, cap)


def test_checker_accepts_either_side_of_a_borderline():
    # Two equal tokens at top_p 0.5: the first reaches the target exactly, so 1 token is the
    # nucleus, but a sum off by 1e-7 would take 2; both sizes are valid. The -inf token never is.
    logits = torch.tensor([[1.0, 1.0, -math.inf]])
    result = mtp_ext.top_p_candidates(logits, 0.5, 4)
    assert_matches_reference(result, logits, 0.5, 4)
    assert int(result.counts[0]) == 1
    order = torch.tensor([[0, 1, 2]])
    softmax = torch.softmax(logits, dim=1)
    assert_matches_reference(_corrupt("extra_token", result, order, softmax), logits, 0.5, 4)
    three = _corrupt("extra_token", _corrupt("extra_token", result, order, softmax), order, softmax)
    with pytest.raises(AssertionError):
        assert_matches_reference(three, logits, 0.5, 4)


# ----------------------------------------------------------------------------- parity with the reference

SMALL_VOCABS = [1, 2, 7, 31, 33, 1000, 4097]
LARGE_VOCABS = [49152, 262144]  # kept to small batches: the reference sorts the whole row
SHAPES = [(b, v) for v in SMALL_VOCABS for b in (1, 3, 17, 64)] + [(b, v) for v in LARGE_VOCABS for b in (1, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,vocab", SHAPES)
def test_parity_across_shapes(batch, vocab, dtype, generator):
    logits = draw_rows(mixed_kinds(batch, generator), vocab, generator, dtype)
    candidates_and_check(logits, draw_top_p(batch, generator), 256, 1.0)


@pytest.mark.parametrize("top_p_case", TOP_P_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", LOGIT_KINDS)
def test_parity_by_kind(kind, dtype, top_p_case, generator):
    batch, vocab = 5, 1000
    logits = draw_rows([kind] * batch, vocab, generator, dtype)
    candidates_and_check(logits, resolve_top_p(top_p_case, batch, generator), 256, 1.0)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("cap", [1, 5, 256, "above_vocab"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_by_cap_and_temperature(dtype, cap, temperature, generator):
    batch, vocab = 17, 4097
    cap = vocab + 7 if cap == "above_vocab" else cap
    logits = draw_rows(mixed_kinds(batch, generator), vocab, generator, dtype)
    candidates_and_check(logits, draw_top_p(batch, generator), cap, temperature)


def test_large_vocab_lm_like_high_top_p(generator):
    # The common serving case: a peaked row over a 256k vocabulary, most of the nucleus far
    # down the tail, capped.
    logits = draw_rows(["lm_like", "peaked", "flat"], 262144, generator, torch.bfloat16)
    for top_p in (0.9, 0.99, 1.0):
        candidates_and_check(logits, top_p, 1024, 1.0)


def test_scalar_and_tensor_top_p_agree(generator):
    logits = draw_rows(mixed_kinds(6, generator), 500, generator)
    by_float = mtp_ext.top_p_candidates(logits, 0.9, 64)
    assert_same_tensors(mtp_ext.top_p_candidates(logits, torch.tensor(0.9), 64), by_float)
    assert_same_tensors(mtp_ext.top_p_candidates(logits, torch.full((6,), 0.9), 64), by_float)
    assert_same_tensors(mtp_ext.top_p_candidates(logits, torch.full((6,), 0.9, dtype=torch.float64), 64), by_float)


def test_signed_zeros_tie():
    # -0.0 and +0.0 are the same logit: ties, taken by lower id.
    logits = torch.tensor([[-0.0, 0.0, -1.0, -0.0, 0.0]])
    result = candidates_and_check(logits, 0.99, 8, 1.0)
    assert result.ids[0, :4].tolist() == [0, 1, 3, 4]


@pytest.mark.parametrize("vocab,top_p,expected_count", [(7, 0.5, 4), (7, 0.9, 7), (10, 0.55, 6), (10, 0.05, 1), (997, 0.1, 100)])
def test_all_equal_row_takes_lowest_ids(vocab, top_p, expected_count):
    # Every token has probability 1/V: the nucleus is the ceil(top_p * V) lowest ids.
    logits = torch.full((1, vocab), 3.0)
    result = candidates_and_check(logits, top_p, vocab, 1.0)
    assert int(result.counts[0]) == expected_count
    assert result.ids[0, :expected_count].tolist() == list(range(expected_count))
    mask = mtp_ext.top_p_mask(logits, top_p)
    assert torch.isfinite(mask).flatten().tolist() == [i < expected_count for i in range(vocab)]


@pytest.mark.parametrize("gap,expected_count", [(28.0, 1000), (29.5, 1)])
def test_tokens_far_below_top_carry_no_mass(gap, expected_count):
    # 28 nats below the top a token still has mass (e^-28 > 2^-41); 29.5 nats below it has
    # none and stays out even at top_p = 1.
    logits = torch.full((1, 1000), -gap)
    logits[0, 0] = 0.0
    result = candidates_and_check(logits, 1.0, 2000, 1.0)
    assert int(result.counts[0]) == expected_count


# ----------------------------------------------------------------------------- layouts, determinism

VIEWS = {
    "transposed": lambda x: x.t().contiguous().t(),  # column-major: stride(1) != 1
    "every_other_column": lambda x: x[:, ::2],
    "every_other_row": lambda x: x[::2],  # unit column stride, row stride 2V
    "offset_columns": lambda x: x[:, 3:],  # storage offset, row stride V + 3
}


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input_same_as_contiguous(view, dtype, generator):
    # No one_finite rows: a column slice could drop the one finite logit.
    kinds = mixed_kinds(10, generator, [k for k in LOGIT_KINDS if k != "one_finite"])
    base = draw_rows(kinds, 4100, generator, dtype)
    strided = VIEWS[view](base)
    assert not strided.is_contiguous()
    dense = strided.contiguous()
    batch = dense.shape[0]
    top_p = draw_top_p(batch, generator)
    assert_same_tensors(mtp_ext.top_p_candidates(strided, top_p, 300, 0.5),
                        mtp_ext.top_p_candidates(dense, top_p, 300, 0.5))
    assert_same_tensors((mtp_ext.top_p_mask(strided, top_p, 2),), (mtp_ext.top_p_mask(dense, top_p, 2),))


def _both_ops(logits, top_p):
    """Every output of both ops, flattened into one tuple."""
    return (*mtp_ext.top_p_candidates(logits, top_p, 300, 0.7), mtp_ext.top_p_mask(logits, top_p, 3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_call_twice_is_bit_identical(dtype, generator):
    logits = draw_rows(mixed_kinds(3, generator), 49152, generator, dtype)
    top_p = draw_top_p(3, generator)
    assert_same_tensors(_both_ops(logits, top_p), _both_ops(logits, top_p))


def test_row_result_independent_of_batch(generator):
    logits = draw_rows(mixed_kinds(17, generator), 4097, generator)
    top_p = draw_top_p(17, generator)
    batched = _both_ops(logits, top_p)
    for row in range(17):
        alone = _both_ops(logits[row : row + 1], top_p[row : row + 1])
        assert_same_tensors(alone, tuple(out[row : row + 1] for out in batched))


@pytest.mark.usefixtures("restore_num_threads")
def test_result_independent_of_thread_count(generator):
    logits = draw_rows(mixed_kinds(17, generator), 4097, generator, torch.bfloat16)
    top_p = draw_top_p(17, generator)
    torch.set_num_threads(1)
    one_thread = _both_ops(logits, top_p)
    torch.set_num_threads(2)
    two_threads = _both_ops(logits, top_p)
    assert_same_tensors(two_threads, one_thread)


# ----------------------------------------------------------------------------- top_p_mask

MASK_TOP_P_CASES = [0.1, 0.5, 0.9, 0.99, 1.0, "per_row"]
# Redraw rows whose cumulative mass lies this close to the target (ten times the kernels'
# documented tolerance): the mask must then equal the reference exactly.
MASK_MARGIN = 1e-5
# Hugging Face adds fp32 probabilities from the bottom of the order, one after another: over
# 1000 tokens its sums drift by a few 1e-6.
HF_MARGIN = 2e-5


# The CPU kernel brackets the threshold from a sample of rows of 1024 tokens or more, and takes
# the general path below that (and whenever the sample misleads it): both sizes are tested.
MASK_VOCABS = [997, 4133]


@pytest.mark.parametrize("vocab", MASK_VOCABS)
@pytest.mark.parametrize("filter_value", [-math.inf, -1e4], ids=["neg_inf", "minus_1e4"])
@pytest.mark.parametrize("min_tokens_to_keep", [1, 3, 50])
@pytest.mark.parametrize("top_p_case", MASK_TOP_P_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_equals_reference(dtype, top_p_case, min_tokens_to_keep, filter_value, vocab, generator):
    batch = 6
    top_p = resolve_top_p(top_p_case, batch, generator)
    # all_equal rows sit exactly on a borderline at most top_p: test_all_equal_row_* has them.
    excluded = {"all_equal"}
    kinds = mixed_kinds(batch, generator, [k for k in LOGIT_KINDS if k not in excluded])
    logits = draw_clear_rows(kinds, vocab, generator, top_p, margin=MASK_MARGIN, dtype=dtype)
    masked = mtp_ext.top_p_mask(logits, top_p, min_tokens_to_keep, filter_value)
    assert masked.dtype == dtype and masked.shape == logits.shape
    expected = reference.top_p_mask(logits, top_p_rows(top_p, batch), min_tokens_to_keep, filter_value)
    kept, expected_kept = (masked != filter_value).sum(1), (expected != filter_value).sum(1)
    assert torch.equal(masked, expected), (kept, expected_kept)


@pytest.mark.parametrize("tail", [-40.0, -math.inf], ids=["dead", "neg_inf"])
def test_mask_min_tokens_among_zero_mass_ties(tail):
    # One live token, four tied zero-mass ones: min_tokens_to_keep = 3 keeps the top token and
    # the two lowest-id ties, and filters the other two.
    logits = torch.tensor([[0.0, tail, tail, tail, tail]])
    masked = mtp_ext.top_p_mask(logits, 0.5, 3, -1e4)
    assert torch.equal(masked, reference.top_p_mask(logits, 0.5, 3, -1e4))
    assert masked.tolist() == [[0.0, tail, tail, -1e4, -1e4]]


def test_mask_min_tokens_above_vocab_keeps_every_token(generator):
    logits = torch.randn((3, 7), generator=generator)
    assert torch.equal(mtp_ext.top_p_mask(logits, 0.1, 50, -1e4), logits)


def sample_defeating_rows(vocab: int) -> Tensor:
    """Rows whose mass hides from a strided sample: a heavy token in each of the first 16 chunks
    of 32 (sampled in full), and in every other chunk a token of moderate logit off the sample's
    stride, together most of the mass. The kernel's bracket from the sample then misses the
    threshold, and the row must still come out right."""
    logits = torch.full((3, vocab), -8.0)
    logits[:, 7::32] = torch.tensor([[2.0], [3.0], [4.5]])
    logits[:, 3:512:32] = 6.0
    logits[:, 0::32] = -1.0  # what the stride sees
    logits[1, 5::97] = 1.0  # some scattered structure on top
    return logits


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_mask_when_the_sample_misleads(top_p):
    logits = sample_defeating_rows(20_000)
    assert torch.equal(mtp_ext.top_p_mask(logits, top_p), reference.top_p_mask(logits, top_p_rows(top_p, 3), 1, -math.inf))


@pytest.mark.parametrize("vocab", [3000, 50_021])
def test_mask_keeps_the_candidates(vocab, generator):
    # Same nucleus, two outputs (the candidates never take the mask's bracketed path): at
    # temperature 1 without a cap, the finite entries of the mask are exactly the candidate
    # ids, and they hold the input logits.
    logits = draw_rows(mixed_kinds(12, generator), vocab, generator)
    top_p = draw_top_p(12, generator)
    top_p[top_p >= 1.0] = 0.999  # at 1 the mask keeps dead tokens too (Hugging Face's rule)
    result = mtp_ext.top_p_candidates(logits, top_p, vocab)
    masked = mtp_ext.top_p_mask(logits, top_p)
    for row in range(12):
        kept = torch.isfinite(masked[row]).nonzero().flatten()
        chosen = result.ids[row, : result.counts[row]].sort().values
        assert torch.equal(kept, chosen), row
        assert torch.equal(masked[row, kept], logits[row, kept])


@pytest.mark.parametrize("filter_value", [-math.inf, -1e4], ids=["neg_inf", "minus_1e4"])
@pytest.mark.parametrize("min_tokens_to_keep", [1, 3, 50])
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.95, 0.99])
def test_mask_equals_hugging_face(top_p, min_tokens_to_keep, filter_value, generator):
    # Rows clear of borderlines by HF_MARGIN, and free of ties, which Hugging Face's unstable
    # sort orders arbitrarily.
    kinds = mixed_kinds(4, generator, DISTINCT_KINDS)
    logits = draw_clear_rows(kinds, 1000, generator, top_p, margin=HF_MARGIN, distinct=True)
    hf_warper = HFTopPLogitsWarper(top_p, filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep)
    ours = mtp_ext.TopPLogitsWarper(top_p, filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep)
    input_ids = torch.zeros((4, 1), dtype=torch.long)
    expected = hf_warper(input_ids, logits.clone())
    assert torch.equal(ours(input_ids, logits), expected)
    assert torch.equal(mtp_ext.top_p_mask(logits, top_p, min_tokens_to_keep, filter_value), expected)


@pytest.mark.parametrize("filter_value", [-math.inf, -1e4], ids=["neg_inf", "minus_1e4"])
def test_mask_at_top_p_one_equals_hugging_face(filter_value, generator):
    # At top_p = 1 only -inf logits go: finite logits stay within 50 nats of the top, where
    # Hugging Face's fp32 probabilities do not underflow to 0.
    logits = 3.0 - 50.0 * torch.rand((5, 2000), generator=generator)
    logits[torch.rand((5, 2000), generator=generator) < 0.2] = -math.inf
    expected = HFTopPLogitsWarper(1.0, filter_value=filter_value)(None, logits.clone())
    assert torch.equal(mtp_ext.top_p_mask(logits, 1.0, 1, filter_value), expected)
    assert (expected == filter_value).any()  # the -inf entries were filtered


# ----------------------------------------------------------------------------- Hugging Face drop-in


def test_warper_is_a_drop_in_for_generate():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(1))

    def generate(warper):
        torch.manual_seed(1234)  # the sampling draws
        # top_k=0 / top_p=1 / temperature=1: no default warper may run besides ours (the
        # generation defaults add TopKLogitsWarper(50) when top_k is left out).
        return model.generate(
            input_ids, do_sample=True, logits_processor=LogitsProcessorList([warper]),
            top_p=1.0, top_k=0, temperature=1.0, max_new_tokens=8, pad_token_id=0,
            return_dict_in_generate=True, output_scores=True, output_logits=True,
        )

    ours = generate(mtp_ext.TopPLogitsWarper(0.8))
    theirs = generate(HFTopPLogitsWarper(0.8))
    assert torch.equal(ours.sequences, theirs.sequences)
    assert ours.sequences.shape[1] > input_ids.shape[1]
    for step, (raw, processed) in enumerate(zip(ours.logits, ours.scores)):
        # The processed scores are the raw logits through our warper alone, and equal
        # Hugging Face's processed scores.
        assert torch.equal(processed, HFTopPLogitsWarper(0.8)(None, raw.clone())), step
        assert torch.equal(processed, theirs.scores[step]), step
        kept = torch.isfinite(processed).sum(dim=1)
        assert ((kept > 1) & (kept < 64)).all(), (step, kept)  # the filter did cut something


# ----------------------------------------------------------------------------- torch.library / compile


def _op_args(op_name: str, logits: Tensor):
    batch = logits.shape[0]
    top_p = torch.linspace(0.3, 1.0, batch, device=logits.device)
    if op_name == "top_p_candidates":
        return (logits, top_p, 16, 0.8)
    return (logits, top_p, 2, -1e4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op_name", ["top_p_candidates", "top_p_mask"])
def test_opcheck_cpu(op_name, dtype, generator):
    logits = draw_rows(mixed_kinds(4, generator), 100, generator, dtype)
    torch.library.opcheck(getattr(torch.ops.mtp_ext, op_name), _op_args(op_name, logits))


def _compilable(logits, top_p_rows_tensor):
    ids, probs, counts, mass = mtp_ext.top_p_candidates(logits, top_p_rows_tensor, 32, 0.7)
    scalar_ids = mtp_ext.top_p_candidates(logits, 0.9, 8).ids
    masked = mtp_ext.top_p_mask(logits, top_p_rows_tensor, 2)
    return ids, probs, counts, mass, scalar_ids, masked


def test_compile_fullgraph_matches_eager(generator):
    # aot_eager traces through the fake kernels and functionalisation like inductor does, in
    # 0.3 s instead of about 18 s of C++ compilation on this machine.
    logits = draw_rows(mixed_kinds(4, generator), 500, generator)
    top_p = draw_top_p(4, generator)
    torch._dynamo.reset()
    compiled = torch.compile(_compilable, fullgraph=True, backend="aot_eager")
    assert_same_tensors(compiled(logits, top_p), _compilable(logits, top_p))


# ----------------------------------------------------------------------------- bad input

GOOD_LOGITS = torch.randn((2, 8), generator=torch.Generator().manual_seed(0))


def _candidates(logits=None, top_p=0.9, max_candidates=4, temperature=1.0):
    return mtp_ext.top_p_candidates(GOOD_LOGITS if logits is None else logits, top_p, max_candidates, temperature)


def _mask(logits=None, top_p=0.9, min_tokens_to_keep=1):
    return mtp_ext.top_p_mask(GOOD_LOGITS if logits is None else logits, top_p, min_tokens_to_keep)


def _with_row(row_value: float, fill_row: bool) -> Tensor:
    """GOOD_LOGITS with row 1 (entirely, or one entry) set to row_value."""
    logits = GOOD_LOGITS.clone()
    if fill_row:
        logits[1] = row_value
    else:
        logits[1, 5] = row_value
    return logits


BAD_TOP_P = {
    "zero": 0.0,
    "negative": -0.1,
    "above_one": 1.5,
    "nan": math.nan,
    "tensor_zero": torch.tensor([0.5, 0.0]),
    "tensor_negative": torch.tensor([-0.1, 0.5]),
    "tensor_above_one": torch.tensor([0.5, 1.5]),
    "tensor_nan": torch.tensor([math.nan, 0.5]),
    "tensor_wrong_length": torch.tensor([0.5, 0.5, 0.5]),
}

BAD_LOGITS = {
    "one_dim": (GOOD_LOGITS[0], "logits must be 2-D"),
    "three_dim": (GOOD_LOGITS[None], "logits must be 2-D"),
    "integer": (torch.ones((2, 8), dtype=torch.int64), "logits must be float32"),
    "float64": (GOOD_LOGITS.double(), "logits must be float32"),
    "row_all_neg_inf": (_with_row(-math.inf, fill_row=True), "row 1 of logits is all -inf"),
    "row_with_nan": (_with_row(math.nan, fill_row=False), r"row 1 of logits holds NaN or \+inf"),
    "row_with_pos_inf": (_with_row(math.inf, fill_row=False), r"row 1 of logits holds NaN or \+inf"),
}

OPS = {"candidates": _candidates, "mask": _mask}


@pytest.mark.parametrize("bad", list(BAD_TOP_P))
@pytest.mark.parametrize("op", list(OPS))
def test_bad_top_p_raises(op, bad):
    with pytest.raises((ValueError, RuntimeError), match="top_p"):
        OPS[op](top_p=BAD_TOP_P[bad])


@pytest.mark.parametrize("op", list(OPS))
def test_top_p_on_wrong_device_raises(op):
    with pytest.raises((ValueError, RuntimeError), match="top_p"):
        OPS[op](top_p=torch.full((2,), 0.5, device="meta"))


@pytest.mark.parametrize("bad", list(BAD_LOGITS))
@pytest.mark.parametrize("op", list(OPS))
def test_bad_logits_raise(op, bad):
    logits, message = BAD_LOGITS[bad]
    with pytest.raises((ValueError, RuntimeError), match=message):
        OPS[op](logits=logits)


@pytest.mark.parametrize("max_candidates", [0, -1, 2.5])
def test_bad_max_candidates_raises(max_candidates):
    with pytest.raises((ValueError, RuntimeError), match="max_candidates"):
        _candidates(max_candidates=max_candidates)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_bad_temperature_raises(temperature):
    with pytest.raises((ValueError, RuntimeError), match="temperature"):
        _candidates(temperature=temperature)


@pytest.mark.parametrize("min_tokens_to_keep", [0, -3])
def test_bad_min_tokens_to_keep_raises(min_tokens_to_keep):
    with pytest.raises((ValueError, RuntimeError), match="min_tokens_to_keep"):
        _mask(min_tokens_to_keep=min_tokens_to_keep)


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.01])
def test_warper_rejects_bad_top_p(top_p):
    with pytest.raises(ValueError, match="top_p"):
        mtp_ext.TopPLogitsWarper(top_p=top_p)


def test_raw_op_rejects_what_the_wrapper_would():
    # The checks live in the kernel too, for callers of torch.ops.mtp_ext.* directly.
    top_p = torch.full((2,), 0.9)
    with pytest.raises(RuntimeError, match="max_candidates"):
        torch.ops.mtp_ext.top_p_candidates(GOOD_LOGITS, top_p, 0, 1.0)
    with pytest.raises(RuntimeError, match="temperature"):
        torch.ops.mtp_ext.top_p_candidates(GOOD_LOGITS, top_p, 4, 0.0)
    with pytest.raises(RuntimeError, match="top_p must be a float32"):
        torch.ops.mtp_ext.top_p_candidates(GOOD_LOGITS, top_p.double(), 4, 1.0)
    with pytest.raises(RuntimeError, match="min_tokens_to_keep"):
        torch.ops.mtp_ext.top_p_mask(GOOD_LOGITS, top_p, 0, -math.inf)


# ----------------------------------------------------------------------------- CUDA (run on a GPU)

CUDA_SHAPES = [(1, 1), (3, 7), (64, 33), (17, 1000), (17, 4097), (4, 49152), (2, 262144)]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("temperature", [0.5, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,vocab", CUDA_SHAPES)
def test_cuda_candidates_equal_cpu(batch, vocab, dtype, temperature, generator):
    logits = draw_rows(mixed_kinds(batch, generator), vocab, generator, dtype)
    top_p = draw_top_p(batch, generator)
    for cap in (1, 256, vocab + 3):
        on_cpu = mtp_ext.top_p_candidates(logits, top_p, cap, temperature)
        on_gpu = mtp_ext.top_p_candidates(logits.cuda(), top_p.cuda(), cap, temperature)
        assert all(t.is_cuda for t in on_gpu)
        assert_same_tensors(on_gpu, on_cpu)
        assert_matches_reference(on_gpu, logits, top_p, cap, temperature)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("kind", LOGIT_KINDS)
def test_cuda_candidates_equal_cpu_by_kind(kind, generator):
    logits = draw_rows([kind] * 4, 262144, generator, torch.bfloat16)
    for top_p in (1e-6, 0.5, 0.99, 1.0):
        on_cpu = mtp_ext.top_p_candidates(logits, top_p, 1024)
        assert_same_tensors(mtp_ext.top_p_candidates(logits.cuda(), top_p, 1024), on_cpu)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,vocab", CUDA_SHAPES)
def test_cuda_mask_equals_cpu(batch, vocab, dtype, generator):
    logits = draw_rows(mixed_kinds(batch, generator), vocab, generator, dtype)
    top_p = draw_top_p(batch, generator)
    for min_tokens_to_keep, filter_value in ((1, -math.inf), (3, -1e4)):
        on_cpu = mtp_ext.top_p_mask(logits, top_p, min_tokens_to_keep, filter_value)
        on_gpu = mtp_ext.top_p_mask(logits.cuda(), top_p.cuda(), min_tokens_to_keep, filter_value)
        assert on_gpu.is_cuda and on_gpu.dtype == dtype
        assert torch.equal(on_gpu.cpu(), on_cpu)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("view", list(VIEWS))
def test_cuda_non_contiguous_equals_cpu(view, generator):
    kinds = mixed_kinds(6, generator, [k for k in LOGIT_KINDS if k != "one_finite"])
    logits = VIEWS[view](draw_rows(kinds, 4100, generator).cuda())
    top_p = draw_top_p(logits.shape[0], generator)
    on_cpu = mtp_ext.top_p_candidates(logits.cpu(), top_p, 300, 0.5)
    assert_same_tensors(mtp_ext.top_p_candidates(logits, top_p.cuda(), 300, 0.5), on_cpu)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op_name", ["top_p_candidates", "top_p_mask"])
def test_opcheck_cuda(op_name, dtype, generator):
    logits = draw_rows(mixed_kinds(4, generator), 100, generator, dtype).cuda()
    torch.library.opcheck(getattr(torch.ops.mtp_ext, op_name), _op_args(op_name, logits))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("bad", ["row_all_neg_inf", "row_with_nan", "row_with_pos_inf"])
@pytest.mark.parametrize("op", list(OPS))
def test_cuda_bad_rows_raise(op, bad):
    logits, message = BAD_LOGITS[bad]
    with pytest.raises((ValueError, RuntimeError), match=message):
        OPS[op](logits=logits.cuda(), top_p=torch.full((2,), 0.9, device="cuda"))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("op", list(OPS))
def test_cuda_top_p_on_cpu_raises(op):
    with pytest.raises((ValueError, RuntimeError), match="top_p"):
        OPS[op](logits=GOOD_LOGITS.cuda(), top_p=torch.full((2,), 0.9))


# ----------------------------------------------------------------------------- exact boundary


BOUNDARY_TOP_P = [0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95, 0.99]


@pytest.mark.parametrize("top_p", BOUNDARY_TOP_P)
def test_equal_rows_keep_the_decimal_nucleus(top_p):
    # n equal tokens: the nucleus is the smallest k with k / n >= top_p, counted exactly with
    # fractions of the decimal top_p. top_p rounds up in float32 for most of these values,
    # which once made a prefix of exactly top_p fall short and keep one token more.
    exact = Fraction(str(top_p))
    for vocab in range(1, 41):
        expected = next(k for k in range(1, vocab + 1) if Fraction(k, vocab) >= exact)
        logits = torch.zeros(1, vocab)
        assert int(mtp_ext.top_p_candidates(logits, top_p, vocab).counts[0]) == expected, vocab
        assert int(torch.isfinite(mtp_ext.top_p_mask(logits, top_p)).sum()) == expected, vocab
        assert int(reference.top_p_candidates(logits, top_p, vocab)[2][0]) == expected, vocab


def test_equal_rows_keep_hugging_face_count():
    # The case that was wrong: 10 equal logits at top_p 0.3 keep 3 tokens, as HF's warper does.
    logits = torch.zeros(1, 10)
    hf_kept = torch.isfinite(HFTopPLogitsWarper(0.3)(None, logits.clone())).sum()
    assert int(hf_kept) == 3
    assert int(torch.isfinite(mtp_ext.top_p_mask(logits, 0.3)).sum()) == 3
    assert mtp_ext.top_p_candidates(logits, torch.full((1,), 0.3), 10).counts.tolist() == [3]
