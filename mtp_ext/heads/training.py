"""Training MTP heads (frozen backbone, weighted hidden states, or jointly with the backbone) and
scoring them on held-out text.

Training windows come from the training documents, `batch_size` per step, cycling in epochs
(in order, or shuffled anew each epoch from the epoch's number), so that the data position is a
function of the step and a resumed run sees exactly the windows an uninterrupted one would. With
a frozen backbone the windows can be a FeatureCache (mtp_ext.heads.features): the backbone's
states computed once, so that each further epoch costs the heads alone. The learning rate is
constant or follows a warmup and a cosine decay, a function of the step too. Checkpoints are written atomically every `checkpoint_every` steps, at
the end and on Ctrl-C: the heads as safetensors (`MTPHeadsModel.save`) and `training_state.pt`
(weights, optimizer, step, RNG, loss history) from which training resumes.

A checkpoint only ever holds whole optimizer steps: SIGINT and SIGTERM are held while a step
runs (the loop stops at the next step boundary, checkpoints, then lets the signal act), and a
step that an exception cuts short inside `optimizer.step()` (a second Ctrl-C) writes nothing, so
the last checkpoint stays the one to resume from.

On several ranks (torchrun; mtp_ext.integrations.distributed) what trains is wrapped in
DistributedDataParallel: every rank takes its slice of each step's windows, so that one step is
the same global batch as in one process, and the ranks decide together when to stop (a signal,
the time budget), so that they stop at the same step. Rank 0 writes the checkpoints; a run
resumes on any number of ranks, since a step's windows do not depend on how they are shared.
"""
from __future__ import annotations

import math
import pickle
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mtp_ext._checks import check_positive_int
from mtp_ext._io import UserError, atomic_write, unreadable
from mtp_ext.heads.features import FeatureCache
from mtp_ext.heads.model import MTPHeadsModel, check_finite_lse
from mtp_ext.integrations.distributed import World
from mtp_ext.ops import multihead_cross_entropy, multihead_unembed_topk

__all__ = ["HeadAccuracy", "IGNORE_INDEX", "TrainingSettings", "build_optimizer", "evaluate_heads", "greedy_sequence",
           "head_targets", "heads_loss", "heads_loss_from_states", "learning_rate_factor", "split_documents",
           "train_heads", "window_rows"]

IGNORE_INDEX = -100  # the target of positions that are not scored
TARGETS = ("text", "model")
LR_SCHEDULES = ("constant", "cosine")
# The cosine decay ends at this share of the learning rate, not at 0: the last steps still learn.
FINAL_LR_SHARE = 0.1
# Settings a resumed run must share with the checkpoint (the data and the step's meaning), with
# the value a checkpoint written before the setting existed had.
RESUME_KEYS = {"seq_len": None, "batch_size": None, "targets": "text", "shuffle": False}
# Training windows: token id lists, or their states cached on disk.
TrainingData = Union[Sequence[Sequence[int]], FeatureCache]
STATE_FILE = "training_state.pt"
STATE_KEYS = ("record", "settings", "config", "model", "optimizer", "rng")


