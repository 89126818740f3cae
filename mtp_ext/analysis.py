"""The paper's diagnostics of a next-token model (Figs. 2-4), from one forward pass per sequence:

- logit lens: each layer's hidden state through the final norm and the shared unembedding, and
  KL(p_layer || p_final) averaged over positions (Fig. 2);
- the entropy of the next-token distribution at every position (Fig. 3);
- how many tokens the top-p nucleus holds at every position, for several p (Fig. 4), with the
  same nucleus as top_p_candidates (counted with top_p_mask, so that no cap applies).

Memory stays bounded: logits exist for one chunk of positions and one layer at a time, and
everything is reduced as it goes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mtp_ext._checks import check_top_p
from mtp_ext.models.adapters import CausalLMAdapter
from mtp_ext.models.introspection import final_norm
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
        entropy: the next-token entropy (nats), per sequence, per position.
        nucleus_sizes: str(top_p), e.g. "0.99" -> nucleus sizes per sequence, per position.
        positions: the positions analysed.
    """

    layers: int
    kl_per_layer: list[float]
    entropy: list[list[float]]
    nucleus_sizes: dict
    positions: int

    def summary(self) -> dict:
        """positions, mean_entropy, mean_nucleus_size (per top_p) and kl_per_layer."""
        flat = lambda rows: [value for row in rows for value in row]  # noqa: E731
        entropies = torch.tensor(flat(self.entropy))
        return {
            "positions": self.positions,
            "mean_entropy": float(entropies.mean()),
            "mean_nucleus_size": {p: float(torch.tensor(flat(rows), dtype=torch.float).mean())
                                  for p, rows in self.nucleus_sizes.items()},
            "kl_per_layer": self.kl_per_layer,
        }

    def to_dict(self) -> dict:
        """The fields and the summary, as JSON-ready values."""
        return {**asdict(self), "summary": self.summary()}


@torch.no_grad()
def analyze(model, sequences: Sequence[Sequence[int]], top_ps: Sequence[float] = (0.99, 0.9),
            progress: bool = True) -> AnalysisResult:
    """Logit-lens KL per layer, entropy and nucleus sizes per position over `sequences`.

    Args:
        model: a supported Hugging Face causal LM.
        sequences: non-empty token id lists, one forward pass each.
        top_ps: the nucleus probabilities whose sizes are counted, each in (0, 1].
        progress: show a progress bar.

    Returns:
        AnalysisResult.
    """
    if not sequences or any(len(sequence) < 1 for sequence in sequences):
        raise ValueError("analyze needs at least one non-empty sequence")
    top_ps = [check_top_p(p) for p in top_ps]
    adapter = CausalLMAdapter(model)
    norm = final_norm(model)
    kl_sums, positions = None, 0
    entropies, sizes = [], {str(p): [] for p in top_ps}
    for sequence in tqdm(sequences, desc="analyze", unit="seq", disable=not progress):
        input_ids = torch.tensor([list(sequence)], device=adapter.device)
        hidden = adapter.base_model(input_ids=input_ids, output_hidden_states=True).hidden_states
        # hidden[0] is the embedding output and hidden[-1] already went through the final norm.
        layers = [norm(state[0]) for state in hidden[1:-1]] + [hidden[-1][0]]
        sequence_kl, sequence_entropy, sequence_sizes = _sequence_diagnostics(adapter, layers, top_ps)
        kl_sums = sequence_kl if kl_sums is None else kl_sums + sequence_kl
        positions += input_ids.shape[1]
        entropies.append(sequence_entropy)
        for p, values in sequence_sizes.items():
            sizes[str(p)].append(values)
    return AnalysisResult(len(layers), (kl_sums / positions).tolist(), entropies, sizes, positions)


def _sequence_diagnostics(adapter: CausalLMAdapter, layers: list[Tensor], top_ps):
    length, vocab = layers[-1].shape[0], adapter.vocab_size
    chunk = max(1, LOGIT_ELEMENTS_PER_CHUNK // vocab)
    kl_sums = torch.zeros(len(layers), dtype=torch.float64)
    entropy, sizes = [], {p: [] for p in top_ps}
    for start in range(0, length, chunk):
        final_logits = adapter.logits(layers[-1][start:start + chunk])
        final_log_probs = torch.log_softmax(final_logits, -1)
        for index, layer in enumerate(layers[:-1]):
            log_probs = torch.log_softmax(adapter.logits(layer[start:start + chunk]), -1)
            kl = (log_probs.exp() * (log_probs - final_log_probs)).sum(-1)
            kl_sums[index] += kl.double().sum()
        entropy += (-(final_log_probs.exp() * final_log_probs).sum(-1)).tolist()
        for p in top_ps:
            # The mask holds the whole nucleus, however large: exact sizes without a cap.
            kept = top_p_mask(final_logits, p) != float("-inf")
            sizes[p] += kept.sum(-1).tolist()
    return kl_sums, entropy, sizes
