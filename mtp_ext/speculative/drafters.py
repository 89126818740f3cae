"""The drafters, and the registry that names them (`drafter="marginal"`, `"heads:DIR"`,
`"token-head:DIR"`; the CLI's `--drafter` reads the same registry).

`MarginalDrafter` uses the step-2 marginal that the verification pass gives for free at the
last accepted node, `HeadsDrafter` trained MTP heads, `TokenHeadDrafter` a trained head that
also reads the next root (mtp_ext.heads.TokenHead). The protocol they follow: protocol.py.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from mtp_ext._checks import check_positive_int, check_top_p
from mtp_ext.heads import check_finite_lse
from mtp_ext.models.adapters import CausalLMAdapter
from mtp_ext.ops import marginal_accumulate, multihead_unembed_topk, top_p_candidates
from mtp_ext.speculative.protocol import (
    Chooser,
    Drafter,
    HiddenStates,
    ModelLogits,
    NodeState,
    TokenRule,
    TreeShape,
    VerifiedPass,
    final_hidden,
)
from mtp_ext.tree import DraftForest

__all__ = ["DEFAULT_DRAFTER", "TOKEN_HEADS_DIR", "DrafterEntry", "HeadsDrafter", "LookupDrafter", "LookupFirstDrafter", "MarginalDrafter",
           "TokenHeadDrafter", "check_drafter", "default_drafter_name", "drafter_help", "prepared_token_head_dir",
           "register_drafter", "registered_drafters",
           "resolve_drafter"]

Branching = Union[int, Sequence[int], None]
# What speculative_generate and `mtp-ext generate` draft with unless told: "auto" is the context
# lookup, merged with the token head prepared for the model where there is one (default_drafter_name).
DEFAULT_DRAFTER = "auto"
# Under the cache root: one token head per model name, as `make prepare` installs the committed ones.
TOKEN_HEADS_DIR = "token-heads"


def depth_one_shape(branching: Branching, max_nodes: Optional[int], name: str) -> TreeShape:
    """The shape of a drafter that drafts only the root's children: one branching count, and no
    max_nodes (the count is the budget)."""
    shape = TreeShape.of(branching, max_nodes)
    if shape.depth > 1 or shape.max_nodes is not None:
        raise ValueError(f"the {name} drafter takes one branching count (candidates under the root) and no "
                         f"other tree shape, got branching={branching}, max_nodes={max_nodes}")
    return shape


def root_children(shape: TreeShape, device: torch.device) -> int:
    """Candidates under the root of a depth-1 draft tree: the shape's, by default 3 on a CPU
    (where each node costs a share of a pass; bench/README.md, speculative decoding) and 8
    elsewhere."""
    if shape.branching is not None:
        return shape.branching[0]
    return 3 if device.type == "cpu" else 8


# ----------------------------------------------------------------------------- marginal


@dataclass
class MarginalGuess(NodeState):
    """The distribution of the token after the next root, at the node."""

    guess: Tensor  # [A, V] float32


class MarginalDrafter(Drafter):
    """Drafts the root's children from the step-2 marginal of the last pass.

    At the last accepted node n the pass also evaluated n's children c, so
    sum_c p(c | n) p(x | n, c) (marginal_accumulate) predicts the token after the next root
    without another forward; its top candidates (nucleus `top_p`, at most `branching`) become
    the root's children. Where n has no evaluated children (after the prompt, or n a leaf) the
    children are n's own runner-up tokens, so that the next pass has a marginal again.

    That is all a marginal can draft, and it is weak: the next root is chosen at n because no
    child of n held it, so the marginal mixes the continuations of the *other* candidates.
    Nothing a pass evaluates is conditioned on the next root, since a node holding it would have
    been accepted: the step-k marginal of a tree of depth k - 1 predicts the token that
    verifying the same tree already gives exactly.

    Args:
        branching: candidates under the root (an int, or a list of one count); None: 3 on a
            CPU, 8 elsewhere.
        top_p: the marginal's nucleus from which they are taken.
        max_nodes: must be None (the branching count is the budget); accepted so that every
            drafter takes the same tree arguments.
    """

    def __init__(self, branching: Branching = None, top_p: float = 0.9, max_nodes: Optional[int] = None):
        self.top_p = check_top_p(top_p)
        self.shape = depth_one_shape(branching, max_nodes, "marginal")

    def width(self, device: torch.device) -> int:
        """Candidates under the root.

        Args:
            device: where the model runs.

        Returns:
            The branching count, by default 3 on a CPU and 8 elsewhere.
        """
        return root_children(self.shape, device)

    def chooser(self, adapter: CausalLMAdapter, hidden: HiddenStates, rule: TokenRule,
                forest: DraftForest) -> Chooser:
        """Every node's logits at once (every_node_chooser), and at each visited node the
        marginal over its children, which the draft needs at the last one.

        Args and Returns: as Drafter.chooser; the state is a MarginalGuess.
        """
        live = forest.live()

        def guess(rows: Tensor, slots: Tensor, at_node: Tensor, tokens: Tensor, every_node: Tensor) -> MarginalGuess:
            is_child = live[rows] & (forest.parents[rows] == slots[:, None])
            return MarginalGuess(step2_guess(at_node, tokens, forest.token_ids[rows], is_child, every_node[rows]))

        return every_node_chooser(adapter, hidden, rule, forest, guess)

    def draft(self, previous: VerifiedPass[MarginalGuess]) -> DraftForest:
        """The root and, as its children, the marginal's top candidates.

        Args and Returns: as Drafter.draft.
        """
        if previous.drafter_state is not None:
            guess = previous.drafter_state.guess
        else:  # after the prompt: a single node, no children
            guess = runner_ups(torch.softmax(previous.stop_logits, -1), previous.next_tokens)
        width = self.width(guess.device)
        ids, probs, _, _ = top_p_candidates(guess.clamp(min=1e-30).log(), self.top_p, width)
        forest = DraftForest.roots(previous.next_tokens)
        return forest.grow(torch.zeros_like(ids), ids.clamp(min=0), probs, max_nodes=1 + width)


def every_node_chooser(adapter: CausalLMAdapter, hidden: HiddenStates, rule: TokenRule, forest: DraftForest,
                       at_node: Optional[Callable[..., NodeState]] = None) -> Chooser:
    """A Chooser that unembeds every node of the pass at once, for depth-1 trees of a few
    nodes: the walk visits the root and perhaps a child, and one read of the unembedding for a
    few rows costs little more than for one (bench/README.md, speculative decoding), so one
    read beats one per visited node. `at_node(rows, slots, logits at the nodes, tokens chosen
    there, every node's logits [B, N, V])` gives the drafter's state at the node; without it,
    the state is the model's logits."""
    every_node = adapter.logits(final_hidden(hidden)[:, : forest.size])  # [B, N, V]

    def choose(rows: Tensor, slots: Tensor) -> tuple[Tensor, NodeState]:
        logits = every_node[rows, slots]
        tokens = rule.choose(logits, rows, slots)
        return tokens, (at_node(rows, slots, logits, tokens, every_node) if at_node else ModelLogits(logits))

    if not rule.do_sample and not rule.processors and at_node is None:
        # What greedy decoding chooses at every node, so the walk can follow the tree without
        # a call per depth (walk's fast path); the choice is the same argmax.
        choose.node_tokens = every_node.argmax(-1)  # type: ignore[attr-defined]
    return choose