@dataclass
class TrainingSettings:
    """How train_heads trains.

    Attributes:
        steps: train up to this optimizer step (>= 0).
        seq_len: tokens per training window (>= 3).
        batch_size: windows per step.
        lr: the heads' learning rate.
        whs_lr: the WHS logits' learning rate.
        backbone_lr: the backbone's learning rate (joint training only).
        ntp_weight: joint training only: loss = ntp_weight * NTP + mean of the heads' losses.
        checkpoint_every: steps between checkpoints.
        targets: what the heads learn to predict: the text ("text"), or the backbone's own
            greedy choices ("model", self-distillation).
        shuffle: each epoch visits the windows in a fresh order (seeded by the epoch).
        lr_schedule: "constant", or "cosine": linear warmup over warmup_steps, then a cosine
            decay to FINAL_LR_SHARE of each learning rate at step `steps`.
        warmup_steps: see lr_schedule.
        eval_every: score the held-out text every this many steps (and at the first and last
            step), recorded as the training record's "curve"; 0: never.
    """

    steps: int
    seq_len: int = 256
    batch_size: int = 2
    lr: float = 1e-3
    whs_lr: float = 5e-2  # a softmax over ~30 layers moves only with steps of this size
    backbone_lr: float = 1e-5
    ntp_weight: float = 1.0
    checkpoint_every: int = 25
    # Heads that draft for speculative decoding are right when they agree with the model,
    # whatever the text says: hence "model".
    targets: str = "text"
    shuffle: bool = False
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    eval_every: int = 0

    def check(self) -> None:
        """Raises a ValueError for a setting out of range."""
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        for name in ("seq_len", "batch_size", "checkpoint_every"):
            check_positive_int(getattr(self, name), name)
        if self.seq_len < 3:
            raise ValueError(f"seq_len must be >= 3 (a head predicts at least two tokens ahead), got {self.seq_len}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.warmup_steps < 0 or self.eval_every < 0:
            raise ValueError("warmup_steps and eval_every must be >= 0")
        if self.targets not in TARGETS:
            raise ValueError(f"targets must be one of {TARGETS}, got {self.targets!r}")
        if not (self.lr > 0 and self.whs_lr > 0 and self.backbone_lr > 0 and self.ntp_weight >= 0):
            raise ValueError("lr, whs_lr and backbone_lr must be > 0 and ntp_weight >= 0")


def split_documents(documents: Sequence[str], held_out_share: float = 0.1) -> tuple[list[str], list[str], dict]:
    """Splits documents into training and held-out ones: the last `held_out_share` of the
    documents (at least one) are held out. A single document is split at the last line break
    before the same share of its characters from the end.

    Args:
        documents: at least one.
        held_out_share: in (0, 1).

    Returns:
        (training documents, held-out documents, a JSON-ready description of the split).
    """
    if not documents:
        raise ValueError("no documents to split")
    if len(documents) == 1:
        text = documents[0]
        cut = text.rfind("\n", 0, int(len(text) * (1 - held_out_share)))
        cut = cut if cut > 0 else int(len(text) * (1 - held_out_share))
        return [text[:cut]], [text[cut:]], {"by": "characters", "documents": 1, "held_out_from_char": cut,
                                            "characters": len(text)}
    held = max(1, round(len(documents) * held_out_share))
    train = len(documents) - held
    return list(documents[:train]), list(documents[train:]), {
        "by": "documents", "documents": len(documents), "training": list(range(train)),
        "held_out": list(range(train, len(documents)))}


def head_targets(input_ids: Tensor, steps: Sequence[int]) -> Tensor:
    """Each step's targets: x_{t+step} at position t, IGNORE_INDEX past the end.

    Args:
        input_ids: [B, T] int64.
        steps: the steps s >= 1.

    Returns:
        [len(steps), B, T] of input_ids' dtype.
    """
    batch, length = input_ids.shape
    targets = input_ids.new_full((len(steps), batch, length), IGNORE_INDEX)
    for index, step in enumerate(steps):
        targets[index, :, : max(length - step, 0)] = input_ids[:, step:]
    return targets


def greedy_sequence(model: MTPHeadsModel, final: Tensor, input_ids: Tensor) -> Tensor:
    """The sequence with every token after the first replaced by the backbone's greedy
    prediction of it from the real tokens before it (teacher forcing): x_{t+s} of this sequence
    is the model's choice for x_{t+s} given x_{<=t+s-1}.

    Args:
        model: the heads and their backbone.
        final: [B, T, H], the backbone's final-normed states over input_ids.
        input_ids: [B, T] int64.

    Returns:
        [B, T] int64.
    """
    with torch.no_grad():
        _, predicted, lse = multihead_unembed_topk(final.detach()[None, :, :-1].flatten(1, 2), model.unembed_weight, 1)
    check_finite_lse(lse, model.source)
    return torch.cat([input_ids[:, :1], predicted.view(input_ids.shape[0], -1)], 1)


def heads_loss(model: MTPHeadsModel, input_ids: Tensor, ntp_weight: float = 1.0, targets: str = "text") -> Tensor:
    """The mean cross-entropy of the heads, in one multihead_cross_entropy call; in joint training
    plus ntp_weight times the backbone's next-token loss (whose targets are always the text).

    Args:
        model: the heads and their backbone.
        input_ids: [B, T] int64 training windows.
        ntp_weight: the weight of the backbone's loss (joint training only).
        targets: "text", or "model": the heads predict the backbone's greedy choices
            (greedy_sequence).

    Returns:
        A scalar float32 tensor (float64 for a float64 model), differentiable.
    """
    final, heads = model(input_ids)
    return _heads_cross_entropy(model, final, heads, input_ids, ntp_weight, targets)


def heads_loss_from_states(model: MTPHeadsModel, states: Tensor, input_ids: Tensor, targets: str = "text") -> Tensor:
    """heads_loss of a frozen backbone, from the states its heads read (a FeatureCache's).

    Args:
        model: the heads, on a frozen backbone.
        states: [S, B, T, H], as model.states_for_heads gives (S = model.num_read_states).
        input_ids: [B, T] int64, the windows the states belong to.
        targets: "text" or "model" (the greedy choices from the final norm of the last state).

    Returns:
        A scalar tensor, differentiable in the heads (and WHS weights).
    """
    if not model.freeze_backbone:
        raise ValueError("cached states serve a frozen backbone only")
    final = model.final_norm(states[-1]) if targets == "model" else None
    return _heads_cross_entropy(model, final, model.heads_from_states(states), input_ids, 1.0, targets)


def _heads_cross_entropy(model: MTPHeadsModel, final: Tensor | None, heads: Tensor, input_ids: Tensor,
                         ntp_weight: float, targets: str) -> Tensor:
    steps, head_weights = model.steps, [1.0 / model.num_heads] * model.num_heads
    head_sequence = greedy_sequence(model, final, input_ids) if targets == "model" else input_ids
    step_targets = head_targets(head_sequence, steps)
    if not model.freeze_backbone:
        heads = torch.cat([final[None], heads])
        head_weights = [ntp_weight] + head_weights
        step_targets = torch.cat([head_targets(input_ids, [1]), step_targets])
    return multihead_cross_entropy(heads.flatten(1, 2), model.unembed_weight, step_targets.flatten(1),
                                   torch.tensor(head_weights, device=input_ids.device), IGNORE_INDEX)


def build_optimizer(model: MTPHeadsModel, settings: TrainingSettings) -> torch.optim.Optimizer:
    """AdamW (no weight decay): the heads at lr, the WHS logits at whs_lr and, in joint training,
    the backbone at backbone_lr.

    Args:
        model: the heads and their backbone.
        settings: the learning rates.

    Returns:
        The optimizer, one parameter group each.
    """
    parameters = ([list(model.heads.parameters())] + ([[model.layer_logits]] if model.layer_logits is not None else [])
                  + ([list(model.backbone.parameters())] if not model.freeze_backbone else []))
    # base_lr: what the schedule scales
    groups = [{"params": group, "lr": lr, "base_lr": lr}
              for group, lr in zip(parameters, _base_learning_rates(settings, model))]
    return torch.optim.AdamW(groups, weight_decay=0.0)


def window_rows(step: int, batch_size: int, count: int, shuffle: bool) -> list[int]:
    """The windows of a step: positions step * batch_size onwards of the sequence of epochs,
    each epoch all `count` windows, in order or (shuffle) in the order torch.randperm draws
    from a generator seeded with the epoch's number.

    Args:
        step: the optimizer step (>= 0).
        batch_size: windows per step.
        count: windows in an epoch.
        shuffle: whether each epoch has its own order.

    Returns:
        batch_size window indices in [0, count).
    """
    rows, orders = [], {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, index = divmod(position, count)
        if shuffle and epoch not in orders:
            orders[epoch] = torch.randperm(count, generator=torch.Generator().manual_seed(epoch)).tolist()
        rows.append(orders[epoch][index] if shuffle else index)
    return rows


def learning_rate_factor(step: int, settings: TrainingSettings) -> float:
    """The share of each group's learning rate at `step` (0-based) under settings.lr_schedule."""
    if settings.lr_schedule == "constant":
        return 1.0
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = min(1.0, (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps))
    return FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * progress))


