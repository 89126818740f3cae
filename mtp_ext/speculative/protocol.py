"""What a drafter is: the protocol between the decoding engine (decoder.py) and the drafters
(drafters.py), and the types both speak.

Each step the engine hands the drafter the last verified pass (`VerifiedPass`); the drafter
returns a draft forest (mtp_ext.tree.DraftForest) whose slot 0 of every row is the next root,
already chosen by the model; one packed pass verifies it. A drafter may also supply the walk's
`Chooser`, which makes the model's choice at each visited node and, in the same unembedding,
computes what the drafter needs there (its `NodeState`), handed back in the next VerifiedPass.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Generic, Optional, Sequence, TypeVar, Union

import torch
from torch import Tensor

from mtp_ext._checks import check_positive_int, check_positive_ints, check_temperature, check_top_p
from mtp_ext.models.adapters import CausalLMAdapter
from mtp_ext.ops import top_p_mask
from mtp_ext.tree import DraftForest

__all__ = ["Chooser", "Drafter", "HiddenStates", "ModelLogits", "NodeState", "TokenRule", "TreeShape",
           "VerifiedPass", "final_hidden", "gather_nodes"]

# The pass's final-norm hidden states [B, T, H], or the model's tuple of every layer's.
HiddenStates = Union[Tensor, tuple[Tensor, ...]]


def draw_categorical(probs: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """One draw per row from the categorical distributions `probs`, by the inverse of the
    cumulative distribution, which over a model's vocabulary costs a CPU a small share of what
    torch.multinomial does (bench/README.md, sampling). The sum runs in float64, so that no token
    of positive probability is absorbed by the rounding of the ones before it.

    Args:
        probs: [R, V] float, each row non-negative with a finite, positive sum (it need not be 1).
        generator: the draws' generator; None: torch's default.

    Returns:
        [R] int64 token ids, each of positive probability.
    """
    dtype = torch.float32 if probs.device.type == "mps" else torch.float64  # MPS has no float64
    cumulative = probs.to(dtype).cumsum(-1)
    totals = cumulative[:, -1]
    if not bool((torch.isfinite(totals) & (totals > 0)).all()):
        raise ValueError("cannot sample: a row of probabilities is NaN, infinite or all zero (every token masked "
                         "by the logits processors, or the model's logits are not finite)")
    uniform = torch.rand((probs.shape[0], 1), generator=generator, dtype=dtype, device=probs.device)
    # uniform * total < total: the first token whose cumulative sum exceeds it has positive probability.
    return torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)[:, 0].clamp(max=probs.shape[-1] - 1)


@dataclass
class TokenRule:
    """How the model chooses a token from logits, as model.generate does: the logits processors
    (repetition penalty, user processors: they read the sequence so far), then argmax, or one
    draw from softmax(scores / temperature) restricted to the top-k tokens and the top-p nucleus
    (top_p_mask).

    Attributes:
        do_sample: False: argmax.
        temperature: finite, > 0 (sampling only).
        top_p: in (0, 1] (sampling only).
        generator: the random draws' generator; None: torch's default.
        top_k: keep the k most likely tokens (sampling only); 0: all.
        processors: Hugging Face logits processors applied first, each row with its own
            sequence (see `sequences`); empty: none.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    generator: Optional[torch.Generator] = None
    top_k: int = 0
    processors: Sequence[Callable[[Tensor, Tensor], Tensor]] = ()
    # What the processors read: per batch row, the tokens so far as model.generate holds them
    # (the prompt with its padding, then every emitted token, the next root last), and the forest
    # being walked, whose paths extend them. Kept up to date by the decoder.
    sequences: Optional[list[list[int]]] = None
    forest: Optional[DraftForest] = None

    def __post_init__(self):
        self.temperature = check_temperature(self.temperature)
        self.top_p = check_top_p(self.top_p)
        if self.top_k:
            self.top_k = check_positive_int(self.top_k, "top_k")

    def choose(self, logits: Tensor, rows: Optional[Tensor] = None, slots: Optional[Tensor] = None) -> Tensor:
        """One token per row.

        Args:
            logits: [R, V] float.
            rows, slots: [R] int64, the batch row and forest slot each row of logits is at
                (needed where there are processors; None before the first tree).

        Returns:
            [R] int64; one random draw per row when sampling.
        """
        if self.processors:
            logits = self._processed(logits, rows, slots)
        if not self.do_sample:
            return logits.argmax(-1)
        scores = logits / self.temperature
        if self.top_k and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, -1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if self.top_p < 1.0:
            scores = top_p_mask(scores, self.top_p)
        return draw_categorical(torch.softmax(scores, -1), self.generator)

    def _processed(self, logits: Tensor, rows: Optional[Tensor], slots: Optional[Tensor]) -> Tensor:
        """The processors' scores, each row of logits with the sequence that ends at its node."""
        if self.sequences is None:
            raise ValueError("a TokenRule with logits processors needs the sequences so far (set by the decoder)")
        processed = []
        for index in range(logits.shape[0]):
            row = int(rows[index]) if rows is not None else index
            tokens = list(self.sequences[row])
            if slots is not None and self.forest is not None:
                tokens += self._path_tokens(row, int(slots[index]))
            scores = logits[index:index + 1].float()
            ids = torch.tensor([tokens], dtype=torch.long, device=logits.device)
            for processor in self.processors:
                scores = processor(ids, scores)
            processed.append(scores)
        return torch.cat(processed)

    def _path_tokens(self, row: int, slot: int) -> list[int]:
        """The drafted tokens from the root's child down to `slot` (the root is the sequence's last)."""
        parents, tokens = self.forest.parents[row].tolist(), self.forest.token_ids[row].tolist()
        path = []
        while parents[slot] >= 0:
            path.append(tokens[slot])
            slot = parents[slot]
        return path[::-1]


