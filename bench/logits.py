"""Synthetic next-token logits for the benchmarks."""
import torch


def lm_like_logits(batch: int, vocab: int, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    """Peaked rows shaped like a language model's: a Gaussian bulk (std 2.5) plus a few
    tokens 8-16 nats above it, so the top-0.99 nucleus holds tens to hundreds of tokens."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=generator) * 2.5
    spikes = torch.randint(0, vocab, (batch, 16), generator=generator)
    logits.scatter_add_(1, spikes, 8.0 + 8.0 * torch.rand(batch, 16, generator=generator))
    return logits.to(device)


def flat_logits(batch: int, vocab: int, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    """Standard normal rows: the nucleus is most of the vocabulary (the hard case)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=generator).to(device)


LOGIT_KINDS = {"lm_like": lm_like_logits, "flat": flat_logits}
