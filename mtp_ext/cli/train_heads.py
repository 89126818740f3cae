"""`mtp-ext train-heads`: MTP heads on a frozen or jointly trained backbone (the paper's Fig. 5),
resumable, with the held-out accuracy at the end; under torchrun DistributedDataParallel, each
rank its slice of every step's windows, rank 0 writing."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtp_ext._io import UserError, atomic_write_text
from mtp_ext.cli import common

__all__ = ["NAME", "add_parser", "plot_training", "run"]

NAME = "train-heads"


def add_parser(commands) -> None:
    """Adds the `mtp-ext train-heads` subcommand to `commands`, the subparsers of `mtp-ext`."""
    parser = commands.add_parser(NAME, help="train MTP heads on a frozen or jointly trained backbone")
    common.add_heads_data_arguments(parser)
    parser.add_argument("--heads", type=int, default=3, help="number of heads (head j predicts x_{t+j+2})")
    parser.add_argument("--head-type", choices=["resblock", "block", "medusa"], default="resblock",
                        help="medusa: vLLM's Medusa layout (mtp-ext export-heads --format vllm-medusa)")
    parser.add_argument("--whs", action="store_true", help="weighted hidden states: each head mixes every layer")
    parser.add_argument("--joint", action="store_true", help="train the backbone too (loss adds the NTP loss)")
    parser.add_argument("--steps", type=common.non_negative_int, required=True,
                        help="train up to this step (resumes from --out)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory (resumed if it holds one)")
    parser.add_argument("--batch-size", type=common.positive_int, default=2, help="windows of --seq-len tokens per step")
    parser.add_argument("--lr", type=common.positive_float, default=1e-3, help="learning rate of the heads and WHS weights")
    parser.add_argument("--whs-lr", type=common.positive_float, default=5e-2, help="learning rate of the WHS logits (--whs)")
    parser.add_argument("--backbone-lr", type=common.positive_float, default=1e-5,
                        help="learning rate of the backbone (--joint)")
    parser.add_argument("--ntp-weight", type=float, default=1.0, help="weight of the NTP loss (--joint)")
    parser.add_argument("--checkpoint-every", type=common.positive_int, default=25, help="steps between checkpoints")
    parser.add_argument("--targets", choices=["text", "model"], default="text",
                        help="what the heads predict: the text, or the backbone's own greedy choices "
                             "(self-distillation, for drafting in speculative decoding)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from the heads saved in this directory (fine-tuning); they must match "
                             "--heads, --head-type, --whs and --joint")
    parser.add_argument("--time-budget", type=common.positive_float, default=None,
                        help="stop (and checkpoint) after this many seconds of training; rerun to go on")
    parser.add_argument("--eval-tokens", type=common.positive_int, default=1024,
                        help="held-out positions scored after training (and for the curve of --eval-every)")
    parser.add_argument("--train-windows", type=common.positive_int, default=None,
                        help="distinct training windows, visited in epochs (default: --steps x --batch-size, "
                             "each once)")
    parser.add_argument("--shuffle", action="store_true", help="visit the windows in a fresh order each epoch")
    parser.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                        help="cosine: linear warmup over --warmup-steps, then a decay to 0.1x at --steps")
    parser.add_argument("--warmup-steps", type=common.non_negative_int, default=0)
    parser.add_argument("--eval-every", type=common.non_negative_int, default=0,
                        help="score the held-out text every this many steps: the curve in train.json and "
                             "train.png (0: only after training)")
    parser.add_argument("--features", type=Path, default=None,
                        help="frozen backbone: cache the states the heads read here (memory-mapped; built on "
                             "first use, completed if cut short) and train on them, so epochs cost the heads "
                             "alone; a cache built with --whs serves heads without it too")
    parser.add_argument("--features-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="of the cached states (bfloat16: half the disk)")
    common.add_world_arguments(parser)
    parser.set_defaults(run=run, interrupted=interrupted)


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves: a checkpoint of whole steps, resumed by the same command."""
    return f"the checkpoint in {args.out} resumes on a rerun"