def step2_guess(at_node: Tensor, next_tokens: Tensor, node_tokens: Tensor, is_child: Tensor,
                node_logits: Tensor) -> Tensor:
    """The distribution [A, V] of the token after `next_tokens` [A] (chosen from logits
    `at_node` [A, V]): the marginal over the node's children (`is_child` [A, N] over the nodes
    of the row, their tokens `node_tokens` [A, N] and logits `node_logits` [A, N, V]), or the
    node's runner-up tokens where it has no children, so that the next pass has a marginal."""
    probs = torch.softmax(at_node, -1)
    weights = probs.gather(1, node_tokens) * is_child  # rows of weight 0 are never read
    return torch.where(is_child.any(1, keepdim=True), marginal_accumulate(weights, node_logits),
                       runner_ups(probs, next_tokens))


def runner_ups(probs: Tensor, chosen: Tensor) -> Tensor:
    """probs [A, V] without the chosen tokens [A]."""
    return probs.scatter(1, chosen[:, None], 0.0)


# ----------------------------------------------------------------------------- MTP heads


@dataclass
class HeadsTopk(NodeState):
    """The drafting heads' top-k at the node."""

    values: Tensor  # [A, D, k] float32 logits
    ids: Tensor  # [A, D, k] int64
    lse: Tensor  # [A, D] float32 log-sum-exp


