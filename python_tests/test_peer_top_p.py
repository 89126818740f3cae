"""The peers' own top-p tests, ported to mtp_ext.top_p_mask, top_p_candidates and TopPLogitsWarper.

What each peer test checks (its inputs, expected kept sets, tolerances) is carried over; the code
is written here:
- Hugging Face transformers, tests/generation/test_logits_process.py, test_top_p_dist_warper;
  the peer itself is transformers.TopPLogitsWarper (installed).
- vLLM, tests/v1/sample/test_topk_topp_sampler.py (its top-p cases), against the rule of
  vllm/v1/sample/ops/topk_topp_sampler.py apply_top_k_top_p_pytorch (`vllm_style_mask` below).
- FlashInfer, tests/test_sampling.py: test_top_p_renorm_probs, its per-request variant and
  test_top_p_sampling, against their ground truth (`flashinfer_style_keep` below).

Where the project's rule deliberately differs from a peer (README, "Differences from peers"),
the test asserts the project's documented rule and shows the peer's different answer.
TopPLogitsWarper(match_hf=True) must give Hugging Face's answer everywhere.
"""
import math

import pytest
import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList
from transformers import TopPLogitsWarper as HFTopPLogitsWarper

import mtp_ext
from mtp_ext import reference
from mtp_ext.integrations.hf import hf_top_p_keep

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def kept(masked: Tensor, filter_value: float = -math.inf) -> Tensor:
    return masked != filter_value


def hf_mask(logits: Tensor, top_p: float, min_tokens_to_keep: int = 1, filter_value: float = -math.inf) -> Tensor:
    return HFTopPLogitsWarper(top_p, filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep)(None, logits)


def match_hf_mask(logits: Tensor, top_p: float, min_tokens_to_keep: int = 1, filter_value: float = -math.inf):
    warper = mtp_ext.TopPLogitsWarper(top_p, filter_value, min_tokens_to_keep, match_hf=True)
    return warper(None, logits)


def vllm_style_mask(logits: Tensor, p: Tensor) -> Tensor:
    """vLLM's PyTorch top-p: sort ascending, softmax, cumulative sum, remove where the sum is
    <= 1 - p, always keep the top token. (Stable sort: the inputs compared here have no ties.)"""
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False, stable=True)
    probs_sum = logits_sort.softmax(dim=-1).cumsum(dim=-1)
    top_p_mask = probs_sum <= 1 - p.unsqueeze(dim=1)
    top_p_mask[:, -1] = False
    return logits.scatter(-1, logits_idx, logits_sort.masked_fill(top_p_mask, -math.inf))


def flashinfer_style_keep(probs: Tensor, p) -> Tensor:
    """FlashInfer's test ground truth: keep the tokens whose ascending cumulative probability is
    >= 1 - p."""
    sorted_prob, indices = torch.sort(probs, descending=False, stable=True)
    cdf = torch.cumsum(sorted_prob, dim=-1)
    threshold = 1 - (p.unsqueeze(1) if isinstance(p, Tensor) else p)
    return torch.zeros_like(probs, dtype=torch.bool).scatter(1, indices, cdf >= threshold)


def borderline_tokens(logits: Tensor, p: Tensor, margin: float = 2e-6) -> Tensor:
    """Tokens [B, V] whose preceding mass lies within `margin` of top_p: there the peers'
    float32 sums may legitimately fall on either side of the boundary."""
    order, _, cum_before, target, _ = reference.nucleus_in_order(logits, p)
    near = ((cum_before - target).abs() < margin) & (p < 1)[:, None]
    return torch.zeros_like(near).scatter(1, order, near)


# ----------------------------------------------------------------------------- Hugging Face

HF_DIST = torch.log(torch.tensor([[0.3, 0.1, 0.1, 0.5], [0.15, 0.3, 0.3, 0.25]]))
HF_EXPECTED_FILTERED_DIST = torch.tensor([[0.3, 0.0, 0.0, 0.5], [0.0, 0.3, 0.3, 0.25]])
OUR_MASKS = {
    "top_p_mask": lambda x, p, k=1, f=-math.inf: mtp_ext.top_p_mask(x, p, k, f),
    "warper": lambda x, p, k=1, f=-math.inf: mtp_ext.TopPLogitsWarper(p, f, k)(None, x),
    "warper_match_hf": match_hf_mask,
    "hugging_face": hf_mask,
}


