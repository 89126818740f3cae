"""Plain-PyTorch versions of every op: the ground truth for tests and the baseline for
benchmarks. Imports only torch.

They follow the kernels' definitions (README, "The ops") with a full sort of the vocabulary
and float64 cumulative sums; the kernels add up integer masses (2^-40 units of the top
token's probability), so the two agree except when a cumulative sum lies within about 1e-7
of top_p.
"""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

__all__ = ["MIN_LIVE_RATIO", "marginal_accumulate", "multihead_cross_entropy", "multihead_unembed_topk",
           "nucleus_in_order", "small_batch_linear", "teacher_forced_marginals", "top_p_candidates", "top_p_mask",
           "tree_pack", "tree_pack_teacher"]

# A token whose exp(s - max) is below 2^-41 rounds to zero integer mass in the kernels: it
# never enters a nucleus.
MIN_LIVE_RATIO = 2.0**-41


def _top_p_per_row(top_p: Union[float, Tensor], logits: Tensor) -> Tensor:
    if isinstance(top_p, Tensor):
        return top_p.to(torch.float64).expand(logits.shape[0])
    return torch.full((logits.shape[0],), float(top_p), dtype=torch.float64)


def _mass_share(top_p: Tensor) -> Tensor:
    """The share of the mass a nucleus must reach, float64: top_p rounded to float32 and then
    lowered by one float32 ulp (below 1), so that a prefix holding exactly the decimal top_p
    reaches it (csrc/common/top_p.h, mass_target)."""
    rounded = top_p.to(torch.float32)
    lowered = torch.nextafter(rounded, torch.zeros_like(rounded))
    return torch.where(rounded >= 1, rounded, lowered).to(torch.float64)


def nucleus_in_order(logits: Tensor, top_p: Union[float, Tensor], temperature: float = 1.0):
    """The sorted view of every row and its nucleus, before any cap.

    Args:
        logits: [B, V] floating.
        top_p: a float, or a tensor [B] (or 0-d) of values in (0, 1].
        temperature: > 0.

    Returns:
        (order [B, V] int64, token ids by descending probability, ties by lower id;
        sorted_probs [B, V] float32; cum_before [B, V] float64, the live mass before each slot;
        target [B, 1] float64, top_p times the live mass; nucleus_size [B] int64).
    """
    scaled = logits.float() / temperature
    sorted_scaled, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    sorted_probs = torch.softmax(sorted_scaled, dim=-1)
    live = torch.exp(sorted_scaled - sorted_scaled[:, :1]) >= MIN_LIVE_RATIO
    live_probs = sorted_probs.double() * live
    cum_before = live_probs.cumsum(dim=-1) - live_probs
    share = _mass_share(_top_p_per_row(top_p, logits)).to(logits.device)
    target = share[:, None] * live_probs.sum(-1, keepdim=True)
    in_nucleus = live & (cum_before < target)
    return order, sorted_probs, cum_before, target, in_nucleus.sum(dim=-1)


def top_p_candidates(
    logits: Tensor, top_p: Union[float, Tensor] = 0.99, max_candidates: int = 256, temperature: float = 1.0
):
    """Reference for mtp_ext.top_p_candidates.

    Args:
        logits: [B, V] floating.
        top_p: a float, or a tensor [B] (or 0-d) of values in (0, 1].
        max_candidates: C, the slots per row.
        temperature: > 0.

    Returns:
        (ids [B, C] int64, -1 in unused slots; probs [B, C] float32, 0 there; counts [B] int32;
        mass [B] float32).
    """
    order, sorted_probs, _, _, nucleus_size = nucleus_in_order(logits, top_p, temperature)
    batch, vocab = order.shape
    width = min(max_candidates, vocab)
    counts = nucleus_size.clamp(max=max_candidates)
    taken = torch.arange(width, device=logits.device)[None, :] < counts[:, None]
    ids = torch.full((batch, max_candidates), -1, dtype=torch.long, device=logits.device)
    probs = torch.zeros((batch, max_candidates), dtype=torch.float32, device=logits.device)
    ids[:, :width] = torch.where(taken, order[:, :width], -1)
    probs[:, :width] = torch.where(taken, sorted_probs[:, :width], 0.0)
    mass = probs.double().sum(dim=-1).float()
    return ids, probs, counts.to(torch.int32), mass


def top_p_mask(
    logits: Tensor, top_p: Union[float, Tensor], min_tokens_to_keep: int = 1, filter_value: float = -math.inf
) -> Tensor:
    """Reference for mtp_ext.top_p_mask.

    Args:
        logits: [B, V] floating.
        top_p: a float, or a tensor [B] (or 0-d) of values in (0, 1].
        min_tokens_to_keep: the nucleus is grown to at least this many tokens.
        filter_value: the value given to every token outside the nucleus.

    Returns:
        [B, V] of logits' dtype.
    """
    order, _, _, _, nucleus_size = nucleus_in_order(logits, top_p)
    keep_count = nucleus_size.clamp(min=min_tokens_to_keep)
    keep_sorted = torch.arange(order.shape[1], device=logits.device)[None, :] < keep_count[:, None]
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    whole_row = (_top_p_per_row(top_p, logits) >= 1.0).to(logits.device)[:, None]
    keep = torch.where(whole_row, logits != -math.inf, keep)
    return logits.masked_fill(~keep, filter_value)


