"""Lossless self-speculative decoding: a drafter proposes a tree of continuations, one forward
pass over the packed tree (tree_pack, reusing the KV cache) verifies it, and the longest path
that the model itself would have produced is kept.

Every step starts from a *root*: the next token, already chosen by the model's own rule from
exact logits. The tree holds the root and drafted descendants. After the pass every node has
the model's exact next-token logits for [sequence, path to the node], so the walk is: at a
node, choose the next token by the model's rule (argmax, or one draw from the temperature /
top-p distribution); if a child holds that token, descend, else that token is the next root.
Each emitted token is thus chosen by the model's rule from the model's exact distribution given
everything before it, whatever the drafts were: the output of greedy decoding is
model.generate's, and sampling is plain ancestral sampling. Drafts are deterministic candidate
sets, not samples, so no rejection-ratio correction (as in Leviathan et al.) is needed: a draft
only decides whether the logits for the next token are already at hand.

The accepted nodes' cache entries are gathered to the slots right after the cache's tokens and
the rest are cropped; a row that accepted fewer nodes than the longest row leaves invisible
slots (holes) that its 2-D slot mask hides, and positions count visible slots only.

Drafters (see `Drafter`): `MarginalDrafter` uses the step-2 marginal that the verification pass
gives for free at the last accepted node, `HeadsDrafter` trained MTP heads, `TokenHeadDrafter` a
trained head that also reads the next root (mtp_ext.token_head).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from mtp_ext.heads import check_finite_lse
from mtp_ext.marginal import DraftForest, check_inputs, pack_for_model
from mtp_ext.models.adapters import CausalLMAdapter, prefix_position_ids, small_batch_linears
from mtp_ext.ops import marginal_accumulate, multihead_unembed_topk, top_p_candidates, top_p_mask, tree_pack


@dataclass
class VerifiedPass:
    """One forward pass and its walk: what drafters learn from for the next tree."""

    forest: DraftForest  # the nodes evaluated, one tree per row (slot 0: the root)
    hidden: Union[Tensor, tuple[Tensor, ...]]  # [B, T, H] of the pass, or the model's tuple per layer
    node_positions: Tensor  # [B, N] where each forest slot lies along hidden's T
    stop_nodes: Tensor  # [B] slot of each row's last accepted node
    stop_logits: Optional[Tensor]  # [B, V] float32 model logits at the last accepted node (None: see stop_drafts)
    next_tokens: Tensor  # [B] the next roots, chosen from stop_logits
    adapter: CausalLMAdapter
    # What the drafter's own chooser (Drafter.chooser) computed at the last accepted node, in
    # place of stop_logits; None where the walk used the model's logits.
    stop_drafts: Optional[tuple[Tensor, ...]] = None

    def stop_positions(self) -> Tensor:
        """[B] where each row's last accepted node lies along hidden's T."""
        return self.node_positions.gather(1, self.stop_nodes[:, None])[:, 0]


# The walk's rule at the nodes it visits: (batch rows [A], node slots [A]) -> (the token chosen
# at each node [A], tensors [A, ...] computed there, of which the last visited node's are kept).
Chooser = Callable[[Tensor, Tensor], tuple[Tensor, tuple[Tensor, ...]]]


class Drafter:
    """Proposes each step's draft tree. `draft(previous)` returns a DraftForest whose slot 0 of
    every row is `previous.next_tokens` (parent -1) and whose other nodes descend from it,
    level by level (as DraftForest.grow builds them)."""

    every_layer = False  # whether draft() reads every layer's hidden states

    def draft(self, previous: VerifiedPass) -> DraftForest:
        raise NotImplementedError

    def chooser(self, adapter: CausalLMAdapter, hidden, rule: "TokenRule", forest: DraftForest) -> Optional[Chooser]:
        """Optionally, a Chooser for the walk over a pass over `forest` with these hidden states
        that makes the model's choice and, in the same unembedding, what draft() needs at the
        node (previous.stop_drafts). None: the walk computes the model's logits (stop_logits)."""
        return None