class _WindowsLoss(nn.Module):
    """heads_loss of some training windows (token ids, and a FeatureCache's states) as one
    module call: what DistributedDataParallel wraps, so that its hooks see what trains."""

    def __init__(self, model: MTPHeadsModel, settings: TrainingSettings):
        super().__init__()
        self.model, self.settings = model, settings

    def forward(self, input_ids: Tensor, states: Tensor | None = None) -> Tensor:
        if states is not None:
            return heads_loss_from_states(self.model, states, input_ids, self.settings.targets)
        return heads_loss(self.model, input_ids, self.settings.ntp_weight, self.settings.targets)


def _windows_inputs(model: MTPHeadsModel, data: TrainingData, rows: list[int]) -> tuple[Tensor, ...]:
    device = model.unembed_weight.device
    if isinstance(data, FeatureCache):
        states, input_ids = data.read(rows, model.num_read_states, model.unembed_weight.dtype)
        return input_ids.to(device), states.to(device)
    return (torch.tensor([data[row] for row in rows], device=device),)


def _trainer(model: MTPHeadsModel, settings: TrainingSettings, world: World) -> nn.Module:
    """The module a step calls: _WindowsLoss, in DistributedDataParallel on several ranks."""
    loss = _WindowsLoss(model, settings)
    if not world.distributed:
        return loss
    from torch.nn.parallel import DistributedDataParallel

    # What does not train (a frozen backbone, every buffer) is the same on every rank: sending
    # it from rank 0 would cost a model's size at each start.
    fixed = ([name for name, parameter in loss.named_parameters() if not parameter.requires_grad]
             + [name for name, _ in loss.named_buffers()])
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(loss, fixed)
    with world.guard("setting up DistributedDataParallel"):
        return DistributedDataParallel(loss, device_ids=[world.device] if world.device.type == "cuda" else None)


