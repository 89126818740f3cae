"""Heads trained on cached backbone states (mtp_ext.heads.features): the cache holds exactly the
states the heads read, resumes when cut short and refuses what is not its own; training on it
equals training on the live backbone; epochs, shuffling, the learning-rate schedule and the
held-out curve; the CLI."""
import json
import math

import numpy as np
import pytest
import torch

from mtp_ext.cli import main
from mtp_ext.heads import MTPHeadsModel
from mtp_ext.heads import features as heads_features
from mtp_ext.heads.features import FeatureCache, cache_features
from mtp_ext.heads.training import (
    FINAL_LR_SHARE,
    TrainingSettings,
    evaluate_heads,
    learning_rate_factor,
    train_heads,
    window_rows,
)

from tiny_models import ARCHITECTURES, tiny_model

VOCAB = 23
LENGTH = 9


def windows(count: int, seed: int = 9) -> list[list[int]]:
    return torch.randint(0, VOCAB, (count, LENGTH), generator=torch.Generator().manual_seed(seed)).tolist()


def heads_on(backbone, whs: bool) -> MTPHeadsModel:
    torch.manual_seed(0)
    model = MTPHeadsModel(backbone, num_heads=2, weighted_hidden_states=whs)
    with torch.no_grad():  # trained-like heads: the zero-initialised ones would hide a wrong state
        for head in model.heads:
            for parameter in head.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape))
    return model


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("whs", [False, True])
def test_the_cache_holds_the_states_the_heads_read(tmp_path, architecture, whs):
    model = heads_on(tiny_model(architecture, VOCAB), whs)
    data = windows(5)
    cache = cache_features(model, data, tmp_path / "cache", dtype="float32", batch_size=2, progress=False)
    assert cache.complete and len(cache) == 5 and cache.num_states == model.num_read_states
    input_ids = torch.tensor(data)
    with torch.no_grad():
        final, heads = model(input_ids)
        states, tokens = cache.read(range(5), model.num_read_states)
        assert torch.equal(tokens, input_ids)
        # within float32 rounding: the live pass here batches 5 windows, the cache's 2
        torch.testing.assert_close(model.heads_from_states(states), heads, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.final_norm(states[-1]), final, rtol=1e-5, atol=1e-6)
    rounded = cache_features(model, data, tmp_path / "bf16", batch_size=3, progress=False)
    assert rounded.dtype == torch.bfloat16
    torch.testing.assert_close(rounded.read([4, 0], model.num_read_states)[0], states[:, [4, 0]].bfloat16().float(),
                               rtol=0, atol=0)


def test_a_cache_cut_short_is_completed_on_the_next_run(tmp_path, monkeypatch):
    model = heads_on(tiny_model("llama", VOCAB), whs=True)
    data = windows(7)
    straight = cache_features(model, data, tmp_path / "straight", dtype="float32", batch_size=2, progress=False)
    real_write, writes = heads_features._write_meta, []

    def stop_after_two_batches(*args):
        if len(writes) == 3:  # the creation, then two batches
            raise KeyboardInterrupt
        writes.append(1)
        real_write(*args)

    monkeypatch.setattr(heads_features, "_write_meta", stop_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        cache_features(model, data, tmp_path / "resumed", dtype="float32", batch_size=2, progress=False)
    monkeypatch.setattr(heads_features, "_write_meta", real_write)
    meta = json.loads((tmp_path / "resumed" / "features.json").read_text())
    assert meta["done"] == 4  # the third batch's states were written but not counted
    calls = []
    monkeypatch.setattr(model.backbone.base_model, "forward", counting(model.backbone.base_model.forward, calls))
    resumed = cache_features(model, data, tmp_path / "resumed", dtype="float32", batch_size=2, progress=False)
    assert len(calls) == 2  # windows 4-5 and 6: only what was not counted
    assert np.array_equal(np.asarray(resumed.states), np.asarray(straight.states))
    cache_features(model, data, tmp_path / "resumed", dtype="float32", batch_size=2, progress=False)
    assert len(calls) == 2  # a complete cache is opened, not rebuilt


def counting(function, calls: list):
    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)
    return counted


