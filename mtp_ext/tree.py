"""Draft forests (one tree of candidate tokens per row) and packing them for one forward pass
of a model over its KV cache. Shared by marginalisation (mtp_ext.marginal, mtp_ext.evaluate)
and speculative decoding (mtp_ext.speculative)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mtp_ext.models.adapters import CausalLMAdapter, PackedMask
from mtp_ext.ops import TreePack, tree_pack

__all__ = ["DraftForest", "PackedTokens", "pack_for_model", "pack_forest"]


@dataclass
class DraftForest:
    """R draft trees, one per row (predict, decoding) or per (row, position) (evaluation).
    Nodes are stored level by level, so a tree's deepest nodes are its last `leaf_counts` slots.

    Attributes:
        token_ids: [R, N] int64, each node's token.
        parents: [R, N] int64, the parent's slot, -1 for depth 1.
        weights: [R, N] float32, the path probability, 0 in unused slots.
        counts: [R] int64, slots in use.
        leaf_counts: [R] int64, nodes of the deepest level.
    """

    token_ids: Tensor
    parents: Tensor
    weights: Tensor
    counts: Tensor
    leaf_counts: Tensor

    @classmethod
    def from_candidates(cls, ids: Tensor, probs: Tensor, counts: Tensor) -> "DraftForest":
        """Trees of depth 1 from padded candidates (as top_p_candidates gives them).

        Args:
            ids: [R, C] int64 token ids, -1 in unused slots.
            probs: [R, C] float32, each candidate's weight.
            counts: [R] integer, the slots in use.

        Returns:
            DraftForest of R trees of C slots; the leaves are all the nodes.
        """
        counts = counts.long()
        return cls(ids.clamp(min=0), torch.full_like(ids, -1), probs.clone(), counts, counts.clone())

    @classmethod
    def roots(cls, tokens: Tensor) -> "DraftForest":
        """Trees of one node each, of weight 1.

        Args:
            tokens: [R] int64.

        Returns:
            DraftForest of R trees of one slot.
        """
        ones = torch.ones(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return cls.from_candidates(tokens[:, None], torch.ones(tokens.shape[0], 1, device=tokens.device), ones)

    @property
    def size(self) -> int:
        """N, the slots per tree."""
        return self.token_ids.shape[1]

    def live(self) -> Tensor:
        """[R, N] bool: the slots in use."""
        return torch.arange(self.size, device=self.counts.device)[None, :] < self.counts[:, None]

    def depths(self) -> Tensor:
        """[R, N] int64: every node's depth, 0 for a node whose parent is -1."""
        depth = torch.zeros_like(self.parents)
        for slot in range(1, self.size):
            parent = self.parents[:, slot]
            depth[:, slot] = torch.where(parent >= 0, depth.gather(1, parent.clamp(min=0)[:, None])[:, 0] + 1, 0)
        return depth

    def with_counts(self, counts: Tensor) -> "DraftForest":
        """The same trees cut to their first slots, and to as many slots as the biggest keeps.

        Args:
            counts: [R] int64, slots kept per tree: a prefix of whole levels (leaf_counts are
                kept as they are).

        Returns:
            DraftForest of views of this one's tensors.
        """
        width = max(int(counts.max()), 1) if counts.numel() else self.size
        return DraftForest(self.token_ids[:, :width], self.parents[:, :width], self.weights[:, :width], counts,
                           self.leaf_counts)

    def select_rows(self, index: Tensor) -> "DraftForest":
        """Some of the trees, in as many slots as the biggest of them holds.

        Args:
            index: [R'] int64, the trees kept, in order.

        Returns:
            DraftForest of R' trees.
        """
        kept = DraftForest(self.token_ids[index], self.parents[index], self.weights[index], self.counts[index],
                           self.leaf_counts[index])
        return kept.with_counts(kept.counts)

    def leaf_slots(self) -> tuple[Tensor, Tensor]:
        """The slots of each tree's deepest nodes.

        Returns:
            (slots [R, L] int64, real [R, L] bool) with L = max(max(leaf_counts), 1); slots
            past a tree's leaves are not real (and clamped to N - 1).
        """
        width = max(int(self.leaf_counts.max()), 1)
        offsets = torch.arange(width, device=self.counts.device)
        first_leaf = (self.counts - self.leaf_counts)[:, None]
        real = offsets[None, :] < self.leaf_counts[:, None]
        slots = (first_leaf + offsets[None, :]).clamp(max=self.size - 1)
        return slots, real

    def grow(self, parent_slots: Tensor, child_ids: Tensor, child_weights: Tensor, max_nodes: int) -> "DraftForest":
        """A new level: each tree keeps its heaviest candidate children within max_nodes.

        Args:
            parent_slots: [R, M] int64, the parent of each candidate.
            child_ids: [R, M] int64, the candidates' tokens.
            child_weights: [R, M] float32, path weights, 0 for no candidate.
            max_nodes: nodes per tree after the level, the earlier levels included.

        Returns:
            DraftForest whose last `leaf_counts` slots of each tree are the new level, in
            order of descending weight (ties: the earlier candidate first).
        """
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
class PackedTokens:
    """Tree tokens as a model takes them.

    Attributes:
        input_ids: [B, P] int64.
        position_ids: [B, P] int64.
        mask: the model's attention mask over (cache, tree tokens): a tensor, or one per layer type.
    """

    input_ids: Tensor
    position_ids: Tensor
    mask: PackedMask


def pack_for_model(adapter: CausalLMAdapter, pack: Callable[[int], TreePack]) -> PackedTokens:
    """Tree tokens and the model's mask, from a packing of each attention window.

    Args:
        adapter: the model's adapter.
        pack: sliding_window -> TreePack (tree_pack or tree_pack_teacher); runs once per
            window that the model's layers use (0: none).

    Returns:
        PackedTokens: input_ids and position_ids [B, P] int64 of the last packing, and the
        model's mask built from every window's attention_mask.
    """
    allowed = {}
    for window in adapter.mask_windows():
        packed = pack(window)
        allowed[window] = packed.attention_mask
    return PackedTokens(packed.input_ids, packed.position_ids, adapter.packed_mask(allowed))


def pack_forest(adapter: CausalLMAdapter, forest: DraftForest, prefix_mask: Tensor) -> PackedTokens:
    """One tree per row after a prefix held in the cache, packed for the model.

    Args:
        adapter: the model's adapter.
        forest: B trees of N slots.
        prefix_mask: [B, T] bool or integer, the cache's attention mask.

    Returns:
        PackedTokens: input_ids and position_ids [B, N] int64, the mask over (cache, nodes).
    """
    return pack_for_model(adapter, lambda window: tree_pack(
        forest.token_ids, forest.parents, forest.counts, prefix_mask, sliding_window=window))
