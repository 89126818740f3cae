"""`mtp-ext generate`: lossless self-speculative decoding with any registered drafter
(mtp_ext.speculative.drafters), against model.generate with --compare."""
from __future__ import annotations

import argparse

from mtp_ext._io import UserError
from mtp_ext.cli import common

__all__ = ["NAME", "add_parser", "run"]

NAME = "generate"


def add_parser(commands) -> None:
    """Adds the `mtp-ext generate` subcommand to `commands`, the subparsers of `mtp-ext`."""
    from mtp_ext.speculative.drafters import DEFAULT_DRAFTER, drafter_help

    parser = commands.add_parser(NAME, help="self-speculative decoding with MTP drafts")
    common.add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--drafter", default=DEFAULT_DRAFTER, help=f"the drafter: {drafter_help()} (default: {DEFAULT_DRAFTER})")
    parser.add_argument("--branching", type=common.positive_int, nargs="+", default=None,
                        help="candidates per node at each depth (heads; default: 3 on a CPU, 4 3 2 2 on a GPU; "
                             "a token head: up to the depth it was trained for, default 3 under the root on a CPU (2 "
                             "for a batch), 8 "
                             "then 1 per level on a GPU), or "
                             "under the root (marginal, one count; default: 3 on a CPU, 8 on a GPU)")
    parser.add_argument("--max-nodes", type=common.positive_int, default=None,
                        help="heads drafter: node budget of a draft tree (default: 4 on a CPU, 16 on a GPU)")
    parser.add_argument("--max-new-tokens", type=common.positive_int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=common.positive_float, default=1.0)
    parser.add_argument("--top-p", type=common.probability, default=1.0)
    parser.add_argument("--top-k", type=common.non_negative_int, default=0,
                        help="sample from the k most likely tokens only (0: all)")
    parser.add_argument("--repetition-penalty", type=common.positive_float, default=1.0,
                        help="Hugging Face's repetition penalty (1: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    parser.add_argument("--compare", action="store_true",
                        help="also run model.generate with the same settings and print the speed-up")
    common.add_placement_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
    """Runs `mtp-ext generate`: streams the continuation as it is accepted, then its speed.

    Returns:
        {"speculative": GenerationStats.to_dict(), and with --compare "generate": model.generate's
        speed (and, greedy, whether the outputs are identical)}.
    """
    import torch
    from transformers import TextStreamer

    from mtp_ext.speculative import check_drafter, default_drafter_name, resolve_drafter, speculative_generate

    common.set_threads(args)
    check_drafter(args.drafter, "--drafter")
    model, tokenizer = common.load_model_for(args)
    input_ids = torch.tensor([tokenizer(args.prompt)["input_ids"]])
    if input_ids.shape[1] == 0:
        raise UserError("--prompt gives no tokens: give some text to continue")
    drafter_name = default_drafter_name(model) if args.drafter == "auto" else args.drafter
    drafter = resolve_drafter(drafter_name, model, branching=args.branching, max_nodes=args.max_nodes)
    output = speculative_generate(model, input_ids, drafter=drafter, max_new_tokens=args.max_new_tokens,
                                  do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                                  generator=torch.Generator().manual_seed(args.seed), streamer=TextStreamer(tokenizer))
    stats = output.stats
    print(f"\n{stats.new_tokens[0]} tokens in {stats.seconds:.2f} s: {stats.tokens_per_second:.2f} tokens/s, "
          f"{stats.verification_steps} verification steps, {stats.mean_accepted_per_step:.2f} tokens per step "
          f"(drafter {drafter_name})")
    report = {"drafter": drafter_name, "speculative": stats.to_dict()}
    if args.compare:
        report["generate"] = compare_with_generate(args, model, input_ids, output.sequences,
                                                   stats.tokens_per_second)
    return report


def compare_with_generate(args: argparse.Namespace, model, input_ids, sequences, speculative_rate: float) -> dict:
    """model.generate with the same settings: its speed, and (greedy) whether the outputs match.
        model: the model.
        input_ids: [1, T] int64, the prompt.
        sequences: [1, T + new] int64, speculative_generate's output.
        speculative_rate: speculative_generate's tokens per second.

    Returns:
        {"tokens_per_second", and greedy only "identical"}.
    """
    import time

    import torch

    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None) if args.do_sample else {}
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    plain = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                           max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                           repetition_penalty=args.repetition_penalty, **sampling)
    plain_rate = (plain.shape[1] - input_ids.shape[1]) / (time.perf_counter() - start)
    print(f"model.generate: {plain_rate:.2f} tokens/s; speed-up {speculative_rate / plain_rate:.2f}x")
    report = {"tokens_per_second": plain_rate}
    if not args.do_sample:
        report["identical"] = torch.equal(plain, sequences)
        print("outputs identical" if report["identical"] else "OUTPUTS DIFFER from model.generate")
    return report