class HeadsDrafter(Drafter):
    """Medusa-style drafts from trained MTP heads (mtp_ext.heads.MTPHeadsModel).

    Head j predicts x_{t + heads.steps[j]} (steps 2, 3, ...) from position t, so at the last
    accepted node (position t, whose next token x_{t+1} is the next root, chosen from the model's
    own logits) the head of step d + 1 drafts the root's descendants at depth d: its top
    `branching[d - 1]` tokens under every node of depth d - 1, the tree pruned to the `max_nodes`
    paths of highest probability (the product of the heads' probabilities). The heads read the
    hidden states of the whole verification pass, so "block" heads (a decoder layer over the
    sequence) see the packed tree instead of the text: their drafts are worse, never wrong.

    The default tree depends on the device of the heads: on a CPU every extra node costs a
    sizeable share of a single-token pass, so the 3 best guesses for the token after next (4
    nodes) do best there; on a GPU, where a pass over 16 nodes costs about one over a single
    token, Medusa's wider tree (4, 3, 2, 2) of 16 (bench/README.md, speculative decoding).

    Args:
        heads: an MTPHeadsModel on the decoding model.
        branching: children per node at each depth (an int: depth 1 only).
        max_nodes: nodes per tree, the root included.
    """

    every_layer = True  # heads with weighted hidden states read every layer

    def __init__(self, heads, branching: Branching = None, max_nodes: Optional[int] = None):
        on_cpu = heads.unembed_weight.device.type == "cpu"
        default = TreeShape((3,), 4) if on_cpu else TreeShape((4, 3, 2, 2), 16)
        shape = TreeShape.of(branching, max_nodes).with_default(default)
        self.heads = heads
        self.head_of_depth = [heads.steps.index(depth + 1) for depth in range(1, shape.depth + 1)
                              if depth + 1 in heads.steps]
        if not self.head_of_depth:
            raise ValueError(f"no head predicts x_(t+2) (heads' steps: {heads.steps}): nothing to draft")
        self.shape = TreeShape(shape.branching[: len(self.head_of_depth)], shape.node_budget())

    @property
    def branching(self) -> tuple[int, ...]:
        """Children per node at each drafted depth (no deeper than the heads reach)."""
        return self.shape.branching

    @property
    def max_nodes(self) -> int:
        """Nodes per tree, the root included."""
        return self.shape.max_nodes

    @classmethod
    def load(cls, directory, model, branching: Branching = None, max_nodes: Optional[int] = None) -> "HeadsDrafter":
        """A drafter from the heads saved by MTPHeadsModel.save.

        Args:
            directory: the heads' checkpoint directory.
            model: the decoding model (a UserError if the heads were trained for another).
            branching: as for the constructor.
            max_nodes: as for the constructor.

        Returns:
            HeadsDrafter.
        """
        from mtp_ext.heads import MTPHeadsModel

        return cls(MTPHeadsModel.load(directory, model), branching, max_nodes)

    def chooser(self, adapter: CausalLMAdapter, hidden: HiddenStates, rule: TokenRule,
                forest: DraftForest) -> Optional[Chooser]:
        """Greedy float32 decoding: at every visited node, one pass over the unembedding gives
        the model's argmax (its top-1, lower id on ties as argmax) and the heads' top-k, which
        are the drafts when the node is the last accepted one. A separate pass for the heads
        would read the whole unembedding again. Other dtypes round the model's logits (argmax
        ties that float32 top-1 would break) and sampling needs the whole distribution: None.

        Args and Returns: as Drafter.chooser; the state is a HeadsTopk.
        """
        final = final_hidden(hidden)
        if rule.do_sample or rule.processors or final.dtype != torch.float32:
            return None
        every_position = self.drafting_hidden(hidden)
        weight, width = self.heads.unembed_weight, max(self.branching)

        def choose(rows: Tensor, slots: Tensor) -> tuple[Tensor, HeadsTopk]:
            at_nodes = torch.cat([final[rows, slots][None], every_position[:, rows, slots]])  # [1 + D, A, H]
            values, ids, lse = multihead_unembed_topk(at_nodes, weight, width)
            check_finite_lse(lse, getattr(self.heads, "source", None))
            return ids[0, :, 0], HeadsTopk(values[1:].transpose(0, 1), ids[1:].transpose(0, 1), lse[1:].transpose(0, 1))

        return choose

    def drafting_hidden(self, hidden: HiddenStates) -> Tensor:
        """The states of the heads that draft depths 1..D, at every position of a pass.

        Args:
            hidden: the pass's HiddenStates (every layer's, as every_layer asks).

        Returns:
            [D, B, T, H].
        """
        return self.heads.head_hidden(hidden, which=self.head_of_depth)

    def heads_topk(self, previous: VerifiedPass[HeadsTopk]) -> tuple[Tensor, Tensor, Tensor]:
        """The heads' top-k at the stop nodes, for the heads that draft depths 1..D (the heads
        of other steps are not unembedded).

        Args:
            previous: the last verified pass.

        Returns:
            (values [D, B, k] float32 logits, ids [D, B, k] int64, lse [D, B] float32) with
            k = max(branching).
        """
        state = previous.drafter_state
        if state is not None:
            return state.values.transpose(0, 1), state.ids.transpose(0, 1), state.lse.transpose(0, 1)
        # head_hidden takes the pass's own hidden states (it checks them against the backbone's
        # latest pass), so every position goes through the heads and the stop nodes are picked after.
        every_position = self.drafting_hidden(previous.hidden)
        at_stop = previous.stop_positions()[None, :, None, None].expand(every_position.shape[0], -1, 1,
                                                                        every_position.shape[-1])
        head_hidden = every_position.gather(2, at_stop)[:, :, 0]  # [D, B, H]
        weight = self.heads.unembed_weight
        if head_hidden.dtype == torch.float64:  # the kernel takes 16/32-bit floats; guesses need no more
            head_hidden, weight = head_hidden.float(), weight.float()
        values, ids, lse = multihead_unembed_topk(head_hidden, weight, max(self.branching))
        check_finite_lse(lse, getattr(self.heads, "source", None))
        return values, ids, lse

    def draft(self, previous: VerifiedPass[HeadsTopk]) -> DraftForest:
        """The root and, level by level, its descendants from the heads' top-k, pruned to the
        max_nodes paths of highest probability.

        Args and Returns: as Drafter.draft.
        """
        values, ids, lse = self.heads_topk(previous)
        probs = torch.exp(values - lse[..., None])
        forest = DraftForest.roots(previous.next_tokens)
        for depth, width in enumerate(self.branching):
            slots, real = forest.leaf_slots()
            leaf_weights = forest.weights.gather(1, slots) * real
            child_weights = leaf_weights[:, :, None] * probs[depth, :, None, :width]
            forest = forest.grow(slots.repeat_interleave(width, 1), ids[depth, :, :width].repeat(1, slots.shape[1]),
                                 child_weights.flatten(1), max_nodes=self.max_nodes)
        return forest