@dataclass
class NodeState:
    """Tensors [A, ...] that a Chooser computed at A visited nodes (subclass it with your
    fields, all tensors). The walk keeps, per row, those of the row's last accepted node."""

    def empty_rows(self, batch: int) -> "NodeState":
        """A state of `batch` rows, shaped like this one's, to fill with store().

        Args:
            batch: B, the rows.

        Returns:
            A state of this type, each field [B, ...] and uninitialised.
        """
        return type(self)(**{name: tensor.new_empty((batch,) + tensor.shape[1:])
                             for name, tensor in self._tensors().items()})

    def store(self, rows: Tensor, computed: "NodeState") -> None:
        """Some rows take the values computed at their nodes.

        Args:
            rows: [B] bool, A of them True.
            computed: a state of A rows, in the order of the True rows.
        """
        for name, tensor in computed._tensors().items():
            getattr(self, name)[rows] = tensor

    def _tensors(self) -> dict[str, Tensor]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


@dataclass
class ModelLogits(NodeState):
    """The walk's default state: the model's float32 logits at the node.

    Attributes:
        logits: [A, V] float32.
    """

    logits: Tensor


StateT = TypeVar("StateT", bound=NodeState)

# The walk's rule at the nodes it visits: (batch rows [A], node slots [A]) -> (the token chosen
# at each node [A], the state computed there).
Chooser = Callable[[Tensor, Tensor], tuple[Tensor, NodeState]]


@dataclass
class VerifiedPass(Generic[StateT]):
    """One forward pass and its walk: what drafters learn from for the next tree.

    Attributes:
        forest: the nodes evaluated, one tree per row (slot 0: the root).
        hidden: the pass's hidden states (HiddenStates).
        node_positions: [B, N] int64, where each forest slot lies along hidden's T.
        stop_nodes: [B] int64, the slot of each row's last accepted node.
        next_tokens: [B] int64, the next roots, chosen at the stop nodes.
        adapter: the model's adapter.
        stop_logits: [B, V] float32 model logits at the stop nodes, where the walk used the
            model's logits (no drafter chooser), else None.
        drafter_state: what the drafter's own chooser computed at the stop nodes, else None.
        context: per row, the real tokens so far (prompt and emitted), the next root last;
            set by the decoder (None outside it).
        rule: the model's TokenRule, by which the pass's tokens were chosen (None outside the
            decoder).
    """

    forest: DraftForest
    hidden: HiddenStates
    node_positions: Tensor
    stop_nodes: Tensor
    next_tokens: Tensor
    adapter: CausalLMAdapter
    stop_logits: Optional[Tensor] = None
    drafter_state: Optional[StateT] = None
    context: Optional[list[list[int]]] = None
    rule: Optional[TokenRule] = None

    def stop_positions(self) -> Tensor:
        """[B] where each row's last accepted node lies along hidden's T."""
        return self.node_positions.gather(1, self.stop_nodes[:, None])[:, 0]

    def stop_hidden(self) -> Tensor:
        """[B, H] the final hidden state at each row's last accepted node."""
        return gather_nodes(final_hidden(self.hidden), self.stop_positions()[:, None])[:, 0]


