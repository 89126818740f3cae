"""What the commands share: argument types, the model and data arguments, where the model runs
(the ranks of a torchrun launch, a device map), reading the user's data and checkpoints before
any model is loaded, output paths checked before the work, plots."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mtp_ext._io import UserError

__all__ = ["DEFAULT_DATA", "DEFAULT_MODEL", "add_heads_data_arguments", "add_model_arguments", "add_placement_arguments",
           "add_world_arguments", "check_output_file", "heads_data", "heads_table", "kept_on_interrupt", "load_model_for",
           "memory_budget", "non_negative_int", "open_share", "output_dir", "positive_float", "positive_int",
           "probability", "pyplot", "read_corpus", "read_documents", "save_figure", "sequences_for", "set_threads",
           "world_for"]

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DATA = "austen"


# ----------------------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= {lowest}, got {text!r}") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"must be an integer >= {lowest}, got {value}")
    return value


def probability(text: str) -> float:
    """argparse type: a float in (0, 1]."""
    value = _float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def open_share(text: str) -> float:
    """argparse type: a float in (0, 1)."""
    value = _float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    value = _float(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = _float(text)
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def memory_budget(text: str) -> tuple[int | str, str]:
    """argparse type: DEVICE=SIZE of --max-memory, e.g. 0=20GiB (GPU 0) or cpu=60GiB."""
    device, _, size = text.partition("=")
    if not size or not (device.isdigit() or device in ("cpu", "mps")):
        raise argparse.ArgumentTypeError(f"must be DEVICE=SIZE with DEVICE a GPU index or cpu, e.g. 0=20GiB or "
                                         f"cpu=60GiB, got {text!r}")
    return (int(device) if device.isdigit() else device), size


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


# ----------------------------------------------------------------------------- model and data


def add_model_arguments(parser: argparse.ArgumentParser, **kwargs) -> None:
    """--model, --allow-download and --threads."""
    parser.add_argument("--model", default=DEFAULT_MODEL, **kwargs)
    parser.add_argument("--allow-download", action="store_true",
                        help="let a --model that is neither built in nor a local directory be downloaded as a "
                             "Hugging Face hub id (also: HF_HUB_OFFLINE=0 in the environment)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")


def add_heads_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, and documents split into training windows and a held-out share."""
    add_model_arguments(parser)
    parser.add_argument("--data", default=DEFAULT_DATA, help="documents; the last --held-out-share are held out")
    parser.add_argument("--held-out-share", type=open_share, default=0.1)
    parser.add_argument("--seq-len", type=positive_int, default=256, help="tokens per window")


def add_world_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --dist-timeout: where each rank of a torchrun launch computes, and how long
    it waits for the others."""
    from mtp_ext.integrations.distributed import DEFAULT_TIMEOUT_S

    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the model runs (cuda: each rank of a torchrun launch its own GPU, NCCL between "
                             "them; cpu: gloo)")
    parser.add_argument("--dist-timeout", type=positive_float, default=DEFAULT_TIMEOUT_S,
                        help="seconds a rank of a torchrun launch waits for the others (the rendezvous, each "
                             "collective) before it stops with an error naming them")


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """--device-map, --max-memory and --offload-folder: a model larger than one device."""
    from mtp_ext.models import DEVICE_MAPS

    parser.add_argument("--device-map", choices=DEVICE_MAPS, default=None,
                        help="spread the model over the GPUs, the CPU and the disk with accelerate (a model larger "
                             "than one device)")
    parser.add_argument("--max-memory", type=memory_budget, nargs="+", default=None, metavar="DEVICE=SIZE",
                        help="with --device-map: the most each device holds, e.g. 0=20GiB 1=20GiB cpu=60GiB")
    parser.add_argument("--offload-folder", type=Path, default=None,
                        help="with --device-map: where the layers that fit in no device's memory are kept")


def set_threads(args: argparse.Namespace) -> None:
    """torch's thread count: --threads if given, else, for several ranks of a torchrun launch
    on one machine, an equal share of its cores each."""
    from mtp_ext.integrations.distributed import launched_ranks, threads_per_rank

    threads = args.threads or (threads_per_rank() if launched_ranks()[0] > 1 else None)
    if threads:
        import torch

        torch.set_num_threads(threads)


def world_for(args: argparse.Namespace):
    """The World of this rank (mtp_ext.integrations.distributed.world_session), as a context
    manager, from --device and --dist-timeout."""
    from mtp_ext.integrations.distributed import world_session

    return world_session(args.device, args.dist_timeout)


def load_model_for(args: argparse.Namespace, world=None):
    """(model, tokenizer) of --model; hub ids only with --allow-download (or HF_HUB_OFFLINE=0);
    placed by --device-map (if the command has it), else on `world`'s device (the CPU without one)."""
    from mtp_ext.models import load_model

    placement = {}
    if getattr(args, "device_map", None):
        if world is not None and world.local_size > 1 and world.device.type == "cuda":
            raise UserError("--device-map spreads one model over every GPU of the machine: start one rank per "
                            "machine (torchrun --nproc-per-node 1)")
        folder = args.offload_folder
        if folder is not None and world is not None and world.distributed:  # each rank writes its own copy
            folder = folder / f"rank-{world.rank}"
        placement = dict(device_map=args.device_map, offload_folder=folder,
                         max_memory=dict(args.max_memory) if args.max_memory else None)
    elif getattr(args, "max_memory", None) or getattr(args, "offload_folder", None):
        raise UserError("--max-memory and --offload-folder go with --device-map")
    model, tokenizer = load_model(args.model, allow_download=True if args.allow_download else None, **placement)
    if not placement and world is not None and world.device.type != "cpu":
        model.to(world.device)
    return model, tokenizer