def root_forest(roots: Tensor) -> DraftForest:
    """Trees of one node each: the roots [B]."""
    ones = torch.ones(roots.shape[0], dtype=torch.long, device=roots.device)
    return DraftForest.from_candidates(roots[:, None], torch.ones(roots.shape[0], 1, device=roots.device), ones)


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
    """

    def __init__(self, branching: Optional[int] = None, top_p: float = 0.9):
        if not (0.0 < float(top_p) <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        self.branching = check_branching(branching)
        self.top_p = float(top_p)

    def width(self, device: torch.device) -> int:
        return root_children(self.branching, device)

    def chooser(self, adapter: CausalLMAdapter, hidden, rule: "TokenRule", forest: DraftForest) -> Chooser:
        """Every node's logits at once (every_node_chooser), and at each visited node the
        marginal over its children, which the draft needs at the last one."""
        live = torch.arange(forest.size, device=forest.counts.device)[None, :] < forest.counts[:, None]

        def guess(rows: Tensor, slots: Tensor, at_node: Tensor, tokens: Tensor, every_node: Tensor):
            is_child = live[rows] & (forest.parents[rows] == slots[:, None])
            return (step2_guess(at_node, tokens, forest.token_ids[rows], is_child, every_node[rows]),)

        return every_node_chooser(adapter, hidden, rule, forest, guess)

    def draft(self, previous: VerifiedPass) -> DraftForest:
        if previous.stop_drafts is not None:
            guess = previous.stop_drafts[0]
        else:  # after the prompt: a single node, no children
            guess = runner_ups(torch.softmax(previous.stop_logits, -1), previous.next_tokens)
        width = self.width(guess.device)
        ids, probs, _, _ = top_p_candidates(guess.clamp(min=1e-30).log(), self.top_p, width)
        forest = root_forest(previous.next_tokens)
        return forest.grow(torch.zeros_like(ids), ids.clamp(min=0), probs, max_nodes=1 + width)


def every_node_chooser(adapter: CausalLMAdapter, hidden, rule: "TokenRule", forest: DraftForest,
                       at_node: Optional[Callable[..., tuple[Tensor, ...]]] = None) -> Chooser:
    """A Chooser that unembeds every node of the pass at once, for depth-1 trees of a few
    nodes: the walk visits the root and perhaps a child, and on a CPU one pass over the
    unembedding for 4 rows costs about 1.3 of one for a single row (bench/README.md), so one
    pass beats a pass per visited node. `at_node(rows, slots, logits at the nodes, tokens
    chosen there, every node's logits [B, N, V])` adds what a drafter keeps from the node."""
    every_node = adapter.logits(final_hidden(hidden)[:, : forest.size])  # [B, N, V]

    def choose(rows: Tensor, slots: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        logits = every_node[rows, slots]
        tokens = rule.choose(logits)
        return tokens, (at_node(rows, slots, logits, tokens, every_node) if at_node else ())

    return choose


def root_children(branching: Optional[int], device: torch.device) -> int:
    """Candidates under the root of a depth-1 draft tree: `branching`, by default 3 on a CPU
    (where each node costs a share of a pass: 4 nodes did best for SmolLM2, bench/README.md)
    and 8 elsewhere."""
    if branching is not None:
        return branching
    return 3 if device.type == "cpu" else 8


def check_branching(branching: Optional[int]) -> Optional[int]:
    if branching is not None and branching < 1:
        raise ValueError(f"branching must be >= 1, got {branching}")
    return None if branching is None else int(branching)


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
    return probs.scatter(1, chosen[:, None], 0.0)


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
    sizeable share of a single-token pass (SmolLM2 on the project's CPU: 4 nodes 1.4 passes, 8
    nodes 1.75; bench/README.md), so the 3 best guesses for the token after next (4 nodes) do
    best there; on a GPU, where a pass over 16 nodes costs about one over a single token,
    Medusa's wider tree (4, 3, 2, 2) of 16.
    """

    every_layer = True  # heads with weighted hidden states read every layer

    def __init__(self, heads, branching: Optional[Sequence[int]] = None, max_nodes: Optional[int] = None):
        on_cpu = heads.unembed_weight.device.type == "cpu"
        branching = branching if branching is not None else ((3,) if on_cpu else (4, 3, 2, 2))
        max_nodes = max_nodes if max_nodes is not None else (4 if on_cpu else 16)
        if not branching or min(branching) < 1:
            raise ValueError(f"branching must be a non-empty list of counts >= 1, got {branching}")
        if max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
        self.heads = heads
        self.head_of_depth = [heads.steps.index(depth + 1) for depth in range(1, len(branching) + 1)
                              if depth + 1 in heads.steps]
        self.branching = tuple(int(k) for k in branching)[: len(self.head_of_depth)]
        if not self.branching:
            raise ValueError(f"no head predicts x_(t+2) (heads' steps: {heads.steps}): nothing to draft")
        self.max_nodes = int(max_nodes)

    @classmethod
    def load(cls, directory, model, **tree) -> "HeadsDrafter":
        """Heads saved by MTPHeadsModel.save in `directory`, for `model` (a clear error if they
        were trained for another model)."""
        from mtp_ext.heads import MTPHeadsModel

        return cls(MTPHeadsModel.load(directory, model), **tree)

    def chooser(self, adapter: CausalLMAdapter, hidden, rule: "TokenRule", forest: DraftForest) -> Optional[Chooser]:
        """Greedy float32 decoding: at every visited node, one pass over the unembedding gives
        the model's argmax (its top-1, lower id on ties as argmax) and the heads' top-k, which
        are the drafts when the node is the last accepted one. A separate pass for the heads
        would read the whole unembedding again (on a CPU, about one more single-token step's
        worth of memory traffic per step). Other dtypes round the model's logits (argmax ties
        that float32 top-1 would break) and sampling needs the whole distribution: None."""
        final = final_hidden(hidden)
        if rule.do_sample or final.dtype != torch.float32:
            return None
        every_position = self.drafting_hidden(hidden)
        weight, width = self.heads.unembed_weight, max(self.branching)

        def choose(rows: Tensor, slots: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
            at_nodes = torch.cat([final[rows, slots][None], every_position[:, rows, slots]])  # [1 + D, A, H]
            values, ids, lse = multihead_unembed_topk(at_nodes, weight, width)
            check_finite_lse(lse, getattr(self.heads, "source", None))
            return ids[0, :, 0], (values[1:].transpose(0, 1), ids[1:].transpose(0, 1), lse[1:].transpose(0, 1))

        return choose

    def drafting_hidden(self, hidden) -> Tensor:
        """[D, B, T, H]: the states of the heads that draft depths 1..D, at every position of
        the pass with these hidden states."""
        return self.heads.head_hidden(hidden, which=self.head_of_depth)

    def heads_topk(self, previous: VerifiedPass) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k values, ids [D, B, k] and log-sum-exp [D, B] at the stop nodes of the heads that
        draft depths 1..D (the heads of other steps are not unembedded)."""
        if previous.stop_drafts is not None:
            return tuple(tensor.transpose(0, 1) for tensor in previous.stop_drafts)
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

    def draft(self, previous: VerifiedPass) -> DraftForest:
        values, ids, lse = self.heads_topk(previous)
        probs = torch.exp(values - lse[..., None])
        forest = root_forest(previous.next_tokens)
        for depth, width in enumerate(self.branching):
            slots, real = forest.leaf_slots()
            leaf_weights = forest.weights.gather(1, slots) * real
            child_weights = leaf_weights[:, :, None] * probs[depth, :, None, :width]
            forest = forest.grow(slots.repeat_interleave(width, 1), ids[depth, :, :width].repeat(1, slots.shape[1]),
                                 child_weights.flatten(1), max_nodes=self.max_nodes)
        return forest


class TokenHeadDrafter(Drafter):
    """Drafts the root's children with a TokenHead (mtp_ext.token_head): at the last accepted
    node (position t) the walk has chosen the next root x_{t+1}, and the head reads both the
    node's final hidden state and that token, where MTP heads must guess x_{t+2} without it.
    Its top `branching` tokens (by default 3 on a CPU, 8 on a GPU) become the children."""

    def __init__(self, head, branching: Optional[int] = None):
        self.head = head
        self.branching = check_branching(branching)

    @classmethod
    def load(cls, directory, model, branching: Optional[int] = None) -> "TokenHeadDrafter":
        """The head saved in `directory` (TokenHead.save, `mtp-ext train-token-head`), for `model`."""
        from mtp_ext.token_head import TokenHead

        return cls(TokenHead.load(directory, model), branching)

    def chooser(self, adapter: CausalLMAdapter, hidden, rule: "TokenRule", forest: DraftForest) -> Chooser:
        return every_node_chooser(adapter, hidden, rule, forest)

    def draft(self, previous: VerifiedPass) -> DraftForest:
        final = final_hidden(previous.hidden)
        at_stop = gather_nodes(final, previous.stop_positions()[:, None])[:, 0]
        logits = self.head(at_stop, previous.next_tokens)  # [B, K] over the draft vocabulary
        width = min(root_children(self.branching, logits.device), logits.shape[-1])
        probs, slots = torch.softmax(logits, -1).topk(width, -1)
        forest = root_forest(previous.next_tokens)
        return forest.grow(torch.zeros_like(slots), self.head.vocab_ids[slots], probs, max_nodes=1 + width)


def final_hidden(hidden: Union[Tensor, tuple[Tensor, ...]]) -> Tensor:
    return hidden[-1] if isinstance(hidden, tuple) else hidden


def gather_nodes(hidden: Tensor, slots: Tensor) -> Tensor:
    """hidden [B, N, H] at slots [B, M] -> [B, M, H]."""
    return hidden.gather(1, slots[:, :, None].expand(-1, -1, hidden.shape[-1]))


@dataclass
class TokenRule:
    """How the model chooses a token from logits: argmax, or one draw from softmax(logits /
    temperature) restricted to the top-p nucleus (top_p_mask)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    generator: Optional[torch.Generator] = None

    def __post_init__(self):
        if not (self.temperature > 0.0 and self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    def choose(self, logits: Tensor) -> Tensor:
        """One token [R] per row of logits [R, V]; one random draw per row when sampling."""
        if not self.do_sample:
            return logits.argmax(-1)
        scores = logits / self.temperature
        if self.top_p < 1.0:
            scores = top_p_mask(scores, self.top_p)
        probs = torch.softmax(scores, -1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


@dataclass
class GenerationStats:
    new_tokens: list[int]  # per row, up to and including EOS
    verification_steps: int  # packed forward passes after the prompt's
    accepted_drafts: int  # drafted tokens accepted, all rows
    drafted_nodes: int  # drafted tokens verified, all rows
    row_steps: int  # (row, step) pairs in which the row was still generating
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return sum(self.new_tokens) / max(self.seconds, 1e-12)

    @property
    def mean_accepted_per_step(self) -> float:
        """Tokens emitted per verification step and row: accepted drafts + the one the model
        chooses itself (1.0 = no draft ever accepted)."""
        return 1.0 + self.accepted_drafts / max(self.row_steps, 1)

    def to_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "verification_steps": self.verification_steps,
                "accepted_drafts": self.accepted_drafts, "drafted_nodes": self.drafted_nodes, "seconds": self.seconds,
                "tokens_per_second": self.tokens_per_second,
                "mean_accepted_per_step": self.mean_accepted_per_step}


@dataclass
class SpeculativeOutput:
    sequences: Tensor  # [B, T + new] like model.generate: prompt, new tokens, pad after EOS
    stats: GenerationStats


class _Rows:
    """What each row has produced so far, and whether it is done (EOS or `limit` tokens)."""

    def __init__(self, batch: int, limit: int, eos: set[int]):
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.done = [False] * batch
        self.limit, self.eos = limit, eos

    def add(self, row: int, new: Sequence[int]) -> None:
        for token in new:
            if self.done[row]:
                return
            self.tokens[row].append(token)
            self.done[row] = token in self.eos or len(self.tokens[row]) >= self.limit

    def remaining(self) -> list[int]:
        return [0 if done else self.limit - len(tokens) for tokens, done in zip(self.tokens, self.done)]


def resolve_drafter(drafter: Union[str, Drafter], model, **tree) -> Drafter:
    """A Drafter from an instance or a name: "marginal", "heads:DIR" for the MTP heads saved in
    DIR or "token-head:DIR" for a TokenHead (each trained for `model`); `tree` (branching,
    max_nodes) shapes the heads' draft trees, and a single branching count sets the marginal
    and token head drafters' candidates under the root."""
    if isinstance(drafter, Drafter):
        return drafter
    if isinstance(drafter, str) and drafter.startswith("heads:") and len(drafter) > len("heads:"):
        return HeadsDrafter.load(drafter[len("heads:"):], model, **tree)
    if isinstance(drafter, str) and drafter.startswith("token-head:") and len(drafter) > len("token-head:"):
        return TokenHeadDrafter.load(drafter[len("token-head:"):], model, single_branching(tree, "token head"))
    if drafter == "marginal":
        return MarginalDrafter(single_branching(tree, "marginal"))
    raise ValueError(f"unknown drafter {drafter!r}: use 'marginal', 'heads:DIR', 'token-head:DIR' or a Drafter")


def single_branching(tree: dict, name: str) -> Optional[int]:
    """The one branching count (candidates under the root) that a depth-1 drafter takes."""
    branching = tree.get("branching")
    if set(tree) - {"branching"} or (branching is not None and len(branching) != 1):
        raise ValueError(f"the {name} drafter takes one branching count (candidates under the root) and no "
                         f"other tree shape, got {tree}")
    return None if branching is None else int(branching[0])


@torch.no_grad()
def speculative_generate(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                         drafter: Union[str, Drafter] = "marginal", max_new_tokens: int = 32,
                         do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                         eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
                         generator: Optional[torch.Generator] = None) -> SpeculativeOutput:
    """Generate up to `max_new_tokens` per row with drafts verified in one packed pass per step.

    Greedy (do_sample=False) gives model.generate(do_sample=False)'s tokens; sampling draws from
    the model's distribution at `temperature`, restricted to the top-p nucleus. Rows stop at
    `eos_token_id` (default: the model's generation config) and are padded with `pad_token_id`
    (default: the generation config's, else the first EOS id), as model.generate does. Padding
    of the prompt may be on either side.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    drafter = resolve_drafter(drafter, model)
    rule = TokenRule(do_sample, float(temperature), float(top_p), generator)
    adapter = CausalLMAdapter(model)
    attention_mask = check_inputs(adapter, input_ids, attention_mask, steps=1)
    eos, pad = generation_ids(model, eos_token_id, pad_token_id)
    longest = int(attention_mask.sum(1).max()) + max_new_tokens
    if longest > adapter.context_length:
        raise ValueError(f"a prompt of {longest - max_new_tokens} tokens plus {max_new_tokens} new ones exceeds "
                         f"the model's context of {adapter.context_length}")

    start = time.perf_counter()
    with small_batch_linears(model):  # a tree of a few nodes is bound by reading the weights
        decoder = SpeculativeDecoder(adapter, drafter, rule, input_ids, attention_mask)
        rows = _Rows(input_ids.shape[0], max_new_tokens, eos)
        for row, token in enumerate(decoder.previous.next_tokens.tolist()):
            rows.add(row, [token])
        while not all(rows.done):
            for row, new in enumerate(decoder.step(rows.remaining())):
                rows.add(row, new)
    stats = GenerationStats([len(tokens) for tokens in rows.tokens], decoder.steps, decoder.accepted_drafts,
                            decoder.drafted_nodes, decoder.row_steps, time.perf_counter() - start)
    return SpeculativeOutput(assemble(input_ids, rows.tokens, pad), stats)


class SpeculativeDecoder:
    """The decoding state between steps: the KV cache, which of its slots each row sees
    (`slot_mask` [B, K]) and the last pass. The prompt runs on construction; `step()` drafts,
    verifies and returns each row's new tokens."""

    def __init__(self, adapter: CausalLMAdapter, drafter: Drafter, rule: TokenRule, input_ids: Tensor,
                 attention_mask: Tensor):
        self.adapter, self.drafter, self.rule = adapter, drafter, rule
        self.cache = adapter.new_cache()
        self.slot_mask = attention_mask.bool()
        self.previous = prefill(adapter, drafter, self.cache, input_ids, self.slot_mask, rule)
        self.steps = self.accepted_drafts = self.drafted_nodes = self.row_steps = 0

    def step(self, remaining: list[int]) -> list[list[int]]:
        """One draft-and-verify step. `remaining` [B]: tokens each row may still emit (0: the
        row is finished; it runs along and its tokens are not counted). Returns per row the
        accepted drafts followed by the next root."""
        forest = prune_to_budget(self.drafter.draft(self.previous), remaining, self.adapter.context_length,
                                 self.slot_mask.sum(1))
        self.previous, paths, lengths = verify(self.adapter, self.drafter, self.cache, self.slot_mask, forest,
                                               self.rule)
        kept = torch.arange(paths.shape[1], device=lengths.device)[None, :] < lengths[:, None]
        self.slot_mask = torch.cat([self.slot_mask, kept], 1)
        self.steps += 1
        new_tokens = []
        for row, (path, length) in enumerate(zip(paths.tolist(), lengths.tolist())):
            if remaining[row] > 0:
                self.row_steps += 1
                self.accepted_drafts += length - 1
                self.drafted_nodes += int(forest.counts[row]) - 1
            drafted = forest.token_ids[row, path[1:length]].tolist()
            new_tokens.append(drafted + [int(self.previous.next_tokens[row])])
        return new_tokens


def generation_ids(model, eos_token_id, pad_token_id) -> tuple[set[int], int]:
    """EOS ids and the pad id, defaulting to the model's generation config as model.generate does."""
    config = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", None)
    eos = set() if eos_token_id is None else {int(t) for t in ([eos_token_id] if isinstance(eos_token_id, int)
                                                                  else eos_token_id)}
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = min(eos) if eos else 0
    return eos, int(pad_token_id)


def assemble(input_ids: Tensor, tokens: list[list[int]], pad: int) -> Tensor:
    width = max(len(row) for row in tokens)
    new = torch.full((len(tokens), width), pad, dtype=input_ids.dtype, device=input_ids.device)
    for row, row_tokens in enumerate(tokens):
        new[row, : len(row_tokens)] = torch.tensor(row_tokens, dtype=input_ids.dtype)
    return torch.cat([input_ids, new], 1)


def prefill(adapter: CausalLMAdapter, drafter: Drafter, cache, input_ids: Tensor, slot_mask: Tensor,
            rule: TokenRule) -> VerifiedPass:
    """The prompt's pass, as a VerifiedPass whose trees are each row's last real token."""
    hidden = adapter.hidden_states(input_ids, slot_mask.long(), prefix_position_ids(slot_mask.long()), cache,
                                   every_layer=drafter.every_layer)
    last_real = (slot_mask.shape[1] - 1 - slot_mask.flip(1).long().argmax(1))[:, None]
    logits = adapter.logits(gather_nodes(final_hidden(hidden), last_real)[:, 0])
    forest = root_forest(input_ids.gather(1, last_real)[:, 0])
    return VerifiedPass(forest, hidden, last_real, torch.zeros_like(last_real[:, 0]), logits, rule.choose(logits),
                        adapter)


def verify(adapter: CausalLMAdapter, drafter: Drafter, cache, slot_mask: Tensor, forest: DraftForest,
           rule: TokenRule) -> tuple[VerifiedPass, Tensor, Tensor]:
    """One packed pass over the trees, the walk, and the cache kept to the accepted paths.

    Returns the pass, the accepted node slots [B, L] (root first; padded with the last
    accepted slot) and the path lengths [B]."""
    length = cache.get_seq_length()
    packed = pack_for_model(adapter, lambda window: tree_pack(
        forest.token_ids, forest.parents, forest.counts, slot_mask, sliding_window=window))
    hidden = adapter.hidden_states(packed.input_ids, packed.mask, packed.position_ids, cache,
                                   every_layer=drafter.every_layer)
    own_chooser = drafter.chooser(adapter, hidden, rule, forest)
    paths, stop_outputs, next_tokens = walk(forest, own_chooser or logits_chooser(adapter, final_hidden(hidden), rule))
    lengths = (paths != -1).sum(1)
    paths = torch.where(paths == -1, paths.max(1, keepdim=True).values, paths)
    adapter.keep_cache_slots(cache, length, paths)
    node_positions = torch.arange(forest.size, device=paths.device).expand(paths.shape[0], -1)
    stop_nodes = paths.gather(1, lengths[:, None] - 1)[:, 0]
    stop_logits, stop_drafts = (None, stop_outputs) if own_chooser else (stop_outputs[0], None)
    return (VerifiedPass(forest, hidden, node_positions, stop_nodes, stop_logits, next_tokens, adapter, stop_drafts),
            paths, lengths)


def logits_chooser(adapter: CausalLMAdapter, hidden: Tensor, rule: TokenRule) -> Chooser:
    """The walk's default Chooser: the model's float32 logits at each node [A, V] (hidden
    [B, T, H] of the pass), and the rule's choice from them."""

    def choose(rows: Tensor, slots: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        logits = adapter.logits(hidden[rows, slots])
        return rule.choose(logits), (logits,)

    return choose


def walk(forest: DraftForest, choose: Chooser):
    """From every root, descend while the token chosen at a node is a child's token.

    Returns the accepted slots [B, D] (-1 after a row's last), what `choose` computed at each
    row's last accepted node (tensors [B, ...]) and the token chosen there [B]."""
    batch, device = forest.token_ids.shape[0], forest.token_ids.device
    rows = torch.arange(batch, device=device)
    current = torch.zeros(batch, dtype=torch.long, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    stop_outputs = None
    chosen = torch.empty(batch, dtype=torch.long, device=device)
    path = [current.clone()]
    live = torch.arange(forest.size, device=device)[None, :] < forest.counts[:, None]
    while bool(active.any()):
        tokens, outputs = choose(rows[active], current[active])
        if stop_outputs is None:
            stop_outputs = tuple(output.new_empty((batch,) + output.shape[1:]) for output in outputs)
        for stored, output in zip(stop_outputs, outputs):
            stored[active] = output
        chosen[active] = tokens
        matches = live[active] & (forest.parents[active] == current[active, None]) & \
            (forest.token_ids[active] == tokens[:, None])
        descend = matches.any(1)
        step = torch.full((batch,), -1, dtype=torch.long, device=device)
        step[rows[active][descend]] = matches[descend].long().argmax(1)
        active = step >= 0
        current = torch.where(active, step, current)
        path.append(step)
    return torch.stack(path[:-1], 1), stop_outputs, chosen


def prune_to_budget(forest: DraftForest, remaining: list[int], context_length: int, visible: Tensor) -> DraftForest:
    """Cut each tree below the depth that can still be emitted (tokens left to generate, room
    in the context); rows with nothing left keep their root only."""
    depth = node_depths(forest)
    allowed = torch.tensor(remaining, device=depth.device) - 1
    allowed = torch.minimum(allowed, context_length - 1 - visible).clamp(min=0)
    # Levels are stored in order, so the kept nodes are a prefix of each tree.
    slots = torch.arange(forest.size, device=depth.device)[None, :]
    counts = ((depth <= allowed[:, None]) & (slots < forest.counts[:, None])).sum(1)
    return DraftForest(forest.token_ids, forest.parents, forest.weights, counts, forest.leaf_counts)


def node_depths(forest: DraftForest) -> Tensor:
    """Depth [B, N] of every node, 0 for the root."""
    depth = torch.zeros_like(forest.parents)
    for slot in range(1, forest.size):
        parent = forest.parents[:, slot]
        depth[:, slot] = torch.where(parent >= 0, depth.gather(1, parent.clamp(min=0)[:, None])[:, 0] + 1, 0)
    return depth