# ----------------------------------------------------------------------------- token head


class TokenHeadDrafter(Drafter):
    """Drafts with a TokenHead (mtp_ext.heads.TokenHead): at the last accepted node (position t)
    the walk has chosen the next root x_{t+1}, and the head reads both the node's final hidden
    state and that token, where MTP heads must guess x_{t+2} without it. A head trained with
    chain L drafts up to L levels: each node's children come from the head chained on the
    state it predicted for the node's parent, reading the node's token (EAGLE's draft tree),
    the tree pruned to the max_nodes paths of highest probability.

    Args:
        head: a TokenHead for the decoding model.
        branching: children per node at each depth, at most head.chain depths; None: on a CPU
            the root's 3 best guesses only (there a 7-node tree of a second level costs more
            than it brings: bench/README.md, "A chained token head"), 2 for a batch of rows
            (whose pass costs in proportion to its rows there); elsewhere 8 and one child under
            each deeper node down to the head's chain.
        max_nodes: nodes per tree, the root included; None: the whole tree of `branching`.
    """

    def __init__(self, head, branching: Branching = None, max_nodes: Optional[int] = None):
        shape = TreeShape.of(branching, max_nodes)
        if shape.depth > head.chain:
            raise ValueError(f"the token head was trained for {head.chain} drafting level(s) (train-token-head "
                             f"--chain), so it drafts trees of that depth at most, got branching={branching}")
        self.head = head
        self.shape = shape

    @classmethod
    def load(cls, directory, model, branching: Branching = None, max_nodes: Optional[int] = None) -> "TokenHeadDrafter":
        """A drafter from the head that TokenHead.save (`mtp-ext train-token-head`) wrote in
        `directory`, for `model` (a UserError if it was trained for another); the tree
        arguments as for the constructor."""
        from mtp_ext.heads import TokenHead

        return cls(TokenHead.load(directory, model), branching, max_nodes)

    def tree_shape(self, device: torch.device, batch: int = 1) -> TreeShape:
        """The tree drafted on `device` for `batch` rows: the given shape, its unset fields by
        default.

        Args:
            device: where the model runs.
            batch: rows decoded at once.

        Returns:
            TreeShape with both fields set.
        """
        if device.type == "cpu":
            default = (3,) if batch == 1 else (2,)
        else:
            default = (8,) + (1,) * (self.head.chain - 1)
        branching = self.shape.branching or default
        return TreeShape(branching, self.shape.max_nodes or TreeShape(branching).node_budget())

    def chooser(self, adapter: CausalLMAdapter, hidden: HiddenStates, rule: TokenRule,
                forest: DraftForest) -> Chooser:
        """Every node's logits at once (every_node_chooser); the state is the model's logits.

        Args and Returns: as Drafter.chooser.
        """
        return every_node_chooser(adapter, hidden, rule, forest)

    def draft(self, previous: VerifiedPass) -> DraftForest:
        """The root and, level by level, the head's top tokens under every node of the last
        level, from the state predicted for the node's parent and the node's token.

        Args and Returns: as Drafter.draft.
        """
        shape = self.tree_shape(previous.next_tokens.device, len(previous.next_tokens))
        forest = DraftForest.roots(previous.next_tokens)
        level_slots = torch.zeros_like(previous.next_tokens)[:, None]  # [B, M]: the last level's nodes
        level_weights = torch.ones(level_slots.shape, device=level_slots.device)
        states = previous.stop_hidden()[:, None]  # [B, M, H]: the state each node's children read
        for width in shape.branching:
            logits, predicted = self.head.step(states, forest.token_ids.gather(1, level_slots))  # [B, M, K]
            probs, vocab_slots = torch.softmax(logits, -1).topk(min(width, logits.shape[-1]), -1)
            forest = forest.grow(level_slots[:, :, None].expand_as(vocab_slots).flatten(1),
                                 self.head.vocab_ids[vocab_slots].flatten(1),
                                 (level_weights[:, :, None] * probs).flatten(1), max_nodes=shape.max_nodes)
            leaves, real = forest.leaf_slots()
            # Each new node reads what the head predicted at its parent, the M-th node of the last level.
            parent_index = (forest.parents.gather(1, leaves)[:, :, None] == level_slots[:, None, :]).float().argmax(-1)
            states = predicted.gather(1, parent_index[:, :, None].expand(-1, -1, predicted.shape[-1]))
            level_slots, level_weights = leaves, forest.weights.gather(1, leaves) * real
        return forest


