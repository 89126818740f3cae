"""`mtp-ext export-heads --format vllm-medusa` without vLLM: the files and names vLLM's Medusa
reads, the speculative_config, and heads vLLM cannot express refused in one line (the loading
by vLLM itself: test_vllm.py, under make test-vllm)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from mtp_ext.cli import main
from mtp_ext.heads import MTPHeadsModel
from mtp_ext.integrations.vllm import CONFIG_FILE, WEIGHTS_FILE, llm_arguments, speculative_config
from mtp_ext.models import load_model

from tiny_models import tiny_model


def saved_heads(directory, backbone, **options):
    heads = MTPHeadsModel(backbone, num_heads=2, **options)
    with torch.no_grad():
        for parameter in heads.heads.parameters():
            parameter.normal_(0.0, 0.3)
    heads.save(directory)
    return heads


def error_line(capsys) -> str:
    """The command's one line about the error (progress bars of model loading may precede it)."""
    lines = capsys.readouterr().err.strip().split("\n")
    assert lines[-1].startswith("error: ") and not any(line.startswith("error") for line in lines[:-1])
    return lines[-1]


def export(heads_dir, out, model, *extra) -> int:
    return main(["export-heads", str(heads_dir), "--format", "vllm-medusa", "--out", str(out), "--model", str(model),
                 *extra])


@pytest.mark.parametrize("draft_vocab", [None, 5])
def test_export_writes_vllm_medusa_names_and_config(tmp_path, tiny_checkpoint, capsys, draft_vocab):
    model_dir, text = tiny_checkpoint
    backbone = load_model(str(model_dir))[0]
    heads = saved_heads(tmp_path / "heads", backbone, head_type="medusa")
    out = tmp_path / "vllm"
    extra = ["--draft-vocab", str(draft_vocab), "--data", str(text)] if draft_vocab else []
    assert export(tmp_path / "heads", out, model_dir, *extra) == 0
    config = json.loads((out / CONFIG_FILE).read_text())
    vocab_size, hidden_size = heads.unembed_weight.shape
    assert {key: config[key] for key in ("model_type", "num_heads", "num_hidden_layers", "hidden_size", "vocab_size",
                                         "original_lm_head", "medusa_fc_bias", "truncated_vocab_size")} == {
        "model_type": "medusa", "num_heads": 2, "num_hidden_layers": 1, "hidden_size": hidden_size,
        "vocab_size": vocab_size, "original_lm_head": True, "medusa_fc_bias": True,
        "truncated_vocab_size": draft_vocab or vocab_size}
    tensors = load_file(out / WEIGHTS_FILE)
    for index, head in enumerate(heads.heads):
        assert torch.equal(tensors[f"blocks.{index}.layers.0.weight"], head.linear.weight)
        assert torch.equal(tensors[f"blocks.{index}.layers.0.bias"], head.linear.bias)
    if draft_vocab:
        token_map = tensors["token_map"]
        assert token_map.shape == (draft_vocab,) and token_map.unique().numel() == draft_vocab
        assert torch.equal(tensors["lm_heads.0.weight"], heads.unembed_weight[token_map])
    else:
        assert "token_map" not in tensors and torch.equal(tensors["lm_heads.0.weight"], heads.unembed_weight)
    printed = capsys.readouterr().out.splitlines()[-1]
    assert json.loads(printed) == llm_arguments(out)
    assert llm_arguments(out)["speculative_config"] == speculative_config(out) == {
        "method": "medusa", "model": str(out.resolve()), "num_speculative_tokens": 2}
    # vLLM 0.32's loader needs its strict check off for a token map (llm_arguments' docstring)
    assert ("model_loader_extra_config" in llm_arguments(out)) == bool(draft_vocab)


@pytest.mark.parametrize("options,reason", [
    ({"head_type": "resblock", "weighted_hidden_states": True}, "(WHS)"),
    ({"head_type": "medusa", "freeze_backbone": False}, "trained jointly"),
    ({"head_type": "block"}, "decoder layers"),
    ({"head_type": "resblock"}, "train with --head-type medusa"),
])
def test_heads_vllm_cannot_express_are_refused_in_one_line(tmp_path, tiny_checkpoint, capsys, options, reason):
    model_dir, _ = tiny_checkpoint
    saved_heads(tmp_path / "heads", load_model(str(model_dir))[0], **options)
    assert export(tmp_path / "heads", tmp_path / "out", model_dir) == 2
    error = error_line(capsys)
    assert error.startswith("error: cannot export the heads in") and reason in error
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_missing_directory_and_another_backbone_are_refused_in_one_line(tmp_path, tiny_checkpoint, capsys):
    model_dir, _ = tiny_checkpoint
    assert export(tmp_path / "none", tmp_path / "out", model_dir) == 2
    error = error_line(capsys)
    assert "holds no MTP heads checkpoint" in error and "no such directory" in error
    saved_heads(tmp_path / "other", tiny_model("gpt_neox"), head_type="medusa")
    assert export(tmp_path / "other", tmp_path / "out", model_dir) == 2
    assert "belongs to another model" in error_line(capsys)
    assert not (tmp_path / "out" / CONFIG_FILE).exists()


def test_speculative_config_checks_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no vLLM Medusa export"):
        speculative_config(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model_type": "llama", "num_heads": 2}))
    with pytest.raises(ValueError, match="not a Medusa config"):
        speculative_config(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model_type": "medusa", "num_heads": 2}))
    assert speculative_config(tmp_path, 1)["num_speculative_tokens"] == 1
    with pytest.raises(ValueError, match="has 2 heads"):
        speculative_config(tmp_path, 3)
