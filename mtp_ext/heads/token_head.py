"""A drafting head that also reads the next token: x_{t+2} from the backbone's final hidden
state at t *and* x_{t+1} (a light cousin of EAGLE's draft model).

In self-speculative decoding the next root x_{t+1} is known when the next tree is drafted: the
model chose it at the last accepted node. MTP heads (mtp_ext.heads) and marginalisation guess
x_{t+2} from position t without it, so they must hedge over every x_{t+1} the model might
choose. Given the token, the guess is much sharper (results/token_head/README.md: the same
head with and without the token, held out).

    z = W_in [h_t ; e(x_{t+1})],   z + W_down SiLU(W_up z),   final norm,   unembedding

h_t is the backbone's final-normed state and e its input embedding; W_in starts by passing h_t
through and W_down at zero. The unembedding is the backbone's, restricted to a *draft
vocabulary*: the tokens the model itself chooses most often in the training text (FR-Spec's
observation: a drafter's guesses need not range over every token): a small share of the
vocabulary covers nearly all of the model's choices and costs that share of the unembedding to
read (results/token_head/README.md).

The head is trained on the model's own greedy choices (self-distillation, teacher-forced):
features of one backbone pass over the training text, then epochs over them.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mtp_ext._checks import check_positive_int
from mtp_ext._io import unreadable
from mtp_ext.heads.checkpoint import DAMAGED, check_checkpoint_dir, read_config, read_safetensors, write_config, write_tensors
from mtp_ext.models.adapters import check_supported, few_rows_linear
from mtp_ext.models.introspection import final_norm, model_fingerprint

__all__ = ["Features", "HeadAccuracy", "TokenHead", "TokenHeadSettings", "check_token_head_dir", "draft_vocabulary",
           "evaluate_token_head", "token_head_features", "train_token_head"]

CONFIG_FILE = "token_head.json"
WEIGHTS_FILE = "token_head.safetensors"


class TokenHead(nn.Module):
    """Logits over the draft vocabulary `vocab_ids` [K] for x_{t+2}, from the final-normed
    hidden states h_t [..., H] and the tokens x_{t+1} [...] (`forward`). The backbone's
    embedding, final norm and unembedding are used, never trained, and not part of the head's
    state.

    Args:
        backbone: a supported Hugging Face causal LM.
        vocab_ids: [K] int64, distinct token ids of the backbone's vocabulary: the draft
            vocabulary.
    """

    def __init__(self, backbone: nn.Module, vocab_ids: Tensor):
        super().__init__()
        check_supported(backbone)
        unembed = backbone.get_output_embeddings().weight
        vocab_size, hidden_size = unembed.shape
        vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long)
        if vocab_ids.dim() != 1 or vocab_ids.numel() < 1:
            raise ValueError("vocab_ids must be a non-empty 1-D list of token ids")
        if int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= vocab_size:
            raise ValueError(f"vocab_ids must lie in [0, {vocab_size}) (the model's vocabulary)")
        if vocab_ids.unique().numel() != vocab_ids.numel():
            raise ValueError("vocab_ids holds a token twice")
        self._backbone = [backbone]  # a list: not a submodule, so neither saved nor trained with the head
        self.project = nn.Linear(2 * hidden_size, hidden_size)
        self.up = nn.Linear(hidden_size, hidden_size)
        self.down = nn.Linear(hidden_size, hidden_size)
        with torch.no_grad():
            self.project.weight.zero_()
            self.project.weight[:, :hidden_size] = torch.eye(hidden_size)
            self.project.weight[:, hidden_size:].normal_(0.0, 0.02)
            self.project.bias.zero_()
            self.down.weight.zero_()
            self.down.bias.zero_()
        self.register_buffer("vocab_ids", vocab_ids.to(unembed.device))
        # The draft rows of the unembedding, gathered once: a step reads them contiguously.
        self.register_buffer("draft_unembed", unembed.detach()[self.vocab_ids].clone(), persistent=False)
        self.to(device=unembed.device, dtype=unembed.dtype)

    @property
    def backbone(self) -> nn.Module:
        """The model the head drafts for."""
        return self._backbone[0]

    def forward(self, hidden: Tensor, next_tokens: Tensor) -> Tensor:
        """The head's logits for x_{t+2}.

        Args:
            hidden: [..., H], the backbone's final-normed states h_t.
            next_tokens: [...] int64, the tokens x_{t+1}.

        Returns:
            [..., K] float32 logits over `vocab_ids`.
        """
        embedded = self.backbone.get_input_embeddings()(next_tokens).to(self.draft_unembed.dtype)
        state = few_rows_linear(torch.cat([hidden.to(embedded.dtype), embedded], -1), self.project.weight,
                                self.project.bias)
        state = state + few_rows_linear(nn.functional.silu(few_rows_linear(state, self.up.weight, self.up.bias)),
                                        self.down.weight, self.down.bias)
        return few_rows_linear(final_norm(self.backbone)(state), self.draft_unembed).float()

    def config_dict(self) -> dict:
        """The draft vocabulary's size and the backbone's model_fingerprint, as saved."""
        return {"draft_vocab_size": int(self.vocab_ids.numel()), "model": model_fingerprint(self.backbone)}

    def save(self, directory: str | os.PathLike[str], record: dict | None = None) -> None:
        """The head's weights and draft vocabulary as safetensors, with a config naming the
        backbone. Each file is replaced atomically.

        Args:
            directory: the checkpoint directory (created if need be).
            record: what training reported, saved in the config; None: nothing.
        """
        directory = Path(directory)
        write_tensors(directory / WEIGHTS_FILE, self.state_dict())
        write_config(directory / CONFIG_FILE, dict(self.config_dict(), **({"training": record} if record else {})))

    @classmethod
    def load(cls, directory: str | os.PathLike[str], backbone: nn.Module) -> "TokenHead":
        """The head saved in `directory`, on `backbone`.

        Args:
            directory: a checkpoint written by save.
            backbone: the model it was trained for (a UserError otherwise).

        Returns:
            TokenHead.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        read_config(directory / CONFIG_FILE, "token head", (), backbone)
        device = str(backbone.get_output_embeddings().weight.device)
        tensors = read_safetensors(directory / WEIGHTS_FILE, "the token head's weights",
                                   lambda path: load_file(path, device=device))
        try:
            head = cls(backbone, tensors["vocab_ids"])
            head.load_state_dict(tensors)
        except (KeyError, RuntimeError) as error:  # a tensor missing or of the wrong shape
            raise unreadable(directory / WEIGHTS_FILE, "the token head's weights", error, DAMAGED) from error
        return head


