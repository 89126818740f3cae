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

Deeper drafts chain the head on itself, as EAGLE's draft model does: norm(z) is the head's guess
of the backbone's final-normed state at t+1, so (norm(z), x_{t+2}) drafts x_{t+3}. A head trained
with `chain` = L > 1 learns that use: each position is unrolled L levels, level l reading the
state level l - 1 predicted and the text's token (EAGLE-3's training-time test), and every
predicted state is also pulled towards the backbone's true state (EAGLE's feature regression).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mtp_ext._checks import check_positive_int
from mtp_ext._io import UserError, atomic_write, atomic_write_text, read_json, unreadable
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
        chain: the drafting levels the head is trained for (1: x_{t+2} only; L: chained on its
            own predicted states up to x_{t+L+1}, `step`).
    """

    def __init__(self, backbone: nn.Module, vocab_ids: Tensor, chain: int = 1):
        super().__init__()
        check_supported(backbone)
        self.chain = check_positive_int(chain, "chain")
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
        return self.step(hidden, next_tokens)[0]

    def step(self, hidden: Tensor, next_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """The head's logits for x_{t+2} and its guess of the final-normed state at t+1, which
        with x_{t+2} drafts x_{t+3} (a head trained with chain > 1).

        Args:
            hidden: [..., H], the final-normed states h_t (the backbone's, or predicted).
            next_tokens: [...] int64, the tokens x_{t+1}.

        Returns:
            (logits [..., K] float32 over `vocab_ids`, predicted states [..., H] of the head's dtype).
        """
        embedded = self.backbone.get_input_embeddings()(next_tokens).to(self.draft_unembed.dtype)
        state = few_rows_linear(torch.cat([hidden.to(embedded.dtype), embedded], -1), self.project.weight,
                                self.project.bias)
        state = state + few_rows_linear(nn.functional.silu(few_rows_linear(state, self.up.weight, self.up.bias)),
                                        self.down.weight, self.down.bias)
        predicted = final_norm(self.backbone)(state)
        return few_rows_linear(predicted, self.draft_unembed).float(), predicted

    def config_dict(self) -> dict:
        """The draft vocabulary's size, the levels trained and the backbone's model_fingerprint,
        as saved."""
        return {"draft_vocab_size": int(self.vocab_ids.numel()), "chain": self.chain,
                "model": model_fingerprint(self.backbone)}

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
        config = read_config(directory / CONFIG_FILE, "token head", (), backbone)
        device = str(backbone.get_output_embeddings().weight.device)
        tensors = read_safetensors(directory / WEIGHTS_FILE, "the token head's weights",
                                   lambda path: load_file(path, device=device))
        try:
            head = cls(backbone, tensors["vocab_ids"], config.get("chain", 1))  # heads saved before chains: 1
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
        chain: drafting levels trained (TokenHead.chain): 1, x_{t+2} from the backbone's state;
            L > 1, each position unrolled L levels on the head's own predicted states.
        feature_weight: with chain > 1, the weight of the feature regression (smooth L1 between
            each predicted state and the backbone's, averaged over the hidden size) beside each
            level's cross-entropy.
    """

    epochs: int = 6
    batch_size: int = 512
    lr: float = 1e-3
    draft_vocab: int = 8192
    seed: int = 0
    chain: int = 1
    feature_weight: float = 1.0

    def check(self, vocab_size: int) -> None:
        """Raises a ValueError for a setting out of range.

        Args:
            vocab_size: V, the model's vocabulary size (draft_vocab may not exceed it).
        """
        for name in ("epochs", "batch_size", "draft_vocab", "chain"):
            check_positive_int(getattr(self, name), name)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.feature_weight >= 0:
            raise ValueError(f"feature_weight must be >= 0, got {self.feature_weight}")
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
        window_ids: [N] int64, the window of each position; a window's positions are
            consecutive, in order (position t + 1 of a row is the next row where the ids agree).
    """

    hidden: Tensor
    next_tokens: Tensor
    targets: Tensor
    choices: Tensor
    window_ids: Tensor

    def ahead(self, rows: Tensor, levels: int) -> Tensor:
        """Where the position `levels` ahead of each row lies in the same window.

        Args:
            rows: [M] int64 row indices.
            levels: how far ahead, >= 0.

        Returns:
            [M] bool.
        """
        later = rows + levels
        inside = later < len(self.window_ids)
        return inside & (self.window_ids[later.clamp(max=len(self.window_ids) - 1)] == self.window_ids[rows])


@torch.no_grad()
def token_head_features(backbone: nn.Module, windows: Sequence[Sequence[int]], batch_size: int = 4,
                        progress: bool = True, parts_dir: Path | None = None) -> Features:
    """The features of every position of `windows`, from one backbone pass.

    Args:
        backbone: a Hugging Face causal LM.
        windows: token id lists; those shorter than 2 tokens are skipped.
        batch_size: windows of one length per pass.
        progress: show a progress bar.
        parts_dir: where to keep the features as they are computed, PARTS_BATCHES batches a
            file, so that a stopped extraction goes on from its last whole part (a UserError if
            the directory holds parts of other windows or another model); None: kept in memory only.

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
    if parts_dir is not None:
        _check_parts_key(Path(parts_dir), {"model": model_fingerprint(backbone), "batch_size": batch_size,
                                           "parts_batches": PARTS_BATCHES, "windows": _digest(batches)})
    parts: list[tuple[Tensor, ...]] = []
    first_windows = [0]
    for batch in batches:
        first_windows.append(first_windows[-1] + len(batch))
    with tqdm(total=len(batches), desc="token head features", unit="batch", disable=not progress) as bar:
        for first in range(0, len(batches), PARTS_BATCHES):
            path = None if parts_dir is None else Path(parts_dir) / f"features-{first // PARTS_BATCHES:05d}.pt"
            part = _read_part(path, unembed.device) if path is not None and path.is_file() else None
            if part is None:
                part = [_batch_features(backbone, unembed, batch, first_windows[index])
                        for index, batch in enumerate(batches[first:first + PARTS_BATCHES], first)]
                if path is not None:
                    atomic_write(path, lambda temporary: torch.save(part, temporary))
            parts += part
            bar.update(len(part))
    return Features(*(torch.cat(column) for column in zip(*parts)))


# Batches of windows per file of features kept by token_head_features(parts_dir=...): a stop loses
# at most this many batches of backbone passes.
PARTS_BATCHES = 64
PARTS_KEY_FILE = "features.json"
TRAINING_STATE_FILE = "training_state.pt"


def _batch_features(backbone: nn.Module, unembed: Tensor, batch: Sequence[Sequence[int]],
                    first_window: int) -> tuple[Tensor, ...]:
    """Features' columns for the positions of one batch of windows of one length."""
    input_ids = torch.tensor(batch, device=unembed.device)
    hidden = backbone.base_model(input_ids=input_ids).last_hidden_state  # [B, T, H]
    # The argmax, in slices of positions so that the logits never all exist at once.
    choices = torch.cat([torch.nn.functional.linear(hidden[:, start:start + 64], unembed).argmax(-1)
                         for start in range(0, hidden.shape[1], 64)], 1)
    window_ids = torch.arange(first_window, first_window + len(batch), device=unembed.device)
    return (hidden[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(), choices[:, 1:].flatten(),
            choices[:, :-1].flatten(), window_ids.repeat_interleave(input_ids.shape[1] - 1))


def _digest(batches: Sequence[Sequence[Sequence[int]]]) -> str:
    return hashlib.sha256(json.dumps([[list(window) for window in batch] for batch in batches]).encode()).hexdigest()


def _check_parts_key(directory: Path, key: dict) -> None:
    """Writes the key of the features kept in `directory`, or checks it against the one there."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / PARTS_KEY_FILE
    if not path.is_file():
        atomic_write_text(path, json.dumps(key, indent=2))
        return
    if read_json(path, "the kept features' key") != json.loads(json.dumps(key)):
        raise UserError(f"{directory} keeps the features of other windows or another model; delete it to "
                        f"start over (rm -r {directory}), or keep this run's elsewhere")


def _read_part(path: Path, device: torch.device) -> list | None:
    """A kept part of features on `device`, or None where it cannot be read (it is computed again)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError):
        return None


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
        level_top1: per drafting level l = 1..L (the head chained on its own predicted states,
            reading the text's tokens), top1 over the positions whose level-l target lies in
            the window; level 1 is top1.
        greedy_level_top1: the same where every token the chain read is the model's own choice,
            as along a greedy draft that is being accepted (NaN where there are none).
    """

    positions: int
    top1: float
    top3: float
    greedy_positions: int
    greedy_top1: float
    greedy_top3: float
    vocab_coverage: float
    level_top1: list[float]
    greedy_level_top1: list[float]


def unrolled_levels(head: TokenHead, features: Features, rows: Tensor, levels: int):
    """The head chained `levels` levels from the positions `rows`: level l reads the state level
    l - 1 predicted (level 1 the backbone's) and the text's token at t + l.

    Args:
        head: a TokenHead.
        features: Features.
        rows: [M] int64 row indices (positions t).
        levels: L >= 1.

    Yields:
        (at [M] int64: the row of position t + l - 1, whose target is level l's; inside [M]
        bool: that position lies in t's window; logits [M, K]; predicted [M, H]) per level.
    """
    hidden = features.hidden[rows]
    last = len(features.window_ids) - 1
    for level in range(levels):
        at = (rows + level).clamp(max=last)
        logits, hidden = head.step(hidden, features.next_tokens[at])
        yield at, features.ahead(rows, level), logits, hidden


@torch.no_grad()
def evaluate_token_head(head: TokenHead, features: Features, chunk: int = 2048,
                        levels: int | None = None) -> HeadAccuracy:
    """How often the model's choice is the head's top 1 / among its top 3, and the top 1 of each
    chained level.

    Args:
        head: a TokenHead (with K >= 3).
        features: token_head_features of held-out text.
        chunk: positions per call of the head.
        levels: chained levels scored; None: those the head was trained for (head.chain).

    Returns:
        HeadAccuracy.
    """
    levels = head.chain if levels is None else check_positive_int(levels, "levels")
    hits = torch.zeros(levels, dtype=torch.long)
    counts, greedy_hits, greedy_counts = torch.zeros_like(hits), torch.zeros_like(hits), torch.zeros_like(hits)
    for first in range(0, len(features.targets), chunk):
        rows = torch.arange(first, min(first + chunk, len(features.targets)), device=features.targets.device)
        greedy = torch.ones_like(rows, dtype=torch.bool)
        for level, (at, inside, logits, _) in enumerate(unrolled_levels(head, features, rows, levels)):
            greedy &= inside & (features.next_tokens[at] == features.choices[at])
            hit = (head.vocab_ids[logits.argmax(-1)] == features.targets[at]) & inside
            hits[level] += int(hit.sum())
            counts[level] += int(inside.sum())
            greedy_hits[level] += int((hit & greedy).sum())
            greedy_counts[level] += int(greedy.sum())
    level_top1 = (hits / counts.clamp(min=1)).where(counts > 0, torch.nan).tolist()
    greedy_level_top1 = (greedy_hits / greedy_counts.clamp(min=1)).where(greedy_counts > 0, torch.nan).tolist()
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
                        share(top1, greedy), share(top3, greedy), share(covered, everywhere), level_top1,
                        greedy_level_top1)


def train_token_head(backbone: nn.Module, features: Features, settings: TokenHeadSettings,
                     progress: bool = True, state_path: Path | None = None) -> tuple[TokenHead, dict]:
    """A TokenHead trained on the model's own greedy choices.

    Args:
        backbone: the model the head drafts for.
        features: token_head_features of the training text.
        settings: TokenHeadSettings.
        progress: show a progress bar.
        state_path: where to keep the training's state after every epoch (the head, the
            optimizer, the order's generator, the losses), and to continue from if it is there:
            a run stopped and run again with the same settings and features ends with the same
            head as one run straight through. None: nothing kept.

    Returns:
        (the head, a record of the training: settings, positions, epoch_losses, seconds).
    """
    vocab_size = backbone.get_output_embeddings().weight.shape[0]
    settings.check(vocab_size)
    torch.manual_seed(settings.seed)
    head = TokenHead(backbone, draft_vocabulary(features.targets, vocab_size, settings.draft_vocab), settings.chain)
    # A target outside the draft vocabulary cannot be guessed: it is left out of the loss.
    slot_of = torch.full((vocab_size,), -1, dtype=torch.long, device=head.vocab_ids.device)
    slot_of[head.vocab_ids] = torch.arange(head.vocab_ids.numel(), device=slot_of.device)
    targets = slot_of[features.targets]
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=0.0)
    positions = len(targets)
    steps_per_epoch = max(1, positions // settings.batch_size)
    total = settings.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(settings.seed)
    started, losses, seconds_before = time.time(), [], 0.0
    if state_path is not None and Path(state_path).is_file():
        losses, seconds_before = _resume_token_head(Path(state_path), head, optimizer, generator, settings, positions)
    step = len(losses) * steps_per_epoch
    with tqdm(total=total, initial=step, desc="train token head", unit="step", disable=not progress) as bar:
        for _ in range(len(losses), settings.epochs):
            order = torch.randperm(positions, generator=generator).to(targets.device)
            epoch_loss = 0.0
            for batch in order[: steps_per_epoch * settings.batch_size].view(steps_per_epoch, -1):
                for group in optimizer.param_groups:
                    group["lr"] = settings.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
                loss = chain_loss(head, features, targets, batch, settings)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                epoch_loss += loss.item()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            losses.append(epoch_loss / steps_per_epoch)
            if state_path is not None:
                state = {"settings": asdict(settings), "positions": positions, "epoch_losses": losses,
                         "seconds": seconds_before + time.time() - started, "head": head.state_dict(),
                         "optimizer": optimizer.state_dict(), "generator": generator.get_state()}
                atomic_write(Path(state_path), lambda temporary: torch.save(state, temporary))
    return head, {"settings": asdict(settings), "positions": positions, "epoch_losses": losses,
                  "seconds": seconds_before + time.time() - started}


def _resume_token_head(path: Path, head: TokenHead, optimizer, generator: torch.Generator,
                       settings: TokenHeadSettings, positions: int) -> tuple[list[float], float]:
    """Restores the head, optimizer and generator kept in `path`; returns (the epochs' losses so
    far, the seconds trained so far)."""
    remedy = f"delete it to start over: rm {path}"
    try:
        state = torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise unreadable(path, "the token head's training state", error, remedy) from error
    if not isinstance(state, dict) or any(key not in state for key in ("settings", "positions", "epoch_losses",
                                                                        "seconds", "head", "optimizer", "generator")):
        raise UserError(f"the training state {path} is incomplete (not a train-token-head state); {remedy}")
    if state["settings"] != asdict(settings) or state["positions"] != positions:
        raise UserError(f"{path} holds a training with other settings or features ({state['settings']}, "
                        f"{state['positions']} positions; now {asdict(settings)}, {positions}); {remedy}")
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return list(state["epoch_losses"]), float(state["seconds"])


def chain_loss(head: TokenHead, features: Features, slots: Tensor, rows: Tensor, settings: TokenHeadSettings) -> Tensor:
    """The training loss at positions `rows`: the mean over levels of each level's cross-entropy
    (its targets inside the window and the draft vocabulary), and with chain > 1 the feature
    regression of every predicted state that a later level reads.

    Args:
        head: the TokenHead being trained.
        features: Features.
        slots: [N] int64, each row's target as a draft-vocabulary slot, -1 outside it.
        rows: [M] int64 row indices.
        settings: TokenHeadSettings (chain, feature_weight).

    Returns:
        A scalar tensor.
    """
    loss = features.hidden.new_zeros((), dtype=torch.float32)
    for level, (at, inside, logits, predicted) in enumerate(unrolled_levels(head, features, rows, settings.chain)):
        level_targets = slots[at].where(inside, -1)
        counted = int((level_targets >= 0).sum())
        summed = nn.functional.cross_entropy(logits, level_targets, ignore_index=-1, reduction="sum")
        loss = loss + summed / max(counted, 1) / settings.chain  # no target here: 0, with a gradient
        if level + 1 < settings.chain and settings.feature_weight > 0:
            follows = features.ahead(rows, level + 1)
            if bool(follows.any()):
                true_next = features.hidden[(at + 1).clamp(max=len(slots) - 1)]
                loss = loss + settings.feature_weight * nn.functional.smooth_l1_loss(
                    predicted[follows].float(), true_next[follows].float())
    return loss