# ----------------------------------------------------------------------------- lookup in the context


class _NgramIndex:
    """Where each n-gram (min_ngram <= n <= max_ngram) of one row's tokens last occurred with a
    token after it, kept up to date as the row grows."""

    def __init__(self, tokens: list[int], max_ngram: int, min_ngram: int = 1):
        self.tokens = tokens  # the decoder's list of the row: it grows in place
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.follower = [{} for _ in range(max_ngram)]  # [n - 1]: n-gram -> index of the token after it
        self.indexed = 1

    def continuation(self, count: int) -> list[int]:
        """`count` tokens that followed the latest earlier occurrence of the longest suffix of
        the row (min_ngram to max_ngram tokens) that occurred before; none without one. A copy that
        reaches the row's end goes on from its own start, as a loop repeats (LZ77's
        overlapping copy): a match d tokens back predicts a period of d."""
        tokens = self.tokens
        for end in range(self.indexed, len(tokens)):  # n-grams ending at end - 1 now have a follower
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self.follower[n - 1][tuple(tokens[end - n:end])] = end
        self.indexed = len(tokens)
        for n in range(min(self.max_ngram, len(tokens)), self.min_ngram - 1, -1):
            start = self.follower[n - 1].get(tuple(tokens[-n:]))
            if start is not None:
                copy = tokens[start:start + count]
                while len(copy) < count:  # the match's continuation runs into the drafted copy itself
                    copy.append(copy[len(copy) - (len(tokens) - start)])
                return copy
        return []


class LookupDrafter(Drafter):
    """Drafts from the context itself, as prompt lookup decoding does (Saxena's prompt lookup,
    Hugging Face's `prompt_lookup_num_tokens`): the tokens that followed the latest earlier
    occurrence of the context's last n tokens, the root last (the longest n <= max_ngram that
    occurred before), as a chain under the root. A row without a match drafts nothing. Needs no
    training and no extra model pass; it pays on text that repeats itself (code, names, quotes).

    The latest occurrence, not the first one Hugging Face takes: text repeats what it said
    lately more than what it said long ago, and the latest match is accepted further
    (bench/README.md, "The lookup drafter's rules").

    Without a fixed size the chain's length follows its own acceptance, per row, along
    ADAPTIVE_CHAIN's ladder of lengths for the device: the first rung, one rung up after every
    pass that accepted the whole chain (the context is being repeated: a longer copy will be
    accepted too), and back to the first after a pass that rejected part of it. The rungs are
    where a pass's measured cost levels off (bench/pass-cost.json): a chain one token shorter
    than a rung costs about as much and is accepted less far. Sampling takes SAMPLING_CHAIN's
    ladder: a drafted token is accepted only where the draw picks it, so a copy is accepted less
    far than under greedy decoding and the first rung is one token. A batch of rows takes
    BATCH_CHAIN's ladder: its pass is as long as its longest chain, so long chains rarely pay
    there.

    Args:
        branching: only a chain: every count 1; its length is the chain's depth (fixed).
        max_nodes: nodes of the chain, the root included (fixed); None (and no branching): the
            adaptive length.
        max_ngram: the longest suffix looked up.
        min_ngram: the shortest suffix looked up (1: any token that occurred before).
    """

    # device type -> the ladder of chain lengths in drafted tokens. On a CPU a pass of 2, 4, 8 or
    # 16 tokens costs about as much as one of 1, 3, 6 or 12 (bench/README.md, "The lookup drafter's
    # rules"), and up to 32 rows run the small-batch linears (SMALL_BATCH_ROWS). Elsewhere passes
    # of up to a few dozen tokens cost about the same, so chains start at Hugging Face's usual 10.
    ADAPTIVE_CHAIN = {"cpu": (3, 7, 15)}
    ADAPTIVE_CHAIN_ELSEWHERE = (10, 20, 31)
    # On a CPU 8 rows already fill the linears, so every drafted token costs a batch's step
    # nearly in full; fixed chains of 2 are the fastest rule replayed at batch 8 (bench/README.md).
    BATCH_CHAIN = {"cpu": (2,)}
    # Under sampling the greedy ladder's first rung of 3 was accepted less than one token deep per pass
    # on a CPU, where a pass of 2 tokens costs little more than one of 1 (bench/README.md, "Against prompt lookup").
    SAMPLING_CHAIN = {"cpu": (1, 3, 7, 15)}

    def __init__(self, branching: Branching = None, max_nodes: Optional[int] = None, max_ngram: int = 3,
                 min_ngram: int = 1):
        self.shape = TreeShape.of(branching, max_nodes)
        if self.shape.branching is not None and set(self.shape.branching) != {1}:
            raise ValueError(f"the lookup drafter drafts a chain: its branching can only be 1 at every depth "
                             f"(or give max_nodes), got {self.shape.branching}")
        self.max_ngram = check_positive_int(max_ngram, "max_ngram")
        self.min_ngram = check_positive_int(min_ngram, "min_ngram")
        if min_ngram > max_ngram:
            raise ValueError(f"min_ngram must be at most max_ngram, got {min_ngram} > {max_ngram}")
        self._context: Optional[list[list[int]]] = None
        self._rows: list[_NgramIndex] = []

    def chooser(self, adapter: CausalLMAdapter, hidden: HiddenStates, rule: TokenRule,
                forest: DraftForest) -> Chooser:
        """Every node's logits at once: a chain accepted to its end visits every node, and one
        read of the unembedding for all of them costs about one for a single node."""
        return every_node_chooser(adapter, hidden, rule, forest)

    @property
    def adaptive(self) -> bool:
        """Whether the chain's length follows its acceptance (no fixed size given)."""
        return self.shape.max_nodes is None and self.shape.branching is None

    def chain_lengths(self, previous: VerifiedPass) -> list[int]:
        """Each row's chain length in drafted tokens, root excluded, for the pass after
        `previous` (see the class docstring)."""
        if self.shape.max_nodes is not None:
            return [self.shape.max_nodes - 1] * len(previous.next_tokens)
        if self.shape.branching is not None:
            return [self.shape.depth] * len(previous.next_tokens)
        device = previous.next_tokens.device.type
        ladders = (self.BATCH_CHAIN if len(previous.next_tokens) > 1 else
                   self.SAMPLING_CHAIN if previous.rule is not None and previous.rule.do_sample else self.ADAPTIVE_CHAIN)
        ladder = ladders.get(device, self.ADAPTIVE_CHAIN.get(device, self.ADAPTIVE_CHAIN_ELSEWHERE))
        # A chain's slots are its depths: the whole chain was accepted where the walk stopped at its
        # last slot. A row whose last draft was a tree (another drafter's) starts the ladder afresh.
        drafted = (previous.forest.counts - 1).tolist()
        chains = (previous.forest.leaf_counts == 1).tolist()
        stops = previous.stop_nodes.tolist() if previous.stop_nodes is not None else [-1] * len(drafted)
        return [next((rung for rung in ladder if rung > count), ladder[-1]) if chain and count > 0 and stop == count
                else ladder[0] for count, chain, stop in zip(drafted, chains, stops)]

    def draft(self, previous: VerifiedPass, lengths: Optional[list[int]] = None) -> DraftForest:
        """The chains of every row; `lengths`: each row's length in drafted tokens, in place of
        chain_lengths'."""
        if previous.context is None:
            raise ValueError("the lookup drafter reads the decoder's context (VerifiedPass.context), which "
                             "this pass does not hold")
        if previous.context is not self._context:  # another generation: index its rows afresh
            self._context = previous.context
            self._rows = [_NgramIndex(tokens, self.max_ngram, self.min_ngram) for tokens in previous.context]
        lengths = self.chain_lengths(previous) if lengths is None else lengths
        return chain_forest(previous.next_tokens, [row.continuation(length)
                                                   for row, length in zip(self._rows, lengths)])


