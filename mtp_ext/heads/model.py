"""MTP heads on a next-token backbone (the paper's Fig. 5).

N independent heads read the backbone's final hidden state (before its final norm), or, with
weighted hidden states (WHS), each its own softmax-normalised learned mix of every layer's
hidden state; each head's output goes through the backbone's final norm and the shared
unembedding. "medusa" heads are laid out as vLLM serves Medusa heads (mtp_ext.integrations.vllm):
the same residual block, applied to the final-normed state, whose output the unembedding reads
directly. Head j (0-based) predicts x_{t+j+2}: the backbone itself predicts x_{t+1}, so
three heads give steps 2, 3 and 4 (`MTPHeadsModel.steps`).

Hugging Face's `hidden_states` tuple ends with the final-normed state, not the last layer's
output. The pre-norm state is taken from a forward hook on the final norm, recorded by the
backbone's latest forward pass; `head_hidden` checks that the tuple it gets belongs to that pass.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from mtp_ext._checks import check_positive_int
from mtp_ext._io import UserError, unreadable
from mtp_ext.heads.checkpoint import DAMAGED, check_checkpoint_dir, read_config, read_safetensors, write_config, write_module, write_tensors
from mtp_ext.models.adapters import additive_mask, check_supported
from mtp_ext.models.introspection import decoder_layers, final_norm, model_fingerprint

__all__ = ["HEAD_TYPES", "MTPHeadsModel", "check_finite_lse", "check_heads_dir", "load_heads"]

HEAD_TYPES = ("resblock", "block", "medusa")
CONFIG_FILE = "heads_config.json"
HEADS_FILE = "heads.safetensors"
BACKBONE_FILE = "backbone.safetensors"
CONFIG_KEYS = ("num_heads", "head_type", "weighted_hidden_states", "freeze_backbone")
# Share of the initial WHS mix on the last layer: heads start near the NTP state yet every
# layer gets a gradient.
WHS_INITIAL_LAST_LAYER_SHARE = 0.9


class ResBlockHead(nn.Module):
    """Medusa's head, x + SiLU(Linear(x)); the linear starts at zero so that an untrained head
    passes the backbone's state through."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + nn.functional.silu(self.linear(hidden))


