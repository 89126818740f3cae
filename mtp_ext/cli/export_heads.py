"""`mtp-ext export-heads`: trained MTP heads in the layout a serving engine loads (vLLM's Medusa),
with the engine's settings to use them."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtp_ext.cli import common

__all__ = ["NAME", "add_parser", "run"]

NAME = "export-heads"


def add_parser(commands) -> None:
    """Adds the `mtp-ext export-heads` subcommand to `commands`, the subparsers of `mtp-ext`."""
    parser = commands.add_parser(NAME, help="export trained MTP heads for vLLM (its Medusa speculative decoding)")
    parser.add_argument("heads_dir", type=Path, metavar="DIR", help="heads saved by mtp-ext train-heads --head-type medusa")
    parser.add_argument("--format", choices=["vllm-medusa"], required=True,
                        help="vllm-medusa: config.json and model.safetensors for speculative_config method 'medusa'")
    parser.add_argument("--out", type=Path, required=True, help="the directory written (vLLM's draft 'model')")
    common.add_model_arguments(parser, help="the backbone the heads were trained on")
    parser.add_argument("--draft-vocab", type=common.positive_int, default=None,
                        help="draft only the K most frequent tokens of --data (vLLM's truncated_vocab_size and "
                             "token_map): each head reads K rows of the unembedding instead of all")
    parser.add_argument("--data", default=common.DEFAULT_DATA, help="the text whose token counts pick --draft-vocab")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
    """Runs `mtp-ext export-heads`: checks the heads can be served as they are, writes --out and
    prints vLLM's engine arguments for it (mtp_ext.integrations.vllm.llm_arguments).

    Returns:
        The config written to --out/config.json.
    """
    from mtp_ext._io import read_json, required_keys
    from mtp_ext.heads.model import CONFIG_FILE, CONFIG_KEYS, MTPHeadsModel, check_heads_dir
    from mtp_ext.integrations.vllm import check_exportable, export_medusa, llm_arguments, text_draft_vocabulary

    common.set_threads(args)
    check_heads_dir(args.heads_dir, "export-heads")
    path = args.heads_dir / CONFIG_FILE
    check_exportable(required_keys(read_json(path, "the MTP heads checkpoint config"), CONFIG_KEYS, path,
                                   "the MTP heads checkpoint config"), args.heads_dir)
    documents = common.read_documents(args.data) if args.draft_vocab else None
    out = common.output_dir(args.out)
    backbone, tokenizer = common.load_model_for(args)
    heads = MTPHeadsModel.load(args.heads_dir, backbone)
    vocab_ids = None
    if documents is not None:
        vocab_ids = text_draft_vocabulary(tokenizer, documents, args.draft_vocab, heads.unembed_weight.shape[0])
    config = export_medusa(heads, out, vocab_ids)
    print(f"wrote {out}; vLLM's engine arguments for it (vllm.LLM(model=..., **arguments); vllm serve "
          "--speculative-config / --model-loader-extra-config):")
    print(json.dumps(llm_arguments(out)))
    return config
