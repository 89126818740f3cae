"""Multi-token prediction by marginalisation on any supported Hugging Face causal LM.

p(x_{t+k} | x_{<=t}) is a sum over the paths of a draft tree of depth k-1: each level keeps the
top-p nucleus of every leaf's next-token distribution (at most `max_candidates` children, at
most `max_nodes` nodes per tree in all), and one forward pass over the packed tree tokens,
reusing the prefix's KV cache, gives every node's next-token distribution.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from mtp_ext.models.adapters import CausalLMAdapter, prefix_position_ids
from mtp_ext.ops import marginal_accumulate, top_p_candidates, tree_pack, tree_pack_teacher

# Largest number of float32 logits held at once when scoring leaves (256 MiB).
LOGIT_ELEMENTS_PER_CHUNK = 1 << 26


@dataclass
class DraftForest:
    """R draft trees, one per row (predict) or per (row, position) (evaluation). Nodes are
    stored level by level, so a tree's deepest nodes are its last `leaf_counts` slots."""

    token_ids: Tensor  # [R, N] int64
    parents: Tensor  # [R, N] int64: parent's slot, -1 for depth 1
    weights: Tensor  # [R, N] float32: path probability, 0 in unused slots
    counts: Tensor  # [R] int64: slots in use
    leaf_counts: Tensor  # [R] int64: nodes of the deepest level

    @classmethod
    def from_candidates(cls, ids: Tensor, probs: Tensor, counts: Tensor) -> "DraftForest":
        counts = counts.long()
        return cls(ids.clamp(min=0), torch.full_like(ids, -1), probs.clone(), counts, counts.clone())

    @property
    def size(self) -> int:
        return self.token_ids.shape[1]

    def leaf_slots(self) -> tuple[Tensor, Tensor]:
        """Slots of each tree's deepest nodes [R, L] and which of them are real [R, L]."""
        width = max(int(self.leaf_counts.max()), 1)
        offsets = torch.arange(width, device=self.counts.device)
        first_leaf = (self.counts - self.leaf_counts)[:, None]
        real = offsets[None, :] < self.leaf_counts[:, None]
        slots = (first_leaf + offsets[None, :]).clamp(max=self.size - 1)
        return slots, real

    def grow(self, parent_slots: Tensor, child_ids: Tensor, child_weights: Tensor, max_nodes: int) -> "DraftForest":
        """A new level: candidate children [R, M] (ids, path weights, 0 for none) of the
        nodes at parent_slots [R, M]; each tree keeps its heaviest children within max_nodes."""
        room = (max_nodes - self.counts).clamp(min=0)
        order = torch.argsort(child_weights, dim=1, descending=True, stable=True)
        kept_per_tree = torch.minimum((child_weights > 0).sum(1), room)
        width = max(int(kept_per_tree.max()), 0)
        order = order[:, :width]
        keep = torch.arange(width, device=order.device)[None, :] < kept_per_tree[:, None]
        new_size = max(int((self.counts + kept_per_tree).max()), self.size)
        pad = new_size - self.size
        token_ids = torch.nn.functional.pad(self.token_ids, (0, pad))
        parents = torch.nn.functional.pad(self.parents, (0, pad), value=-1)
        weights = torch.nn.functional.pad(self.weights, (0, pad))
        # Children go after each tree's nodes; slots past a tree's share point at a scratch
        # column that is cut off below.
        target = torch.where(keep, self.counts[:, None] + torch.arange(width, device=order.device)[None, :],
                             new_size)
        scratch = torch.zeros(token_ids.shape[0], 1, dtype=token_ids.dtype, device=token_ids.device)
        token_ids = torch.cat([token_ids, scratch], 1).scatter_(1, target, child_ids.gather(1, order))
        parents = torch.cat([parents, scratch - 1], 1).scatter_(1, target, parent_slots.gather(1, order))
        weights = torch.cat([weights, scratch.float()], 1).scatter_(1, target, child_weights.gather(1, order))
        return DraftForest(token_ids[:, :new_size], parents[:, :new_size], weights[:, :new_size],
                           self.counts + kept_per_tree, kept_per_tree)


@dataclass
class LevelScores:
    """What one level of leaves yields: the marginal of the next step and, when asked,
    the leaves' own nucleus candidates for the level after."""

    marginal: Tensor  # [R, V] float32
    captured_mass: Tensor  # [R] float32: total weight of the leaves
    children: Optional[tuple[Tensor, Tensor, Tensor]] = None  # (parent slots, ids, weights) [R, M]


@dataclass
class MarginalPrediction:
    distributions: list[Tensor]  # step k: [B, V]
    captured_mass: list[Tensor]  # step k: [B], 1 for step 1
    tree_sizes: list[Tensor] = field(default_factory=list)  # step k >= 2: [B] nodes used