@dataclass(frozen=True)
class TreeShape:
    """The shape of a draft tree, one type for every drafter: `branching[d]` children under each
    node of depth d (the root has depth 0) and at most `max_nodes` nodes per tree, the root
    included. A field left None takes the drafter's default.

    `TreeShape.of(3)` is a depth-1 tree of 3 guesses; `TreeShape.of((4, 3, 2, 2), 16)` Medusa's.

    Attributes:
        branching: children per node at each depth (integers >= 1), or None.
        max_nodes: nodes per tree, the root included (>= 1), or None.
    """

    branching: Optional[tuple[int, ...]] = None
    max_nodes: Optional[int] = None

    def __post_init__(self):
        if self.branching is not None:
            object.__setattr__(self, "branching", check_positive_ints(self.branching, "branching"))
        if self.max_nodes is not None:
            object.__setattr__(self, "max_nodes", check_positive_int(self.max_nodes, "max_nodes"))

    @classmethod
    def of(cls, branching: Union[int, Sequence[int], None] = None, max_nodes: Optional[int] = None) -> "TreeShape":
        """A shape from a count (depth 1) or a list of counts per depth.

        Args:
            branching: an int, a sequence of ints, or None.
            max_nodes: an int, or None.

        Returns:
            TreeShape.
        """
        if isinstance(branching, int) and not isinstance(branching, bool):
            branching = (branching,)
        return cls(None if branching is None else tuple(branching), max_nodes)

    def with_default(self, default: "TreeShape") -> "TreeShape":
        """This shape, its None fields taken from `default`.

        Args:
            default: the drafter's default shape.

        Returns:
            TreeShape.
        """
        return TreeShape(self.branching if self.branching is not None else default.branching,
                         self.max_nodes if self.max_nodes is not None else default.max_nodes)

    @property
    def depth(self) -> int:
        """The levels below the root (0 where branching is None)."""
        return len(self.branching or ())

    def node_budget(self) -> int:
        """max_nodes, or the full tree's size where it is None."""
        if self.max_nodes is not None:
            return self.max_nodes
        nodes, level = 1, 1
        for count in self.branching or ():
            level *= count
            nodes += level
        return nodes

    def as_arguments(self) -> dict:
        """The fields that are set, as keyword arguments of a drafter's constructor."""
        return {name: value for name, value in (("branching", self.branching), ("max_nodes", self.max_nodes))
                if value is not None}


class Drafter:
    """Proposes each step's draft tree: `draft(previous)` returns a DraftForest whose slot 0 of
    every row is `previous.next_tokens` (parent -1) and whose other nodes descend from it, level
    by level (as DraftForest.grow builds them). Drafts decide only which logits the verification
    pass computes: whatever they are, the output is the model's own (greedy: model.generate's).

    A complete drafter, which guesses that the root's token comes again:

    >>> import torch
    >>> from mtp_ext.speculative import Drafter, speculative_generate
    >>> from mtp_ext.tree import DraftForest
    >>> class RepeatDrafter(Drafter):
    ...     def draft(self, previous):
    ...         roots = previous.next_tokens                          # [B], chosen by the model
    ...         forest = DraftForest.roots(roots)                     # slot 0: the root
    ...         return forest.grow(torch.zeros_like(roots)[:, None],  # children of slot 0 ...
    ...                            roots[:, None],                    # ... holding these tokens,
    ...                            torch.ones(len(roots), 1),         # ... of these weights
    ...                            max_nodes=2)
    >>> out = speculative_generate(model, input_ids, drafter=RepeatDrafter(), max_new_tokens=8)
    >>> out.sequences.shape[1] == input_ids.shape[1] + 8
    True

    To reach it by name (`drafter="repeat"`, `mtp-ext generate --drafter repeat`), register a
    factory: `register_drafter("repeat", lambda argument, model, shape: RepeatDrafter(),
    help="the root's token again")` (mtp_ext.speculative.drafters).

    Optional: `every_layer = True` when draft() reads every layer's hidden states, and a
    `chooser()` that computes the drafter's needs during the walk (see MarginalDrafter).

    A batch's finished rows leave it once their last draft is made (their passes would buy
    nothing), so the next VerifiedPass may hold fewer rows than the last: a drafter that keeps
    state per row keys it on `previous.context`, a new list whenever the rows change (see
    LookupDrafter).
    """

    every_layer = False  # whether draft() reads every layer's hidden states

    def draft(self, previous: VerifiedPass) -> DraftForest:
        """The next step's draft forest, from the last verified pass.

        Args:
            previous: the last pass (after the prompt: a pass whose trees are each row's last
                real token).

        Returns:
            DraftForest of B trees, slot 0 of each `previous.next_tokens` (parent -1).
        """
        raise NotImplementedError

    def chooser(self, adapter: CausalLMAdapter, hidden: HiddenStates, rule: TokenRule,
                forest: DraftForest) -> Optional[Chooser]:
        """Optionally, a Chooser for the walk that makes the model's choice and, in the same
        unembedding, computes what draft() needs at the node (previous.drafter_state).

        Args:
            adapter: the model's adapter.
            hidden: the hidden states of the pass over `forest`.
            rule: the model's TokenRule, by which the Chooser makes the model's choice.
            forest: the trees just verified.

        Returns:
            A Chooser, or None: the walk computes the model's logits (stop_logits).
        """
        return None


def final_hidden(hidden: HiddenStates) -> Tensor:
    """The final-norm states of a pass.

    Args:
        hidden: the pass's HiddenStates.

    Returns:
        [B, T, H]: hidden itself, or the last of the model's tuple.
    """
    return hidden[-1] if isinstance(hidden, tuple) else hidden


def gather_nodes(hidden: Tensor, slots: Tensor) -> Tensor:
    """The hidden states at some slots of each row.

    Args:
        hidden: [B, N, H].
        slots: [B, M] int64 indices into N.

    Returns:
        [B, M, H] of hidden's dtype.
    """
    return hidden.gather(1, slots[:, :, None].expand(-1, -1, hidden.shape[-1]))