def tree_pack(tree_ids: Tensor, parents: Tensor, counts: Tensor, prefix_mask: Tensor, pad_id: int = 0,
              sliding_window: int = 0):
    """Reference for mtp_ext.tree_pack, node by node.

    Args:
        tree_ids: [B, N] int64.
        parents: [B, N] int64, -1 for a child of the prefix's last token.
        counts: [B] int32 or int64.
        prefix_mask: [B, T] bool or integer.
        pad_id: the token of padding slots.
        sliding_window: > 0: keys within that many positions only; 0: no window.

    Returns:
        (input_ids [B, N] int64, position_ids [B, N] int64, attention_mask [B, 1, N, T + N]
        bool), on tree_ids' device.
    """
    last = prefix_mask.shape[1] - 1
    return _pack_trees(tree_ids[:, None], parents[:, None], counts[:, None], prefix_mask, first_anchor=last,
                       padding_anchor_empties_tree=False, pad_id=pad_id, sliding_window=sliding_window)


def tree_pack_teacher(tree_ids: Tensor, parents: Tensor, counts: Tensor, seq_mask: Tensor, pad_id: int = 0,
                      sliding_window: int = 0, first_position: int = 0):
    """Reference for mtp_ext.tree_pack_teacher, node by node.

    Args:
        tree_ids: [B, W, N] int64.
        parents: [B, W, N] int64.
        counts: [B, W] int32 or int64.
        seq_mask: [B, T] bool or integer.
        pad_id: the token of padding slots.
        sliding_window: > 0: keys within that many positions only; 0: no window.
        first_position: the sequence token that tree 0 follows.

    Returns:
        (input_ids [B, W * N] int64, position_ids [B, W * N] int64, attention_mask
        [B, 1, W * N, T + W * N] bool), on tree_ids' device.
    """
    return _pack_trees(tree_ids, parents, counts, seq_mask, first_anchor=first_position,
                       padding_anchor_empties_tree=True, pad_id=pad_id, sliding_window=sliding_window)


def _pack_trees(tree_ids, parents, counts, seq_mask, first_anchor, padding_anchor_empties_tree, pad_id,
                sliding_window):
    """Node by node: each live node (w, j) attends to the keys of the sequence it stands for,
    [real tokens up to its anchor first_anchor + w, its ancestors, itself], at their positions
    in that sequence; a padding node only to itself."""
    batch, trees, nodes = tree_ids.shape
    length = seq_mask.shape[1]
    packed = trees * nodes
    real = (seq_mask != 0).cpu()
    seq_positions = real.long().cumsum(1) - 1
    parent_lists, count_lists = parents.tolist(), counts.tolist()
    input_ids = torch.full((batch, packed), pad_id, dtype=torch.long)
    position_ids = torch.empty((batch, packed), dtype=torch.long)
    mask = torch.zeros((batch, 1, packed, length + packed), dtype=torch.bool)
    for b in range(batch):
        for w in range(trees):
            anchor = first_anchor + w
            anchor_position = int(seq_positions[b, anchor]) if anchor >= 0 else -1
            tree_live = not padding_anchor_empties_tree or bool(real[b, anchor])
            for j in range(nodes):
                slot = w * nodes + j
                if not (tree_live and j < count_lists[b][w]):
                    position_ids[b, slot] = anchor_position + 1
                    mask[b, 0, slot, length + slot] = True
                    continue
                path = [j]  # the node and its ancestors, up to the child of the anchor
                while parent_lists[b][w][path[-1]] >= 0:
                    path.append(parent_lists[b][w][path[-1]])
                position = anchor_position + len(path)
                input_ids[b, slot] = tree_ids[b, w, j]
                position_ids[b, slot] = position
                in_window = torch.ones(anchor + 1, dtype=torch.bool)
                if sliding_window > 0:
                    in_window = position - seq_positions[b, : anchor + 1] < sliding_window
                mask[b, 0, slot, : anchor + 1] = real[b, : anchor + 1] & in_window
                for depth, node in enumerate(reversed(path), start=1):
                    key_position = anchor_position + depth
                    if sliding_window <= 0 or position - key_position < sliding_window:
                        mask[b, 0, slot, length + w * nodes + node] = True
    device = tree_ids.device
    return input_ids.to(device), position_ids.to(device), mask.to(device)


