"""The paper's diagnostics of a next-token model (Figs. 2-4), from one forward pass per sequence:

- logit lens: each layer's hidden state through the final norm and the shared unembedding, and
  KL(p_layer || p_final) averaged over positions (Fig. 2);
- the entropy of the next-token distribution at every position (Fig. 3);
- how many tokens the top-p nucleus holds at every position, for several p (Fig. 4), with the
  same nucleus as top_p_candidates (counted with top_p_mask, so that no cap applies).

Memory stays bounded: logits exist for one chunk of positions and one layer at a time, and
everything is reduced as it goes, to sums and histograms (and the entropy along the first
sequence, Fig. 3), which is also all that ranks of a distributed run exchange.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import Tensor

from mtp_ext._checks import check_top_p
from mtp_ext.integrations.distributed import World
from mtp_ext.models.adapters import CausalLMAdapter
from mtp_ext.models.introspection import decoder_layers, final_norm
from mtp_ext.ops import top_p_mask

__all__ = ["AnalysisResult", "analyze"]

# Largest number of float32 logits held at once (64 MiB).
LOGIT_ELEMENTS_PER_CHUNK = 1 << 24


@dataclass
class AnalysisResult:
    """What analyze measured.

    Attributes:
        layers: L, the model's decoder layers.
        kl_per_layer: mean KL(p_layer || p_final) (nats) for layers 1..L (the last is 0).
        positions: the positions analysed.
        entropy_sum: the next-token entropy (nats), summed over the positions.
        first_entropy: the next-token entropy at each position of the first sequence (Fig. 3).
        nucleus_size_histogram: str(top_p), e.g. "0.99" -> [[size, positions], ...]: how many
            positions have a nucleus of each size (sizes that occur, ascending).
    """

    layers: int
    kl_per_layer: list[float]
    positions: int
    entropy_sum: float
    first_entropy: list[float]
    nucleus_size_histogram: dict

    def summary(self) -> dict:
        """positions, mean_entropy, mean_nucleus_size (per top_p) and kl_per_layer."""
        return {
            "positions": self.positions,
            "mean_entropy": self.entropy_sum / max(self.positions, 1),
            "mean_nucleus_size": {p: sum(size * count for size, count in pairs) / max(sum(c for _, c in pairs), 1)
                                  for p, pairs in self.nucleus_size_histogram.items()},
            "kl_per_layer": self.kl_per_layer,
        }

    def to_dict(self) -> dict:
        """The fields and the summary, as JSON-ready values."""
        return {**asdict(self), "summary": self.summary()}


@torch.no_grad()
def analyze(model, sequences: Sequence[Sequence[int]], top_ps: Sequence[float] = (0.99, 0.9),
            progress: bool = True, world: World | None = None) -> AnalysisResult:
    """Logit-lens KL per layer, entropy and nucleus sizes per position over `sequences`.

    Everything is reduced to sums and histograms as it goes. In a distributed run every rank
    analyses its own share of the chunks of positions (each as one process would) and the sums
    and histograms are added up over the ranks: every rank returns the whole result.

    Args:
        model: a supported Hugging Face causal LM.
        sequences: non-empty token id lists, one forward pass each.
        top_ps: the nucleus probabilities whose sizes are counted, each in (0, 1].
        progress: show a progress bar (rank 0 only: of every rank's positions).
        world: the ranks sharing the work (mtp_ext.integrations.distributed); None: this process.

    Returns:
        AnalysisResult.
    """
    if not sequences or any(len(sequence) < 1 for sequence in sequences):
        raise ValueError("analyze needs at least one non-empty sequence")
    top_ps = [check_top_p(p) for p in top_ps]
    world = world or World()
    adapter = CausalLMAdapter(model)
    norm = final_norm(model)
    layers = len(decoder_layers(model))
    chunk = max(1, LOGIT_ELEMENTS_PER_CHUNK // adapter.vocab_size)
    chunks = [(index, start, min(start + chunk, len(sequence))) for index, sequence in enumerate(sequences)
              for start in range(0, len(sequence), chunk)]
    weights = [stop - start for _, start, stop in chunks]
    tally = _Tally(layers, adapter.vocab_size, top_ps, len(sequences[0]))
    with world.progress(weights, desc="analyze", unit="tok", disable=not progress) as bar:
        for index, units in itertools.groupby(world.share(weights), key=lambda unit: chunks[unit][0]):
            input_ids = torch.tensor([list(sequences[index])], device=adapter.device)
            hidden = adapter.base_model(input_ids=input_ids, output_hidden_states=True).hidden_states
            # hidden[0] is the embedding output and hidden[-1] already went through the final norm.
            states = [norm(state[0]) for state in hidden[1:-1]] + [hidden[-1][0]]
            for unit in units:
                _, start, stop = chunks[unit]
                tally.add(adapter, [state[start:stop] for state in states], top_ps, start if index == 0 else None)
                bar.update(weights[unit])
        bar.wait()
    return tally.reduced(world).result(top_ps)


class _Tally:
    """What analyze adds up: KL sums per layer, positions, the entropy sum, the first
    sequence's entropies and a nucleus size histogram per top_p (every size 0..V)."""

    def __init__(self, layers: int, vocab_size: int, top_ps, first_length: int):
        self.kl_sums = torch.zeros(layers, dtype=torch.float64)
        self.counts = torch.zeros(len(top_ps), vocab_size + 1, dtype=torch.long)
        self.positions, self.entropy_sum = 0, 0.0
        self.first_entropy = torch.zeros(first_length, dtype=torch.float64)

    def add(self, adapter: CausalLMAdapter, layers: list[Tensor], top_ps, first_start: int | None) -> None:
        """One chunk of positions: `layers` [P, H] each, the last one final-normed;
        first_start: where the chunk starts if it is of the first sequence."""
        final_logits = adapter.logits(layers[-1])
        final_log_probs = torch.log_softmax(final_logits, -1)
        for index, layer in enumerate(layers[:-1]):
            log_probs = torch.log_softmax(adapter.logits(layer), -1)
            kl = (log_probs.exp() * (log_probs - final_log_probs)).sum(-1)
            self.kl_sums[index] += kl.double().sum().cpu()
        entropy = (-(final_log_probs.exp() * final_log_probs).sum(-1)).double().cpu()
        self.positions += entropy.numel()
        self.entropy_sum += float(entropy.sum())
        if first_start is not None:
            self.first_entropy[first_start:first_start + entropy.numel()] = entropy
        for row, p in enumerate(top_ps):
            # The mask holds the whole nucleus, however large: exact sizes without a cap.
            sizes = (top_p_mask(final_logits, p) != float("-inf")).sum(-1).cpu()
            self.counts[row] += torch.bincount(sizes, minlength=self.counts.shape[1])

    def reduced(self, world: World) -> "_Tally":
        """The tally summed over the ranks (counts exactly); itself in one process."""
        if world.distributed:
            self.kl_sums = world.sum(self.kl_sums, "the logit-lens KL")
            self.counts = world.sum(self.counts, "the nucleus size histograms")
            self.first_entropy = world.sum(self.first_entropy, "the entropy of the first sequence")
            positions, self.entropy_sum = world.sum(torch.tensor([self.positions, self.entropy_sum],
                                                                 dtype=torch.float64), "the entropy").tolist()
            self.positions = int(positions)
        return self

    def result(self, top_ps) -> AnalysisResult:
        histograms = {str(p): [[size, int(row[size])] for size in row.nonzero().flatten().tolist()]
                      for p, row in zip(top_ps, self.counts)}
        return AnalysisResult(len(self.kl_sums), (self.kl_sums / self.positions).tolist(), self.positions,
                              self.entropy_sum, self.first_entropy.tolist(), histograms)