def check_token_head_dir(directory: str | os.PathLike[str], label: str) -> None:
    """Raises a MissingFileError unless `directory` holds a token head.

    Args:
        directory: the checkpoint directory.
        label: how the user gave it, for the message (e.g. "--drafter token-head:").
    """
    check_checkpoint_dir(Path(directory), CONFIG_FILE, "token head (mtp-ext train-token-head)", label)


@dataclass
class TokenHeadSettings:
    """How train_token_head trains.

    Attributes:
        epochs: passes over the features.
        batch_size: positions per step.
        lr: AdamW's initial learning rate, with cosine decay to 0.
        draft_vocab: K, the tokens the head can guess.
        seed: for the initialisation and the order of positions.
    """

    epochs: int = 6
    batch_size: int = 512
    lr: float = 1e-3
    draft_vocab: int = 8192
    seed: int = 0

    def check(self, vocab_size: int) -> None:
        """Raises a ValueError for a setting out of range.

        Args:
            vocab_size: V, the model's vocabulary size (draft_vocab may not exceed it).
        """
        for name in ("epochs", "batch_size", "draft_vocab"):
            check_positive_int(getattr(self, name), name)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.draft_vocab > vocab_size:
            raise ValueError(f"draft_vocab ({self.draft_vocab}) exceeds the model's vocabulary ({vocab_size})")


@dataclass
class Features:
    """What a head learns from, per position t of the text (teacher-forced).

    Attributes:
        hidden: [N, H], the final-normed states h_t, of the backbone's dtype.
        next_tokens: [N] int64, the text's x_{t+1}.
        targets: [N] int64, the model's choice at t+1 given it.
        choices: [N] int64, the model's choice at t (x_{t+1} equals it where greedy decoding
            would be here).
    """

    hidden: Tensor
    next_tokens: Tensor
    targets: Tensor
    choices: Tensor