def marginal_accumulate(weights: Tensor, logits: Tensor) -> Tensor:
    """Reference for mtp_ext.marginal_accumulate: softmax in float32, then the weighted sum.

    Rows of weight 0 are zeroed before the sum, since they may hold NaN.

    Args:
        weights: [B, N] float32.
        logits: [B, N, V] floating.

    Returns:
        [B, V] float32.
    """
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    probs.masked_fill_((weights == 0)[:, :, None], 0.0)
    return torch.bmm(weights[:, None, :], probs)[:, 0]


def multihead_unembed_topk(hidden: Tensor, weight: Tensor, k: int):
    """Reference for mtp_ext.multihead_unembed_topk: full logits per head, then a stable sort
    and logsumexp in float32; ties in value go to the lower id.

    Args:
        hidden: [N, B, H] floating.
        weight: [V, H] floating.
        k: the tokens kept per head and row.

    Returns:
        (values [N, B, k] float32, ids [N, B, k] int64, lse [N, B] float32).
    """
    logits = torch.matmul(hidden.float(), weight.float().t())
    order = torch.sort(logits, dim=-1, descending=True, stable=True)
    return order.values[..., :k], order.indices[..., :k], torch.logsumexp(logits, dim=-1)


def multihead_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, head_weights: Tensor | None = None,
                            ignore_index: int = -100) -> Tensor:
    """Reference for mtp_ext.multihead_cross_entropy: sum_i head_weights[i] * CE_i, where CE_i is
    head i's mean cross-entropy over its targets that are not ignore_index (0 if it has none).
    Logits are computed in float32 (float64 for float64 inputs).

    Args:
        hidden: [N, M, H] floating.
        weight: [V, H] floating.
        targets: [N, M] int64.
        head_weights: [N]; None: 1 / N each.
        ignore_index: the target value that is not scored.

    Returns:
        A scalar float32 tensor (float64 for float64 inputs).
    """
    num_heads = hidden.shape[0]
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if head_weights is None:
        head_weights = torch.full((num_heads,), 1.0 / num_heads, device=hidden.device)
    loss = hidden.new_zeros((), dtype=dtype)
    for head in range(num_heads):
        logits = torch.matmul(hidden[head].to(dtype), weight.to(dtype).t())
        kept = targets[head] != ignore_index
        if kept.any():
            head_loss = torch.nn.functional.cross_entropy(logits[kept], targets[head][kept])
            loss = loss + head_weights[head].to(dtype) * head_loss
    return loss


def small_batch_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference for mtp_ext.small_batch_linear (same arguments and result): F.linear."""
    return torch.nn.functional.linear(input, weight, bias)


# --- Teacher-forced marginalisation, the plain ways (baselines for evaluate_mtp) ---------------


def _cache_keyword(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def teacher_forced_marginals(model, sequence: Tensor, top_p: float = 0.99, max_candidates: int = 64,
                             method: str = "rerun"):
    """Step-2 marginals at every position of one sequence, computed without packing.

    Args:
        model: a Hugging Face causal LM (needs transformers' DynamicCache for "cache_copy").
        sequence: [L] int64 token ids.
        top_p: the nucleus of the step-1 candidates.
        max_candidates: cap on each nucleus.
        method: "rerun": every candidate continuation runs as its own sequence, prefix
            included; "cache_copy": the sequence runs once, then each candidate runs on its own
            copy of the cache, cut back to its position.

    Returns:
        (step-1 distributions [L-1, V] float32, step-2 marginals [L-2, V] float32, captured
        mass [L-2] float32).
    """
    import copy

    if method not in ("rerun", "cache_copy"):
        raise ValueError(f"method must be 'rerun' or 'cache_copy', got {method!r}")
    from transformers import DynamicCache  # a baseline for HF models; the module needs only torch

    length = sequence.shape[0]
    # A cache without config keeps every token, so that it can be cut back (sliding layers too).
    cache_arguments = {_cache_keyword(model): DynamicCache()} if method == "cache_copy" else {}
    outputs = model(sequence[None], use_cache=method == "cache_copy", **cache_arguments)
    step1 = torch.softmax(outputs.logits[0, :-1].float(), -1)
    ids, probs, counts, _ = top_p_candidates(outputs.logits[0, :-2].float(), top_p, max_candidates)
    marginals = torch.zeros(length - 2, step1.shape[1])
    for position in range(length - 2):
        for slot in range(int(counts[position])):
            candidate = ids[position, slot].view(1, 1)
            if method == "rerun":
                tokens = torch.cat([sequence[None, : position + 1], candidate], 1)
                logits = model(tokens).logits[0, -1]
            else:
                cache = copy.deepcopy(outputs.past_key_values)
                cache.crop(position + 1 - length)
                logits = model(candidate, position_ids=torch.tensor([[position + 1]]), use_cache=True,
                               **{_cache_keyword(model): cache}).logits[0, -1]
            marginals[position] += probs[position, slot] * torch.softmax(logits.float(), -1)
    return step1, marginals, probs.sum(1)