def _training_step(trainer: nn.Module, model: MTPHeadsModel, optimizer: torch.optim.Optimizer, data: TrainingData,
                   step: int, settings: TrainingSettings, world: World) -> float:
    factor = learning_rate_factor(step, settings)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    optimizer.zero_grad(set_to_none=True)
    rows = window_rows(step, settings.batch_size, len(data), settings.shuffle)[world.slice(settings.batch_size)]
    share = len(rows) / settings.batch_size
    with world.guard(f"training step {step + 1}"):
        loss = trainer(*_windows_inputs(model, data, rows))
        # Every window weighs the same in the batch's mean, and DDP averages the ranks' gradients:
        # scaled by its share of the windows times the ranks, a rank's loss gives the batch's gradient.
        (loss * (share * world.size)).backward()
    optimizer.step()
    return float(world.sum(loss.detach().double().reshape(1).cpu() * share, "the loss"))


def train_heads(model: MTPHeadsModel, windows: TrainingData, settings: TrainingSettings, out: Path,
                progress: bool = True, time_budget_s: float | None = None,
                held_out: Callable[[MTPHeadsModel], list["HeadAccuracy"]] | None = None,
                world: World | None = None) -> dict:
    """Trains `model` up to settings.steps steps, resuming from the checkpoint in `out` if there
    is one (written by any number of ranks).

    Args:
        model: the heads and their backbone.
        windows: token id lists of exactly settings.seq_len tokens, or a complete FeatureCache
            of such windows (frozen backbone only).
        settings: TrainingSettings.
        out: the checkpoint directory.
        progress: show a progress bar.
        time_budget_s: start no step once this run has taken that many seconds (and
            checkpoint); None: no limit.
        held_out: the held-out scores of the model as it is (e.g. evaluate_heads on held-out
            text), taken every settings.eval_every steps; None: no curve. On several ranks
            every rank calls it (it may share the work: evaluate_heads' `world`).
        world: the ranks sharing each step's windows (mtp_ext.integrations.distributed); None:
            this process. settings.batch_size is the global batch, at least one window a rank.

    Returns:
        The training record: step, losses (per step, of the global batch), seconds (wall time
        of all runs), tokens_seen, epochs (windows seen / distinct windows), world_size (of the
        latest run), and with held_out the "curve": [{"step", "tokens_seen", "held_out":
        [HeadAccuracy as a dict per step]}].
    """
    settings.check()
    world = world or World()
    _check_training_data(model, windows, settings, world)
    out = Path(out)
    optimizer = build_optimizer(model, settings)
    record = _resume(model, optimizer, settings, out)
    world.agree(record["step"], f"the step of the checkpoint in {out}",
                "--out must be one directory that every rank sees (shared storage)")
    if world.main and record["step"] and record.get("world_size", 1) != world.size:
        print(f"resuming {out} (step {record['step']}, trained on {record.get('world_size', 1)} rank(s)) on "
              f"{world.size}: each step is the same {settings.batch_size} windows", file=sys.stderr)
    record["world_size"] = world.size
    model.backbone.eval()  # no dropout: a resumed run repeats an uninterrupted one exactly
    trainer = _trainer(model, settings, world)
    started = time.perf_counter()
    step = first_step = record["step"]
    curve = _Curve(held_out, settings, record)
    update = _UpdateWatch(optimizer)
    save = world.main  # one writer; every rank holds the same weights after each step
    with tqdm(total=settings.steps, initial=step, desc="train heads", unit="step",
              disable=not progress or not world.main) as bar, _HeldSignals(announce=world.main) as held:
        try:
            curve.point(model, step, final=step >= settings.steps)
            # Decided together, so that every rank stops at the same step.
            while step < settings.steps and not world.any(
                    held.received is not None or bool(time_budget_s and time.perf_counter() - started > time_budget_s)):
                record["losses"].append(_training_step(trainer, model, optimizer, windows, step, settings, world))
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{record['losses'][-1]:.3f}")
                curve.point(model, step, final=step == settings.steps)
                if save and step % settings.checkpoint_every == 0 and step < settings.steps:
                    _save_checkpoint(model, optimizer, settings, out, record, step, started, len(windows))
        finally:  # also on Ctrl-C: no finished step is lost, and no half-applied one is saved
            update.remove()
            if save and not update.torn and (step > first_step or not (out / STATE_FILE).is_file()):
                _save_checkpoint(model, optimizer, settings, out, record, step, started, len(windows))
    held.deliver()
    return record