@pytest.mark.parametrize("impl", list(OUR_MASKS))
def test_hf_dist_warper_keeps_the_smallest_set_reaching_top_p(impl):
    # Row 0: 0.5 + 0.3 is exactly top_p = 0.8, so two tokens reach it; row 1: 0.3 + 0.3 falls
    # short, and the third token (0.25) completes it.
    dist = HF_DIST.clone()
    filtered = OUR_MASKS[impl](dist, 0.8)
    torch.testing.assert_close(torch.exp(filtered), HF_EXPECTED_FILTERED_DIST, rtol=1e-3, atol=1e-3)
    assert kept(filtered).tolist() == [[True, False, False, True], [False, True, True, True]]
    assert torch.equal(dist, HF_DIST)  # not in place
    assert not torch.equal(filtered, dist)


def test_hf_dist_candidates_are_the_same_sets():
    result = mtp_ext.top_p_candidates(HF_DIST, 0.8, 4)
    assert result.counts.tolist() == [2, 3]
    assert result.ids.tolist() == [[3, 0, -1, -1], [1, 2, 3, -1]]  # ties (0.3, 0.3): lower id first
    torch.testing.assert_close(result.mass, torch.tensor([0.8, 0.85]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", list(OUR_MASKS))
def test_hf_dist_warper_min_tokens_to_keep_on_extreme_logits(impl):
    # Row 0 keeps three tokens (0.63, 0.86, 0.95 cumulated); row 1, a ramp times 100, would keep
    # one but min_tokens_to_keep = 2 keeps two. filter_value 0.0 also hides the logit that is 0.
    ramp = (torch.arange(10, dtype=torch.float) - 5).repeat(2, 1)
    ramp[1] *= 100.0
    filtered = OUR_MASKS[impl](ramp, 0.9, 2, 0.0)
    assert (filtered != 0.0).sum(dim=-1).tolist() == [3, 2]


def test_hf_boundary_tie_order_differs():
    # Ten equal tokens at top_p 0.3: the nucleus is three tokens for both. Ours are the lowest
    # ids (ties: lower id first); Hugging Face's ascending sort of a row this short is stable,
    # so it removes the lowest ids and keeps the highest.
    logits = torch.zeros(1, 10)
    assert kept(mtp_ext.top_p_mask(logits, 0.3))[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert mtp_ext.top_p_candidates(logits, 0.3, 10).ids[0, :4].tolist() == [0, 1, 2, -1]
    assert kept(hf_mask(logits, 0.3))[0].nonzero().flatten().tolist() == [7, 8, 9]
    assert torch.equal(match_hf_mask(logits, 0.3), hf_mask(logits, 0.3))


def test_hf_longer_rows_keep_ties_in_the_sorts_order():
    # Above 16 tokens torch.sort(stable=False), which Hugging Face calls, orders ties its own way
    # (neither by id nor reversed); match_hf follows it, the project keeps the lowest ids.
    logits = torch.zeros(1, 40)
    hf_ids = kept(hf_mask(logits, 0.25))[0].nonzero().flatten().tolist()
    assert len(hf_ids) == 10 and hf_ids != list(range(10)) and hf_ids != list(range(30, 40))
    assert kept(mtp_ext.top_p_mask(logits, 0.25))[0].nonzero().flatten().tolist() == list(range(10))
    assert torch.equal(match_hf_mask(logits, 0.25), hf_mask(logits, 0.25))


def test_hf_bf16_softmax_in_bf16_differs():
    # Rows (a, 0, ..., 0) in bfloat16 over a grid of a: the project's probabilities are float32
    # (the reference's rule, float64 sums); Hugging Face rounds the softmax and its cumulative
    # sum to bfloat16, which moves the boundary for some rows.
    a = torch.arange(0.0, 6.0, 2.0**-5)
    logits = torch.zeros((len(a), 21))
    logits[:, 0] = a
    logits = logits.bfloat16()
    differs = 0
    for top_p in (0.5, 0.9):
        ours = kept(mtp_ext.top_p_mask(logits, top_p))
        assert torch.equal(ours, kept(reference.top_p_mask(logits, top_p)))
        differs += int((ours != kept(hf_mask(logits, top_p))).any(dim=1).sum())
        assert torch.equal(match_hf_mask(logits, top_p), hf_mask(logits, top_p))
    assert differs > 0, "no row of the grid shows the bf16 rounding"


def test_hf_top_p_one_also_filters_underflow():
    # At top_p = 1 the project filters only -inf logits; Hugging Face also removes a finite
    # logit whose float32 probability underflows to 0.
    logits = torch.tensor([[0.0, -200.0, -math.inf, -1.0]])
    assert kept(mtp_ext.top_p_mask(logits, 1.0)).tolist() == [[True, True, False, True]]
    assert kept(hf_mask(logits, 1.0)).tolist() == [[True, False, False, True]]
    assert torch.equal(match_hf_mask(logits, 1.0), hf_mask(logits, 1.0))


# ----------------------------------------------------------------------------- match_hf


def draw_rows(kind: str, batch: int, vocab: int, generator: torch.Generator) -> Tensor:
    """float32 rows of one kind, many of them full of exact ties."""
    if kind == "ties":
        return torch.randint(0, 4, (batch, vocab), generator=generator).float()
    if kind == "bf16_valued":  # what a bf16 model's logits look like after generate's upcast
        return (torch.randn((batch, vocab), generator=generator) * 3).bfloat16().float()
    if kind == "lm_like":
        logits = torch.randn((batch, vocab), generator=generator) * 2
        spikes = torch.randint(0, vocab, (batch, 3), generator=generator)
        return logits.scatter_add_(1, spikes, 5 + 10 * torch.rand((batch, 3), generator=generator))
    if kind == "all_equal":
        return torch.zeros((batch, vocab))
    if kind == "neg_inf":
        logits = torch.randn((batch, vocab), generator=generator) * 3
        logits[torch.rand((batch, vocab), generator=generator) < 0.4] = -math.inf
        logits[:, 0] = 1.0
        return logits
    raise ValueError(kind)


@pytest.mark.parametrize("min_tokens_to_keep,filter_value", [(1, -math.inf), (3, -1e4)])
@pytest.mark.parametrize("top_p", [0.1, 0.3, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["ties", "bf16_valued", "lm_like", "all_equal", "neg_inf"])
def test_match_hf_equals_hugging_face(kind, dtype, top_p, min_tokens_to_keep, filter_value, generator):
    for vocab in (10, 100, 1000):
        logits = draw_rows(kind, 6, vocab, generator).to(dtype)
        expected = hf_mask(logits, top_p, min_tokens_to_keep, filter_value)
        got = match_hf_mask(logits, top_p, min_tokens_to_keep, filter_value)
        assert got.dtype == dtype
        assert torch.equal(got, expected), (vocab, kept(got, filter_value).sum(1), kept(expected, filter_value).sum(1))


def test_match_hf_rows_the_ops_reject_are_hugging_faces():
    logits = torch.randn((4, 50), generator=torch.Generator().manual_seed(0))
    logits[1, 3] = math.nan
    logits[2, 7] = math.inf
    logits[3] = -math.inf
    torch.testing.assert_close(match_hf_mask(logits, 0.9), hf_mask(logits, 0.9), rtol=0, atol=0, equal_nan=True)


def test_match_hf_without_ties_needs_no_sort(monkeypatch, generator):
    # Distinct float32 logits far from any rounding boundary: every row is decided by the ops,
    # so the vocabulary is never sorted.
    logits = draw_rows("lm_like", 8, 1000, generator)
    expected = hf_mask(logits, 0.9, 2)
    assert hf_top_p_keep(logits, 0.9, 2)[1].all()

    def no_sort(*args, **kwargs):
        raise AssertionError("torch.sort was called")

    monkeypatch.setattr(torch, "sort", no_sort)
    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    assert torch.equal(match_hf_mask(logits, 0.9, 2), expected)


def test_match_hf_default_is_unchanged(generator):
    logits = draw_rows("bf16_valued", 5, 300, generator)
    assert torch.equal(mtp_ext.TopPLogitsWarper(0.7)(None, logits), mtp_ext.top_p_mask(logits, 0.7))


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_match_hf_generate_gives_hugging_faces_sequences(model_dtype):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to(model_dtype)
    input_ids = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(1))

    def generate(**sampling):
        torch.manual_seed(1234)  # the sampling draws
        return model.generate(input_ids, do_sample=True, top_k=0, temperature=1.0, max_new_tokens=12,
                              pad_token_id=0, **sampling)

    ours = generate(top_p=1.0, logits_processor=LogitsProcessorList([mtp_ext.TopPLogitsWarper(0.8, match_hf=True)]))
    theirs = generate(top_p=0.8)  # the built-in transformers.TopPLogitsWarper
    assert ours.shape[1] > input_ids.shape[1]
    assert torch.equal(ours, theirs)


# ----------------------------------------------------------------------------- vLLM


def assert_equals_vllm_off_borderlines(logits: Tensor, p: Tensor):
    """The kept sets equal vLLM's rule but at tokens within float32 rounding of the boundary."""
    ours = kept(mtp_ext.top_p_mask(logits, p))
    theirs = kept(vllm_style_mask(logits, p))
    near = borderline_tokens(logits, p)
    assert near.sum() <= logits.shape[0] * 4  # a few tokens per row at most
    assert torch.equal(ours & ~near, theirs & ~near), (ours.sum(1), theirs.sum(1))


@pytest.mark.parametrize("batch,vocab", [(1, 1024), (8, 1024), (32, 32000), (2, 128256)])
def test_vllm_topp_only(batch, vocab):
    generator = torch.Generator().manual_seed(42)
    logits = torch.randn(batch, vocab, generator=generator, dtype=torch.float32)
    p = torch.rand(batch, generator=generator) * 0.9 + 0.1  # [0.1, 1.0]
    p.masked_fill_(torch.randint(0, 4, (batch,), generator=generator) == 0, 1.0)  # ~25% disabled
    assert_equals_vllm_off_borderlines(logits, p)


def test_vllm_extreme_p_values():
    generator = torch.Generator().manual_seed(42)
    logits = torch.randn(16, 1024, generator=generator, dtype=torch.float32)
    for p in (torch.full((16,), 0.01), torch.ones(16), torch.tensor([0.1, 0.5, 0.9, 1.0] * 4)):
        assert_equals_vllm_off_borderlines(logits, p)


def test_vllm_boundary_rule_differs():
    # k of V equal tokens hold exactly k / V: the project's nucleus at top_p = k / V is k tokens.
    # vLLM compares a float32 cumulative sum from the bottom with 1 - p, which for some (k, V)
    # keeps one token more.
    differs = 0
    for vocab in range(2, 33):
        logits = torch.zeros(1, vocab)
        for k in range(1, vocab):
            p = torch.tensor([k / vocab])
            assert int(kept(mtp_ext.top_p_mask(logits, p)).sum()) == k, (k, vocab)
            assert int(mtp_ext.top_p_candidates(logits, p, vocab).counts[0]) == k, (k, vocab)
            differs += int(kept(vllm_style_mask(logits, p)).sum()) != k
    assert differs > 0


# ----------------------------------------------------------------------------- FlashInfer


def renormalised_nucleus(probs: Tensor, p) -> Tensor:
    """Our nucleus of the distribution `probs`, renormalised: the mask op on its logits."""
    return torch.softmax(mtp_ext.top_p_mask(probs.log(), p).float(), dim=-1)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("batch,vocab", [(1, 111), (19, 111), (19, 32000), (1, 128256)])
def test_flashinfer_top_p_renorm_probs(batch, vocab, p):
    torch.manual_seed(42)
    pre_norm_prob = torch.rand(batch, vocab)
    normalized_prob = pre_norm_prob / pre_norm_prob.sum(dim=-1, keepdim=True)
    ground_truth = normalized_prob * flashinfer_style_keep(normalized_prob, p)
    ground_truth = ground_truth / ground_truth.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(renormalised_nucleus(normalized_prob, p), ground_truth, rtol=1e-3, atol=1e-3)
    # The same from the candidates: their probabilities over the captured mass.
    ids, probs, counts, mass = mtp_ext.top_p_candidates(normalized_prob.log(), p, vocab)
    from_candidates = torch.zeros_like(normalized_prob).scatter_add(1, ids.clamp(min=0), probs / mass[:, None])
    torch.testing.assert_close(from_candidates, ground_truth, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("batch,vocab", [(4, 111), (99, 111), (4, 32000)])
def test_flashinfer_top_p_renorm_probs_per_request(batch, vocab):
    torch.manual_seed(42)
    pre_norm_prob = torch.rand(batch, vocab)
    normalized_prob = pre_norm_prob / pre_norm_prob.sum(dim=-1, keepdim=True)
    top_p = torch.linspace(0.1, 0.9, batch)
    ground_truth = normalized_prob * flashinfer_style_keep(normalized_prob, top_p)
    ground_truth = ground_truth / ground_truth.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(renormalised_nucleus(normalized_prob, top_p), ground_truth, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("batch,vocab", [(1, 111), (19, 500), (4, 32000)])
def test_flashinfer_top_p_sampling_stays_in_the_nucleus(batch, vocab, p):
    # Every token drawn from our nucleus lies in FlashInfer's mask, cdf > (1 - p) - eps.
    torch.manual_seed(42)
    eps = 1e-4
    pre_norm_prob = torch.rand(batch, vocab)
    normalized_prob = pre_norm_prob / pre_norm_prob.sum(dim=-1, keepdim=True)
    sorted_prob, indices = torch.sort(normalized_prob, descending=False)
    cdf = torch.cumsum(sorted_prob, dim=-1)
    mask = torch.zeros(batch, vocab, dtype=torch.int32).scatter_add_(1, indices, (cdf > (1 - p) - eps).int())
    samples = torch.multinomial(renormalised_nucleus(normalized_prob, p), 500, replacement=True)
    assert torch.all(mask.gather(1, samples) == 1)


def test_flashinfer_boundary_rule_differs():
    # FlashInfer's ground truth keeps a token whose ascending cumulative probability equals
    # 1 - p: of ten equal tokens at p = 0.3 it keeps four; the project's nucleus is three.
    probs = torch.full((1, 10), 0.1)
    assert int(flashinfer_style_keep(probs, 0.3).sum()) == 4
    assert int(kept(mtp_ext.top_p_mask(probs.log(), 0.3)).sum()) == 3