class MarginalMTP:
    """Multi-token prediction by marginalisation over top-p draft trees.

    `MarginalMTP(model, top_p=0.99, max_candidates=64, max_nodes=256).predict(input_ids,
    attention_mask, steps=3)` returns the distributions of x_{t+1}, x_{t+2}, x_{t+3} after each
    row's last real token. Padding may be on either side.
    """

    def __init__(self, model, top_p: float = 0.99, max_candidates: int = 64, max_nodes: int = 256):
        if not (0.0 < float(top_p) <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        if max_candidates < 1 or max_nodes < 1:
            raise ValueError(f"max_candidates and max_nodes must be >= 1, got {max_candidates}, {max_nodes}")
        self.adapter = CausalLMAdapter(model)
        self.top_p = float(top_p)
        self.max_candidates = int(max_candidates)
        self.max_nodes = int(max_nodes)

    @torch.no_grad()
    def predict(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, steps: int = 2) -> list[Tensor]:
        """Distributions [B, V] of x_{t+1} .. x_{t+steps}."""
        return self.predict_detailed(input_ids, attention_mask, steps).distributions

    @torch.no_grad()
    def predict_detailed(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                         steps: int = 2) -> MarginalPrediction:
        attention_mask = check_inputs(self.adapter, input_ids, attention_mask, steps)
        adapter = self.adapter
        cache = adapter.new_cache()
        hidden = adapter.hidden_states(input_ids, attention_mask, prefix_position_ids(attention_mask), cache)
        last_real = attention_mask.shape[1] - 1 - attention_mask.flip(1).long().argmax(1)
        logits = adapter.logits(hidden[torch.arange(hidden.shape[0]), last_real])
        prediction = MarginalPrediction([torch.softmax(logits, -1)], [torch.ones(logits.shape[0])])
        if steps == 1:
            return prediction
        forest = DraftForest.from_candidates(*top_p_candidates(logits, self.top_p, self.max_candidates)[:3])
        prefix_length = input_ids.shape[1]
        for step in range(2, steps + 1):
            packed = pack_for_model(adapter, lambda window: tree_pack(
                forest.token_ids, forest.parents, forest.counts, attention_mask, sliding_window=window))
            node_hidden = adapter.hidden_states(packed.input_ids, packed.mask, packed.position_ids, cache)
            adapter.trim_cache(cache, prefix_length)
            scores = score_leaves(adapter, forest, node_hidden, self.top_p, self.max_candidates,
                                  expand=step < steps)
            prediction.distributions.append(scores.marginal)
            prediction.captured_mass.append(scores.captured_mass)
            prediction.tree_sizes.append(forest.counts.clone())
            if step < steps:
                forest = forest.grow(*scores.children, max_nodes=self.max_nodes)
        return prediction


@dataclass
class PackedTokens:
    input_ids: Tensor
    position_ids: Tensor
    mask: object  # what the model takes: a tensor, or a dict per layer type


def pack_for_model(adapter: CausalLMAdapter, pack) -> PackedTokens:
    """Tree tokens and the model's mask: `pack(sliding_window)` -> TreePack runs once per
    window that the model's layers use (0: none)."""
    allowed = {}
    for window in adapter.mask_windows():
        packed = pack(window)
        allowed[window] = packed.attention_mask
    return PackedTokens(packed.input_ids, packed.position_ids, adapter.packed_mask(allowed))


def score_leaves(adapter: CausalLMAdapter, forest: DraftForest, node_hidden: Tensor, top_p: float,
                 max_candidates: int, expand: bool) -> LevelScores:
    """Marginal of the deepest level's children: sum over leaves of weight * softmax(logits),
    in chunks of trees so that at most LOGIT_ELEMENTS_PER_CHUNK logits exist at once; with
    `expand`, also each leaf's nucleus as candidate children."""
    trees = forest.token_ids.shape[0]
    hidden = node_hidden.reshape(trees, forest.size, -1)
    slots, real = forest.leaf_slots()
    leaf_weights = forest.weights.gather(1, slots) * real
    leaves = slots.shape[1]
    trees_per_chunk = max(1, LOGIT_ELEMENTS_PER_CHUNK // (leaves * adapter.vocab_size))
    marginals, children = [], []
    for start in range(0, trees, trees_per_chunk):
        chunk = slice(start, start + trees_per_chunk)
        leaf_hidden = hidden[chunk].gather(1, slots[chunk, :, None].expand(-1, -1, hidden.shape[-1]))
        logits = adapter.logits(leaf_hidden)
        marginals.append(marginal_accumulate(leaf_weights[chunk], logits))
        if expand:
            children.append(leaf_children(logits, slots[chunk], leaf_weights[chunk], top_p, max_candidates))
    scores = LevelScores(torch.cat(marginals), leaf_weights.sum(1))
    if expand:
        scores.children = tuple(torch.cat(parts) for parts in zip(*children))
    return scores


def leaf_children(logits: Tensor, slots: Tensor, leaf_weights: Tensor, top_p: float, max_candidates: int):
    """Nucleus candidates of every leaf as (parent slots, ids, path weights), [R, L * C]."""
    trees, leaves, vocab = logits.shape
    ids, probs, _, _ = top_p_candidates(logits.reshape(-1, vocab), top_p, max_candidates)
    width = ids.shape[1]
    child_weights = (probs.reshape(trees, leaves, width) * leaf_weights[:, :, None]).reshape(trees, -1)
    parent_slots = slots[:, :, None].expand(-1, -1, width).reshape(trees, -1)
    return parent_slots, ids.clamp(min=0).reshape(trees, -1), child_weights


def check_inputs(adapter: CausalLMAdapter, input_ids: Tensor, attention_mask: Optional[Tensor], steps: int) -> Tensor:
    """The attention mask to use (all ones when None), after checking the request."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                         f"{tuple(input_ids.shape)}")
    if not bool((attention_mask.sum(1) > 0).all()):
        raise ValueError("every row needs at least one real token (an attention_mask row is all 0)")
    # The deepest tree tokens sit steps - 1 positions after the prefix.
    needed = int(attention_mask.sum(1).max()) + steps - 1
    if needed > adapter.context_length:
        raise ValueError(f"input of {needed - steps + 1} tokens plus {steps - 1} predicted ones exceeds the "
                         f"model's context of {adapter.context_length}")
    return attention_mask