class DecoderBlockHead(nn.Module):
    """One decoder layer of the backbone's own class, initialised as a copy of its last layer,
    run causally over whole sequences (positions 0..T-1, no cache)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        base = backbone.base_model
        self.layer = copy.deepcopy(decoder_layers(backbone)[-1])
        config = backbone.config
        layer_types = getattr(config, "layer_types", None)
        self.layer_type = layer_types[-1] if layer_types else None
        self.sliding_window = int(config.sliding_window) if self.layer_type == "sliding_attention" else 0
        # Not a submodule: the rotary embedding belongs to (and is saved with) the backbone.
        self._rotary = (getattr(base, "rotary_emb", None),)

    def forward(self, hidden: Tensor) -> Tensor:
        length = hidden.shape[1]
        position_ids = torch.arange(length, device=hidden.device)[None]
        arguments = {"attention_mask": _causal_mask(length, self.sliding_window, hidden),
                     "position_ids": position_ids}
        rotary = self._rotary[0]
        if rotary is not None:
            extra = (self.layer_type,) if self.layer_type is not None else ()
            arguments["position_embeddings"] = rotary(hidden, position_ids, *extra)
        output = self.layer(hidden, **arguments)
        return output[0] if isinstance(output, tuple) else output


def _causal_mask(length: int, sliding_window: int, like: Tensor) -> Tensor:
    """Additive [1, 1, T, T] mask: each position sees itself and the earlier ones (within the
    window, if any)."""
    query = torch.arange(length, device=like.device)[:, None]
    key = torch.arange(length, device=like.device)[None, :]
    allowed = key <= query
    if sliding_window:
        allowed &= query - key < sliding_window
    return additive_mask(allowed[None, None], like.dtype)


class MTPHeadsModel(nn.Module):
    """A backbone with `num_heads` MTP heads sharing its final norm and unembedding.

    Args:
        backbone: a supported Hugging Face causal LM (no final logit soft-capping).
        num_heads: N; head j (0-based) predicts x_{t+j+2}.
        head_type: "resblock" (Medusa's x + SiLU(Linear(x)), zero-initialised, then the final
            norm), "block" (a copy of the backbone's last decoder layer, run over whole
            sequences without a cache, then the final norm) or "medusa" (the resblock on the
            final-normed state, no norm after: vLLM's Medusa layout, exportable to it).
        weighted_hidden_states: each head reads its own softmax-normalised mix of the
            embeddings and every layer's output instead of the last layer's output (not with
            "medusa": vLLM's heads read the final state only).
        freeze_backbone: False for joint training (backbone and unembedding get gradients).
    """

    def __init__(self, backbone: nn.Module, num_heads: int = 3, head_type: str = "resblock",
                 weighted_hidden_states: bool = False, freeze_backbone: bool = True):
        super().__init__()
        check_supported(backbone)
        num_heads = check_positive_int(num_heads, "num_heads")
        if head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {', '.join(HEAD_TYPES)}, got {head_type!r}")
        if getattr(backbone.config, "final_logit_softcapping", None):
            raise ValueError("backbones with final logit soft-capping are not supported by the MTP heads")
        if head_type == "medusa" and weighted_hidden_states:
            raise ValueError("medusa heads read the final hidden state only, as vLLM's Medusa does: "
                             "weighted hidden states do not apply to them")
        self.backbone = backbone
        self.num_heads = num_heads
        self.head_type = head_type
        self.weighted_hidden_states = weighted_hidden_states
        self.freeze_backbone = freeze_backbone
        self.source: str | None = None  # the checkpoint directory the heads were loaded from, for messages
        hidden_size = self.unembed_weight.shape[1]
        self.heads = nn.ModuleList(
            DecoderBlockHead(backbone) if head_type == "block" else ResBlockHead(hidden_size)
            for _ in range(num_heads)
        )
        self.heads.to(device=self.unembed_weight.device, dtype=self.unembed_weight.dtype)
        self.layer_logits = None
        if weighted_hidden_states:
            self.layer_logits = nn.Parameter(_initial_layer_logits(num_heads, backbone.config.num_hidden_layers + 1))
        self.backbone.requires_grad_(not freeze_backbone)
        self._recorded = None  # (input, output) of the final norm in the latest forward pass
        self._in_backbone_pass = False
        self.final_norm.register_forward_hook(self._record_final_norm)
        backbone.base_model.register_forward_pre_hook(lambda *_: self._mark_backbone_pass(True))
        backbone.base_model.register_forward_hook(lambda *_: self._mark_backbone_pass(False), always_call=True)

    @property
    def steps(self) -> list[int]:
        """The token each head predicts: head j gives x_{t + steps[j]}."""
        return list(range(2, self.num_heads + 2))

    @property
    def final_norm(self) -> nn.Module:
        """The backbone's final norm, shared by every head."""
        return final_norm(self.backbone)

    @property
    def unembed_weight(self) -> Tensor:
        """The backbone's output embedding weight [V, H], shared by every head."""
        return self.backbone.get_output_embeddings().weight

    def _record_final_norm(self, module, inputs, output) -> None:
        if self._in_backbone_pass:  # the heads' (and anyone's) own uses of the norm do not count
            self._recorded = (inputs[0], output)

    def _mark_backbone_pass(self, running: bool) -> None:
        self._in_backbone_pass = running

    def layer_weights(self) -> Tensor:
        """Each head's softmax-normalised weights over the embeddings and the layers [N, L + 1]."""
        if self.layer_logits is None:
            raise ValueError("this model reads the final hidden state only (weighted_hidden_states=False)")
        return torch.softmax(self.layer_logits.float(), dim=-1)

    @property
    def num_read_states(self) -> int:
        """S, the backbone states the heads read (states_for_heads): L + 1 with WHS, else 1."""
        return self.backbone.config.num_hidden_layers + 1 if self.layer_logits is not None else 1

    def states_for_heads(self, hidden_states: Sequence[Tensor], all_layers: bool | None = None) -> Tensor:
        """What the heads read of the backbone's latest forward pass: the last layer's output
        (before the final norm) and, with WHS, the embeddings and every earlier layer's output
        before it. A frozen backbone's states can be cached (mtp_ext.heads.features).

        Args:
            hidden_states: the L + 1 states [B, T, H] (embeddings and every layer) of the
                backbone's latest forward pass (output_hidden_states=True).
            all_layers: every state (S = L + 1) or the last only (S = 1); None: what these
                heads read.

        Returns:
            [S, B, T, H] (S = num_read_states unless all_layers says) of the backbone's dtype.
        """
        last = self._last_layer_output(hidden_states)
        if not (self.layer_logits is not None if all_layers is None else all_layers):
            return last[None]
        return torch.stack(list(hidden_states[:-1]) + [last])

    def heads_from_states(self, states: Tensor, which: Optional[Sequence[int]] = None) -> Tensor:
        """Every head's state that the unembedding reads (after the final norm; "medusa" heads
        norm first), from the states the heads read.

        Args:
            states: [S, ..., H], what states_for_heads returns (or a cache of it).
            which: only these heads, in this order; None: all.

        Returns:
            [N, ..., H] (N = len(which)) of the states' dtype.
        """
        if states.shape[0] != self.num_read_states:
            raise ValueError(f"these heads read {self.num_read_states} backbone state(s) per position, "
                             f"got {states.shape[0]}")
        which = list(range(self.num_heads)) if which is None else list(which)
        norm = self.final_norm
        if self.head_type == "medusa":
            normed = norm(states[0])
            return torch.stack([self.heads[head](normed) for head in which])
        if self.layer_logits is None:
            inputs = [states[0]] * len(which)
        else:
            weights = self.layer_weights()[which].to(states.dtype)
            inputs = list(torch.einsum("nl,l...->n...", weights, states))
        return torch.stack([norm(self.heads[head](state)) for head, state in zip(which, inputs)])

    def head_hidden(self, hidden_states: Sequence[Tensor], which: Optional[Sequence[int]] = None) -> Tensor:
        """Every head's state that the unembedding reads, from the backbone's latest forward pass.

        Feeding element j through the unembedding gives head j's logits for x_{t+j+2}. "block"
        heads attend over the tokens of this pass only, so they need a pass over whole
        sequences (no KV cache).

        Args:
            hidden_states: the L + 1 states [B, T, H] (embeddings and every layer) of the
                backbone's latest forward pass (output_hidden_states=True).
            which: only these heads, in this order; None: all.

        Returns:
            [N, B, T, H] (N = len(which)) of the backbone's dtype.
        """
        return self.heads_from_states(self.states_for_heads(hidden_states), which)

    def _last_layer_output(self, hidden_states: Sequence[Tensor]) -> Tensor:
        expected = self.backbone.config.num_hidden_layers + 1
        if len(hidden_states) != expected:
            raise ValueError(f"expected the backbone's {expected} hidden states (embeddings and every layer), "
                             f"got {len(hidden_states)}")
        recorded = self._recorded
        final = hidden_states[-1]
        if recorded is None or recorded[1].data_ptr() != final.data_ptr() or recorded[1].numel() != final.numel():
            raise ValueError("head_hidden needs the hidden_states of the backbone's latest forward pass "
                             "(the final norm's input is recorded there)")
        return recorded[0].reshape(final.shape)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The backbone's and the heads' states; with a frozen backbone the backbone runs
        without gradients.

        Args:
            input_ids: [B, T] int64.
            attention_mask: [B, T], or None.

        Returns:
            (final-normed backbone states [B, T, H], head states [N, B, T, H]).
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            outputs = self.backbone.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                               output_hidden_states=True)
        return outputs.hidden_states[-1], self.head_hidden(outputs.hidden_states)

    def trainable_state(self) -> dict[str, Tensor]:
        """The heads' and the WHS weights' tensors (what a frozen-backbone checkpoint holds)."""
        return {name: value for name, value in self.state_dict().items() if not name.startswith("backbone.")}

    def config_dict(self) -> dict:
        """The constructor's arguments and the backbone's model_fingerprint, as saved."""
        return {"num_heads": self.num_heads, "head_type": self.head_type,
                "weighted_hidden_states": self.weighted_hidden_states, "freeze_backbone": self.freeze_backbone,
                "model": model_fingerprint(self.backbone)}

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Writes the heads (and WHS weights; and the backbone too when it is trained jointly)
        as safetensors, with a config naming the backbone. Each file is replaced atomically.

        Args:
            directory: the checkpoint directory (created if need be).
        """
        directory = Path(directory)
        write_tensors(directory / HEADS_FILE, self.trainable_state())
        if not self.freeze_backbone:
            write_module(directory / BACKBONE_FILE, self.backbone)
        write_config(directory / CONFIG_FILE, self.config_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike[str], backbone: nn.Module) -> "MTPHeadsModel":
        """The heads saved in `directory`, on `backbone`.

        Args:
            directory: a checkpoint written by save.
            backbone: the model they were trained on (a UserError otherwise); a joint
                checkpoint also loads its backbone weights into it.

        Returns:
            MTPHeadsModel, its `source` the directory.
        """
        from safetensors.torch import load_file, load_model

        directory = Path(directory)
        config = read_config(directory / CONFIG_FILE, "MTP heads checkpoint", CONFIG_KEYS, backbone)
        model = cls(backbone, config["num_heads"], config["head_type"], config["weighted_hidden_states"],
                    config["freeze_backbone"])
        model.source = str(directory)
        device = str(model.unembed_weight.device)
        if not model.freeze_backbone:
            read_safetensors(directory / BACKBONE_FILE, "the jointly trained backbone",
                             lambda path: load_model(backbone, path, device=device))
        tensors = read_safetensors(directory / HEADS_FILE, "the heads' weights",
                                   lambda path: load_file(path, device=device))
        try:
            missing, unexpected = model.load_state_dict(tensors, strict=False)
        except RuntimeError as error:  # tensors of the wrong shape
            raise unreadable(directory / HEADS_FILE, "the heads' weights", error, DAMAGED) from error
        missing = [name for name in missing if not name.startswith("backbone.")]
        if missing or unexpected:
            raise UserError(f"{directory / HEADS_FILE} does not match its config: missing {missing}, "
                            f"unexpected {unexpected}")
        return model


def check_finite_lse(lse: Tensor, source: str | None) -> None:
    """Raises a UserError when a log-sum-exp of the heads (or the backbone) is NaN or infinite:
    every probability computed from it would be NaN, silently.

    Args:
        lse: any shape, floating (UnembedTopk.lse).
        source: the checkpoint directory, for the message, or None.
    """
    if not bool(torch.isfinite(lse).all()):
        where = f"the checkpoint {source}" if source else "the heads"
        raise UserError(f"the heads produce NaN logits: {where} or the model holds NaN/inf weights")


def check_heads_dir(directory: str | os.PathLike[str], label: str) -> None:
    """Raises a MissingFileError unless `directory` holds an MTP heads checkpoint.

    Args:
        directory: the checkpoint directory.
        label: how the user gave it, for the message (e.g. "--heads-dir").
    """
    check_checkpoint_dir(Path(directory), CONFIG_FILE, "MTP heads checkpoint (mtp-ext train-heads)", label)


def load_heads(directory: str | os.PathLike[str], backbone: nn.Module) -> MTPHeadsModel:
    """MTPHeadsModel.load: the heads saved in `directory`, on `backbone`.

    Args:
        directory: a checkpoint written by MTPHeadsModel.save.
        backbone: the model they were trained on.

    Returns:
        MTPHeadsModel.
    """
    return MTPHeadsModel.load(directory, backbone)


def _initial_layer_logits(num_heads: int, num_states: int) -> Tensor:
    others = (1.0 - WHS_INITIAL_LAST_LAYER_SHARE) / max(num_states - 1, 1)
    logits = torch.full((num_heads, num_states), float(torch.tensor(others).log()))
    logits[:, -1] = float(torch.tensor(WHS_INITIAL_LAST_LAYER_SHARE).log())
    return logits