def test_the_cache_refuses_what_is_not_its_own(tmp_path):
    model = heads_on(tiny_model("llama", VOCAB), whs=False)
    cache_features(model, windows(3), tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match="holds other windows"):
        cache_features(model, windows(3, seed=1), tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match="keeps 1 state.*read 3"):  # the tiny models have 2 layers
        cache_features(heads_on(model.backbone, whs=True), windows(3), tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match="belongs to another model"):
        cache_features(heads_on(tiny_model("gpt2", VOCAB + 1), whs=False), windows(3), tmp_path / "cache",
                       progress=False)
    with pytest.raises(ValueError, match="frozen backbone"):
        cache_features(MTPHeadsModel(model.backbone, freeze_backbone=False), windows(3), tmp_path / "j")
    with pytest.raises(ValueError, match="dtype"):
        cache_features(model, windows(3), tmp_path / "d", dtype="float16")
    (tmp_path / "cache" / "states.bin").write_bytes(b"\0" * 10)  # truncated
    with pytest.raises(ValueError, match="damaged"):
        cache_features(model, windows(3), tmp_path / "cache", progress=False)
    (tmp_path / "cache" / "features.json").write_text("{")
    with pytest.raises(ValueError, match="features.json"):
        cache_features(model, windows(3), tmp_path / "cache", progress=False)


def test_a_cache_of_every_layer_serves_heads_of_the_last_one(tmp_path):
    backbone = tiny_model("llama", VOCAB)
    cache = cache_features(heads_on(backbone, whs=True), windows(4), tmp_path / "all", dtype="float32",
                           progress=False)
    frozen = heads_on(backbone, whs=False)
    assert cache_features(frozen, windows(4), tmp_path / "all", progress=False).num_states == cache.num_states
    live = evaluate_heads(frozen, windows(4), progress=False)
    assert evaluate_heads(frozen, cache, progress=False) == live


@pytest.mark.parametrize("whs", [False, True])
@pytest.mark.parametrize("targets", ["text", "model"])
def test_training_on_the_cache_equals_training_on_the_backbone(tmp_path, whs, targets):
    settings = TrainingSettings(steps=6, seq_len=LENGTH, batch_size=2, lr=1e-2, checkpoint_every=4, shuffle=True,
                                lr_schedule="cosine", warmup_steps=2, targets=targets)
    data = windows(5)
    live = heads_on(tiny_model("llama", VOCAB), whs)
    live_record = train_heads(live, data, settings, tmp_path / "live", progress=False)
    cached = heads_on(tiny_model("llama", VOCAB), whs)
    cache = cache_features(cached, data, tmp_path / "cache", dtype="float32", progress=False)
    cached_record = train_heads(cached, cache, settings, tmp_path / "cached", progress=False)
    assert cached_record["losses"] == pytest.approx(live_record["losses"], rel=1e-5)
    assert cached_record["epochs"] == pytest.approx(12 / 5) and cached_record["distinct_windows"] == 5
    for (name, got), want in zip(cached.trainable_state().items(), live.trainable_state().values()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_windows_are_visited_in_epochs_shuffled_by_epoch():
    count, batch = 7, 3
    order = [row for step in range(14) for row in window_rows(step, batch, count, shuffle=True)]
    epochs = [order[first:first + count] for first in range(0, 42, count)]
    assert all(sorted(epoch) == list(range(count)) for epoch in epochs)  # every window once per epoch
    assert len({tuple(epoch) for epoch in epochs}) > 1  # each epoch its own order
    assert window_rows(5, batch, count, shuffle=True) == order[15:18]  # a function of the step
    assert [window_rows(step, batch, count, False) for step in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 0, 1]]