@torch.no_grad()
def token_head_features(backbone: nn.Module, windows: Sequence[Sequence[int]], batch_size: int = 4,
                        progress: bool = True) -> Features:
    """The features of every position of `windows`, from one backbone pass.

    Args:
        backbone: a Hugging Face causal LM.
        windows: token id lists; those shorter than 2 tokens are skipped.
        batch_size: windows of one length per pass.
        progress: show a progress bar.

    Returns:
        Features of every position but each window's last (grouped by window length).
    """
    unembed = backbone.get_output_embeddings().weight
    by_length: dict[int, list[Sequence[int]]] = {}
    for window in windows:
        by_length.setdefault(len(window), []).append(window)
    batches = [group[first:first + batch_size] for length, group in by_length.items() if length >= 2
               for first in range(0, len(group), batch_size)]
    if not batches:
        raise ValueError("no window of at least 2 tokens")
    parts: list[tuple[Tensor, ...]] = []
    for batch in tqdm(batches, desc="token head features", unit="batch", disable=not progress):
        input_ids = torch.tensor(batch, device=unembed.device)
        hidden = backbone.base_model(input_ids=input_ids).last_hidden_state  # [B, T, H]
        # The argmax, in slices of positions so that the logits never all exist at once.
        choices = torch.cat([torch.nn.functional.linear(hidden[:, start:start + 64], unembed).argmax(-1)
                             for start in range(0, hidden.shape[1], 64)], 1)
        parts.append((hidden[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(), choices[:, 1:].flatten(),
                      choices[:, :-1].flatten()))
    hidden, next_tokens, targets, choices = (torch.cat(column) for column in zip(*parts))
    return Features(hidden, next_tokens, targets, choices)


def draft_vocabulary(targets: Tensor, vocab_size: int, size: int) -> Tensor:
    """The `size` tokens chosen most often in `targets` (lower id first on ties).

    Args:
        targets: int64 token ids, any shape.
        vocab_size: V.
        size: K <= V.

    Returns:
        [K] int64 on the CPU, most chosen first.
    """
    counts = torch.bincount(targets.flatten().cpu(), minlength=vocab_size)
    return torch.sort(counts, descending=True, stable=True).indices[:size]


@dataclass
class HeadAccuracy:
    """How often the model's choice is among the token head's guesses (see evaluate_token_head).

    Attributes:
        positions: the positions scored.
        top1: the share where it is the head's top 1.
        top3: the share where it is among the head's top 3.
        greedy_positions: the positions where x_{t+1} is the model's own choice at t, as in
            greedy decoding.
        greedy_top1: top1 at those positions (NaN where there are none).
        greedy_top3: top3 at those positions (NaN where there are none).
        vocab_coverage: the share of the targets inside the draft vocabulary.
    """

    positions: int
    top1: float
    top3: float
    greedy_positions: int
    greedy_top1: float
    greedy_top3: float
    vocab_coverage: float


@torch.no_grad()
def evaluate_token_head(head: TokenHead, features: Features, chunk: int = 2048) -> HeadAccuracy:
    """How often the model's choice is the head's top 1 / among its top 3.

    Args:
        head: a TokenHead (with K >= 3).
        features: token_head_features of held-out text.
        chunk: positions per call of the head.

    Returns:
        HeadAccuracy.
    """
    guesses = torch.cat([head.vocab_ids[head(features.hidden[first:first + chunk],
                                             features.next_tokens[first:first + chunk]).topk(min(3, len(head.vocab_ids)), -1).indices]
                         for first in range(0, len(features.targets), chunk)])
    top1 = guesses[:, 0] == features.targets
    top3 = (guesses == features.targets[:, None]).any(-1)
    greedy = features.next_tokens == features.choices
    covered = torch.isin(features.targets, head.vocab_ids)

    def share(hits: Tensor, where: Tensor) -> float:
        return float(hits[where].float().mean()) if bool(where.any()) else float("nan")

    everywhere = torch.ones_like(greedy)
    return HeadAccuracy(int(everywhere.sum()), share(top1, everywhere), share(top3, everywhere), int(greedy.sum()),
                        share(top1, greedy), share(top3, greedy), share(covered, everywhere))


def train_token_head(backbone: nn.Module, features: Features, settings: TokenHeadSettings,
                     progress: bool = True) -> tuple[TokenHead, dict]:
    """A TokenHead trained on the model's own greedy choices.

    Args:
        backbone: the model the head drafts for.
        features: token_head_features of the training text.
        settings: TokenHeadSettings.
        progress: show a progress bar.

    Returns:
        (the head, a record of the training: settings, positions, epoch_losses, seconds).
    """
    vocab_size = backbone.get_output_embeddings().weight.shape[0]
    settings.check(vocab_size)
    torch.manual_seed(settings.seed)
    head = TokenHead(backbone, draft_vocabulary(features.targets, vocab_size, settings.draft_vocab))
    # A target outside the draft vocabulary cannot be guessed: it is left out of the loss.
    slot_of = torch.full((vocab_size,), -1, dtype=torch.long, device=head.vocab_ids.device)
    slot_of[head.vocab_ids] = torch.arange(head.vocab_ids.numel(), device=slot_of.device)
    targets = slot_of[features.targets]
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=0.0)
    positions = len(targets)
    steps_per_epoch = max(1, positions // settings.batch_size)
    total = settings.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(settings.seed)
    started, losses, step = time.time(), [], 0
    with tqdm(total=total, desc="train token head", unit="step", disable=not progress) as bar:
        for _ in range(settings.epochs):
            order = torch.randperm(positions, generator=generator).to(targets.device)
            epoch_loss = 0.0
            for batch in order[: steps_per_epoch * settings.batch_size].view(steps_per_epoch, -1):
                for group in optimizer.param_groups:
                    group["lr"] = settings.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
                logits = head(features.hidden[batch], features.next_tokens[batch])
                loss = nn.functional.cross_entropy(logits, targets[batch], ignore_index=-1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                epoch_loss += loss.item()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            losses.append(epoch_loss / steps_per_epoch)
    return head, {"settings": asdict(settings), "positions": positions, "epoch_losses": losses,
                  "seconds": time.time() - started}
