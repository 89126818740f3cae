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

The phases of a step, as named below: draft (the drafter, drafters.py), pack and verify (one
forward over the packed forest, `verify`), walk (`walk`, with the drafter's Chooser or the
model's logits), keep (the accepted nodes' cache entries, `CausalLMAdapter.keep_cache_slots`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from mtp_ext._checks import check_positive_int
from mtp_ext.models.adapters import CausalLMAdapter, check_inputs, last_real_positions, prefix_position_ids, small_batch_linears
from mtp_ext.speculative.drafters import DEFAULT_DRAFTER, resolve_drafter
from mtp_ext.speculative.protocol import (
    Chooser,
    Drafter,
    ModelLogits,
    TokenRule,
    VerifiedPass,
    final_hidden,
    gather_nodes,
)
from mtp_ext.tree import DraftForest, pack_forest

__all__ = ["GenerationStats", "SpeculativeDecoder", "SpeculativeOutput", "speculative_generate"]


@dataclass
class GenerationStats:
    """What a speculative_generate call did.

    Attributes:
        new_tokens: per row, the tokens generated, up to and including EOS.
        verification_steps: the packed forward passes after the prompt's.
        accepted_drafts: the drafted tokens accepted, all rows.
        drafted_nodes: the drafted tokens verified, all rows.
        row_steps: the (row, step) pairs in which the row was still generating.
        seconds: wall time, the prompt's pass included.
    """

    new_tokens: list[int]
    verification_steps: int
    accepted_drafts: int
    drafted_nodes: int
    row_steps: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """New tokens of all rows per second."""
        return sum(self.new_tokens) / max(self.seconds, 1e-12)

    @property
    def mean_accepted_per_step(self) -> float:
        """Tokens emitted per verification step and row: accepted drafts + the one the model
        chooses itself (1.0 = no draft ever accepted)."""
        return 1.0 + self.accepted_drafts / max(self.row_steps, 1)

    def to_dict(self) -> dict:
        """The fields but row_steps, and the two rates, as JSON-ready values."""
        return {"new_tokens": self.new_tokens, "verification_steps": self.verification_steps,
                "accepted_drafts": self.accepted_drafts, "drafted_nodes": self.drafted_nodes, "seconds": self.seconds,
                "tokens_per_second": self.tokens_per_second,
                "mean_accepted_per_step": self.mean_accepted_per_step}


@dataclass
class SpeculativeOutput:
    """What speculative_generate returns.

    Attributes:
        sequences: [B, T + new] of input_ids' dtype, like model.generate's: the prompt, the new
            tokens, pad_token_id after EOS (new: the most tokens any row generated).
        stats: GenerationStats.
    """

    sequences: Tensor
    stats: GenerationStats


class _Rows:
    """What each row has produced so far, and whether it is done (EOS or `limit` tokens); a
    streamer gets the tokens as they are added."""

    def __init__(self, batch: int, limit: int, eos: set[int], streamer=None):
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.done = [False] * batch
        self.limit, self.eos, self.streamer = limit, eos, streamer

    def add(self, row: int, new: Sequence[int]) -> None:
        before = len(self.tokens[row])
        for token in new:
            if self.done[row]:
                break
            self.tokens[row].append(token)
            self.done[row] = token in self.eos or len(self.tokens[row]) >= self.limit
        if self.streamer is not None and len(self.tokens[row]) > before:
            self.streamer.put(torch.tensor(self.tokens[row][before:]))

    def remaining(self) -> list[int]:
        return [0 if done else self.limit - len(tokens) for tokens, done in zip(self.tokens, self.done)]


# generation_config fields the engine honours (the rest must stay at their defaults), and the
# ones that carry no instruction for it.
_HONOURED = {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "eos_token_id",
             "pad_token_id"}
_BOOKKEEPING = {"transformers_version", "_from_model_config", "bos_token_id", "use_cache", "max_length"}
_DEFAULTS = {"max_new_tokens": 32, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
             "repetition_penalty": 1.0}


@torch.no_grad()
def speculative_generate(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                         drafter: Union[str, Drafter] = DEFAULT_DRAFTER, max_new_tokens: Optional[int] = None,
                         do_sample: Optional[bool] = None, temperature: Optional[float] = None,
                         top_p: Optional[float] = None, eos_token_id: Union[int, Sequence[int], None] = None,
                         pad_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                         generation_config=None, logits_processor=None, streamer=None,
                         top_k: Optional[int] = None, repetition_penalty: Optional[float] = None) -> SpeculativeOutput:
    """Generate up to `max_new_tokens` per row with drafts verified in one packed pass per step,
    as model.generate would (greedy: the same tokens; sampling: draws from the same distribution).

    The token at every step is chosen as model.generate chooses it: the repetition penalty and
    `logits_processor` first (each reads the row's sequence up to the node), then argmax, or a
    draw at `temperature` from the `top_k` tokens and the `top_p` nucleus. Settings come from
    the arguments, else from `generation_config`, else the defaults below; a generation_config
    asking for anything else (beams, minimum lengths, ...) is refused with the fields named.
    Rows stop at `eos_token_id` (default: the model's generation config) and are padded with
    `pad_token_id` (default: the generation config's, else the first EOS id), as model.generate
    does. Padding of the prompt may be on either side.

    Args:
        model: a supported Hugging Face causal LM.
        input_ids: [B, T] int64, the prompts.
        attention_mask: [B, T] (1: real token), or None: every token is real.
        drafter: a Drafter, or a registered name (see register_drafter); by default "auto": the
            context lookup, else the token head prepared for the model (default_drafter_name).
        max_new_tokens: the most tokens generated per row, >= 1; default 32.
        do_sample: False (default): greedy decoding.
        temperature: finite, > 0 (sampling only); default 1.
        top_p: in (0, 1] (sampling only); default 1.
        eos_token_id: an id or ids that end a row; None: the generation config's.
        pad_token_id: the id after a row's EOS; None: as above.
        generator: the random draws' generator; None: torch's default.
        generation_config: a transformers GenerationConfig, as model.generate takes it.
        logits_processor: a LogitsProcessorList (or list) of processors (input_ids, scores) ->
            scores, applied after the repetition penalty.
        streamer: receives the tokens as model.generate's streamer does (`put` the prompt, then
            each step's accepted tokens, `end` at the end); batch size 1 only, e.g. TextStreamer.
        top_k: keep the k most likely tokens when sampling; 0 (default): all.
        repetition_penalty: Hugging Face's repetition penalty; 1 (default): none.

    Returns:
        SpeculativeOutput.
    """
    settings = generation_settings(generation_config, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                   temperature=temperature, top_p=top_p, top_k=top_k,
                                   repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                                   pad_token_id=pad_token_id)
    max_new_tokens = check_positive_int(settings["max_new_tokens"], "max_new_tokens")
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError(f"a streamer takes one sequence at a time, as in model.generate; got a batch of "
                         f"{input_ids.shape[0]}")
    drafter = resolve_drafter(drafter, model)
    rule = TokenRule(bool(settings["do_sample"]), float(settings["temperature"]), float(settings["top_p"]),
                     generator, int(settings["top_k"] or 0), processors(settings["repetition_penalty"], logits_processor))
    adapter = CausalLMAdapter(model)
    attention_mask = check_inputs(adapter, input_ids, attention_mask, steps=1)
    eos, pad = generation_ids(model, settings["eos_token_id"], settings["pad_token_id"])
    longest = int(attention_mask.sum(1).max()) + max_new_tokens
    if longest > adapter.context_length:
        raise ValueError(f"a prompt of {longest - max_new_tokens} tokens plus {max_new_tokens} new ones exceeds "
                         f"the model's context of {adapter.context_length}")

    start = time.perf_counter()
    if streamer is not None:
        streamer.put(input_ids.cpu())
    with small_batch_linears(model):  # a tree of a few nodes is bound by reading the weights
        decoder = SpeculativeDecoder(adapter, drafter, rule, input_ids, attention_mask)
        rows = _Rows(input_ids.shape[0], max_new_tokens, eos, streamer)
        for row, token in enumerate(decoder.previous.next_tokens.tolist()):
            rows.add(row, [token])
        while not all(rows.done):
            for row, new in enumerate(decoder.step(rows.remaining())):
                rows.add(row, new)
    if streamer is not None:
        streamer.end()
    stats = GenerationStats([len(tokens) for tokens in rows.tokens], decoder.steps, decoder.accepted_drafts,
                            decoder.drafted_nodes, decoder.row_steps, time.perf_counter() - start)
    return SpeculativeOutput(assemble(input_ids, rows.tokens, pad), stats)


def generation_settings(generation_config, **given) -> dict:
    """The generation settings: each given one (not None), else generation_config's, else the
    engine's default; a ValueError naming what generation_config asks for that the engine cannot
    honour."""
    settings = dict(_DEFAULTS, eos_token_id=None, pad_token_id=None)
    if generation_config is not None:
        unhonoured = sorted(set(generation_config.to_diff_dict()) - _HONOURED - _BOOKKEEPING)
        if unhonoured:
            raise ValueError(f"speculative_generate cannot honour generation_config's {', '.join(unhonoured)}: it "
                             f"decodes one sequence per prompt, choosing each token by {', '.join(sorted(_HONOURED))}")
        settings.update({name: getattr(generation_config, name) for name in settings
                         if getattr(generation_config, name, None) is not None})
    settings.update({name: value for name, value in given.items() if value is not None})
    return settings


def processors(repetition_penalty: float, logits_processor) -> tuple:
    """The processors model.generate would apply before choosing: the repetition penalty, then
    the user's."""
    chain = []
    if repetition_penalty != 1.0:
        from transformers import RepetitionPenaltyLogitsProcessor

        chain.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty)))
    return tuple(chain) + tuple(logits_processor or ())