def chain_forest(roots: Tensor, chains: list[list[int]]) -> DraftForest:
    """One chain per row: the root [B], then chains[b] (tokens, each the child of the one before)."""
    batch, depth = roots.shape[0], max((len(chain) for chain in chains), default=0)
    token_ids = torch.zeros((batch, 1 + depth), dtype=torch.long)
    for row, chain in enumerate(chains):
        token_ids[row, 1:1 + len(chain)] = torch.tensor(chain, dtype=torch.long)
    token_ids = token_ids.to(roots.device)
    token_ids[:, 0] = roots
    counts = torch.tensor([1 + len(chain) for chain in chains], dtype=torch.long, device=roots.device)
    slots = torch.arange(1 + depth, device=roots.device)
    live = slots[None, :] < counts[:, None]
    parents = torch.where(live, slots[None, :] - 1, -1).expand(batch, -1).contiguous()
    return DraftForest(token_ids, parents, live.float(), counts, torch.ones_like(counts))


class LookupFirstDrafter(Drafter):
    """The lookup chain where the context holds a match, another drafter's tree where it does
    not: text that repeats itself is drafted from itself, the rest by the model-based drafter.
    The chain is as long as the lookup drafter's adaptive rule says, and at least as long as the
    fallback's tree is big (its latest tree), whose pass costs as much. A pass in which every row
    has a match drafts no tree.

    Args:
        fallback: the drafter of rows without a match (its chooser serves the walk).
        max_ngram: as for LookupDrafter.
        min_ngram: the shortest match taken. A single earlier token predicts what follows less
            well than a trained drafter does (bench/README.md, "The lookup drafter's rules"),
            so by default the chain needs a match of 2 tokens.
    """

    def __init__(self, fallback: Drafter, max_ngram: int = 3, min_ngram: int = 2):
        self.fallback = fallback
        self.lookup = LookupDrafter(max_ngram=max_ngram, min_ngram=min_ngram)
        self.every_layer = fallback.every_layer
        self._fallback_chose = True  # whether the last pass's state is the fallback's own
        self._floor: Optional[int] = None  # the shortest chain: the fallback's latest tree's size less its root

    def chooser(self, adapter: CausalLMAdapter, hidden: HiddenStates, rule: TokenRule,
                forest: DraftForest) -> Chooser:
        """The fallback's chooser, or else every node's logits at once (for the chains)."""
        own = self.fallback.chooser(adapter, hidden, rule, forest)
        self._fallback_chose = own is not None
        return own or every_node_chooser(adapter, hidden, rule, forest)

    def draft(self, previous: VerifiedPass) -> DraftForest:
        if not self._fallback_chose and isinstance(previous.drafter_state, ModelLogits):
            # The fallback sees the pass as if the walk had used the model's logits.
            previous = dataclasses.replace(previous, stop_logits=previous.drafter_state.logits, drafter_state=None)
        lengths = self.lookup.chain_lengths(previous)
        chain = None
        if self._floor is not None:
            chain = self.lookup.draft(previous, [max(length, self._floor) for length in lengths])
            if bool((chain.counts > 1).all()):  # no row needs the fallback's tree
                return chain
        tree = self.fallback.draft(previous)
        floor = max(tree.size - 1, 1)
        if chain is None or floor != self._floor:
            self._floor = floor
            chain = self.lookup.draft(previous, [max(length, floor) for length in lengths])
        return select_rows(chain.counts > 1, chain, tree)