def _check_training_data(model: MTPHeadsModel, windows: TrainingData, settings: TrainingSettings,
                         world: World) -> None:
    if settings.batch_size < world.size:
        raise ValueError(f"a step's {settings.batch_size} windows cannot be shared by {world.size} ranks: give "
                         f"at least one window a rank (--batch-size {world.size} or more)")
    if isinstance(windows, FeatureCache):
        if not windows.complete:
            raise ValueError(f"the feature cache {windows.directory} is not complete")
        if windows.tokens.shape[1] != settings.seq_len:
            raise ValueError(f"the feature cache holds windows of {windows.tokens.shape[1]} tokens, "
                             f"not seq_len={settings.seq_len}")
        if not model.freeze_backbone:
            raise ValueError("cached features serve a frozen backbone only")
    elif not windows or any(len(window) != settings.seq_len for window in windows):
        raise ValueError(f"training needs windows of exactly {settings.seq_len} tokens")


class _Curve:
    """The held-out curve of a training record: a point at the first step of a run when the
    record has none for it, every eval_every steps and at the last step."""

    def __init__(self, held_out, settings: TrainingSettings, record: dict):
        self.held_out, self.settings = held_out, settings
        self.points = record.setdefault("curve", [])

    def point(self, model: MTPHeadsModel, step: int, final: bool) -> None:
        every = self.settings.eval_every
        if self.held_out is None or not every or any(point["step"] == step for point in self.points):
            return
        if step % every and not final and self.points:
            return
        was_training = model.training
        model.eval()
        scores = self.held_out(model)
        model.train(was_training)
        model.backbone.eval()
        self.points.append({"step": step, "tokens_seen": step * self.settings.batch_size * self.settings.seq_len,
                            "held_out": [asdict(score) for score in scores]})

