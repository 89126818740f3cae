"""Evaluation, analysis and heads training past one process, on torch.distributed.

A command launched by torchrun (one process per GPU, or per share of a machine's cores; one
machine or several) runs in a `World`: each rank takes its own share of the work
(`World.share`), the counts, sums and histograms are summed over the ranks (`World.sum`:
communication grows with the metrics, never with the data), and rank 0 alone prints and writes.
Without torchrun (no WORLD_SIZE in the environment, or 1) the World is this one process and
every call below costs nothing.

The backend follows the device: gloo for the CPU, NCCL for CUDA. The rendezvous store that
torchrun sets up carries what is not a collective: the progress of every rank (rank 0 shows one
bar of all ranks' positions), and the failure of a rank, which the others then name instead of
waiting. Every wait has a timeout (`timeout_s`): a rank that dies, hangs or never joins ends the
run with a message saying which rank and what to check, never a hang.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mtp_ext._io import UserError

__all__ = ["DEFAULT_TIMEOUT_S", "DistributedError", "SharedProgress", "World", "balanced_share", "init_world",
           "launched_ranks", "threads_per_rank", "world_session"]

# torch's own default for gloo; waits for the slowest rank at the end of a share fall within it.
DEFAULT_TIMEOUT_S = 1800.0
# Store keys of this package: KEY_PREFIX/<session>/..., a session per World of this process, so
# that the commands one process runs in turn (each in its own World) never read each other's keys.
KEY_PREFIX = "mtp_ext"
_SESSIONS = itertools.count(1)
# Polling the store while waiting for other ranks: from this interval up to the longest one.
FIRST_POLL_S, LONGEST_POLL_S = 0.005, 0.2
CHECK = ("check that every rank was started with the same --nnodes and --nproc-per-node, that MASTER_ADDR:MASTER_PORT "
         "(torchrun's --rdzv-endpoint) is rank 0's machine and reachable from every machine (no firewall on the "
         "port), and the other ranks' output; --dist-timeout sets how long a rank waits")


class DistributedError(RuntimeError):
    """A rank failed, hung or never joined; the message names it and says what to check."""


def launched_ranks() -> tuple[int, int]:
    """(ranks on this machine, ranks in all) as torchrun's environment says; (1, 1) without it."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")), int(os.environ.get("WORLD_SIZE", "1"))