class SpeculativeDecoder:
    """The decoding state between steps: the KV cache, which of its slots each row sees
    (`slot_mask` [B', K] bool) and the last pass (`previous`), for the B' rows still generating
    (`live_rows`: their indices among the B prompts). The prompt runs on construction; `step()`
    drafts, verifies and returns each row's new tokens.

    A finished row leaves the batch before the next pass: rows finish at different steps, since
    each accepts its own drafts, and on a CPU a pass costs about as much as its rows times its
    longest tree (bench/README.md, "Against prompt lookup").

    Args:
        adapter: the model's adapter.
        drafter: the Drafter.
        rule: the model's TokenRule.
        input_ids: [B, T] int64, the prompts.
        attention_mask: [B, T] (1: real token).
    """

    def __init__(self, adapter: CausalLMAdapter, drafter: Drafter, rule: TokenRule, input_ids: Tensor,
                 attention_mask: Tensor):
        self.adapter, self.drafter, self.rule = adapter, drafter, rule
        self.cache = adapter.new_cache()
        self.slot_mask = attention_mask.bool()
        # Each row as model.generate holds it (padding included), for the rule's processors.
        rule.sequences, rule.forest = input_ids.tolist(), None
        self.previous = prefill(adapter, drafter, self.cache, input_ids, self.slot_mask, rule)
        for sequence, root in zip(rule.sequences, self.previous.next_tokens.tolist()):
            sequence.append(root)
        # Each row's real tokens so far, the next root last: what drafters that look back read.
        self.context = [row[real].tolist() + [root] for row, real, root
                        in zip(input_ids, self.slot_mask, self.previous.next_tokens.tolist())]
        self.previous.context = self.context
        self.live_rows = list(range(input_ids.shape[0]))
        self.steps = self.accepted_drafts = self.drafted_nodes = self.row_steps = 0

    def step(self, remaining: list[int]) -> list[list[int]]:
        """One draft-and-verify step of the rows that may still emit tokens.

        Args:
            remaining: [B] ints, the tokens each of the B prompts' rows may still emit (0: the
                row is finished and leaves the batch for good; if every row is, they all run
                along and their tokens are not counted).

        Returns:
            Per row of the B, the accepted drafts followed by the next root (none for a row
            that has left).
        """
        forest = self.drafter.draft(self.previous)
        going_on = [row for row in self.live_rows if remaining[row] > 0]
        if going_on and len(going_on) < len(self.live_rows):
            forest = self.keep_rows(going_on, forest)
        live_remaining = [remaining[row] for row in self.live_rows]
        forest = prune_to_budget(forest, live_remaining, self.adapter.context_length, self.slot_mask.sum(1))
        self.previous, paths, lengths = verify(self.adapter, self.drafter, self.cache, self.slot_mask, forest,
                                               self.rule)
        kept = torch.arange(paths.shape[1], device=lengths.device)[None, :] < lengths[:, None]
        self.slot_mask = torch.cat([self.slot_mask, kept], 1)
        self.steps += 1
        new_tokens: list[list[int]] = [[] for _ in remaining]
        for live, (row, path, length) in enumerate(zip(self.live_rows, paths.tolist(), lengths.tolist())):
            if remaining[row] > 0:
                self.row_steps += 1
                self.accepted_drafts += length - 1
                self.drafted_nodes += int(forest.counts[live]) - 1
            drafted = forest.token_ids[live, path[1:length]].tolist()
            new_tokens[row] = drafted + [int(self.previous.next_tokens[live])]
            self.context[live].extend(new_tokens[row])
            self.rule.sequences[live].extend(new_tokens[row])
        self.previous.context = self.context
        return new_tokens

    def keep_rows(self, rows: list[int], forest: DraftForest) -> DraftForest:
        """Drop every live row but `rows` (indices among the prompts, in order) from the batch;
        returns their trees of `forest`."""
        index = torch.tensor([self.live_rows.index(row) for row in rows], device=self.slot_mask.device)
        self.cache.batch_select_indices(index)
        self.slot_mask = self.slot_mask[index]
        self.context = [self.context[position] for position in index.tolist()]
        self.rule.sequences = [self.rule.sequences[position] for position in index.tolist()]
        self.live_rows = rows
        return forest.select_rows(index.to(forest.token_ids.device))


