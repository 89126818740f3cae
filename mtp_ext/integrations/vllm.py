"""vLLM serves heads trained with mtp_ext: their export to vLLM's Medusa checkpoint layout, the
engine arguments (`speculative_config`) that point vLLM at an exported directory, and greedy
decoding with vLLM's offline engine for tests and benchmarks.

vLLM's Medusa (vllm/model_executor/models/medusa.py) runs, for each head, residual layers
x + SiLU(W x + b) on the target model's final, post-norm hidden state and unembeds the result:
with `original_lm_head` one unembedding (`lm_heads.0.weight`) serves every head, and with
`truncated_vocab_size` K < V and a `token_map` of K token ids it covers those tokens only (the
others are never drafted; the unembedding read per head shrinks by V / K). Its proposer drafts a
chain, each head's argmax. mtp_ext's "medusa" heads (MTPHeadsModel(head_type="medusa")) are that
layout with one layer per head and the backbone's own unembedding, so the export renames their
tensors. Only VllmEngine and greedy_generate need vLLM installed (`make vllm-env`).
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from mtp_ext._checks import check_positive_int
from mtp_ext._io import MissingFileError, UserError, read_json, required_keys
from mtp_ext.heads.checkpoint import write_config, write_tensors
from mtp_ext.heads.model import MTPHeadsModel
from mtp_ext.heads.token_head import draft_vocabulary
from mtp_ext.models.introspection import model_fingerprint

__all__ = ["CONFIG_FILE", "VllmEngine", "VllmRun", "WEIGHTS_FILE", "check_exportable", "export_medusa", "greedy_generate",
           "llm_arguments", "medusa_config", "medusa_tensors", "speculative_config", "text_draft_vocabulary"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# One residual layer per head: the layout of mtp_ext's ResBlockHead (vLLM's default too).
LAYERS_PER_HEAD = 1


def check_exportable(config: dict, source: str | os.PathLike[str]) -> None:
    """Raises a UserError, saying why, for heads that vLLM's Medusa cannot run as they were
    trained; cheap (the heads' saved config only), so callers check before loading a model.

    Args:
        config: the heads' checkpoint config (heads_config.json: head_type,
            weighted_hidden_states, freeze_backbone).
        source: the checkpoint directory, for the message.
    """
    why = None
    if not config["freeze_backbone"]:
        why = ("they were trained jointly with the backbone, whose changed weights vLLM would not serve "
               "(it drafts from the target model it runs)")
    elif config["weighted_hidden_states"]:
        why = "they mix every layer's hidden state (WHS), and vLLM's Medusa heads read the final hidden state only"
    elif config["head_type"] == "block":
        why = "'block' heads are decoder layers attending over the sequence, and vLLM's Medusa heads are residual blocks"
    elif config["head_type"] == "resblock":
        why = ("'resblock' heads apply the final norm after their block, and vLLM's Medusa heads read the "
               "normed state and unembed their output directly: train with --head-type medusa")
    if why is not None:
        raise UserError(f"cannot export the heads in {source} to vLLM's Medusa: {why}")


def medusa_tensors(heads: MTPHeadsModel, vocab_ids: Optional[Tensor] = None) -> dict[str, Tensor]:
    """The heads' tensors under vLLM's Medusa parameter names.

    Args:
        heads: "medusa" heads on a frozen backbone (check_exportable).
        vocab_ids: [K] int64 distinct token ids, the draft vocabulary (vLLM's token_map); None:
            the whole vocabulary.

    Returns:
        blocks.{j}.layers.0.weight / .bias, lm_heads.0.weight (the backbone's unembedding, its
        vocab_ids rows only), and token_map with vocab_ids; in the backbone's dtype.
    """
    check_exportable(heads.config_dict(), heads.source or "these heads")
    tensors = {}
    for index, head in enumerate(heads.heads):
        tensors[f"blocks.{index}.layers.0.weight"] = head.linear.weight
        tensors[f"blocks.{index}.layers.0.bias"] = head.linear.bias
    unembed = heads.unembed_weight
    if vocab_ids is None:
        tensors["lm_heads.0.weight"] = unembed
    else:
        vocab_ids = _checked_vocab(vocab_ids, unembed.shape[0])
        tensors["lm_heads.0.weight"] = unembed[vocab_ids.to(unembed.device)]
        tensors["token_map"] = vocab_ids
    return {name: tensor.detach().cpu() for name, tensor in tensors.items()}


def medusa_config(heads: MTPHeadsModel, vocab_ids: Optional[Tensor] = None) -> dict:
    """The config.json of vLLM's MedusaConfig for the heads (see medusa_tensors), with the
    backbone's fingerprint under "mtp_ext" (vLLM keeps unknown keys and ignores them).

    Args:
        heads: as for medusa_tensors.
        vocab_ids: as for medusa_tensors.

    Returns:
        JSON-ready values.
    """
    hidden_size = int(heads.unembed_weight.shape[1])
    vocab_size = int(heads.unembed_weight.shape[0])
    return {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": hidden_size,
            "vocab_size": vocab_size, "num_heads": heads.num_heads, "num_hidden_layers": LAYERS_PER_HEAD,
            "truncated_vocab_size": vocab_size if vocab_ids is None else int(vocab_ids.numel()),
            "original_lm_head": True, "medusa_fc_bias": True,
            "mtp_ext": {"model": model_fingerprint(heads.backbone), "heads": heads.source}}


def export_medusa(heads: MTPHeadsModel, out: str | os.PathLike[str], vocab_ids: Optional[Tensor] = None) -> dict:
    """Writes the heads as a vLLM Medusa checkpoint: `out`/model.safetensors and `out`/config.json
    (last: it marks a whole export), each replaced atomically.

    Args:
        heads: as for medusa_tensors.
        out: the directory (created if need be).
        vocab_ids: as for medusa_tensors.

    Returns:
        The config written.
    """
    out = Path(out)
    tensors = medusa_tensors(heads, vocab_ids)
    config = medusa_config(heads, vocab_ids)
    write_tensors(out / WEIGHTS_FILE, tensors)
    write_config(out / CONFIG_FILE, config)
    return config


def speculative_config(directory: str | os.PathLike[str], num_speculative_tokens: Optional[int] = None) -> dict:
    """vLLM's `speculative_config` for a directory written by export_medusa (as JSON, for
    `vllm serve --speculative-config`); llm_arguments gives every engine argument it needs.

    Args:
        directory: the exported directory.
        num_speculative_tokens: tokens drafted per step, at most the heads' count; None: all
            heads.

    Returns:
        {"method": "medusa", "model": the absolute directory, "num_speculative_tokens": n}.
    """
    directory = Path(directory)
    config = _export_config(directory)
    heads = int(config["num_heads"])
    count = heads if num_speculative_tokens is None else check_positive_int(num_speculative_tokens,
                                                                           "num_speculative_tokens")
    if count > heads:
        raise UserError(f"num_speculative_tokens={count}, but the export in {directory} has {heads} heads "
                        "(one drafted token each)")
    return {"method": "medusa", "model": str(directory.resolve()), "num_speculative_tokens": count}


def llm_arguments(directory: str | os.PathLike[str], num_speculative_tokens: Optional[int] = None) -> dict:
    """The engine arguments that serve the heads exported in `directory`:
    `vllm.LLM(model=..., **llm_arguments(directory))`.

    Args:
        directory: the exported directory.
        num_speculative_tokens: as for speculative_config.

    Returns:
        {"speculative_config": ...}, and with a draft vocabulary {"model_loader_extra_config":
        {"enable_weights_track": False}} (`vllm serve --model-loader-extra-config`): vLLM 0.32's
        loader counts every parameter of the draft model as one the checkpoint must fill, and
        its Medusa class makes the token map a parameter without counting it as filled.
    """
    arguments = {"speculative_config": speculative_config(directory, num_speculative_tokens)}
    config = _export_config(Path(directory))
    if config.get("truncated_vocab_size", config.get("vocab_size")) != config.get("vocab_size"):
        arguments["model_loader_extra_config"] = {"enable_weights_track": False}
    return arguments


def _export_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise MissingFileError(f"{directory} holds no vLLM Medusa export ({CONFIG_FILE} is missing): "
                               "write one with mtp-ext export-heads DIR --format vllm-medusa --out OUT")
    config = required_keys(read_json(path, "the Medusa config"), ("model_type", "num_heads"), path, "the Medusa config")
    if config["model_type"] != "medusa":
        raise UserError(f"{path} is not a Medusa config (model_type {config['model_type']!r})")
    return config


def text_draft_vocabulary(tokenizer, documents: Iterable[str], size: int, vocab_size: int) -> Tensor:
    """The `size` most frequent tokens of the documents, as a draft vocabulary (lower id first
    on ties): what a model writes is mostly its most frequent tokens.

    Args:
        tokenizer: the backbone's tokenizer.
        documents: texts.
        size: K, at most vocab_size.
        vocab_size: the backbone's V.

    Returns:
        [K] int64, most frequent first.
    """
    size = check_positive_int(size, "size")
    if size > vocab_size:
        raise ValueError(f"a draft vocabulary of {size} tokens is larger than the model's {vocab_size}")
    ids = [token for text in documents
           for token in tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]]
    return draft_vocabulary(torch.tensor(ids, dtype=torch.long), vocab_size, size)


def _checked_vocab(vocab_ids: Tensor, vocab_size: int) -> Tensor:
    vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long).cpu()
    if vocab_ids.dim() != 1 or vocab_ids.numel() < 1:
        raise ValueError("vocab_ids must be a non-empty 1-D tensor of token ids")
    if int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= vocab_size or vocab_ids.unique().numel() != vocab_ids.numel():
        raise ValueError(f"vocab_ids must be distinct token ids in [0, {vocab_size})")
    return vocab_ids


@dataclass
class VllmRun:
    """What greedy_generate measured.

    Attributes:
        token_ids: per prompt, the generated token ids.
        seconds: wall time of the timed generation (the warm-up excluded).
        drafts: vLLM's spec-decode drafts (0 without speculation).
        draft_tokens: the tokens they proposed.
        accepted_tokens: those the target model accepted.
    """

    token_ids: list[list[int]]
    seconds: float
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per target pass, vLLM's definition: 1 + accepted tokens per draft (1.0
        without speculation)."""
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else 1.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens of every prompt per second."""
        return sum(map(len, self.token_ids)) / max(self.seconds, 1e-12)


class VllmEngine:
    """vLLM's offline engine for greedy decoding of token-id prompts (vLLM must be installed:
    `make vllm-env`): float32, eager, nothing fetched from the hub. The engine core runs in a
    process of its own, so the calling script needs an `if __name__ == "__main__":` guard. A
    context manager: the engine stops on exit.

    Args:
        model: the model's local directory (a Hugging Face checkpoint).
        engine: more arguments of vllm.LLM, e.g. llm_arguments(directory), or
            {"speculative_config": {"method": "ngram", ...}}; None: plain decoding.
        max_batch: the most prompts decoded at once (vLLM's max_num_seqs).
        kv_cache_gib: the CPU KV cache (VLLM_CPU_KVCACHE_SPACE).
        max_model_len: the longest prompt + generation.
    """

    def __init__(self, model: str | os.PathLike[str], engine: Optional[dict] = None, max_batch: int = 8,
                 kv_cache_gib: int = 2, max_model_len: int = 1024):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        from vllm import LLM

        self.max_batch = check_positive_int(max_batch, "max_batch")
        self.llm = LLM(model=str(model), dtype="float32", enforce_eager=True, max_model_len=max_model_len,
                       max_num_seqs=self.max_batch, disable_log_stats=False, seed=0, **(engine or {}))

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int, batch_size: Optional[int] = None) -> VllmRun:
        """Greedy continuations of `prompts`, `batch_size` at a time, each group after the last.

        Args:
            prompts: token id lists.
            max_tokens: new tokens per prompt (fewer where EOS comes first).
            batch_size: prompts per group, at most max_batch; None: max_batch.

        Returns:
            VllmRun: the outputs, the wall time and the spec-decode counters of this call.
        """
        from vllm import SamplingParams

        batch_size = min(batch_size or self.max_batch, self.max_batch)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        before = self._spec_counters()
        started = time.perf_counter()
        outputs = [output for first in range(0, len(prompts), batch_size)
                   for output in self.llm.generate([{"prompt_token_ids": list(prompt)}
                                                    for prompt in prompts[first:first + batch_size]],
                                                   params, use_tqdm=False)]
        seconds = time.perf_counter() - started
        after = self._spec_counters()
        return VllmRun([list(output.outputs[0].token_ids) for output in outputs], seconds,
                       *(after[name] - before[name] for name in _SPEC_COUNTERS))

    def _spec_counters(self) -> dict[str, int]:
        values = dict.fromkeys(_SPEC_COUNTERS, 0)
        for metric in self.llm.get_metrics():
            if metric.name in values:
                values[metric.name] += int(metric.value)
        return values

    def close(self) -> None:
        """Stops the engine."""
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()

    def __enter__(self) -> "VllmEngine":
        return self

    def __exit__(self, *exception) -> None:
        self.close()


def greedy_generate(model: str | os.PathLike[str], prompts: Sequence[Sequence[int]], max_tokens: int,
                    engine: Optional[dict] = None, batch_size: Optional[int] = None) -> VllmRun:
    """One VllmEngine's greedy continuations of `prompts`, after a warm-up over the first group.

    Args:
        model: as for VllmEngine.
        prompts: token id lists.
        max_tokens: new tokens per prompt.
        engine: as for VllmEngine.
        batch_size: prompts decoded at once; None: all.

    Returns:
        VllmRun of the pass after the warm-up.
    """
    batch_size = batch_size or len(prompts)
    with VllmEngine(model, engine, max_batch=batch_size) as runner:
        runner.generate(prompts[:batch_size], max_tokens)
        return runner.generate(prompts, max_tokens)


_SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                  "vllm:spec_decode_num_accepted_tokens")