def threads_per_rank() -> int:
    """This machine's cores (those this process may use) split evenly among its ranks, at least
    one each: ranks on the CPU that each took every core would slow each other down."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // launched_ranks()[0])


def balanced_share(weights: Sequence[int], rank: int, size: int) -> range:
    """The contiguous run of items of rank `rank` among `size`: an item goes to the rank whose
    equal part of the total weight holds the item's midpoint, so that shares weigh about the
    same and together hold every item once, in order.

    Args:
        weights: each item's work (>= 0); all 0: the items are split by count.
        rank: in [0, size).
        size: the ranks.

    Returns:
        The indices of the rank's items (possibly empty).
    """
    weights = [int(weight) for weight in weights] if any(weights) else [1] * len(weights)
    total, before, owners = sum(weights), 0, []
    for weight in weights:
        # The midpoint before + weight / 2 as a share of the total, in integers.
        owners.append(min(size - 1, (2 * before + weight) * size // (2 * total)) if total else 0)
        before += weight
    mine = [index for index, owner in enumerate(owners) if owner == rank]
    return range(mine[0], mine[-1] + 1) if mine else range(0)


@dataclass
class World:
    """The ranks a command runs on; the default is one process.

    Attributes:
        rank: this process's rank, in [0, size).
        size: the ranks in all.
        local_rank: its rank on this machine.
        local_size: the ranks on this machine.
        device: where this rank computes: the CPU, or cuda:local_rank.
        timeout_s: the longest wait for another rank.
        store: the rendezvous store (torch.distributed.Store); None in one process.
        reduced_bytes: the bytes this rank has put into collectives so far.
        namespace: the prefix of this World's keys in the store.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = DEFAULT_TIMEOUT_S
    store: Any = None
    reduced_bytes: int = 0
    namespace: str = KEY_PREFIX
    _keys: int = 0

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that prints and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there are other ranks."""
        return self.size > 1

    @property
    def backend(self) -> str | None:
        """"nccl" for CUDA, "gloo" for the CPU; None in one process."""
        return None if not self.distributed else "nccl" if self.device.type == "cuda" else "gloo"

    @property
    def label(self) -> str:
        """"rank R of N", for messages."""
        return f"rank {self.rank} of {self.size}"

    def describe(self) -> dict:
        """What a report records of the run: size, backend and the bytes this rank reduced."""
        return {"size": self.size, "backend": self.backend, "reduced_bytes": self.reduced_bytes}

    def share(self, weights: Sequence[int]) -> range:
        """This rank's items of `weights` (balanced_share)."""
        return balanced_share(weights, self.rank, self.size)

    def slice(self, count: int) -> slice:
        """This rank's contiguous part of `count` equal items (sizes differ by at most one)."""
        return slice(self.rank * count // self.size, (self.rank + 1) * count // self.size)

    def sum(self, tensor: Tensor, what: str = "the results") -> Tensor:
        """`tensor` summed over the ranks (itself in one process), on its own device.

        Args:
            tensor: the same shape and dtype on every rank (int64 sums are exact).
            what: what is summed, for the message of a failure.

        Returns:
            The sum, a new tensor in a distributed run.
        """
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        reduced = tensor.to(self.device, copy=True)
        self.reduced_bytes += reduced.numel() * reduced.element_size()
        with self.guard(f"summing {what}"):
            dist.all_reduce(reduced)
        return reduced.to(tensor.device)

    def any(self, flag: bool, what: str = "whether to stop") -> bool:
        """Whether `flag` holds on any rank (every rank must ask)."""
        return bool(self.sum(torch.tensor([int(flag)]), what).item())

    def agree(self, value: int, what: str, remedy: str) -> int:
        """`value`, once every rank holds the same; a DistributedError naming `what` otherwise.

        Args:
            value: an integer each rank computed.
            what: what it is, for the message.
            remedy: what to do when the ranks differ.

        Returns:
            value.
        """
        if self.distributed:
            # Each rank fills its own slot: the sum is every rank's value, O(ranks) integers.
            slots = torch.zeros(self.size, dtype=torch.long)
            slots[self.rank] = value
            values = self.sum(slots, what).tolist()
            if len(set(values)) > 1:
                listed = ", ".join(f"rank {rank}: {held}" for rank, held in enumerate(values))
                raise DistributedError(f"{self.label}: the ranks disagree on {what} ({listed}); {remedy}")
        return value

    @contextlib.contextmanager
    def main_first(self, what: str) -> Iterator[None]:
        """The block runs on rank 0 first and on the other ranks once it is done (at once in one
        process): for what rank 0 does once for all, e.g. a cache the others then open.

        Args:
            what: what the block does, for the message when rank 0 takes longer than timeout_s.
        """
        key = self.fresh_key("main-first")
        if self.distributed and not self.main:
            self._wait_for(key, what)
        yield
        if self.distributed and self.main:
            with self.guard("telling the other ranks"):
                self.store.set(key, "done")

    def _wait_for(self, key: str, what: str) -> None:
        """Returns once rank 0 has set `key`."""
        self.poll(f"waiting for rank 0 to finish {what}", lambda: (bool(self.store.check([key])), 0),
                  lambda: f"rank 0 has not finished {what} within {self.timeout_s:.0f} s: raise --dist-timeout, or do "
                          f"it first in one process; if rank 0 is gone, {CHECK}")

    def poll(self, what: str, state: Callable[[], tuple[bool, Any]], stalled: Callable[[], str]) -> None:
        """Waits, polling the store, until `state()` says (ready, _); raises a DistributedError
        when a rank reports a failure, or with `stalled()` when its second value (the progress)
        has not changed for timeout_s.

        Args:
            what: what this rank waits for, for messages.
            state: (whether the wait is over, a value that changes while the others progress).
            stalled: the message when nothing has changed for timeout_s.
        """
        last, changed, pause = None, time.monotonic(), FIRST_POLL_S
        with self.guard(what):
            while True:
                ready, progress = state()
                if ready:
                    return
                failures = self._failures()
                if failures:
                    raise DistributedError(f"{self.label}: stopping: {failures}")
                if progress != last:
                    last, changed = progress, time.monotonic()
                elif time.monotonic() - changed > self.timeout_s:
                    raise DistributedError(f"{self.label}: {stalled()}")
                time.sleep(pause)
                pause = min(2 * pause, LONGEST_POLL_S)

    def progress(self, weights: Sequence[int], **bar) -> "SharedProgress":
        """A progress bar of every rank's work on items of `weights` (each rank working on its
        share), shown by rank 0 (tqdm's keyword arguments in `bar`)."""
        return SharedProgress(self, weights, **bar)

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turns the failure of a collective inside the block (a rank died or hung) into a
        DistributedError naming `what`, the rank that reported a failure, if one did, and what
        to check."""
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as error:  # gloo's and NCCL's errors are RuntimeErrors, as are others
            if not self.distributed:
                raise
            failures = self._failures() or "no other rank reported a failure"
            raise DistributedError(f"{self.label}: {what} failed ({_first_line(error)}); {failures}; if a rank "
                                   f"died or hung, {CHECK}") from error

    # ------------------------------------------------------------------ the store

    def fresh_key(self, name: str) -> str:
        """A store key of its own for the next use of `name` (every rank asks in the same order)."""
        self._keys += 1
        return f"{self.namespace}/{name}/{self._keys}"

    def record_failure(self, error: BaseException) -> None:
        """Tells the other ranks that this one failed, and why (they name it when they stop)."""
        if self.store is None:
            return
        with contextlib.suppress(Exception):  # the store may be gone with rank 0's machine
            self.store.set(f"{self.namespace}/failed/{self.rank}", f"{type(error).__name__}: {_first_line(error)}")
            self.store.add(f"{self.namespace}/failures", 1)

    def _failures(self) -> str:
        """'rank R failed: ...' for every rank that reported a failure; '' if none did."""
        try:
            if self.store.add(f"{self.namespace}/failures", 0) == 0:
                return ""
            keys = [f"{self.namespace}/failed/{rank}" for rank in range(self.size)]
            return "; ".join(f"rank {rank} failed: {self.store.get(key).decode()}"
                             for rank, key in enumerate(keys) if rank != self.rank and self.store.check([key]))
        except Exception as error:  # noqa: BLE001 - any failure of the store means the same
            return (f"the rendezvous store is unreachable too ({type(error).__name__}): rank 0's machine or its "
                    "launcher is gone")

    def close(self) -> None:
        """Leaves the process group (nothing in one process)."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


class SharedProgress:
    """Every rank's progress on its share of some items, kept in the rendezvous store: `update`
    adds this rank's progress (rank 0's bar shows the total), `wait` returns once every rank has
    done its share, or raises when a rank failed or made no progress for the world's timeout.

    Args:
        world: the ranks.
        weights: each item's work, as given to World.share.
        bar: tqdm's keyword arguments (`disable` too); only rank 0 shows a bar.
    """

    def __init__(self, world: World, weights: Sequence[int], **bar):
        self.world = world
        self.expected = [sum(weights[index] for index in balanced_share(weights, rank, world.size))
                         for rank in range(world.size)]
        self.key = world.fresh_key("progress") if world.distributed else ""
        self.bar = tqdm(total=sum(self.expected), **{**bar, "disable": bar.get("disable", False) or not world.main})

    def __enter__(self) -> "SharedProgress":
        return self

    def __exit__(self, *exception) -> None:
        self.bar.close()

    def update(self, amount: int) -> None:
        """Adds `amount` of this rank's work done."""
        if not self.world.distributed:
            self.bar.update(amount)
            return
        with self.world.guard("reporting progress to the rendezvous store"):
            self.world.store.add(f"{self.key}/{self.world.rank}", amount)
            self._show(self.world.store.add(self.key, amount))

    def wait(self) -> None:
        """Returns once every rank has done its share (at once in one process)."""
        if not self.world.distributed:
            return
        store, total = self.world.store, sum(self.expected)

        def state() -> tuple[bool, int]:
            done = store.add(self.key, 0)
            self._show(done)
            return done >= total, done

        def stalled() -> str:
            behind = [f"rank {rank} at {done} of {expected}" for rank, expected in enumerate(self.expected)
                      if (done := store.add(f"{self.key}/{rank}", 0)) < expected]
            return (f"no rank made progress for {self.world.timeout_s:.0f} s ({', '.join(behind)}): those ranks died "
                    f"or hung; {CHECK}")

        self.world.poll("waiting for the other ranks", state, stalled)

    def _show(self, total_done: int) -> None:
        self.bar.update(total_done - self.bar.n)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def init_world(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """The World of this process: one process without torchrun's environment (or WORLD_SIZE 1),
    else this rank, after the rendezvous and with its process group.

    Args:
        device: "cpu" or "cuda" (each rank takes cuda:LOCAL_RANK).
        timeout_s: the longest wait for another rank, the rendezvous included.

    Returns:
        The World.
    """
    local_size, size = launched_ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is visible to this process")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU of its own: this machine shows "
                            f"{torch.cuda.device_count()}; start at most that many ranks per machine")
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
    elif device == "cpu":
        where = torch.device("cpu")
    else:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    world = World(rank=int(os.environ.get("RANK", "0")), size=size, local_rank=local_rank, local_size=local_size,
                  device=where, timeout_s=timeout_s)
    if world.distributed:
        world.namespace = f"{KEY_PREFIX}/{next(_SESSIONS)}"
        world.store = _join(world)
    return world


def _join(world: World):
    """The rendezvous store, once this rank has joined the process group."""
    import torch.distributed as dist

    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE={world.size} is set but {', '.join(missing)} not: start the command with "
                        "torchrun (python -m torch.distributed.run), which sets them all")
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    timeout = timedelta(seconds=world.timeout_s)
    try:
        store, _, _ = next(dist.rendezvous("env://", world.rank, world.size, timeout=timeout))
        dist.init_process_group(world.backend, store=dist.PrefixStore(f"{world.namespace}/group", store),
                                rank=world.rank, world_size=world.size, timeout=timeout,
                                **({"device_id": world.device} if world.backend == "nccl" else {}))
    except (RuntimeError, ValueError) as error:  # DistStoreError, DistNetworkError: timeouts, refused connections
        raise DistributedError(f"{world.label}: the rendezvous at {address} did not complete within "
                               f"{world.timeout_s:.0f} s ({_first_line(error)}); {CHECK}") from error
    return store


@contextlib.contextmanager
def world_session(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[World]:
    """The World of a command (init_world), left at the end. An error inside the block is told
    to the other ranks (they stop instead of waiting) and, in a distributed run, the project's
    errors (UserError, ValueError, RuntimeError) are raised again as a UserError whose message
    starts with the rank, so that torchrun's output says which rank failed.

    Args:
        device: as for init_world.
        timeout_s: as for init_world.

    Yields:
        The World.
    """
    world = init_world(device, timeout_s)
    try:
        yield world
    except BaseException as error:
        world.record_failure(error)
        if world.distributed and isinstance(error, (ValueError, RuntimeError)) \
                and not str(error).startswith(world.label):
            raise UserError(f"{world.label}: {error}") from error
        raise
    finally:
        world.close()