def generation_ids(model, eos_token_id, pad_token_id) -> tuple[set[int], int]:
    """EOS ids and the pad id, defaulting to the model's generation config as model.generate does."""
    config = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", None)
    eos_ids = [] if eos_token_id is None else [int(t) for t in ([eos_token_id] if isinstance(eos_token_id, int)
                                                                else eos_token_id)]
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
    if pad_token_id is None:  # model.generate pads with the first EOS id
        pad_token_id = eos_ids[0] if eos_ids else 0
    return set(eos_ids), int(pad_token_id)


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
    last_real = last_real_positions(slot_mask)[:, None]
    logits = adapter.logits(gather_nodes(final_hidden(hidden), last_real)[:, 0])
    forest = DraftForest.roots(input_ids.gather(1, last_real)[:, 0])
    return VerifiedPass(forest, hidden, last_real, torch.zeros_like(last_real[:, 0]), rule.choose(logits), adapter,
                        stop_logits=logits, rule=rule)


def verify(adapter: CausalLMAdapter, drafter: Drafter, cache, slot_mask: Tensor, forest: DraftForest,
           rule: TokenRule) -> tuple[VerifiedPass, Tensor, Tensor]:
    """One packed pass over the trees, the walk, and the cache kept to the accepted paths.

    Returns the pass, the accepted node slots [B, L] (root first; padded with the last
    accepted slot) and the path lengths [B]."""
    length = cache.get_seq_length()
    packed = pack_forest(adapter, forest, slot_mask)
    hidden = adapter.hidden_states(packed.input_ids, packed.mask, packed.position_ids, cache,
                                   every_layer=drafter.every_layer)
    rule.forest = forest
    own_chooser = drafter.chooser(adapter, hidden, rule, forest)
    paths, stop_state, next_tokens = walk(forest, own_chooser or logits_chooser(adapter, final_hidden(hidden), rule))
    lengths = (paths != -1).sum(1)
    paths = torch.where(paths == -1, paths.max(1, keepdim=True).values, paths)
    adapter.keep_cache_slots(cache, length, paths)
    node_positions = torch.arange(forest.size, device=paths.device).expand(paths.shape[0], -1)
    stop_nodes = paths.gather(1, lengths[:, None] - 1)[:, 0]
    stop_logits, drafter_state = (None, stop_state) if own_chooser else (stop_state.logits, None)
    return (VerifiedPass(forest, hidden, node_positions, stop_nodes, next_tokens, adapter, stop_logits, drafter_state,
                         rule=rule),
            paths, lengths)