def select_rows(take_first: Tensor, first: DraftForest, second: DraftForest) -> DraftForest:
    """Row b of `first` where take_first[b], else of `second`."""
    size = max(first.size, second.size)

    def padded(forest: DraftForest, name: str, value) -> Tensor:
        tensor = getattr(forest, name)
        return torch.nn.functional.pad(tensor, (0, size - forest.size), value=value)

    pick = take_first[:, None]
    return DraftForest(torch.where(pick, padded(first, "token_ids", 0), padded(second, "token_ids", 0)),
                       torch.where(pick, padded(first, "parents", -1), padded(second, "parents", -1)),
                       torch.where(pick, padded(first, "weights", 0.0), padded(second, "weights", 0.0)),
                       torch.where(take_first, first.counts, second.counts),
                       torch.where(take_first, first.leaf_counts, second.leaf_counts))


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DrafterEntry:
    """A drafter reachable by name.

    Attributes:
        name: "name" in `drafter="name"` or `"name:ARGUMENT"`.
        build: (argument or None, model, TreeShape) -> Drafter.
        help: one line for `mtp-ext generate --help`.
        argument: what the text after "name:" is (e.g. "DIR"), or None if it takes none.
        check: (argument, label) -> None, raising a clear error for an argument that cannot
            work; cheap, so that the CLI runs it before loading any model.
        optional: whether the argument may be left out.
    """

    name: str
    build: Callable[[Optional[str], object, TreeShape], Drafter]
    help: str
    argument: Optional[str] = None
    check: Optional[Callable[[str, str], None]] = None
    optional: bool = False

    def usage(self) -> str:
        """How the user names it: "name", "name:ARGUMENT" or "name[:ARGUMENT]"."""
        if not self.argument:
            return self.name
        return f"{self.name}[:{self.argument}]" if self.optional else f"{self.name}:{self.argument}"

    def takes(self, argument: str) -> bool:
        """Whether `argument` (the text after "name:", "" for none) fits the entry."""
        return bool(argument) == bool(self.argument) or (self.optional and not argument)


_REGISTRY: dict[str, DrafterEntry] = {}


def register_drafter(name: str, build: Callable[[Optional[str], object, TreeShape], Drafter], help: str,
                     argument: Optional[str] = None, check: Optional[Callable[[str, str], None]] = None,
                     optional: bool = False) -> None:
    """Makes `drafter=name` (or `name:ARGUMENT`) build a drafter, in speculative_generate and in
    `mtp-ext generate --drafter`.

    Args:
        name: the drafter's name, without ":".
        build: (argument, model, shape) -> Drafter; argument is the text after "name:" (None
            without), shape the user's TreeShape (fields None: the drafter's defaults).
        help: one line describing it.
        argument: what the text after "name:" is, e.g. "DIR"; None if it takes none.
        check: optionally, (argument, label) -> None raising for an argument that cannot work.
        optional: whether the argument may be left out.
    """
    if not name or ":" in name:
        raise ValueError(f"a drafter name must be non-empty and hold no ':', got {name!r}")
    _REGISTRY[name] = DrafterEntry(name, build, help, argument, check, optional)


def registered_drafters() -> list[DrafterEntry]:
    """Every drafter reachable by name, in registration order."""
    return list(_REGISTRY.values())


def drafter_help() -> str:
    """The registered drafters as one help text."""
    return "; ".join(f"'{entry.usage()}': {entry.help}" for entry in registered_drafters())


