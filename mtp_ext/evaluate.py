"""Teacher-forced evaluation of marginalisation MTP (the paper's Fig. 1 measurement).

For every position t of every sequence and every step k, the marginal distribution of
x_{t+k} given x_{<=t} is ranked against the true token. One forward pass per batch of sequences
fills the KV cache; then, for a window of positions at a time, one packed pass per tree level
scores the draft trees of all those positions at once (tree_pack_teacher).

Candidates are capped, so the marginal misses the left-out mass m = 1 - (captured mass). Every
token's true marginal lies in [captured, captured + m], which bounds each top-k accuracy: a hit
is certain when no other token can overtake the true one, and possible unless some token beats
it even with all of m added to the true token.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence, Union

import torch
from torch import Tensor

from mtp_ext._checks import check_positive_int, check_positive_ints, check_top_p
from mtp_ext.integrations.distributed import World
from mtp_ext.marginal import score_leaves
from mtp_ext.models.adapters import CausalLMAdapter
from mtp_ext.ops import top_p_candidates, tree_pack_teacher
from mtp_ext.tree import DraftForest, pack_for_model

__all__ = ["EvaluationResult", "Example", "StepAccuracy", "evaluate_mtp"]

# A sequence of token ids, or a (prompt, target) pair whose target tokens alone are scored.
Example = Union[Sequence[int], tuple[Sequence[int], Sequence[int]]]


@dataclass
class StepAccuracy:
    """The running counts of one step's top-k accuracy, with its bounds.

    Attributes:
        step: k, the token x_{t+k} scored.
        positions: the positions scored.
        hits: k -> positions whose true token ranks in the top k.
        certain_hits: k -> hits that hold whatever was left out.
        possible_hits: k -> positions that could be hits.
        certain_sets: k -> positions whose top-k set is certain.
        captured_mass_sum: the captured mass, summed over positions.
    """

    step: int
    positions: int = 0
    hits: dict = field(default_factory=dict)
    certain_hits: dict = field(default_factory=dict)
    possible_hits: dict = field(default_factory=dict)
    certain_sets: dict = field(default_factory=dict)
    captured_mass_sum: float = 0.0

    def add(self, marginal: Tensor, targets: Tensor, left_out: Tensor, top_k: Sequence[int]) -> None:
        """Scores R more positions.

        Args:
            marginal: [R, V] float32, the step's marginal at each position.
            targets: [R] int64, the true tokens.
            left_out: [R] float32, the mass the marginal misses (0 for step 1).
            top_k: the k to count.
        """
        self.positions += targets.numel()
        self.captured_mass_sum += float((1.0 - left_out).sum())
        target_value = marginal.gather(1, targets[:, None])
        above = (marginal > target_value).sum(1)
        # The true token itself always counts in `maybe_above`: hence the - 1.
        maybe_above = (marginal + left_out[:, None] >= target_value).sum(1) - 1
        surely_above = (marginal > target_value + left_out[:, None]).sum(1)
        top_values = marginal.topk(min(max(top_k) + 1, marginal.shape[1]), dim=1).values
        for k in top_k:
            self.hits[k] = self.hits.get(k, 0) + int((above < k).sum())
            self.certain_hits[k] = self.certain_hits.get(k, 0) + int((maybe_above < k).sum())
            self.possible_hits[k] = self.possible_hits.get(k, 0) + int((surely_above < k).sum())
            if k < top_values.shape[1]:
                certain = top_values[:, k - 1] > top_values[:, k] + left_out
            else:
                certain = torch.ones_like(left_out, dtype=torch.bool)
            self.certain_sets[k] = self.certain_sets.get(k, 0) + int(certain.sum())

    def counts(self, top_k: Sequence[int]) -> list[int]:
        """positions, then hits, certain_hits, possible_hits and certain_sets of each k in
        `top_k`: what from_counts takes back (to sum them over ranks)."""
        return [self.positions] + [counts.get(k, 0) for counts in self._count_dicts() for k in top_k]

    @classmethod
    def from_counts(cls, step: int, top_k: Sequence[int], counts: Sequence[int],
                    captured_mass_sum: float) -> "StepAccuracy":
        """The StepAccuracy whose counts(top_k) are `counts` (no k is counted without a position).

        Args:
            step: k, the token x_{t+k} scored.
            top_k: the k counted.
            counts: as counts(top_k) gives them.
            captured_mass_sum: the captured mass, summed over positions.

        Returns:
            StepAccuracy.
        """
        accuracy = cls(step, int(counts[0]), captured_mass_sum=float(captured_mass_sum))
        if accuracy.positions:
            values = iter(int(value) for value in counts[1:])
            for counted in accuracy._count_dicts():
                counted.update({k: next(values) for k in top_k})
        return accuracy

    def _count_dicts(self) -> tuple[dict, dict, dict, dict]:
        return self.hits, self.certain_hits, self.possible_hits, self.certain_sets

    def summary(self) -> dict:
        """The counts as shares of the positions: step, positions, accuracy, accuracy_lower,
        accuracy_upper, certain_topk_share ("top{k}" -> share each) and captured_mass (the mean)."""
        share = lambda counts: {f"top{k}": counts[k] / max(self.positions, 1) for k in counts}  # noqa: E731
        return {
            "step": self.step,
            "positions": self.positions,
            "accuracy": share(self.hits),
            "accuracy_lower": share(self.certain_hits),
            "accuracy_upper": share(self.possible_hits),
            "certain_topk_share": share(self.certain_sets),
            "captured_mass": self.captured_mass_sum / max(self.positions, 1),
        }


@dataclass
class EvaluationResult:
    """What evaluate_mtp measured.

    Attributes:
        steps: StepAccuracy.summary() of steps 1 .. steps.
        mean_nucleus_size: the mean size of the step-1 nuclei (capped at max_candidates) at the
            scored positions.
        mean_nucleus_mass: their mean probability mass.
        positions: the positions scored for step 1.
        seconds: wall time.
        settings: the arguments of evaluate_mtp, and the number of sequences.
    """

    steps: list[dict]
    mean_nucleus_size: float
    mean_nucleus_mass: float
    positions: int
    seconds: float
    settings: dict

    @property
    def positions_per_second(self) -> float:
        """Step-1 positions scored per second."""
        return self.positions / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        """The fields and positions_per_second, as JSON-ready values."""
        return {**asdict(self), "positions_per_second": self.positions_per_second}

    def table(self, top_k: Sequence[int] = (1, 5)) -> str:
        """The results as a Markdown table: one line per step.

        Args:
            top_k: the k shown; each must have been evaluated.

        Returns:
            The table, and a line on the nucleus sizes and speed.
        """
        head = "| step | positions | " + " | ".join(f"top-{k} (bounds)" for k in top_k) + " | captured mass |"
        lines = [head, "|" + "---|" * (3 + len(top_k))]
        for step in self.steps:
            cells = []
            for k in top_k:
                name = f"top{k}"
                cells.append(f"{step['accuracy'][name]:.3f} ({step['accuracy_lower'][name]:.3f}-"
                             f"{step['accuracy_upper'][name]:.3f})")
            lines.append(f"| {step['step']} | {step['positions']} | " + " | ".join(cells)
                         + f" | {step['captured_mass']:.4f} |")
        lines.append(f"\nmean nucleus size (top-p {self.settings['top_p']}, cap {self.settings['max_candidates']}): "
                     f"{self.mean_nucleus_size:.1f} tokens holding {self.mean_nucleus_mass:.4f}; "
                     f"{self.positions_per_second:.1f} positions/s")
        return "\n".join(lines)


@torch.no_grad()
def evaluate_mtp(
    model,
    sequences: Sequence[Example],
    steps: int = 2,
    top_k: Sequence[int] = (1, 5),
    top_p: float = 0.99,
    max_candidates: int = 64,
    max_nodes: int = 256,
    batch_size: int = 4,
    tokens_per_pass: int = 2048,
    progress: bool = True,
    world: World | None = None,
) -> EvaluationResult:
    """Top-k accuracy of the marginal of x_{t+1} .. x_{t+steps} against the true tokens.

    Sequences are right-padded into batches of `batch_size`; each packed pass holds at most
    about `tokens_per_pass` tree tokens. In a distributed run every rank scores its own share
    of the windows of positions (each window as one process would, so the counts are the same)
    and the counts and sums are added up over the ranks: every rank returns the whole result.

    Args:
        model: a supported Hugging Face causal LM.
        sequences: token id lists (at least 2 tokens each), or (prompt, target) pairs of which
            only target tokens are scored (translation).
        steps: the tokens predicted after each position, >= 1.
        top_k: the k whose accuracy is counted.
        top_p: the nucleus kept at every level of the draft trees, in (0, 1].
        max_candidates: cap on each nucleus.
        max_nodes: cap on the nodes of a draft tree.
        batch_size: sequences per forward pass.
        tokens_per_pass: about the most tree tokens in one packed pass.
        progress: show a progress bar (rank 0 only: of every rank's positions).
        world: the ranks sharing the work (mtp_ext.integrations.distributed); None: this process.

    Returns:
        EvaluationResult.
    """
    adapter = CausalLMAdapter(model)
    _check_request(adapter, sequences, steps, top_k, top_p)
    for name, value in (("max_candidates", max_candidates), ("max_nodes", max_nodes), ("batch_size", batch_size),
                        ("tokens_per_pass", tokens_per_pass)):
        check_positive_int(value, name)
    world = world or World()
    tally = _Tally(steps, top_k)
    started = time.perf_counter()
    batches = [_pad_batch(sequences[i:i + batch_size]) for i in range(0, len(sequences), batch_size)]
    # The unit of work: one window of positions of one batch, as one process scores it.
    tree_size = max_candidates if steps == 2 else max_nodes
    windows = [(index, first, last) for index, (input_ids, _, _) in enumerate(batches)
               for first, last in _windows(input_ids.shape, tree_size, tokens_per_pass)]
    weights = [int(batches[index][2][:, first + 1:last + 1].sum()) for index, first, last in windows]
    with world.progress(weights, unit="tok", disable=not progress, desc=f"evaluate steps 1-{steps}") as bar:
        for index, units in itertools.groupby(world.share(weights), key=lambda unit: windows[unit][0]):
            input_ids, seq_mask, scored = (tensor.to(adapter.device) for tensor in batches[index])
            cache = adapter.new_cache()
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
            hidden = adapter.hidden_states(input_ids, seq_mask, positions, cache)
            for unit in units:
                _, first, last = windows[unit]
                _evaluate_window(adapter, cache, hidden, input_ids, seq_mask, scored, first, last, steps, top_k,
                                 top_p, max_candidates, max_nodes, tally)
                bar.update(weights[unit])
        bar.wait()
    tally = tally.reduced(world)
    seconds = time.perf_counter() - started
    settings = dict(steps=steps, top_k=list(top_k), top_p=top_p, max_candidates=max_candidates,
                    max_nodes=max_nodes, sequences=len(sequences))
    accuracies = tally.accuracies
    return EvaluationResult([a.summary() for a in accuracies], tally.nucleus_size_sum / max(tally.nucleus_count, 1),
                            tally.nucleus_mass_sum / max(tally.nucleus_count, 1), accuracies[0].positions, seconds,
                            settings)


class _Tally:
    """What evaluate_mtp adds up: each step's StepAccuracy, and the size and mass of the step-1
    nuclei where the next token is scored."""

    def __init__(self, steps: int, top_k: Sequence[int]):
        self.top_k = tuple(top_k)
        self.accuracies = [StepAccuracy(step) for step in range(1, steps + 1)]
        self.nucleus_count = self.nucleus_size_sum = 0
        self.nucleus_mass_sum = 0.0

    def add_nuclei(self, counts: Tensor, mass: Tensor) -> None:
        self.nucleus_count += counts.numel()
        self.nucleus_size_sum += int(counts.sum())
        self.nucleus_mass_sum += float(mass.double().sum())

    def reduced(self, world: World) -> "_Tally":
        """The tally summed over the ranks (integers exactly); itself in one process."""
        if not world.distributed:
            return self
        counts = world.sum(torch.tensor([value for accuracy in self.accuracies for value in accuracy.counts(self.top_k)]
                                        + [self.nucleus_count, self.nucleus_size_sum], dtype=torch.long), "the counts")
        sums = world.sum(torch.tensor([accuracy.captured_mass_sum for accuracy in self.accuracies]
                                      + [self.nucleus_mass_sum], dtype=torch.float64), "the masses").tolist()
        width = 1 + 4 * len(self.top_k)
        total = _Tally(len(self.accuracies), self.top_k)
        total.accuracies = [StepAccuracy.from_counts(accuracy.step, self.top_k, counts[row * width:(row + 1) * width],
                                                     sums[row])
                            for row, accuracy in enumerate(self.accuracies)]
        total.nucleus_count, total.nucleus_size_sum = (int(value) for value in counts[-2:])
        total.nucleus_mass_sum = sums[-1]
        return total


def _windows(shape: torch.Size, tree_size: int, tokens_per_pass: int) -> list[tuple[int, int]]:
    """The windows [first, last) of anchors of a [B, L] batch, each scored in one packed pass per level."""
    batch, length = shape
    window = max(1, tokens_per_pass // (batch * tree_size))
    return [(first, min(first + window, length - 1)) for first in range(0, length - 1, window)]


def _evaluate_window(adapter, cache, hidden, input_ids, seq_mask, scored, first, last, steps, top_k, top_p,
                     max_candidates, max_nodes, tally: _Tally) -> None:
    length = input_ids.shape[1]
    logits = adapter.logits(hidden[:, first:last]).reshape(-1, adapter.vocab_size)
    _score(tally.accuracies[0], logits, input_ids, scored, first, last, 1, torch.zeros(logits.shape[0]), top_k)
    ids, probs, counts, mass = top_p_candidates(logits, top_p, max_candidates)
    # Nucleus sizes count where the next token is scored.
    anchored = scored[:, first + 1:last + 1].reshape(-1)
    tally.add_nuclei(counts[anchored], mass[anchored])
    if steps == 1:
        return
    forest = DraftForest.from_candidates(ids, probs, counts)
    for step in range(2, steps + 1):
        shape = (input_ids.shape[0], last - first, forest.size)
        packed = pack_for_model(adapter, lambda window: tree_pack_teacher(
            forest.token_ids.reshape(shape), forest.parents.reshape(shape), forest.counts.reshape(shape[:2]),
            seq_mask, first_position=first, sliding_window=window))
        node_hidden = adapter.hidden_states(packed.input_ids, packed.mask, packed.position_ids, cache)
        adapter.trim_cache(cache, length)
        scores = score_leaves(adapter, forest, node_hidden, top_p, max_candidates, expand=step < steps)
        left_out = (1.0 - scores.captured_mass).clamp(min=0.0)
        _score(tally.accuracies[step - 1], scores.marginal, input_ids, scored, first, last, step, left_out, top_k)
        if step < steps:
            forest = forest.grow(*scores.children, max_nodes=max_nodes)


def _score(accuracy: StepAccuracy, distributions: Tensor, input_ids: Tensor, scored: Tensor, first: int,
           last: int, step: int, left_out: Tensor, top_k: Sequence[int]) -> None:
    """Rank x_{t+step} for anchors t in [first, last) whose target exists and is scored."""
    batch, length = input_ids.shape
    anchors = torch.arange(first, last, device=input_ids.device)
    target_index = anchors + step
    in_range = target_index < length
    target_index = target_index.clamp(max=length - 1)
    targets = input_ids[:, target_index]  # [B, P]
    valid = (scored[:, target_index] & in_range[None, :]).reshape(-1)
    if bool(valid.any()):
        accuracy.add(distributions[valid], targets.reshape(-1)[valid], left_out.to(distributions.device)[valid],
                     top_k)


def _pad_batch(batch: Sequence[Example]) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded input ids, attention mask and which tokens are scored, [B, L] each."""
    rows, scored_rows = [], []
    for example in batch:
        if isinstance(example, tuple):
            prompt, target = list(example[0]), list(example[1])
            rows.append(prompt + target)
            scored_rows.append([False] * len(prompt) + [True] * len(target))
        else:
            rows.append(list(example))
            scored_rows.append([True] * len(rows[-1]))
    length = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    seq_mask = torch.zeros(len(rows), length, dtype=torch.long)
    scored = torch.zeros(len(rows), length, dtype=torch.bool)
    for index, (row, scored_row) in enumerate(zip(rows, scored_rows)):
        input_ids[index, :len(row)] = torch.tensor(row)
        seq_mask[index, :len(row)] = 1
        scored[index, :len(row)] = torch.tensor(scored_row)
    scored[:, 0] = False  # nothing predicts the first token
    return input_ids, seq_mask, scored


def _check_request(adapter: CausalLMAdapter, sequences, steps, top_k, top_p) -> None:
    check_positive_int(steps, "steps")
    check_top_p(top_p)
    check_positive_ints(top_k, "top_k")
    if len(sequences) == 0:
        raise ValueError("no sequences to evaluate")
    for index, example in enumerate(sequences):
        tokens = len(example[0]) + len(example[1]) if isinstance(example, tuple) else len(example)
        if tokens < 2:
            raise ValueError(f"sequence {index} has {tokens} tokens: at least 2 are needed")
        if tokens + steps - 1 > adapter.context_length:
            raise ValueError(f"sequence {index} has {tokens} tokens, which with {steps - 1} predicted ones "
                             f"exceeds the model's context of {adapter.context_length}")