def read_corpus(data: str) -> tuple[str, list]:
    """("translation", the (source, target) pairs) of a parallel corpus, else ("open-ended", the
    documents). Read before any model is loaded, so that a bad file fails at once."""
    from mtp_ext import data as corpora

    if data in corpora.PAIR_CORPORA or corpora.is_pairs_file(data):
        return "translation", corpora.load_pairs(data)
    return "open-ended", corpora.load_text(data)


def read_documents(data: str) -> list[str]:
    """The documents of --data, read before any model is loaded, so that a bad file fails at once."""
    from mtp_ext import data as corpora

    return corpora.load_text(data)


def sequences_for(data: str, tokenizer, tokens: int, seq_len: int, corpus: tuple[str, list] | None = None):
    """Token sequences of open-ended text, or (prompt, target) pairs for a parallel corpus;
    `corpus`: what read_corpus(data) gave, if it has been read already."""
    from mtp_ext import data as corpora

    task, records = corpus if corpus is not None else read_corpus(data)
    if task == "translation":
        examples, scored = [], 0
        for example in corpora.translation_examples(tokenizer, records, max_examples=None):
            examples.append(example)
            scored += len(example[1])
            if scored >= tokens:
                break
        return examples, "translation"
    return corpora.token_sequences(tokenizer, records, seq_len, max_tokens=tokens), "open-ended"


def heads_data(args: argparse.Namespace, documents: list[str], tokenizer, training_windows: int,
               held_out_tokens: int):
    """(training windows, held-out sequences of up to `held_out_tokens` positions, the split) of
    `documents` (corpora.load_text of --data)."""
    from mtp_ext import data as corpora
    from mtp_ext.heads.training import split_documents

    train_documents, held_out_documents, split = split_documents(documents, args.held_out_share)
    windows = corpora.token_sequences(tokenizer, train_documents, args.seq_len,
                                      max_tokens=training_windows * (args.seq_len - 1))
    held_out = corpora.token_sequences(tokenizer, held_out_documents, args.seq_len, max_tokens=held_out_tokens)
    if not windows or not held_out:
        raise UserError(f"{args.data!r} holds too little text for windows of {args.seq_len} tokens on both "
                        "sides of the held-out split")
    return windows, held_out, split


def heads_table(results: dict, marginal_steps: list[dict] | None = None, intervals: dict | None = None) -> str:
    """Markdown: one line per step, top-1 / top-5 of marginalisation (with the top-5 bounds) and
    of each set of heads, each top-5 followed by its interval [low-high] where one is given
    (a marginal step's "interval", or intervals[name][row]["top5"])."""
    names = list(results)
    marginal_steps = marginal_steps or []
    intervals = intervals or {}
    head = "| step | positions |" + (" marginalisation top-1 / top-5 (bounds) |" if marginal_steps else "")
    lines = [head + "".join(f" {name} top-1 / top-5 |" for name in names),
             "|" + "---|" * (2 + bool(marginal_steps) + len(names))]
    for row, accuracy in enumerate(results[names[0]]):
        cells = [str(accuracy.step), str(accuracy.positions)]
        if marginal_steps:
            step = marginal_steps[row] if row < len(marginal_steps) else None
            cells.append("-" if step is None else
                         f"{step['accuracy']['top1']:.3f} / {step['accuracy']['top5']:.3f}"
                         f"{_interval_text(step.get('interval'))} "
                         f"({step['accuracy_lower']['top5']:.3f}-{step['accuracy_upper']['top5']:.3f})")
        for name in names:
            values = results[name][row].accuracy
            interval = intervals[name][row] if name in intervals else None
            cells.append(f"{values['top1']:.3f} / {values['top5']:.3f}{_interval_text(interval)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _interval_text(interval: dict | None) -> str:
    return "" if interval is None else f" [{interval['top5'][0]:.3f}-{interval['top5'][1]:.3f}]"


# ----------------------------------------------------------------------------- outputs


def kept_on_interrupt(kept: Path | None, option: str, what: str) -> str:
    """What Ctrl-C leaves of a command that keeps its work where `option` says.

    Args:
        kept: where the work is kept; None: the option was not given.
        option: the option, e.g. "--json".
        what: what is kept there, e.g. "the sequences scored so far".

    Returns:
        One line for the "interrupted" message.
    """
    if kept is None:
        return f"nothing is kept without {option}"
    return f"{what} are in {kept}; the same command goes on from them"


def output_dir(path: Path) -> Path:
    """`path`, created if need be, once a file could be created in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the output directory {path}: {error.strerror or error}") from error
    if not _can_create_files_in(path):
        raise UserError(f"the output directory {path} is not writable")
    return path


def check_output_file(path: Path | None, flag: str) -> None:
    """Raises a UserError unless the output file `path` (given as `flag`; None: not asked for) can
    be written: checked before the work, so that a typo does not cost the results."""
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"cannot write {flag} {path}: it is a directory; give a file name")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir() or not _can_create_files_in(directory):
        raise UserError(f"cannot write {flag} {path}: {directory} is not a writable directory")


def _can_create_files_in(directory: Path) -> bool:
    # Tried, not read from the permission bits: root passes those even where nothing can be
    # created (/proc), and the results are written through a temporary file beside the target.
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".mtp-ext-probe.", suffix=".tmp"):
            return True
    except OSError:
        return False


def pyplot():
    """matplotlib.pyplot on a backend that needs no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, figure, path: Path) -> None:
    """Writes `figure` to `path` (PNG) and closes it."""
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
