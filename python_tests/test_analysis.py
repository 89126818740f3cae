"""The paper's diagnostics (logit lens, entropy, nucleus sizes) and the report, on tiny models."""
import argparse
import json

import pytest
import torch

from mtp_ext import reference
from mtp_ext.analysis import analyze
from mtp_ext.cli.analyze import plot_analysis
from mtp_ext.cli.report import report_table
from mtp_ext.cli.report import run as run_report

from tiny_models import ARCHITECTURES, tiny_model

VOCAB = 29
SEQUENCES = [[1, 5, 2, 8, 3, 9, 4], [7, 7, 1, 2]]


def model_logits(model, sequence):
    with torch.no_grad():
        return model(torch.tensor([sequence])).logits[0].float()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_logit_lens_kl_vanishes_at_the_last_layer(architecture):
    model = tiny_model(architecture, VOCAB)
    result = analyze(model, SEQUENCES, progress=False)
    assert result.layers == model.config.num_hidden_layers
    assert len(result.kl_per_layer) == result.layers
    assert result.kl_per_layer[-1] == pytest.approx(0.0, abs=1e-6)
    assert all(kl >= -1e-6 for kl in result.kl_per_layer)
    assert result.kl_per_layer[0] > 1e-5  # the first layer is not the output


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_entropy_and_nucleus_sizes_match_direct_computation(architecture):
    model = tiny_model(architecture, VOCAB, seed=3)
    result = analyze(model, SEQUENCES, top_ps=(0.99, 0.9, 0.5), progress=False)
    assert result.positions == sum(map(len, SEQUENCES))
    entropies, sizes = [], {p: [] for p in (0.99, 0.9, 0.5)}
    for sequence in SEQUENCES:
        logits = model_logits(model, sequence)
        log_probs = torch.log_softmax(logits, -1)
        entropies.append(-(log_probs.exp() * log_probs).sum(-1))
        for p in sizes:
            sizes[p] += reference.nucleus_in_order(logits, p)[-1].tolist()
    torch.testing.assert_close(torch.tensor(result.first_entropy, dtype=torch.float64), entropies[0].double(),
                               atol=1e-5, rtol=1e-5)
    assert result.entropy_sum == pytest.approx(float(torch.cat(entropies).sum()), rel=1e-5)
    for p, values in sizes.items():
        assert result.nucleus_size_histogram[str(p)] == [[size, values.count(size)] for size in sorted(set(values))], p
    mean_sizes = result.summary()["mean_nucleus_size"]
    assert mean_sizes["0.99"] >= mean_sizes["0.9"] >= mean_sizes["0.5"] >= 1
    assert mean_sizes["0.9"] == pytest.approx(sum(sizes[0.9]) / len(sizes[0.9]))


def test_plots_are_written(tmp_path):
    result = analyze(tiny_model("llama", VOCAB), SEQUENCES, progress=False)
    report = {"model": "tiny", "data": "numbers", "task": "open-ended", **result.to_dict()}
    plot_analysis(report, tmp_path)
    for name in ("logit_lens_kl.png", "entropy.png", "nucleus_sizes.png"):
        assert (tmp_path / name).stat().st_size > 1000, name


def fake_evaluation(model, data, top5):
    step = lambda number, value: {  # noqa: E731
        "step": number, "positions": 100, "accuracy": {"top1": value / 2, "top5": value},
        "accuracy_lower": {"top1": value / 3, "top5": value - 0.1},
        "accuracy_upper": {"top1": value, "top5": value + 0.1}, "captured_mass": 0.875,
    }
    return {"model": model, "data": data, "task": "open-ended", "steps": [step(1, top5), step(2, top5 / 2)]}


def test_report_holds_the_numbers_of_its_inputs(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    (first / "eval.json").write_text(json.dumps(fake_evaluation("m1", "austen", 0.642)))
    (second / "eval.json").write_text(json.dumps(fake_evaluation("m2", "bible", 0.816)))
    (first / "analysis.json").write_text(json.dumps(
        {"model": "m1", "data": "austen", "summary": {"positions": 100, "mean_entropy": 2.345,
                                                      "mean_nucleus_size": {"0.99": 57.25, "0.9": 12.5},
                                                      "kl_per_layer": [1.0, 0.0]}}))
    table = run_report(argparse.Namespace(dirs=[first, second], out=tmp_path / "report"))
    assert "| m1 | austen | open-ended | 1 | 100 | 0.321 | 0.642 (0.542-0.742) | 0.875 | 57.2 | 12.5 | 2.345 |" in table
    assert "| m2 | bible | open-ended | 2 | 100 | 0.204 | 0.408 (0.308-0.508) | 0.875 | - | - | - |" in table
    assert (tmp_path / "report" / "report.md").read_text().strip() == table
    assert (tmp_path / "report" / "fig1.png").stat().st_size > 1000


def test_report_table_lists_analyses_without_evaluation():
    table = report_table([], {("m", "d"): {"positions": 9, "mean_entropy": 1.0,
                                            "mean_nucleus_size": {"0.99": 3.0, "0.9": 2.0}}})
    assert "| m | d | - | - | 9 | - | - | - | 3.0 | 2.0 | 1.000 |" in table


def test_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        analyze(tiny_model("gpt2", VOCAB), [], progress=False)
    with pytest.raises(ValueError, match="top_p"):
        analyze(tiny_model("gpt2", VOCAB), SEQUENCES, top_ps=(1.5,), progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot create the output directory"):
        run_report(argparse.Namespace(dirs=[tmp_path], out=blocker / "sub"))
    with pytest.raises(ValueError, match="none of the directories"):
        run_report(argparse.Namespace(dirs=[tmp_path], out=tmp_path / "out"))
