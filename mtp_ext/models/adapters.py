"""What mtp_ext needs from a Hugging Face causal LM, in one place, for every supported
architecture and for the transformers versions in use (5.17 on the GPU machine, 5.24 here).

A packed pass runs the base model over extra tokens that reuse the KV cache of a prefix, with
an explicit 4-D mask and position ids; the cache is trimmed back afterwards.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator, Optional, Union

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from mtp_ext._checks import check_positive_int
from mtp_ext.models import linear_choice
from mtp_ext.ops import linear_over_rows


__all__ = ["PackedMask", "SMALL_BATCH_ROWS", "SUPPORTED_ARCHITECTURES", "CausalLMAdapter", "UnsupportedModelError",
           "additive_mask", "check_inputs", "check_supported", "few_rows_linear", "last_real_positions",
           "prefix_position_ids", "small_batch_linears"]

# model_type -> the name people know it by
SUPPORTED_ARCHITECTURES = {
    "llama": "Llama (SmolLM2)",
    "gemma3_text": "Gemma 3",
    "gpt2": "GPT-2",
    "gpt_neox": "GPT-NeoX (Pythia)",
}

PackedMask = Union[Tensor, dict]


class UnsupportedModelError(ValueError):
    pass


def check_supported(model: PreTrainedModel) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(f"{key} ({name})" for key, name in SUPPORTED_ARCHITECTURES.items())
        raise UnsupportedModelError(
            f"model architecture {model_type!r} ({type(model).__name__}) is not supported; "
            f"supported: {supported}"
        )


class CausalLMAdapter:
    """Runs a supported HF causal LM the way marginalisation needs it."""

    def __init__(self, model: PreTrainedModel):
        check_supported(model)
        self.model = model
        self.config = model.config
        self.base_model = model.base_model
        self.lm_head = model.get_output_embeddings()
        parameters = inspect.signature(self.base_model.forward).parameters
        # transformers renamed past_key_values to cache; the GPU machine has the old name.
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        layer_types = getattr(self.config, "layer_types", None) or []
        self.sliding_window = (
            int(self.config.sliding_window) if "sliding_attention" in layer_types else 0
        )

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def context_length(self) -> int:
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(self.config, name, None)
            if value:
                return int(value)
        raise ValueError(f"cannot tell the context length of {type(self.model).__name__}")

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self) -> DynamicCache:
        # No config: every layer keeps every token. A config would make Gemma 3's sliding
        # layers evict tokens that packed passes still index.
        return DynamicCache()

    def hidden_states(self, input_ids: Tensor, attention_mask: PackedMask, position_ids: Tensor,
                      cache: DynamicCache, every_layer: bool = False) -> Union[Tensor, tuple[Tensor, ...]]:
        """Final-norm hidden states [B, n, H] of input_ids after the cache's tokens; the cache
        grows by n tokens. With `every_layer`, the model's own tuple of hidden states instead
        (embeddings first, the final-norm states last, as output_hidden_states gives them)."""
        outputs = self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            output_hidden_states=every_layer,
            **{self.cache_argument: cache},
        )
        return outputs.hidden_states if every_layer else outputs.last_hidden_state

    def logits(self, hidden: Tensor) -> Tensor:
        """float32 next-token logits for hidden states [..., H]."""
        logits = self.lm_head(hidden).float()
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def packed_mask(self, allowed: dict[int, Tensor]) -> PackedMask:
        """The model's attention mask from boolean masks [B, 1, n, K] keyed by sliding window
        (0: none): additive in the model's dtype, and one per layer type for models with
        sliding layers."""
        full = additive_mask(allowed[0], self.dtype)
        if not self.sliding_window:
            return full
        return {"full_attention": full,
                "sliding_attention": additive_mask(allowed[self.sliding_window], self.dtype)}

    def mask_windows(self) -> list[int]:
        """The sliding windows (0: none) for which packed_mask wants a boolean mask."""
        return [0, self.sliding_window] if self.sliding_window else [0]

    @staticmethod
    def trim_cache(cache: DynamicCache, length: int) -> None:
        """Drop the tokens after the first `length` (a negative count works in every version)."""
        extra = cache.get_seq_length() - length
        if extra > 0:
            cache.crop(-extra)

    @staticmethod
    def keep_cache_slots(cache: DynamicCache, length: int, slots: Tensor) -> None:
        """Keep the first `length` tokens and, after them, the tokens at `slots` [B, L]
        (indices counted from `length`, per row); drop the rest."""
        # The kept entries are written over the first slots after `length` and the rest cut
        # off, in place: the cache's tensors are its own (each update concatenates anew), and a
        # copy of the whole cache per step would cost more than the gather.
        kept = length + slots.shape[1]
        if bool((slots == torch.arange(slots.shape[1], device=slots.device)).all()):
            # Every row kept the pass's first tokens (a chain accepted so far): the gather would
            # write each entry over itself, so cutting the rest off is all there is to do.
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, :kept], layer.values[:, :, :kept]
            return
        for layer in cache.layers:
            index = slots[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            for name in ("keys", "values"):
                states = getattr(layer, name)
                states[:, :, length:kept] = states[:, :, length:].gather(2, index)
                setattr(layer, name, states[:, :, :kept])


# Rows up to which small_batch_linear may serve a layer (where it is measured faster: linear_choice):
# a batch of 8 rows verifying chains of 2 holds 24 tokens, where the kernel still beat MKL on the
# project's CPU (bench/README.md, small_batch_linear); far above, MKL's GEMM reuses each weight
# tile across enough rows.
SMALL_BATCH_ROWS = 32


@contextlib.contextmanager
def small_batch_linears(model: torch.nn.Module, max_rows: int = SMALL_BATCH_ROWS) -> Iterator[None]:
    """Within the block, the model's nn.Linear layers run through mtp_ext.small_batch_linear
    when they get at most `max_rows` rows of float32 on the CPU without autograd (a draft tree's
    verification pass, the walk's logits) and the kernel is the faster for that shape and row
    count on this machine (measured once: mtp_ext.models.linear_choice); everything else runs
    as before. The layers are
    restored on exit; their parameters are read as the block starts (replace none inside it).
    Results equal F.linear's up to float rounding (another summation order)."""
    linears = [module for module in model.modules() if type(module) is torch.nn.Linear
               and "forward" not in vars(module)]
    for module in linears:
        module.forward = _small_batch_forward(module.weight, module.bias, max_rows)
    try:
        yield
    finally:
        for module in linears:
            del module.forward


def _small_batch_forward(weight: Tensor, bias: Optional[Tensor], max_rows: int) -> Callable[[Tensor], Tensor]:
    """A layer's forward within small_batch_linears. Called for every linear layer of every pass,
    so what depends on the layer alone (its parameters, their dtype and device, the measured
    choice for its shape) is settled here once, not on each call."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return lambda input: torch.nn.functional.linear(input, weight, bias)
    in_features = weight.shape[1]
    kernel_faster = linear_choice.chooser(weight.shape[0], in_features)

    def forward(input: Tensor) -> Tensor:
        if input.dtype == torch.float32 and in_features > 0 and not torch.is_grad_enabled():
            rows = input.numel() // in_features
            if 0 < rows <= max_rows and kernel_faster(rows):
                with torch._C._AutoDispatchBelowAutograd():
                    return linear_over_rows(input, weight, bias)
        return torch.nn.functional.linear(input, weight, bias)

    return forward


def few_rows_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                    max_rows: int = SMALL_BATCH_ROWS) -> Tensor:
    """F.linear, through mtp_ext.small_batch_linear where that is faster: at most `max_rows`
    rows of float32 on the CPU, without autograd (whose Python layer the op then skips), for a
    shape and row count at which the kernel was measured faster on this machine
    (mtp_ext.models.linear_choice).

    Args:
        input: [..., K].
        weight: [N, K].
        bias: [N] or None.
        max_rows: the most rows routed to the kernel.

    Returns:
        [..., N], F.linear's result up to float rounding.
    """
    if (input.dtype == torch.float32 and weight.dtype == torch.float32 and input.device.type == "cpu"
            and weight.device.type == "cpu" and not torch.is_grad_enabled() and input.shape[-1] > 0):
        rows = input.numel() // input.shape[-1]
        if 0 < rows <= max_rows and linear_choice.kernel_is_faster(weight.shape[0], weight.shape[1], rows):
            with torch._C._AutoDispatchBelowAutograd():
                return linear_over_rows(input, weight, bias)
    return torch.nn.functional.linear(input, weight, bias)


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = may attend) as the additive mask HF models take: 0 where allowed,
    the dtype's lowest number elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def prefix_position_ids(attention_mask: Tensor) -> Tensor:
    """Position ids for a left- or right-padded batch: real tokens count from 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_real_positions(attention_mask: Tensor) -> Tensor:
    """[B] int64: the index of each row's last real token, whichever side the padding is on."""
    return attention_mask.shape[1] - 1 - attention_mask.flip(1).long().argmax(1)


def check_inputs(adapter: CausalLMAdapter, input_ids: Tensor, attention_mask: Optional[Tensor], steps: int) -> Tensor:
    """The attention mask to use (all ones when None), after checking a request to predict
    `steps` tokens after input_ids [B, T] (each row needs a real token, and room in the context)."""
    steps = check_positive_int(steps, "steps")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                         f"{tuple(input_ids.shape)}")
    if not bool((attention_mask.sum(1) > 0).all()):
        raise ValueError("every row needs at least one real token (an attention_mask row is all 0)")
    # The deepest tree tokens sit steps - 1 positions after the prefix.
    needed = int(attention_mask.sum(1).max()) + steps - 1
    if needed > adapter.context_length:
        raise ValueError(f"input of {needed - steps + 1} tokens plus {steps - 1} predicted ones exceeds the "
                         f"model's context of {adapter.context_length}")
    return attention_mask