class _UpdateWatch:
    """Whether an optimizer.step() began and did not finish (`torn`): its update may be partly
    applied, with the step count not yet advanced, so the weights belong to no step."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.torn = False
        self._handles = [optimizer.register_step_pre_hook(lambda *_: self._mark(True)),
                         optimizer.register_step_post_hook(lambda *_: self._mark(False))]

    def _mark(self, torn: bool) -> None:
        self.torn = torn

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _HeldSignals:
    """Holds SIGINT and SIGTERM inside the block: a signal is recorded (`received`) for the loop
    to stop at the next step boundary, and `deliver()` lets it act once the handlers are back. A
    second SIGINT interrupts at once. Signals can only be caught in the main thread; elsewhere,
    and for a signal the process ignores, nothing changes."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True):
        self.received: int | None = None
        self.announce = announce  # say so on stderr (one rank of several does)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_HeldSignals":
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                if signal.getsignal(number) is not signal.SIG_IGN:
                    self._previous[number] = signal.signal(number, self._hold)
        return self

    def _hold(self, number: int, frame) -> None:
        if self.received is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = number
        if self.announce:
            print("\nstopping after this training step, with a checkpoint (Ctrl-C again: stop at once)", file=sys.stderr)

    def __exit__(self, *exception) -> None:
        for number, handler in self._previous.items():
            # None: a handler installed outside Python; the default is the closest to it
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def deliver(self) -> None:
        """Sends the held signal again, to the restored handler (SIGINT: KeyboardInterrupt)."""
        if self.received is not None:
            number, self.received = self.received, None
            signal.raise_signal(number)


