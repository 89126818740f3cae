"""`mtp-ext train-token-head`: a drafting head that reads the next token too (TokenHead),
trained by self-distillation on one backbone pass over the text."""
from __future__ import annotations

import argparse
from pathlib import Path

from mtp_ext._io import UserError
from mtp_ext.cli import common

__all__ = ["NAME", "add_parser", "run"]

NAME = "train-token-head"


def add_parser(commands) -> None:
    """Adds the `mtp-ext train-token-head` subcommand to `commands`, the subparsers of `mtp-ext`."""
    parser = commands.add_parser(NAME, help="train a drafting head that reads the next token too (TokenHead)")
    common.add_heads_data_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="directory for the head")
    parser.add_argument("--tokens", type=common.positive_int, default=200_000, help="training positions (one backbone pass)")
    parser.add_argument("--eval-tokens", type=common.positive_int, default=8192, help="held-out positions scored")
    parser.add_argument("--epochs", type=common.positive_int, default=6)
    parser.add_argument("--batch-size", type=common.positive_int, default=512, help="positions per step")
    parser.add_argument("--lr", type=common.positive_float, default=1e-3, help="AdamW, cosine decay to 0")
    parser.add_argument("--draft-vocab", type=int, default=8192,
                        help="tokens the head can guess: the model's most frequent choices")
    parser.add_argument("--chain", type=common.positive_int, default=1,
                        help="drafting levels: L > 1 trains the head chained on its own predicted states "
                             "(EAGLE-style), so it drafts trees L deep")
    parser.add_argument("--feature-weight", type=common.non_negative_float, default=1.0,
                        help="with --chain > 1: the weight of the regression of predicted states onto the backbone's")
    parser.add_argument("--resume-dir", type=Path,
                        help="keep the training positions' features and the training's state (after every epoch) "
                             "here, and go on from them: a stopped run, run again, continues where it stopped")
    parser.set_defaults(run=run, interrupted=interrupted)


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves: with --resume-dir, the features and epochs so far."""
    return common.kept_on_interrupt(args.resume_dir, "--resume-dir", "the features and the epochs finished so far")


def run(args: argparse.Namespace) -> dict:
    """Runs `mtp-ext train-token-head`: trains a TokenHead, scores it on the held-out text and
    saves both in --out.

    Returns:
        The report, saved in the head's config.
    """
    from mtp_ext.heads import TokenHeadSettings, evaluate_token_head, train_token_head
    from mtp_ext.heads.token_head import TRAINING_STATE_FILE, token_head_features
    from mtp_ext.models import describe_weights

    from mtp_ext.integrations.distributed import launched_ranks

    if launched_ranks()[1] > 1:  # every rank would train the same head and write it
        raise UserError("train-token-head runs in one process: start it without torchrun (or with "
                        "--nproc-per-node 1 --nnodes 1)")
    common.set_threads(args)
    settings = TokenHeadSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                 draft_vocab=args.draft_vocab, chain=args.chain, feature_weight=args.feature_weight)
    documents = common.read_documents(args.data)
    out = common.output_dir(args.out)
    backbone, tokenizer = common.load_model_for(args)
    settings.check(backbone.get_output_embeddings().weight.shape[0])
    windows, held_out, split = common.heads_data(args, documents, tokenizer, max(1, args.tokens // (args.seq_len - 1)),
                                          args.eval_tokens)
    resume = None if args.resume_dir is None else common.output_dir(args.resume_dir)
    features = token_head_features(backbone, windows, parts_dir=resume)
    head, record = train_token_head(backbone, features, settings,
                                    state_path=None if resume is None else resume / TRAINING_STATE_FILE)
    accuracy = evaluate_token_head(head, token_head_features(backbone, held_out))
    report = {"model": args.model, "weights": describe_weights(backbone), "data": args.data, "split": split,
              "seq_len": args.seq_len, "training": record, "held_out": vars(accuracy)}
    head.save(out, report)
    print(f"\ntrained on {record['positions']} positions ({record['seconds']:.0f} s); held-out "
          f"({split['by']} split), the model's own next choice among the head's guesses:")
    print("| positions | top-1 | top-3 |\n|---|---:|---:|")
    print(f"| all {accuracy.positions} | {accuracy.top1:.3f} | {accuracy.top3:.3f} |")
    print(f"| x_(t+1) the model's own choice (greedy decoding) {accuracy.greedy_positions} | "
          f"{accuracy.greedy_top1:.3f} | {accuracy.greedy_top3:.3f} |")
    for level in range(1, len(accuracy.level_top1)):
        print(f"| level {level + 1} (chained, x_(t+{level + 2})): all / greedy chains | "
              f"{accuracy.level_top1[level]:.3f} / {accuracy.greedy_level_top1[level]:.3f} | |")
    print(f"draft vocabulary: {settings.draft_vocab} tokens, {accuracy.vocab_coverage:.3f} of the held-out choices")
    print(f"wrote {out}")
    return report