def test_the_learning_rate_warms_up_then_decays_to_its_final_share():
    settings = TrainingSettings(steps=12, lr_schedule="cosine", warmup_steps=4)
    factors = [learning_rate_factor(step, settings) for step in range(12)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(later < earlier for earlier, later in zip(factors[4:], factors[5:]))
    assert learning_rate_factor(12, settings) == pytest.approx(FINAL_LR_SHARE)
    assert learning_rate_factor(8, settings) == pytest.approx(FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * 0.5)
    assert learning_rate_factor(3, TrainingSettings(steps=12)) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainingSettings(steps=1, lr_schedule="linear").check()


def test_the_scheduled_learning_rate_reaches_the_optimizer(tmp_path, monkeypatch):
    settings = TrainingSettings(steps=4, seq_len=LENGTH, lr=1e-2, whs_lr=0.5, lr_schedule="cosine", warmup_steps=2)
    seen = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append([group["lr"] for group in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train_heads(heads_on(tiny_model("llama", VOCAB), whs=True), windows(3), settings, tmp_path, progress=False)
    want = [[1e-2 * learning_rate_factor(step, settings), 0.5 * learning_rate_factor(step, settings)]
            for step in range(4)]
    assert np.allclose(seen, want, rtol=1e-12)


def test_the_held_out_curve_is_taken_every_few_steps_and_survives_a_resume(tmp_path):
    backbone = tiny_model("llama", VOCAB)
    held_out = windows(2, seed=3)
    calls = []

    def scores(model):
        calls.append(1)
        return evaluate_heads(model, held_out, progress=False)

    settings = TrainingSettings(steps=7, seq_len=LENGTH, lr=1e-2, eval_every=3)
    record = train_heads(heads_on(backbone, whs=False), windows(3), settings, tmp_path / "a", progress=False,
                         held_out=scores)
    assert [point["step"] for point in record["curve"]] == [0, 3, 6, 7] and len(calls) == 4
    assert [row["step"] for row in record["curve"][-1]["held_out"]] == [1, 2, 3]
    assert record["curve"][-1]["held_out"][1]["loss"] < record["curve"][0]["held_out"][1]["loss"]
    resumed_settings = TrainingSettings(steps=4, seq_len=LENGTH, lr=1e-2, eval_every=3)
    train_heads(heads_on(backbone, whs=False), windows(3), resumed_settings, tmp_path / "b", progress=False,
                held_out=scores)
    record = train_heads(heads_on(backbone, whs=False), windows(3), settings, tmp_path / "b", progress=False,
                         held_out=scores)
    assert [point["step"] for point in record["curve"]] == [0, 3, 4, 6, 7]
    assert all(math.isfinite(row["loss"]) for point in record["curve"] for row in point["held_out"])


def test_a_cache_of_other_windows_cannot_train(tmp_path):
    model = heads_on(tiny_model("llama", VOCAB), whs=False)
    cache = cache_features(model, windows(3), tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match="windows of 9 tokens, not seq_len=8"):
        train_heads(model, cache, TrainingSettings(steps=1, seq_len=8), tmp_path / "out")
    incomplete = FeatureCache(cache.directory, cache.tokens, cache.states, cache.dtype, done=1)
    with pytest.raises(ValueError, match="not complete"):
        train_heads(model, incomplete, TrainingSettings(steps=1, seq_len=LENGTH), tmp_path / "out")


def test_cli_trains_on_cached_features_with_a_curve_and_a_plot(tmp_path, tiny_checkpoint, capsys):
    model, text = tiny_checkpoint
    common = ["--model", str(model), "--data", str(text), "--seq-len", "16", "--heads", "2", "--eval-tokens", "40"]
    features = tmp_path / "features"
    schedule = ["--train-windows", "3", "--shuffle", "--lr-schedule", "cosine", "--warmup-steps", "1",
                "--eval-every", "2", "--batch-size", "2", "--features", str(features)]
    assert main(["train-heads", *common, "--whs", "--steps", "4", *schedule, "--out", str(tmp_path / "whs")]) == 0
    report = json.loads((tmp_path / "whs" / "train.json").read_text())
    training = report["training"]
    assert training["epochs"] == pytest.approx(8 / 3) and training["distinct_windows"] == 3
    assert [point["step"] for point in training["curve"]] == [0, 2, 4]
    assert report["settings"]["lr_schedule"] == "cosine" and report["settings"]["shuffle"] is True
    assert (tmp_path / "whs" / "train.png").stat().st_size > 1000
    meta = json.loads((features / "features.json").read_text())
    assert meta["windows"] == 3 and meta["states"] == json.loads((model / "config.json").read_text())["num_hidden_layers"] + 1
    assert meta["done"] == 3
    assert json.loads((features / "held-out" / "features.json").read_text())["done"] >= 1
    # the cache of every layer serves heads of the last one: nothing is cached again
    capsys.readouterr()
    assert main(["train-heads", *common, "--steps", "2", *schedule, "--out", str(tmp_path / "frozen")]) == 0
    assert "cache features" not in capsys.readouterr().err
    assert main(["train-heads", *common, "--joint", "--steps", "1", "--features", str(features),
                 "--out", str(tmp_path / "joint")]) == 2
    assert "joint training (--joint) changes them" in capsys.readouterr().err


def test_eval_heads_goes_on_from_the_sequences_it_scored_and_gives_intervals(tmp_path, tiny_checkpoint, capsys,
                                                                           monkeypatch):
    from mtp_ext.cli import eval_heads
    from mtp_ext.evaluate import evaluate_mtp
    from mtp_ext.models import load_model

    model, text = tiny_checkpoint
    common = ["--model", str(model), "--data", str(text), "--seq-len", "16"]
    heads = tmp_path / "heads"
    assert main(["train-heads", *common, "--heads", "2", "--whs", "--steps", "2", "--out", str(heads)]) == 0
    evaluation = [*common, "--heads-dir", str(heads), "--tokens", "60", "--max-candidates", "4", "--max-nodes", "8"]
    straight = tmp_path / "straight.json"
    assert main(["eval-heads", *evaluation, "--json", str(straight), "--plot", str(tmp_path / "fig5.png")]) == 0
    report = json.loads(straight.read_text())
    assert report["sequences"] == 4 and not (tmp_path / "straight.json.parts.jsonl").exists()
    assert (tmp_path / "fig5.png").stat().st_size > 1000 and (tmp_path / "fig5-whs-heads.png").stat().st_size > 1000

    # merged per-sequence counts equal one evaluation of every sequence at once
    from mtp_ext import data as corpora
    from mtp_ext.heads.training import split_documents
    backbone, tokenizer = load_model(str(model))
    _, held_documents, _ = split_documents([text.read_text()])
    held_out = corpora.token_sequences(tokenizer, held_documents, 16, max_tokens=60)
    whole = evaluate_mtp(backbone, held_out, steps=3, max_candidates=4, max_nodes=8, batch_size=1, progress=False)
    for merged, want in zip(report["marginalisation"]["steps"], whole.steps):
        assert merged["positions"] == want["positions"]
        for field in ("accuracy", "accuracy_lower", "accuracy_upper", "certain_topk_share"):
            assert merged[field] == pytest.approx(want[field], abs=1e-12)
        assert merged["captured_mass"] == pytest.approx(want["captured_mass"], rel=1e-6)
        for k in ("top1", "top5"):
            low, high = merged["interval"][k]
            assert low <= merged["accuracy"][k] <= high
    whole_heads = evaluate_heads(load_heads_for(heads, model), held_out, progress=False)
    for merged, want in zip(report["heads"][str(heads)]["steps"], whole_heads):
        assert merged["positions"] == want.positions and merged["accuracy"] == pytest.approx(want.accuracy)
        assert merged["loss"] == pytest.approx(want.loss, rel=1e-5)
        assert merged["interval"]["top5"][0] <= merged["accuracy"]["top5"] <= merged["interval"]["top5"][1]
    assert "[" in capsys.readouterr().out  # the table shows the intervals
    # paired differences: the heads against marginalisation's estimate and its bounds
    assert [(pair["a"], pair["b"]) for pair in report["differences"]] == [
        ("heads", "marginalisation"), ("heads", "marginalisation's lower bound"),
        ("heads", "marginalisation's upper bound")]
    for pair, field in zip(report["differences"], ("accuracy", "accuracy_lower", "accuracy_upper")):
        for difference, head, marginal in zip(pair["steps"], report["heads"][str(heads)]["steps"],
                                              report["marginalisation"]["steps"]):
            for k in ("top1", "top5"):
                want = head["accuracy"][k] - marginal[field][k]
                assert difference[k]["difference"] == pytest.approx(want, abs=1e-12)
                low, high = difference[k]["interval"]
                assert -1 <= low <= high <= 1
    assert "| heads | marginalisation | 2 |" in report["differences_table"]
    # what the WHS heads read: weights, and their shares of the mix once the states' sizes count
    layers = report["whs_layers"]["heads"]
    weights, norms, shares = (torch.tensor(layers[key]) for key in ("weights", "state_norms", "norm_shares"))
    assert weights.shape == shares.shape == (2, norms.numel()) and layers["steps"] == [2, 3]
    torch.testing.assert_close(weights, load_heads_for(heads, model).layer_weights().detach())
    want = weights * norms
    torch.testing.assert_close(shares, want / want.sum(-1, keepdim=True))
    assert bool((norms > 0).all()) and not torch.allclose(shares, weights)  # the sizes differ, so do the shares

    # stopped after two sequences (the second one's line cut short), then run again
    resumed = tmp_path / "resumed.json"
    real_score, scored = eval_heads._score_sequence, []

    def stop_at_the_third(*args):
        if len(scored) == 2:
            with open(tmp_path / "resumed.json.parts.jsonl", "a") as file:
                file.write('{"key": ')  # a line cut short
            raise KeyboardInterrupt
        scored.append(1)
        return real_score(*args)

    monkeypatch.setattr(eval_heads, "_score_sequence", stop_at_the_third)
    assert main(["eval-heads", *evaluation, "--json", str(resumed)]) == 130
    assert "the same command goes on from them" in capsys.readouterr().err
    monkeypatch.setattr(eval_heads, "_score_sequence", counting(real_score, calls := []))
    assert main(["eval-heads", *evaluation, "--json", str(resumed)]) == 0
    assert len(calls) == 2  # sequences 3 and 4 only
    again = json.loads(resumed.read_text())
    assert again["marginalisation"]["steps"] == report["marginalisation"]["steps"]
    assert again["heads"] == report["heads"]

    # a parts file of other arguments is refused, not merged
    (tmp_path / "other.json.parts.jsonl").write_text(json.dumps({"key": {"model": "x"}, "sequence": 0,
                                                                 "scores": {}}) + "\n")
    assert main(["eval-heads", *evaluation, "--json", str(tmp_path / "other.json")]) == 2
    assert "partial results of another evaluation" in capsys.readouterr().err


def load_heads_for(directory, model_path):
    from mtp_ext.heads import load_heads
    from mtp_ext.models import load_model

    return load_heads(directory, load_model(str(model_path))[0])


def test_the_bootstrap_interval_widens_with_the_spread_between_sequences():
    from mtp_ext._stats import bootstrap_share_interval

    even = bootstrap_share_interval([5] * 20, [10] * 20)
    assert even == pytest.approx((0.5, 0.5))  # every sequence at 0.5: no spread to tell
    spread = bootstrap_share_interval([0, 10] * 10, [10] * 20)
    assert spread[0] < 0.5 < spread[1] and spread[1] - spread[0] > 0.2
    assert bootstrap_share_interval([0, 10] * 10, [10] * 20) == spread  # seeded: reproducible
    assert bootstrap_share_interval([3], [4]) == (0.75, 0.75)
    with pytest.raises(ValueError, match="one non-zero length"):
        bootstrap_share_interval([], [])
    with pytest.raises(ValueError, match="level"):
        bootstrap_share_interval([1, 2], [3, 3], level=1.0)


def test_the_paired_interval_cancels_what_the_sequences_share():
    from mtp_ext._stats import bootstrap_difference_interval, bootstrap_share_interval

    hits_b = [0, 2, 9, 4, 7, 1, 8, 3]  # sequences far apart: each share alone is uncertain
    hits_a = [hits + 1 for hits in hits_b]  # A one hit ahead in every sequence
    positions = [10] * 8
    low, high = bootstrap_share_interval(hits_a, positions)
    assert high - low > 0.2
    assert bootstrap_difference_interval(hits_a, positions, hits_b, positions) == pytest.approx((0.1, 0.1))
    # unpaired (B's sequences in another order) the same totals differ by a spread, not a constant
    shuffled = bootstrap_difference_interval(hits_a, positions, hits_b[::-1], positions)
    assert shuffled[0] < 0.1 < shuffled[1] and shuffled[1] - shuffled[0] > 0.2
    assert bootstrap_difference_interval([3], [4], [1], [4]) == (0.5, 0.5)
    with pytest.raises(ValueError, match="same groups"):
        bootstrap_difference_interval([1, 2], [3, 3], [1], [3])


def test_the_findings_follow_the_paired_intervals():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "results" / "heads" / "findings.py"
    spec = importlib.util.spec_from_file_location("findings", path)
    findings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(findings)

    def pair(a, b, low, high):
        cell = {"difference": (low + high) / 2, "interval": [low, high]}
        return {"a": a, "b": b, "steps": [{"step": step, "top1": cell, "top5": cell} for step in (1, 2, 3)]}

    report = {"differences": [
        pair("frozen", "untrained", 0.05, 0.09),  # above: holds
        pair("frozen", findings.LOWER, -0.2, -0.1), pair("frozen", findings.UPPER, -0.6, -0.5),  # short: holds
        pair("whs", "frozen", -0.01, 0.02),  # cannot tell
        pair("whs", findings.LOWER, 0.01, 0.03), pair("whs", findings.UPPER, -0.3, -0.2),  # between the bounds
        pair("joint", "untrained", -0.03, -0.01),  # step 1 below the backbone's: the cost holds
        pair("frozen", "joint", 0.02, 0.05),  # listed the other way round: joint - frozen below 0
    ]}
    lines = "\n".join(findings.verdicts(report))
    assert "| training helps: frozen heads above the untrained ones | 2 | holds, +0.070" in lines
    assert "| frozen heads fall short of marginalisation | 3 | holds, vs lower bound" in lines
    assert "| WHS narrows the gap: WHS above frozen | 2 | cannot tell" in lines
    assert "| WHS does not close it: WHS short of marginalisation | 2 | cannot tell (between the bounds)" in lines
    assert "| joint training narrows the gap: joint above frozen | 2 | does not hold" in lines
    assert "costs next-token accuracy: joint's step 1 below the backbone's | 1 | holds, -0.020" in lines
    assert "joint above WHS" not in lines  # no such pair in the report: no line
    assert "| 1 | holds, +0.070" not in lines  # step 1 is not a finding of the heads
    assert "| joint training narrows the gap: joint above frozen | 3 | does not hold, -0.035 [-0.050, -0.020]" in lines
