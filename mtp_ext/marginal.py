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

from mtp_ext._checks import check_positive_int, check_top_p
from mtp_ext.models.adapters import CausalLMAdapter, check_inputs, last_real_positions, prefix_position_ids
from mtp_ext.ops import marginal_accumulate, top_p_candidates
from mtp_ext.tree import DraftForest, pack_forest

__all__ = ["LevelScores", "MarginalMTP", "MarginalPrediction", "score_leaves"]

# Largest number of float32 logits held at once when scoring leaves (256 MiB).
LOGIT_ELEMENTS_PER_CHUNK = 1 << 26


@dataclass
class LevelScores:
    """What one level of leaves yields: the marginal of the next step and, when asked,
    the leaves' own nucleus candidates for the level after.

    Attributes:
        marginal: [R, V] float32.
        captured_mass: [R] float32, the total weight of the leaves.
        children: (parent slots [R, M] int64, ids [R, M] int64, path weights [R, M] float32),
            the arguments of DraftForest.grow; None unless asked for.
    """

    marginal: Tensor
    captured_mass: Tensor
    children: Optional[tuple[Tensor, Tensor, Tensor]] = None


@dataclass
class MarginalPrediction:
    """What MarginalMTP.predict_detailed gives, one entry per step.

    Attributes:
        distributions: step k (from 1): [B, V] float32, the distribution of x_{t+k}.
        captured_mass: step k: [B] float32, the weight of the paths summed over (1 for step 1).
        tree_sizes: step k >= 2: [B] int64, the nodes of the draft tree used.
    """

    distributions: list[Tensor]
    captured_mass: list[Tensor]
    tree_sizes: list[Tensor] = field(default_factory=list)


class MarginalMTP:
    """Multi-token prediction by marginalisation over top-p draft trees.

    `MarginalMTP(model, top_p=0.99, max_candidates=64, max_nodes=256).predict(input_ids,
    attention_mask, steps=3)` returns the distributions of x_{t+1}, x_{t+2}, x_{t+3} after each
    row's last real token. Padding may be on either side.

    Args:
        model: a supported Hugging Face causal LM.
        top_p: the nucleus kept at every level, in (0, 1].
        max_candidates: cap on each nucleus.
        max_nodes: cap on the nodes of a draft tree.
    """

    def __init__(self, model, top_p: float = 0.99, max_candidates: int = 64, max_nodes: int = 256):
        self.top_p = check_top_p(top_p)
        self.max_candidates = check_positive_int(max_candidates, "max_candidates")
        self.max_nodes = check_positive_int(max_nodes, "max_nodes")
        self.adapter = CausalLMAdapter(model)

    @torch.no_grad()
    def predict(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, steps: int = 2) -> list[Tensor]:
        """The distributions of x_{t+1} .. x_{t+steps} after each row's last real token.

        Args:
            input_ids: [B, T] int64.
            attention_mask: [B, T] (1: real token), or None: every token is real.
            steps: the tokens predicted, >= 1.

        Returns:
            steps tensors [B, V] float32.
        """
        return self.predict_detailed(input_ids, attention_mask, steps).distributions

    @torch.no_grad()
    def predict_detailed(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                         steps: int = 2) -> MarginalPrediction:
        """`predict`, with the captured mass and the tree size of every step.

        Args:
            input_ids: [B, T] int64.
            attention_mask: [B, T] (1: real token), or None: every token is real.
            steps: the tokens predicted, >= 1.

        Returns:
            MarginalPrediction.
        """
        attention_mask = check_inputs(self.adapter, input_ids, attention_mask, steps)
        adapter = self.adapter
        cache = adapter.new_cache()
        hidden = adapter.hidden_states(input_ids, attention_mask, prefix_position_ids(attention_mask), cache)
        last_real = last_real_positions(attention_mask)
        logits = adapter.logits(hidden[torch.arange(hidden.shape[0]), last_real])
        prediction = MarginalPrediction([torch.softmax(logits, -1)], [torch.ones(logits.shape[0], device=logits.device)])
        if steps == 1:
            return prediction
        forest = DraftForest.from_candidates(*top_p_candidates(logits, self.top_p, self.max_candidates)[:3])
        prefix_length = input_ids.shape[1]
        for step in range(2, steps + 1):
            packed = pack_forest(adapter, forest, attention_mask)
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


def score_leaves(adapter: CausalLMAdapter, forest: DraftForest, node_hidden: Tensor, top_p: float,
                 max_candidates: int, expand: bool) -> LevelScores:
    """The marginal of the deepest level's children: sum over leaves of weight * softmax(logits),
    in chunks of trees so that at most LOGIT_ELEMENTS_PER_CHUNK logits exist at once.

    Args:
        adapter: the model's adapter.
        forest: R trees of N slots.
        node_hidden: final hidden states of the packed pass over the forest, R * N rows of H
            ([B, P, H] with B * P = R * N).
        top_p: the nucleus of each leaf's candidate children.
        max_candidates: cap on each nucleus.
        expand: also give each leaf's nucleus as candidate children.

    Returns:
        LevelScores.
    """
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