def logits_chooser(adapter: CausalLMAdapter, hidden: Tensor, rule: TokenRule) -> Chooser:
    """The walk's default Chooser: the model's float32 logits at each node [A, V] (hidden
    [B, T, H] of the pass), and the rule's choice from them."""

    def choose(rows: Tensor, slots: Tensor) -> tuple[Tensor, ModelLogits]:
        logits = adapter.logits(hidden[rows, slots])
        return rule.choose(logits, rows, slots), ModelLogits(logits)

    return choose


def walk(forest: DraftForest, choose: Chooser):
    """From every root, descend while the token chosen at a node is a child's token.

    Returns the accepted slots [B, D] (-1 after a row's last), the state `choose` computed at
    each row's last accepted node (a NodeState of [B, ...] tensors) and the token chosen there
    [B]."""
    batch, device = forest.token_ids.shape[0], forest.token_ids.device
    rows = torch.arange(batch, device=device)
    node_tokens = getattr(choose, "node_tokens", None)
    if node_tokens is not None:
        return walk_chosen(forest, choose, node_tokens)
    current = torch.zeros(batch, dtype=torch.long, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    stop_state = None
    chosen = torch.empty(batch, dtype=torch.long, device=device)
    path = [current.clone()]
    live = forest.live()
    while bool(active.any()):
        tokens, state = choose(rows[active], current[active])
        if stop_state is None:
            stop_state = state.empty_rows(batch)
        stop_state.store(active, state)
        chosen[active] = tokens
        matches = live[active] & (forest.parents[active] == current[active, None]) & \
            (forest.token_ids[active] == tokens[:, None])
        descend = matches.any(1)
        step = torch.full((batch,), -1, dtype=torch.long, device=device)
        step[rows[active][descend]] = matches[descend].long().argmax(1)
        active = step >= 0
        current = torch.where(active, step, current)
        path.append(step)
    return torch.stack(path[:-1], 1), stop_state, chosen


def walk_chosen(forest: DraftForest, choose: Chooser, node_tokens: Tensor):
    """walk, where the token chosen at every node is known before the walk (node_tokens [B, N],
    a greedy chooser's): the tree is followed on Python lists, and `choose` is called once, at
    the rows' last accepted nodes, for their states. Returns what walk returns."""
    parents, token_ids = forest.parents.tolist(), forest.token_ids.tolist()
    counts, chosen_at = forest.counts.tolist(), node_tokens.tolist()
    paths = []
    for row_parents, row_tokens, count, row_chosen in zip(parents, token_ids, counts, chosen_at):
        path = [0]
        while True:
            node, want = path[-1], row_chosen[path[-1]]
            child = next((slot for slot in range(1, count) if row_parents[slot] == node and row_tokens[slot] == want),
                         None)
            if child is None:
                break
            path.append(child)
        paths.append(path)
    depth = max(len(path) for path in paths)
    device = forest.token_ids.device
    padded = torch.tensor([path + [-1] * (depth - len(path)) for path in paths], dtype=torch.long, device=device)
    stops = torch.tensor([path[-1] for path in paths], dtype=torch.long, device=device)
    chosen, stop_state = choose(torch.arange(len(paths), device=device), stops)
    return padded, stop_state, chosen


def prune_to_budget(forest: DraftForest, remaining: list[int], context_length: int, visible: Tensor) -> DraftForest:
    """Cut each tree below the depth that can still be emitted (tokens left to generate, room
    in the context); rows with nothing left keep their root only."""
    depth = forest.depths()
    allowed = torch.tensor(remaining, device=depth.device) - 1
    allowed = torch.minimum(allowed, context_length - 1 - visible).clamp(min=0)
    # Levels are stored in order, so the kept nodes are a prefix of each tree.
    slots = torch.arange(forest.size, device=depth.device)[None, :]
    counts = ((depth <= allowed[:, None]) & (slots < forest.counts[:, None])).sum(1)
    return forest.with_counts(counts)