def _save_checkpoint(model, optimizer, settings, out: Path, record: dict, step: int, started: float,
                     distinct_windows: int) -> None:
    record.update(step=step, tokens_seen=step * settings.batch_size * settings.seq_len,
                  distinct_windows=distinct_windows, epochs=step * settings.batch_size / distinct_windows)
    record["seconds"] = record.get("seconds_before", 0.0) + time.perf_counter() - started
    model.save(out)
    state = {"record": record, "settings": asdict(settings), "config": model.config_dict(),
             "model": model.state_dict() if not model.freeze_backbone else model.trainable_state(),
             "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
    atomic_write(out / STATE_FILE, lambda path: torch.save(state, path))


def _resume(model: MTPHeadsModel, optimizer, settings: TrainingSettings, out: Path) -> dict:
    """The training record to continue: from out/training_state.pt if present (weights,
    optimizer and RNG restored), else a fresh one."""
    path = out / STATE_FILE
    if not path.is_file():
        return {"step": 0, "losses": [], "seconds_before": 0.0}
    remedy = f"delete it to start over (or use another --out): rm {path}"
    try:
        state = torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:  # truncated, empty or not a checkpoint
        raise unreadable(path, "the training state", error, remedy) from error
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        raise UserError(f"the training state {path} is incomplete (not a train-heads checkpoint); {remedy}")
    saved, current = state["config"], model.config_dict()
    if saved != current:
        raise ValueError(f"{out} holds a checkpoint of other heads or another model: {saved} (checkpoint) "
                         f"vs {current} (now); use another --out")
    for key, default in RESUME_KEYS.items():
        saved_value = state["settings"].get(key, default)
        if saved_value != getattr(settings, key):
            raise ValueError(f"{out} was trained with {key}={saved_value}, not "
                             f"{getattr(settings, key)}: resuming must keep the data the same")
    model.load_state_dict(state["model"], strict=not model.freeze_backbone)
    optimizer.load_state_dict(state["optimizer"])
    for group, base_lr in zip(optimizer.param_groups, _base_learning_rates(settings, model)):
        group.setdefault("base_lr", base_lr)  # checkpoints from before the schedule
    torch.set_rng_state(state["rng"])
    record = state["record"]
    record["seconds_before"] = record["seconds"]
    return record


def _base_learning_rates(settings: TrainingSettings, model: MTPHeadsModel) -> list[float]:
    return ([settings.lr] + ([settings.whs_lr] if model.layer_logits is not None else [])
            + ([settings.backbone_lr] if not model.freeze_backbone else []))


@dataclass
class HeadAccuracy:
    """One step's held-out scores (see evaluate_heads).

    Attributes:
        step: s, the token x_{t+s} predicted (1: the backbone's own prediction).
        positions: the positions scored.
        accuracy: "top{k}" -> the share of positions whose true token is among the top k.
        loss: the mean cross-entropy (nats).
    """

    step: int
    positions: int
    accuracy: dict
    loss: float


@torch.no_grad()
def evaluate_heads(model: MTPHeadsModel, sequences: TrainingData, top_k: Sequence[int] = (1, 5),
                   batch_size: int = 4, progress: bool = True, world: World | None = None) -> list[HeadAccuracy]:
    """Teacher-forced top-k accuracy and cross-entropy of every head, and of the backbone's own
    next-token prediction (step 1, first), on `sequences` (equal lengths within a batch).
    A step s is scored at every position t with t + s inside the sequence, the positions
    evaluate_mtp scores for step s. On several ranks each scores its share of the batches and
    the counts and sums are added up over the ranks: every rank returns the whole result.

    Args:
        model: the heads and their backbone.
        sequences: token id lists, or a complete FeatureCache of them (frozen backbone; its
            step 1 is the final norm of the cached last state).
        top_k: the k whose accuracy is counted.
        batch_size: sequences per forward pass.
        progress: show a progress bar (rank 0 only: of every rank's sequences).
        world: the ranks sharing the work (mtp_ext.integrations.distributed); None: this process.

    Returns:
        One HeadAccuracy per step: 1, then model.steps.
    """
    if not sequences:
        raise ValueError("no sequences to evaluate")
    world = world or World()
    steps = [1] + model.steps
    counts = torch.zeros(len(steps), len(top_k) + 1, dtype=torch.long)  # hits per k, then positions
    losses = torch.zeros(len(steps), dtype=torch.float64)
    batches = [range(first, min(first + batch_size, len(sequences))) for first in range(0, len(sequences), batch_size)]
    weights = [len(rows) for rows in batches]
    with world.progress(weights, desc="evaluate heads", unit="seq", disable=not progress) as bar:
        for batch in world.share(weights):
            final, heads, input_ids = _evaluated_states(model, sequences, batches[batch])
            hidden = torch.cat([final[None], heads]).flatten(1, 2)  # [S, B * T, H]
            targets = head_targets(input_ids, steps).flatten(1)
            _, ids, lse = multihead_unembed_topk(hidden, model.unembed_weight, max(top_k))
            check_finite_lse(lse, model.source)
            scored = targets != IGNORE_INDEX
            found = ids == targets[..., None]  # [S, M, k]
            for index, k in enumerate(top_k):
                counts[:, index] += (found[..., :k].any(-1) & scored).sum(-1).cpu()
            target_logits = torch.einsum("smh,smh->sm", hidden.float(),
                                         model.unembed_weight.float()[targets.clamp(min=0)])
            losses += ((lse - target_logits) * scored).sum(-1).double().cpu()
            counts[:, -1] += scored.sum(-1).cpu()
            bar.update(weights[batch])
        bar.wait()
    counts, losses = world.sum(counts, "the held-out hits"), world.sum(losses, "the held-out losses")
    return [HeadAccuracy(step, int(row[-1]), {f"top{k}": int(row[index]) / max(int(row[-1]), 1)
                                              for index, k in enumerate(top_k)}, float(loss / max(int(row[-1]), 1)))
            for step, row, loss in zip(steps, counts, losses)]


def _evaluated_states(model: MTPHeadsModel, sequences: TrainingData, rows: range) -> tuple[Tensor, Tensor, Tensor]:
    """(final-normed states [B, T, H], head states [N, B, T, H], token ids [B, T]) of some
    sequences, live or from a cache."""
    device = model.unembed_weight.device
    if isinstance(sequences, FeatureCache):
        states, input_ids = sequences.read(rows, model.num_read_states, model.unembed_weight.dtype)
        states, input_ids = states.to(device), input_ids.to(device)
        return model.final_norm(states[-1]), model.heads_from_states(states), input_ids
    input_ids = torch.tensor([list(sequences[row]) for row in rows], device=device)
    final, heads = model(input_ids)
    return final, heads, input_ids