def check_drafter(drafter: str, label: str = "drafter") -> tuple[DrafterEntry, Optional[str]]:
    """The registry entry and argument of a drafter name, after the entry's own check of the
    argument; a ValueError listing the names for an unknown one.

    Args:
        drafter: "name" or "name:ARGUMENT".
        label: what messages call it, e.g. "--drafter".

    Returns:
        (the DrafterEntry, the argument or None).
    """
    name, _, argument = drafter.partition(":") if isinstance(drafter, str) else ("", "", "")
    entry = _REGISTRY.get(name)
    if entry is None or not entry.takes(argument):
        usages = ", ".join(f"'{entry.usage()}'" for entry in registered_drafters())
        raise ValueError(f"unknown drafter {drafter!r}: use {usages} or a Drafter")
    if entry.check is not None and argument:
        entry.check(argument, f"{label} {name}:")
    return entry, argument or None


def resolve_drafter(drafter: Union[str, Drafter], model, branching: Branching = None,
                    max_nodes: Optional[int] = None) -> Drafter:
    """A Drafter from an instance or a registered name.

    Args:
        drafter: a Drafter (returned as it is), or a registered name ("marginal", "heads:DIR",
            "token-head:DIR", ...).
        model: the decoding model the named drafter is built for.
        branching: the tree shape's branching (an int or a list per depth); None: the
            drafter's default.
        max_nodes: the tree shape's node budget; None: the drafter's default.

    Returns:
        Drafter.
    """
    if isinstance(drafter, Drafter):
        return drafter
    entry, argument = check_drafter(drafter)
    return entry.build(argument, model, TreeShape.of(branching, max_nodes))


def _check_heads(directory: str, label: str) -> None:
    from mtp_ext.heads.model import check_heads_dir

    check_heads_dir(directory, label)


def _check_token_head(directory: str, label: str) -> None:
    from mtp_ext.heads.token_head import check_token_head_dir

    check_token_head_dir(directory, label)


register_drafter("marginal", lambda _, model, shape: MarginalDrafter(**shape.as_arguments()),
                 help="the step-2 marginal of the last pass (no training; weak)")
register_drafter("heads", lambda directory, model, shape: HeadsDrafter.load(directory, model, **shape.as_arguments()),
                 help="MTP heads saved in DIR (mtp-ext train-heads), a Medusa-style tree", argument="DIR",
                 check=_check_heads)
register_drafter("token-head", lambda directory, model, shape: TokenHeadDrafter.load(directory, model,
                                                                                     **shape.as_arguments()),
                 help="a TokenHead saved in DIR (mtp-ext train-token-head): drafts best", argument="DIR",
                 check=_check_token_head)


def _build_lookup(fallback: Optional[str], model, shape: TreeShape) -> Drafter:
    if fallback is None:
        return LookupDrafter(**shape.as_arguments())
    return LookupFirstDrafter(resolve_drafter(fallback, model, shape.branching, shape.max_nodes))


def _check_lookup_fallback(fallback: str, label: str) -> None:
    check_drafter(fallback, label.rstrip(":"))


def prepared_token_head_dir(model) -> Optional[Path]:
    """The token head prepared for `model`, if any: $MTP_EXT_CACHE/token-heads/NAME (default
    ~/.cache/mtp_ext), NAME the model's name (a built-in model's, or its config's name_or_path
    with "/" as "--"), when that directory holds a token head's config.

    Args:
        model: a Hugging Face causal LM.

    Returns:
        The directory, or None.
    """
    from mtp_ext.data import cache_root
    from mtp_ext.heads.token_head import CONFIG_FILE
    from mtp_ext.models.introspection import model_fingerprint

    name = model_fingerprint(model)["name"]
    if not name:
        return None
    directory = cache_root() / TOKEN_HEADS_DIR / name.strip("/").replace("/", "--")
    return directory if (directory / CONFIG_FILE).is_file() else None


def default_drafter_name(model) -> str:
    """What "auto" (the default drafter) is on `model`: "lookup:token-head:DIR" where a token
    head is prepared for it (prepared_token_head_dir), else "lookup". On held-out text the
    lookup chain where the context has a match and the head's guesses where it has none draft
    best of the drafters measured, and the lookup alone best of those that need no trained
    weights (bench/README.md, "Against prompt lookup").

    Args:
        model: a Hugging Face causal LM.

    Returns:
        A registered drafter name.
    """
    directory = prepared_token_head_dir(model)
    return "lookup" if directory is None else f"lookup:token-head:{directory}"


register_drafter("auto", lambda _, model, shape: resolve_drafter(default_drafter_name(model), model, shape.branching,
                                                                 shape.max_nodes),
                 help="lookup, else the token head prepared for the model under $MTP_EXT_CACHE/token-heads/ "
                      "(make prepare installs SmolLM2's), or lookup alone where none is")
register_drafter("lookup", _build_lookup, help="prompt lookup: the continuation of the context's latest earlier "
                 "match as a chain (no training); 'lookup:DRAFTER' drafts with DRAFTER where the context has "
                 "no match, e.g. lookup:token-head:DIR", argument="DRAFTER", check=_check_lookup_fallback,
                 optional=True)