def run(args: argparse.Namespace) -> dict:
    """Runs `mtp-ext train-heads`: trains (or resumes) into --out, then scores the held-out text.

    Returns:
        The report written to --out/train.json.
    """
    from mtp_ext.heads.features import cache_features
    from mtp_ext.heads.model import MTPHeadsModel, check_heads_dir
    from mtp_ext.heads.training import TrainingSettings, evaluate_heads, train_heads
    from mtp_ext.models import describe_weights

    common.set_threads(args)
    settings = TrainingSettings(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                                whs_lr=args.whs_lr, backbone_lr=args.backbone_lr, ntp_weight=args.ntp_weight,
                                checkpoint_every=args.checkpoint_every, targets=args.targets, shuffle=args.shuffle,
                                lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
                                eval_every=args.eval_every)
    settings.check()
    if args.features is not None and args.joint:
        raise UserError("--features caches a frozen backbone's states; joint training (--joint) changes them "
                        "every step")
    if args.init_from is not None:
        check_heads_dir(args.init_from, "--init-from")
    documents = common.read_documents(args.data)
    out = common.output_dir(args.out)
    if args.features is not None:
        common.output_dir(args.features)
    with common.world_for(args) as world:
        backbone, tokenizer = common.load_model_for(args, world)
        training_windows = args.train_windows or max(1, args.steps * args.batch_size)
        windows, held_out, split = common.heads_data(args, documents, tokenizer, training_windows, args.eval_tokens)
        if args.init_from is not None:
            heads = initial_heads(args, backbone)
        else:
            heads = MTPHeadsModel(backbone, args.heads, args.head_type, args.whs, freeze_backbone=not args.joint)
        heads.to(world.device)  # the WHS weights are made on the CPU
        training_data, curve_data = windows, held_out
        if args.features is not None:
            # Rank 0 builds the caches; the other ranks then open them.
            with world.main_first("the feature cache"):
                training_data = cache_features(heads, windows, args.features, args.features_dtype,
                                               progress=world.main)
                full_windows = [sequence for sequence in held_out if len(sequence) == args.seq_len]
                if args.eval_every and full_windows:  # a cache holds windows of one length: the curve skips a short last one
                    curve_data = cache_features(heads, full_windows, args.features / "held-out", args.features_dtype,
                                                progress=world.main)
        record = train_heads(heads, training_data, settings, out, time_budget_s=args.time_budget, world=world,
                             held_out=lambda model: evaluate_heads(model, curve_data, batch_size=1, progress=False,
                                                                   world=world))
        accuracies = evaluate_heads(heads, held_out, batch_size=1, world=world)
        report = {"model": args.model, "weights": describe_weights(backbone), "data": args.data, "split": split,
                  "settings": vars(settings), "init_from": str(args.init_from) if args.init_from else None,
                  "heads": heads.config_dict(), "world": world.describe(), "training": record,
                  "held_out": [vars(accuracy) for accuracy in accuracies]}
        if not world.main:
            return report
    atomic_write_text(out / "train.json", json.dumps(report, indent=2))
    if len(record["curve"]) > 1:
        plot_training(record, f"{args.model}, {'WHS' if args.whs else 'joint' if args.joint else 'frozen'} heads",
                      out / "train.png")
    print(f"\ntrained to step {record['step']} ({record['tokens_seen']} tokens, {record['seconds']:.0f} s); "
          f"held-out ({split['by']} split):")
    print(common.heads_table({"heads": accuracies}))
    print(f"wrote {out}")
    return report


def initial_heads(args: argparse.Namespace, backbone):
    """The heads saved in --init-from, on `backbone`, if they are the heads the arguments ask for.
        backbone: the model.

    Returns:
        MTPHeadsModel.
    """
    from mtp_ext.heads import MTPHeadsModel

    heads = MTPHeadsModel.load(args.init_from, backbone)
    saved = (heads.num_heads, heads.head_type, heads.weighted_hidden_states, heads.freeze_backbone)
    asked = (args.heads, args.head_type, args.whs, not args.joint)
    if saved != asked:
        raise UserError(f"--init-from {args.init_from} holds other heads: (heads, head type, WHS, frozen) = "
                        f"{saved}, the arguments ask for {asked}")
    return heads


def plot_training(record: dict, title: str, path: Path) -> None:
    """The training loss (a moving mean over 5% of the steps) and each step's held-out loss
    against the tokens seen, as a PNG.

    Args:
        record: train_heads' record, with its "curve".
        title: the figure's title.
        path: the PNG written.
    """
    import numpy as np

    plt = common.pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    losses = np.asarray(record["losses"], dtype=float)
    tokens_per_step = record["tokens_seen"] / max(record["step"], 1)
    if losses.size:
        width = max(1, losses.size // 20)
        smoothed = np.convolve(losses, np.ones(width) / width, mode="valid")
        axis.plot((np.arange(smoothed.size) + width) * tokens_per_step, smoothed, color="0.6",
                  label=f"training (mean of {width} steps)")
    curve = record["curve"]
    tokens = [point["tokens_seen"] for point in curve]
    for row, first in enumerate(curve[0]["held_out"]):
        axis.plot(tokens, [point["held_out"][row]["loss"] for point in curve], marker=".",
                  label=f"held out, step {first['step']} ({first['positions']} positions)")
    axis.set_xlabel("training tokens seen")
    axis.set_ylabel("cross-entropy (nats)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    common.save_figure(plt, figure, path)
