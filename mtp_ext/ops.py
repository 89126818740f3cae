"""Typed wrappers over torch.ops.mtp_ext.*, their fake (meta) kernels and autograd.

The fake kernels give output shapes without running anything, so the ops trace under
torch.compile(fullgraph=True); every output has a fixed size for the same reason.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Union

import torch
from torch import Tensor

from mtp_ext._checks import check_positive_int, check_temperature, check_top_p

__all__ = ["TopPCandidates", "TreePack", "UnembedTopk", "linear_over_rows", "marginal_accumulate",
           "multihead_cross_entropy", "multihead_unembed_topk", "small_batch_linear", "top_p_candidates",
           "top_p_mask", "tree_pack", "tree_pack_teacher"]

# A float, or a float tensor [B] (or a scalar tensor): one value for every row, or one per row.
TopP = Union[float, Tensor]


class TopPCandidates(NamedTuple):
    """The nucleus of each row as a padded candidate set (see `top_p_candidates`).

    Attributes:
        ids: [B, C] int64 token ids, -1 in unused slots.
        probs: [B, C] float32 probabilities, 0 in unused slots.
        counts: [B] int32, filled slots.
        mass: [B] float32, the probability held by the filled slots.
    """

    ids: Tensor
    probs: Tensor
    counts: Tensor
    mass: Tensor


def _top_p_per_row(top_p: TopP, logits: Tensor) -> Tensor:
    """top_p as the float32 [B] tensor the ops take. Scalars are checked here, without reading
    any device memory; tensors are checked by the op."""
    if isinstance(top_p, Tensor):
        # Checked here too: a meta tensor would send the call to the fake kernel.
        if top_p.device != logits.device:
            raise ValueError(f"top_p is on {top_p.device} but logits are on {logits.device}")
        if top_p.dim() == 0:
            top_p = top_p.expand(logits.shape[0])
        return top_p.to(torch.float32)
    top_p = check_top_p(top_p)
    return torch.full((logits.shape[0],), top_p, dtype=torch.float32, device=logits.device)


def top_p_candidates(
    logits: Tensor,
    top_p: TopP = 0.99,
    max_candidates: int = 256,
    temperature: float = 1.0,
) -> TopPCandidates:
    """The top-p nucleus of every row of `logits`, as a padded candidate set.

    Probabilities are softmax(logits / temperature) in float32. The nucleus of a row is the
    shortest run of tokens, in order of descending probability (ties: lower id first; Hugging
    Face and vLLM choose among tied tokens in their unstable sort's order), whose probability
    reaches `top_p`. A run whose probability lies within one float32 ulp under top_p reaches
    it: top_p is taken in float32, so this keeps the decimal boundary exact (3 of 10 equal
    tokens reach 0.3). Tokens more than 29 nats below the row's top logit (probability
    < 2.5e-13 of the top token's) carry no mass and never enter a nucleus.

    No sort of the vocabulary: a radix select finds the threshold and only the selected tokens
    are sorted. Deterministic, and the same result on CPU and CUDA.

    Args:
        logits: [B, V] float32, bfloat16 or float16.
        top_p: a float, or a float tensor [B] (or 0-d) on logits' device; values in (0, 1].
        max_candidates: C, the slots per row (>= 1; may exceed V).
        temperature: finite, > 0.

    Returns:
        TopPCandidates(ids [B, C] int64, probs [B, C] float32, counts [B] int32, mass [B]
        float32): the first `counts[b] = min(nucleus size, max_candidates)` slots of `ids[b]` /
        `probs[b]` hold the nucleus in that order, the rest hold -1 / 0; `mass[b]` is the
        probability of the returned tokens.
    """
    max_candidates = check_positive_int(max_candidates, "max_candidates")
    temperature = check_temperature(temperature)
    _check_logits_rank(logits)
    ids, probs, counts, mass = torch.ops.mtp_ext.top_p_candidates(
        logits, _top_p_per_row(top_p, logits), max_candidates, temperature
    )
    return TopPCandidates(ids, probs, counts, mass)


def top_p_mask(
    logits: Tensor,
    top_p: TopP,
    min_tokens_to_keep: int = 1,
    filter_value: float = -math.inf,
) -> Tensor:
    """`logits` with every token outside the top-p nucleus set to `filter_value`.

    Keeps the nucleus of `top_p_candidates` (at temperature 1), grown to the
    `min_tokens_to_keep` most probable tokens: Hugging Face's TopPLogitsWarper's set except where
    the rules deliberately differ (README, "Differences from peers"): ties at the boundary go to
    the lower id (Hugging Face keeps those its `torch.sort(stable=False)` puts last),
    probabilities are float32 also for bf16/fp16 logits, the boundary uses exact sums, and at
    top_p = 1 only tokens of logit -inf are filtered (Hugging Face also filters finite logits
    whose fp32 probability underflows to 0, more than about 100 nats below the top one).
    `TopPLogitsWarper(top_p, match_hf=True)` gives Hugging Face's exact set.

    Args:
        logits: [B, V] float32, bfloat16 or float16.
        top_p: a float, or a float tensor [B] (or 0-d) on logits' device; values in (0, 1].
        min_tokens_to_keep: the nucleus is grown to at least this many tokens (>= 1).
        filter_value: the value given to every token outside the nucleus.

    Returns:
        [B, V], a new tensor of logits' dtype.
    """
    min_tokens_to_keep = check_positive_int(min_tokens_to_keep, "min_tokens_to_keep")
    _check_logits_rank(logits)
    return torch.ops.mtp_ext.top_p_mask(
        logits, _top_p_per_row(top_p, logits), min_tokens_to_keep, float(filter_value)
    )


def _check_logits_rank(logits: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")


@torch.library.register_fake("mtp_ext::top_p_candidates")
def _top_p_candidates_fake(logits, top_p, max_candidates, temperature):
    _check_fake_devices("top_p_candidates", logits=logits, top_p=top_p)
    torch._check(logits.dim() == 2, lambda: "logits must be 2-D [batch, vocab]")
    batch = logits.shape[0]
    return (
        logits.new_empty((batch, max_candidates), dtype=torch.long),
        logits.new_empty((batch, max_candidates), dtype=torch.float32),
        logits.new_empty((batch,), dtype=torch.int32),
        logits.new_empty((batch,), dtype=torch.float32),
    )


@torch.library.register_fake("mtp_ext::top_p_mask")
def _top_p_mask_fake(logits, top_p, min_tokens_to_keep, filter_value):
    _check_fake_devices("top_p_mask", logits=logits, top_p=top_p)
    torch._check(logits.dim() == 2, lambda: "logits must be 2-D [batch, vocab]")
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


class TreePack(NamedTuple):
    """Draft-tree tokens packed for one forward pass over a KV cache (see `tree_pack`).

    Attributes:
        input_ids: [B, P] int64, pad_id in padding slots.
        position_ids: [B, P] int64.
        attention_mask: [B, 1, P, T + P] bool over (cache, packed tokens), True: may attend.
    """

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor


def tree_pack(
    tree_ids: Tensor,
    parents: Tensor,
    counts: Tensor,
    prefix_mask: Tensor,
    pad_id: int = 0,
    sliding_window: int = 0,
) -> TreePack:
    """Packs a draft tree per row, to run after a prefix held in a KV cache.

    Running the model on input_ids with position_ids, the mask (as an additive float mask)
    and the prefix's cache gives every node the logits of [prefix, ancestors, node]; the
    cache then also holds the tree tokens, so crop it back to T afterwards.

    Args:
        tree_ids: [B, N] int64, the nodes' tokens.
        parents: [B, N] int64, the index of each node's parent within its row's tree (smaller
            than the node's own index), or -1 for a child of the prefix's last token.
        counts: [B] int32 or int64, the nodes in use (later slots are padding and may hold
            anything).
        prefix_mask: [B, T] bool or integer, the prefix's attention mask: any pattern of real
            tokens (left padding included).
        pad_id: the token of padding slots.
        sliding_window: > 0: a node sees only keys fewer than that many positions before it
            (a sliding-window layer's mask); 0: no window.

    Returns:
        TreePack: input_ids [B, N] int64 (pad_id in padding slots); position_ids [B, N] int64
        = real prefix tokens + depth - 1 (Hugging Face's cumsum(mask) - 1 convention, depth 1
        for a child of the prefix); attention_mask [B, 1, N, T + N] bool over (prefix, nodes),
        True where a node may attend: the real prefix tokens, its ancestors and itself, as in
        the sequence [prefix, ancestors, node]. Padding slots see only themselves.
    """
    _check_same_device(tree_ids=tree_ids, parents=parents, counts=counts, prefix_mask=prefix_mask)
    return TreePack(*torch.ops.mtp_ext.tree_pack(
        tree_ids, parents, counts, prefix_mask, int(pad_id), int(sliding_window)
    ))


def tree_pack_teacher(
    tree_ids: Tensor,
    parents: Tensor,
    counts: Tensor,
    seq_mask: Tensor,
    pad_id: int = 0,
    sliding_window: int = 0,
    first_position: int = 0,
) -> TreePack:
    """`tree_pack` for a tree after each of many tokens of one sequence (teacher forcing).

    Tree w follows sequence token t = first_position + w (first_position + W <= T; by default
    the trees of tokens 0..W-1). All trees are scored in one pass.

    Args:
        tree_ids: [B, W, N] int64, the nodes' tokens, one tree per sequence token.
        parents: [B, W, N] int64, parent indices within tree w (-1: a child of token t).
        counts: [B, W] int32 or int64, the nodes in use in each tree.
        seq_mask: [B, T] bool or integer, the attention mask of the sequence held in the cache.
        pad_id: the token of padding slots.
        sliding_window: > 0: keys within that many positions only; 0: no window.
        first_position: the sequence token that tree 0 follows.

    Returns:
        TreePack over the flattened nodes (w, j) -> w * N + j: input_ids and position_ids
        [B, W * N] int64, position = pos(t) + depth with pos(t) = cumsum(seq_mask)[t] - 1;
        attention_mask [B, 1, W * N, T + W * N] bool in which node (w, j) sees the real
        sequence tokens up to t, its ancestors in tree w and itself (within `sliding_window`
        positions, if > 0). Padding nodes (j >= counts[b, w], or a padding token t) see only
        themselves.
    """
    _check_same_device(tree_ids=tree_ids, parents=parents, counts=counts, seq_mask=seq_mask)
    return TreePack(*torch.ops.mtp_ext.tree_pack_teacher(
        tree_ids, parents, counts, seq_mask, int(pad_id), int(sliding_window), int(first_position)
    ))


def marginal_accumulate(weights: Tensor, logits: Tensor) -> Tensor:
    """sum_n weights[b, n] * softmax(logits[b, n]): a marginal distribution.

    Rows of weight 0 are never read, so they may hold anything, NaN included; a row of
    positive weight must hold no NaN or +inf and at least one finite logit. Fused: two reads
    of the live rows, and the N x V probabilities are never written.

    Args:
        weights: [B, N] float32 (finite, >= 0), path probabilities, 0 for padding candidates.
        logits: [B, N, V] float32, bfloat16 or float16, any strides (unit stride along V is
            read in place).

    Returns:
        [B, V] float32.
    """
    _check_same_device(weights=weights, logits=logits)
    return torch.ops.mtp_ext.marginal_accumulate(weights, logits)


def _tree_pack_fake_outputs(tree_ids: Tensor, packed, seq_len):
    batch = tree_ids.shape[0]
    return (
        tree_ids.new_empty((batch, packed)),
        tree_ids.new_empty((batch, packed)),
        tree_ids.new_empty((batch, 1, packed, seq_len + packed), dtype=torch.bool),
    )


@torch.library.register_fake("mtp_ext::tree_pack")
def _tree_pack_fake(tree_ids, parents, counts, prefix_mask, pad_id, sliding_window):
    _check_fake_devices("tree_pack", tree_ids=tree_ids, parents=parents, counts=counts, prefix_mask=prefix_mask)
    torch._check(tree_ids.dim() == 2, lambda: "tree_ids must be 2-D [batch, nodes]")
    torch._check(prefix_mask.dim() == 2, lambda: "prefix_mask must be 2-D [batch, length]")
    return _tree_pack_fake_outputs(tree_ids, tree_ids.shape[1], prefix_mask.shape[1])


@torch.library.register_fake("mtp_ext::tree_pack_teacher")
def _tree_pack_teacher_fake(tree_ids, parents, counts, seq_mask, pad_id, sliding_window, first_position=0):
    _check_fake_devices("tree_pack_teacher", tree_ids=tree_ids, parents=parents, counts=counts, seq_mask=seq_mask)
    torch._check(tree_ids.dim() == 3, lambda: "tree_ids must be 3-D [batch, trees, nodes]")
    torch._check(seq_mask.dim() == 2, lambda: "seq_mask must be 2-D [batch, length]")
    return _tree_pack_fake_outputs(tree_ids, tree_ids.shape[1] * tree_ids.shape[2], seq_mask.shape[1])


@torch.library.register_fake("mtp_ext::marginal_accumulate")
def _marginal_accumulate_fake(weights, logits):
    _check_fake_devices("marginal_accumulate", weights=weights, logits=logits)
    torch._check(logits.dim() == 3, lambda: "logits must be 3-D [batch, candidates, vocab]")
    return logits.new_empty((logits.shape[0], logits.shape[2]), dtype=torch.float32)


class UnembedTopk(NamedTuple):
    """Each head's top-k tokens and log-sum-exp (see `multihead_unembed_topk`).

    Attributes:
        values: [N, B, k] float32 logits, descending.
        ids: [N, B, k] int64 token ids.
        lse: [N, B] float32, the log-sum-exp of each row's logits.
    """

    values: Tensor
    ids: Tensor
    lse: Tensor


def multihead_unembed_topk(hidden: Tensor, weight: Tensor, k: int) -> UnembedTopk:
    """The k most likely tokens of N heads through one shared unembedding.

    Logits hidden[n] @ weight.T are computed in float32, one tile of the vocabulary at a time
    with all N * B rows in one GEMM, so the weight is read once and the N x B x V logits are
    never held. A NaN logit ranks above every number, as in torch.sort and torch.topk, and
    makes its row's lse NaN: callers that need a distribution check lse. Every bit of the
    result is the same for any thread count.

    Args:
        hidden: [N, B, H] float32, bfloat16 or float16, N heads' hidden states.
        weight: [V, H] of hidden's dtype, the unembedding.
        k: the tokens kept per head and row.

    Returns:
        UnembedTopk: values [N, B, k] float32, per head and row the k largest logits in
        descending order (ties: lower id first); ids [N, B, k] int64, their token ids; lse
        [N, B] float32, the log-sum-exp of all V logits (so values - lse are log-probabilities).
    """
    if isinstance(k, bool) or int(k) != k:
        raise ValueError(f"k must be an integer, got {k!r}")
    _check_same_device(hidden=hidden, weight=weight)
    return UnembedTopk(*torch.ops.mtp_ext.multihead_unembed_topk(hidden, weight, int(k)))


def multihead_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    head_weights: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """The weighted mean of N heads' cross-entropy losses through one shared unembedding.

    The loss is sum_n head_weights[n] * CE_n, where CE_n is the mean cross-entropy of logits
    hidden[n] @ weight.T (float32; float64 for float64 inputs) over head n's targets that are
    not ignore_index, and 0 for a head without any. Chunked over rows so that no N x M x V
    logits are held; when a gradient is needed it is computed during this call (the backward
    only scales it). Higher-order gradients (create_graph=True) are exact but recompute the
    loss the plain way, holding N x M x V logits.

    Args:
        hidden: [N, M, H] float32, bfloat16, float16 or float64.
        weight: [V, H] of hidden's dtype, the unembedding.
        targets: [N, M] int64 in [0, V), or ignore_index.
        head_weights: [N] floating; None: 1 / N each.
        ignore_index: the target value that is not scored.

    Returns:
        A scalar float32 tensor (float64 for float64 inputs), differentiable with respect to
        hidden, weight and head_weights.
    """
    _check_same_device(hidden=hidden, weight=weight, targets=targets, head_weights=head_weights)
    if head_weights is None:
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        head_weights = torch.full((hidden.shape[0],), 1.0 / max(hidden.shape[0], 1), dtype=dtype,
                                  device=hidden.device)
    grad_enabled = torch.is_grad_enabled()
    loss, _, _, _ = torch.ops.mtp_ext.multihead_cross_entropy(
        hidden, weight, targets, head_weights, int(ignore_index),
        grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad,
    )
    return loss


def small_batch_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`torch.nn.functional.linear(input, weight, bias)` for inputs of a few rows, float32.

    Meant for the handful of rows of a draft tree's verification pass, which on a CPU are
    bound by reading the weights: the kernel reads each weight row once, at memory speed,
    where MKL's small-M GEMM (and its GEMV) streams them at well under it. Differentiable.

    Args:
        input: [..., K] float32 (at least one dimension).
        weight: [N, K] float32, on input's device.
        bias: [N] float32, or None.

    Returns:
        [..., N] float32.
    """
    _check_same_device(input=input, weight=weight, bias=bias)
    if input.dim() < 1:
        raise ValueError("input must have at least one dimension (in_features)")
    return linear_over_rows(input, weight, bias)


def linear_over_rows(input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """torch.ops.mtp_ext.small_batch_linear on input flattened to rows, without the wrapper's checks.

    Args:
        input: [..., K] float32.
        weight: [N, K] float32.
        bias: [N] float32, or None.

    Returns:
        [..., N] float32.
    """
    rows = input.reshape(math.prod(input.shape[:-1]), input.shape[-1])  # -1 is ambiguous when K = 0
    return torch.ops.mtp_ext.small_batch_linear(rows, weight, bias).reshape(*input.shape[:-1], weight.shape[0])


def _device_mismatch(tensors: dict[str, Tensor | None]) -> str | None:
    """"x is on A but y is on B" for the first tensor not on the first one's device, else None."""
    named = [(name, tensor) for name, tensor in tensors.items() if isinstance(tensor, Tensor)]
    for name, tensor in named[1:]:
        if tensor.device != named[0][1].device:
            return f"{name} is on {tensor.device} but {named[0][0]} is on {named[0][1].device}"
    return None


def _check_same_device(**tensors: Tensor | None) -> None:
    """The wrappers' device check (ValueError), before dispatch."""
    mismatch = _device_mismatch(tensors)
    if mismatch is not None:
        raise ValueError(mismatch)


def _check_fake_devices(op: str, **tensors: Tensor | None) -> None:
    """Every fake kernel's device check. A meta tensor among CPU ones sends a call to the fake
    kernel, which would return unfilled CPU tensors; under torch.compile all inputs are fake
    tensors of their real devices, so the check holds there as the kernels' own does."""
    mismatch = _device_mismatch(tensors)
    if mismatch is not None:
        raise RuntimeError(f"mtp_ext::{op}: {mismatch}")


@torch.library.register_fake("mtp_ext::multihead_unembed_topk")
def _multihead_unembed_topk_fake(hidden, weight, k):
    _check_fake_devices("multihead_unembed_topk", hidden=hidden, weight=weight)
    torch._check(hidden.dim() == 3, lambda: "hidden must be 3-D [heads, rows, hidden_size]")
    heads, batch = hidden.shape[0], hidden.shape[1]
    return (
        hidden.new_empty((heads, batch, k), dtype=torch.float32),
        hidden.new_empty((heads, batch, k), dtype=torch.long),
        hidden.new_empty((heads, batch), dtype=torch.float32),
    )


@torch.library.register_fake("mtp_ext::multihead_cross_entropy")
def _multihead_cross_entropy_fake(hidden, weight, targets, head_weights, ignore_index, hidden_grad, weight_grad):
    _check_fake_devices("multihead_cross_entropy", hidden=hidden, weight=weight, targets=targets,
                        head_weights=head_weights)
    torch._check(hidden.dim() == 3, lambda: "hidden must be 3-D [heads, rows, hidden_size]")
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return (
        hidden.new_empty((), dtype=dtype),
        hidden.new_empty((hidden.shape[0],), dtype=dtype),
        torch.empty_like(hidden, memory_format=torch.contiguous_format) if hidden_grad else hidden.new_empty((0,)),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if weight_grad else weight.new_empty((0,)),
    )


def _multihead_cross_entropy_setup_context(ctx, inputs, output):
    hidden, weight, targets, head_weights, ignore_index, hidden_grad, weight_grad = inputs
    _, head_losses, grad_hidden, grad_weight = output
    ctx.computed = (hidden_grad, weight_grad)
    ctx.head_weights_dtype = head_weights.dtype
    ctx.ignore_index = ignore_index
    # The inputs themselves (no copies) for a differentiable backward (create_graph=True).
    ctx.save_for_backward(head_losses, grad_hidden, grad_weight, hidden, weight, targets, head_weights)


def _multihead_cross_entropy_backward(ctx, grad_loss, _grad_head_losses, _grad_hidden, _grad_weight):
    """The gradients were computed in the forward call: scale them by the loss's gradient.
    Under create_graph=True they must be differentiable functions of the inputs, which the
    forward's gradients are not: then they are recomputed the plain way."""
    head_losses, grad_hidden, grad_weight, hidden, weight, targets, head_weights = ctx.saved_tensors
    if torch.is_grad_enabled():
        return _differentiable_cross_entropy_backward(ctx, grad_loss, hidden, weight, targets, head_weights)
    needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if (needs_hidden and not ctx.computed[0]) or (needs_weight and not ctx.computed[1]):
        raise RuntimeError(
            "mtp_ext::multihead_cross_entropy was called with hidden_grad/weight_grad False for an "
            "input that needs a gradient; call mtp_ext.multihead_cross_entropy instead"
        )
    return (
        grad_hidden * grad_loss.to(grad_hidden.dtype) if needs_hidden else None,
        grad_weight * grad_loss.to(grad_weight.dtype) if needs_weight else None,
        None,
        (head_losses * grad_loss).to(ctx.head_weights_dtype) if ctx.needs_input_grad[3] else None,
        None,
        None,
        None,
    )


def _differentiable_cross_entropy_backward(ctx, grad_loss, hidden, weight, targets, head_weights):
    """The backward of multihead_cross_entropy as plain, differentiable PyTorch (full logits,
    [N, M, V] at once), so that second derivatives are exact."""
    needs = ctx.needs_input_grad
    accumulate = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = torch.matmul(hidden.to(accumulate), weight.to(accumulate).t())
    scored = targets != ctx.ignore_index
    row_losses = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten().where(scored.flatten(), 0), reduction="none"
    ).view(targets.shape) * scored
    head_losses = row_losses.sum(1) / scored.sum(1).clamp_min(1)
    loss = (head_weights.to(accumulate) * head_losses).sum()
    wanted = [tensor for tensor, need in zip((hidden, weight), needs[:2]) if need]
    grads = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=True) if wanted else ())
    return (
        next(grads) if needs[0] else None,
        next(grads) if needs[1] else None,
        None,
        (head_losses * grad_loss).to(ctx.head_weights_dtype) if needs[3] else None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "mtp_ext::multihead_cross_entropy",
    _multihead_cross_entropy_backward,
    setup_context=_multihead_cross_entropy_setup_context,
)


@torch.library.register_fake("mtp_ext::small_batch_linear")
def _small_batch_linear_fake(input, weight, bias):
    _check_fake_devices("small_batch_linear", input=input, weight=weight, bias=bias)
    torch._check(input.dim() == 2, lambda: "input must be 2-D [rows, in_features]")
    torch._check(weight.dim() == 2, lambda: "weight must be 2-D [out_features, in_features]")
    return input.new_empty((input.shape[0], weight.shape[0]))


def _small_batch_linear_setup_context(ctx, inputs, output):
    input, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(input, weight)


def _small_batch_linear_backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    grad_input = grad_output @ weight if ctx.needs_input_grad[0] else None
    grad_weight = grad_output.T @ input if ctx.needs_input_grad[1] else None
    grad_bias = grad_output.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_input, grad_weight, grad_bias


torch.library.register_autograd(
    "mtp_ext::small_batch_linear",
    _small_batch_linear_backward,
    setup_context=_small_batch_linear_setup_context,
)
