"""MTP heads on tiny random models of every supported architecture: shapes, targets, the
untrained head, WHS, gradients, the loss, save/load, resume, the CLI and bad input."""
import json

import pytest
import torch

import mtp_ext
from mtp_ext import reference
from mtp_ext.heads import training as heads_training
from mtp_ext.cli import main
from mtp_ext.heads import MTPHeadsModel, load_heads
from mtp_ext.models import load_model
from mtp_ext.heads.training import (
    IGNORE_INDEX,
    TrainingSettings,
    evaluate_heads,
    head_targets,
    heads_loss,
    split_documents,
    train_heads,
)

from tiny_models import ARCHITECTURES, tiny_model

VOCAB = 23
LENGTH = 9


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def perturb(model: MTPHeadsModel, seed: int = 0) -> None:
    """Moves every trainable tensor off its initial value, so that tests see trained-like heads."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("head_type", ["resblock", "block"])
def test_shapes_and_the_backbone_states(architecture, head_type):
    backbone = tiny_model(architecture, VOCAB)
    model = MTPHeadsModel(backbone, num_heads=3, head_type=head_type, weighted_hidden_states=True)
    input_ids = random_ids(2, LENGTH, seed=1)
    final, heads = model(input_ids)
    hidden_size = model.unembed_weight.shape[1]
    assert model.num_heads == 3 and model.steps == [2, 3, 4]
    assert heads.shape == (3, 2, LENGTH, hidden_size)
    assert model.unembed_weight.shape == (VOCAB, hidden_size)
    torch.testing.assert_close(final @ model.unembed_weight.T, backbone(input_ids).logits)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_untrained_resblock_head_copies_the_final_state(architecture):
    backbone = tiny_model(architecture, VOCAB)
    model = MTPHeadsModel(backbone, num_heads=2)
    outputs = backbone(random_ids(2, LENGTH, seed=2), output_hidden_states=True)
    heads = model.head_hidden(outputs.hidden_states)
    for head in heads:
        torch.testing.assert_close(head @ model.unembed_weight.T, outputs.logits)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_block_head_is_a_copy_of_the_last_layer(architecture):
    """Run on the last layer's input, the untrained block head gives the last layer's output: the
    layer is called as the backbone calls it (causal mask, position embeddings)."""
    backbone = tiny_model(architecture, VOCAB)
    model = MTPHeadsModel(backbone, num_heads=1, head_type="block")
    outputs = backbone.base_model(random_ids(2, LENGTH, seed=3), output_hidden_states=True)
    last_output = model._last_layer_output(outputs.hidden_states)
    torch.testing.assert_close(model.heads[0](outputs.hidden_states[-2]), last_output)
    torch.testing.assert_close(model.final_norm(last_output), outputs.hidden_states[-1])


def test_head_hidden_refuses_states_of_an_earlier_pass():
    backbone = tiny_model("llama", VOCAB)
    model = MTPHeadsModel(backbone)
    earlier = backbone(random_ids(1, LENGTH, seed=4), output_hidden_states=True).hidden_states
    backbone(random_ids(1, LENGTH, seed=5))
    with pytest.raises(ValueError, match="latest forward pass"):
        model.head_hidden(earlier)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_weighted_hidden_states_mix_every_layer_with_softmax_weights(architecture):
    backbone = tiny_model(architecture, VOCAB)
    model = MTPHeadsModel(backbone, num_heads=2, weighted_hidden_states=True)
    perturb(model)
    weights = model.layer_weights()
    assert weights.shape == (2, backbone.config.num_hidden_layers + 1)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    assert (weights > 0).all()
    outputs = backbone.base_model(random_ids(1, LENGTH, seed=6), output_hidden_states=True)
    states = list(outputs.hidden_states[:-1]) + [model._last_layer_output(outputs.hidden_states)]
    for index, head in enumerate(model.heads):
        mixed = sum(weight * state for weight, state in zip(weights[index], states))
        torch.testing.assert_close(model.head_hidden(outputs.hidden_states)[index],
                                   model.final_norm(head(mixed)))


@pytest.mark.parametrize("whs", [False, True])
def test_head_hidden_of_some_heads_equals_those_of_all(whs):
    backbone = tiny_model("llama", VOCAB)
    model = MTPHeadsModel(backbone, num_heads=3, weighted_hidden_states=whs)
    perturb(model)
    outputs = backbone.base_model(random_ids(2, LENGTH, seed=7), output_hidden_states=True)
    every_head = model.head_hidden(outputs.hidden_states)
    torch.testing.assert_close(model.head_hidden(outputs.hidden_states, which=[2, 0]), every_head[[2, 0]])


def test_head_targets_are_the_tokens_step_ahead():
    input_ids = torch.arange(10, 16)[None]
    targets = head_targets(input_ids, [2, 3])
    assert targets[0, 0].tolist() == [12, 13, 14, 15] + [IGNORE_INDEX] * 2
    assert targets[1, 0].tolist() == [13, 14, 15] + [IGNORE_INDEX] * 3


@pytest.mark.parametrize("joint", [False, True])
def test_model_targets_are_the_backbones_greedy_choices(joint):
    backbone = tiny_model("llama", VOCAB)
    model = MTPHeadsModel(backbone, num_heads=2, freeze_backbone=not joint)
    perturb(model)
    input_ids = random_ids(2, LENGTH, seed=3)
    greedy = backbone(input_ids).logits.argmax(-1)  # greedy[:, t]: the model's choice for x_{t+1}
    assert not torch.equal(greedy[:, :-1], input_ids[:, 1:])  # else the test could not tell them apart
    loss = heads_loss(model, input_ids, ntp_weight=0.5, targets="model")

    logits = model.head_hidden(backbone(input_ids, output_hidden_states=True).hidden_states) @ model.unembed_weight.T
    # head j at t predicts the model's choice for x_{t+s} given the real x_{<=t+s-1}: greedy[:, t+s-1]
    expected = sum(torch.nn.functional.cross_entropy(logits[j, :, : LENGTH - step].reshape(-1, VOCAB),
                                                     greedy[:, step - 1: LENGTH - 1].reshape(-1))
                   for j, step in enumerate((2, 3))) / 2
    if joint:  # the backbone's own loss keeps the text
        ntp = backbone(input_ids).logits[:, :-1]
        expected = expected + 0.5 * torch.nn.functional.cross_entropy(ntp.reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected.detach())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("joint", [False, True])
def test_loss_matches_hand_computation_and_gradients_reach_what_trains(architecture, joint):
    backbone = tiny_model(architecture, VOCAB)
    model = MTPHeadsModel(backbone, num_heads=2, weighted_hidden_states=True, freeze_backbone=not joint)
    perturb(model)
    input_ids = random_ids(2, LENGTH, seed=7)
    loss = heads_loss(model, input_ids, ntp_weight=0.5)
    loss.backward()

    logits = model.head_hidden(backbone(input_ids, output_hidden_states=True).hidden_states) @ model.unembed_weight.T
    expected = sum(torch.nn.functional.cross_entropy(logits[j, :, : LENGTH - step].reshape(-1, VOCAB),
                                                     input_ids[:, step:].reshape(-1)) for j, step in enumerate((2, 3))) / 2
    if joint:
        ntp = backbone(input_ids).logits[:, :-1]
        expected = expected + 0.5 * torch.nn.functional.cross_entropy(ntp.reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected.detach())
    assert model.layer_logits.grad is not None and model.layer_logits.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.heads.parameters())
    backbone_grads = [p.grad for p in backbone.parameters()]
    if joint:
        assert all(g is not None for g in backbone_grads) and model.unembed_weight.grad.abs().sum() > 0
    else:
        assert all(g is None for g in backbone_grads)


@pytest.mark.parametrize("joint", [False, True])
def test_save_load_round_trip(tmp_path, joint):
    backbone = tiny_model("gpt2", VOCAB)  # tied input and output embeddings
    model = MTPHeadsModel(backbone, num_heads=2, head_type="block", weighted_hidden_states=True,
                          freeze_backbone=not joint)
    perturb(model)
    model.save(tmp_path)
    input_ids = random_ids(1, LENGTH, seed=8)
    expected = model(input_ids)
    loaded = load_heads(tmp_path, tiny_model("gpt2", VOCAB))
    assert loaded.config_dict() == model.config_dict()
    for got, want in zip(loaded(input_ids), expected):
        torch.testing.assert_close(got, want)
    assert (tmp_path / "backbone.safetensors").exists() == joint


def test_load_refuses_another_model_or_a_missing_checkpoint(tmp_path):
    MTPHeadsModel(tiny_model("llama", VOCAB)).save(tmp_path / "heads")
    with pytest.raises(ValueError, match="another model: model_type 'llama'"):
        load_heads(tmp_path / "heads", tiny_model("gpt_neox", VOCAB))
    with pytest.raises(ValueError, match="vocab_size 23"):
        load_heads(tmp_path / "heads", tiny_model("llama", VOCAB + 1))
    with pytest.raises(ValueError, match="no MTP heads checkpoint"):
        load_heads(tmp_path / "missing", tiny_model("llama", VOCAB))


def test_bad_arguments():
    backbone = tiny_model("llama", VOCAB)
    for count in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_heads"):
            MTPHeadsModel(backbone, num_heads=count)
    with pytest.raises(ValueError, match="head_type"):
        MTPHeadsModel(backbone, head_type="mlp")
    with pytest.raises(ValueError, match="steps"):
        TrainingSettings(steps=-1).check()
    with pytest.raises(ValueError, match="exactly 8 tokens"):
        train_heads(MTPHeadsModel(backbone), [[1, 2, 3]], TrainingSettings(steps=1, seq_len=8), "unused")


def windows(count: int, length: int = LENGTH) -> list[list[int]]:
    return random_ids(count, length, seed=9).tolist()


@pytest.mark.parametrize("joint", [False, True])
def test_resume_after_interruption_gives_the_uninterrupted_weights(tmp_path, monkeypatch, joint):
    settings = TrainingSettings(steps=5, seq_len=LENGTH, batch_size=2, checkpoint_every=2, lr=1e-2, backbone_lr=1e-3)

    def fresh():
        return MTPHeadsModel(tiny_model("llama", VOCAB), num_heads=2, weighted_hidden_states=True,
                             freeze_backbone=not joint)

    straight = fresh()
    record = train_heads(straight, windows(3), settings, tmp_path / "straight", progress=False)
    assert record["step"] == 5 and len(record["losses"]) == 5

    real_step, calls = heads_training._training_step, []

    def interrupted_step(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(*args)

    monkeypatch.setattr(heads_training, "_training_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train_heads(fresh(), windows(3), settings, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(heads_training, "_training_step", real_step)
    assert torch.load(tmp_path / "resumed" / "training_state.pt")["record"]["step"] == 3  # between checkpoints
    resumed = fresh()
    record = train_heads(resumed, windows(3), settings, tmp_path / "resumed", progress=False)
    assert record["step"] == 5 and len(record["losses"]) == 5
    for (name, got), want in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(got, want), name
    assert not torch.equal(straight.layer_logits, fresh().layer_logits)  # training changed something


def interrupt_inside_the_update(monkeypatch, at_call: int, interrupt) -> list:
    """Makes AdamW's `at_call`-th update (one per parameter group and step) apply to its first
    parameter, call `interrupt()`, then apply to the others: an interruption in the middle of
    optimizer.step(). Returns the list of calls."""
    from torch.optim import adam

    real, calls = adam._single_tensor_adam, []

    def update(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *rest, **options):
        calls.append(len(params))
        lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        if len(calls) != at_call:
            return real(*lists, *rest, **options)
        real(*(values[:1] for values in lists), *rest, **options)
        interrupt()
        real(*(values[1:] for values in lists), *rest, **options)

    monkeypatch.setattr(adam, "_single_tensor_adam", update)
    return calls


class Terminated(Exception):
    pass


@pytest.mark.parametrize("joint,signal_name", [(False, "SIGINT"), (True, "SIGINT"), (False, "SIGTERM")])
def test_a_signal_inside_the_optimizer_step_checkpoints_after_that_step(tmp_path, monkeypatch, joint, signal_name):
    import signal

    settings = TrainingSettings(steps=5, seq_len=LENGTH, batch_size=2, checkpoint_every=2, lr=1e-2, backbone_lr=1e-3)

    def fresh():
        return MTPHeadsModel(tiny_model("llama", VOCAB), num_heads=2, weighted_hidden_states=True,
                             freeze_backbone=not joint)

    straight = fresh()
    straight_losses = train_heads(straight, windows(3), settings, tmp_path / "straight", progress=False)["losses"]
    groups = len(heads_training.build_optimizer(fresh(), settings).param_groups)
    number = getattr(signal, signal_name)

    def terminated(*_):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)  # what the signal does once the step is done
    try:
        calls = interrupt_inside_the_update(monkeypatch, 3 * groups + 1, lambda: signal.raise_signal(number))
        with pytest.raises(KeyboardInterrupt if signal_name == "SIGINT" else Terminated):
            train_heads(fresh(), windows(3), settings, tmp_path / "resumed", progress=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.undo()
    assert len(calls) == 4 * groups and calls[3 * groups] > 1  # the 4th step ran whole, its update split
    assert torch.load(tmp_path / "resumed" / "training_state.pt")["record"]["step"] == 4
    resumed = fresh()
    assert train_heads(resumed, windows(3), settings, tmp_path / "resumed", progress=False)["losses"] == straight_losses
    for (name, got), want in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(got, want), name


def test_a_second_ctrl_c_inside_the_optimizer_step_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import signal

    settings = TrainingSettings(steps=5, seq_len=LENGTH, batch_size=2, checkpoint_every=2, lr=1e-2)

    def fresh():
        return MTPHeadsModel(tiny_model("llama", VOCAB), num_heads=2, weighted_hidden_states=True)

    straight = fresh()
    straight_losses = train_heads(straight, windows(3), settings, tmp_path / "straight", progress=False)["losses"]
    groups = len(heads_training.build_optimizer(fresh(), settings).param_groups)

    def ctrl_c_twice():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)

    interrupt_inside_the_update(monkeypatch, 3 * groups + 1, ctrl_c_twice)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train_heads(fresh(), windows(3), settings, tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    # The 4th step stopped half applied: nothing of it is saved, the checkpoint of step 2 stays.
    assert torch.load(tmp_path / "resumed" / "training_state.pt")["record"]["step"] == 2
    assert signal.getsignal(signal.SIGINT) is handler  # put back
    resumed = fresh()
    assert train_heads(resumed, windows(3), settings, tmp_path / "resumed", progress=False)["losses"] == straight_losses
    for (name, got), want in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(got, want), name


def test_time_budget_stops_with_a_checkpoint_to_go_on_from(tmp_path):
    settings = TrainingSettings(steps=2, seq_len=LENGTH)
    model = MTPHeadsModel(tiny_model("llama", VOCAB))
    assert train_heads(model, windows(2), settings, tmp_path, progress=False, time_budget_s=1e-9)["step"] == 0
    assert torch.load(tmp_path / "training_state.pt")["record"]["step"] == 0
    assert train_heads(model, windows(2), settings, tmp_path, progress=False)["step"] == 2


def test_resume_refuses_other_heads(tmp_path):
    settings = TrainingSettings(steps=1, seq_len=LENGTH)
    train_heads(MTPHeadsModel(tiny_model("llama", VOCAB), num_heads=2), windows(2), settings, tmp_path, progress=False)
    with pytest.raises(ValueError, match="other heads or another model"):
        train_heads(MTPHeadsModel(tiny_model("llama", VOCAB), num_heads=3), windows(2), settings, tmp_path,
                    progress=False)


def test_resume_refuses_other_targets(tmp_path):
    train_heads(MTPHeadsModel(tiny_model("llama", VOCAB)), windows(2), TrainingSettings(steps=1, seq_len=LENGTH),
                tmp_path, progress=False)
    with pytest.raises(ValueError, match="targets=text, not model"):
        train_heads(MTPHeadsModel(tiny_model("llama", VOCAB)), windows(2),
                    TrainingSettings(steps=2, seq_len=LENGTH, targets="model"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="targets must be one of"):
        TrainingSettings(steps=1, targets="labels").check()


def test_evaluate_heads_counts_hits_like_the_reference():
    model = MTPHeadsModel(tiny_model("gpt_neox", VOCAB), num_heads=2)
    perturb(model)
    sequences = windows(3)
    results = evaluate_heads(model, sequences, top_k=(1, 3), batch_size=2, progress=False)
    assert [r.step for r in results] == [1, 2, 3]
    for result in results:
        hits = {1: 0, 3: 0}
        for sequence in sequences:
            input_ids = torch.tensor([sequence])
            final, heads = model(input_ids)
            hidden = final if result.step == 1 else heads[result.step - 2]
            _, ids, _ = reference.multihead_unembed_topk(hidden[:, : LENGTH - result.step], model.unembed_weight, 3)
            target = input_ids[0, result.step:]
            for k in (1, 3):
                hits[k] += int((ids[0, :, :k] == target[:, None]).any(-1).sum())
        assert result.positions == len(sequences) * (LENGTH - result.step)
        assert result.accuracy == {f"top{k}": hits[k] / result.positions for k in (1, 3)}
        assert result.loss > 0


def test_split_documents():
    train, held, split = split_documents(["a", "b", "c", "d", "e", "f"])
    assert (train, held) == (["a", "b", "c", "d", "e"], ["f"]) and split["held_out"] == [5]
    train, held, split = split_documents(["line one\nline two\nline three\n" * 10])
    assert train[0] + held[0] == "line one\nline two\nline three\n" * 10 and held[0].startswith("\n")
    assert split["by"] == "characters"


def test_cli_train_resume_and_eval(tmp_path, tiny_checkpoint, capsys):
    model, text = tiny_checkpoint
    common = ["--model", str(model), "--data", str(text), "--seq-len", "16"]
    out = tmp_path / "heads"
    assert main(["train-heads", *common, "--heads", "2", "--whs", "--steps", "2", "--out", str(out),
                 "--eval-tokens", "40"]) == 0
    assert main(["train-heads", *common, "--heads", "2", "--whs", "--steps", "3", "--out", str(out),
                 "--eval-tokens", "40"]) == 0
    trained = json.loads((out / "train.json").read_text())
    assert trained["training"]["step"] == 3 and len(trained["training"]["losses"]) == 3
    assert [row["step"] for row in trained["held_out"]] == [1, 2, 3]
    assert trained["split"]["by"] == "characters"
    distilled = tmp_path / "distilled"  # fine-tunes the text-trained heads on the model's choices
    assert main(["train-heads", *common, "--heads", "2", "--whs", "--steps", "1", "--out", str(distilled),
                 "--targets", "model", "--init-from", str(out), "--eval-tokens", "40"]) == 0
    report = json.loads((distilled / "train.json").read_text())
    assert report["settings"]["targets"] == "model" and report["init_from"] == str(out)
    assert main(["train-heads", *common, "--heads", "3", "--steps", "1", "--out", str(tmp_path / "other"),
                 "--init-from", str(out)]) == 2
    assert "holds other heads" in capsys.readouterr().err
    copied = tmp_path / "copied"  # no steps: the checkpoint is the heads it started from
    assert main(["train-heads", *common, "--heads", "2", "--whs", "--steps", "0", "--out", str(copied),
                 "--init-from", str(out), "--eval-tokens", "40"]) == 0
    backbone = load_model(str(model))[0]
    started, source = load_heads(copied, backbone).trainable_state(), load_heads(out, backbone).trainable_state()
    assert started.keys() == source.keys() and all(torch.equal(started[k], source[k]) for k in source)
    joint = tmp_path / "joint"
    assert main(["train-heads", *common, "--heads", "2", "--joint", "--steps", "1", "--out", str(joint)]) == 0
    report_path = tmp_path / "eval.json"
    assert main(["eval-heads", *common, "--heads-dir", str(out), str(joint), "--tokens", "30",
                 "--max-candidates", "4", "--max-nodes", "8", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    marginal_steps = report["marginalisation"]["steps"]
    assert [step["step"] for step in marginal_steps] == [1, 2, 3]
    for name in (str(out), str(joint)):
        assert [s["positions"] for s in report["heads"][name]["steps"]] == [s["positions"] for s in marginal_steps]
    # the original backbone's next-token accuracy is marginalisation's step 1
    assert report["heads"][str(out)]["steps"][0]["accuracy"] == pytest.approx(marginal_steps[0]["accuracy"])
    printed = capsys.readouterr().out
    assert "marginalisation top-1 / top-5" in printed and "| heads top-1 / top-5 | joint top-1 / top-5 |" in printed


def test_cli_bad_input(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("MTP_EXT_OFFLINE", "1")  # an unknown name must not reach the hub
    model, text = tiny_checkpoint
    common = ["--model", str(model), "--data", str(text), "--seq-len", "16"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train-heads", *common, "--steps", "1", "--out", str(blocker / "sub")]) == 2
    assert "cannot create the output directory" in capsys.readouterr().err
    assert main(["train-heads", *common, "--heads", "0", "--steps", "1", "--out", str(tmp_path / "a")]) == 2
    assert "num_heads must be an integer >= 1" in capsys.readouterr().err
    assert main(["train-heads", "--model", str(model), "--data", "no-such-corpus", "--steps", "1",
                 "--out", str(tmp_path / "b")]) == 2
    assert "unknown corpus" in capsys.readouterr().err
    assert main(["train-heads", "--model", str(tmp_path / "no-model"), "--data", str(text), "--steps", "1",
                 "--out", str(tmp_path / "c")]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["eval-heads", *common, "--heads-dir", str(tmp_path / "none")]) == 2
    assert "no MTP heads checkpoint" in capsys.readouterr().err
    assert main(["eval-heads", *common, "--heads-dir", str(tmp_path / "none"), "--json",
                 str(tmp_path / "missing" / "x.json")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_cli_ctrl_c_says_how_to_resume(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    model, text = tiny_checkpoint

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(heads_training, "train_heads", interrupted)
    out = tmp_path / "heads"
    assert main(["train-heads", "--model", str(model), "--data", str(text), "--seq-len", "16", "--steps", "1",
                 "--out", str(out)]) == 130
    assert f"the checkpoint in {out} resumes on a rerun" in capsys.readouterr().err


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_medusa_heads_read_the_final_normed_state_and_feed_the_unembedding(architecture):
    """vLLM's Medusa layout: the block on the post-norm state, no norm after; untrained, a head
    gives the backbone's own logits."""
    backbone = tiny_model(architecture, VOCAB)
    model = MTPHeadsModel(backbone, num_heads=3, head_type="medusa")
    outputs = backbone(random_ids(2, LENGTH, seed=12), output_hidden_states=True)
    for head in model.head_hidden(outputs.hidden_states):
        torch.testing.assert_close(head @ model.unembed_weight.T, outputs.logits)
    perturb(model)
    outputs = backbone(random_ids(2, LENGTH, seed=13), output_hidden_states=True)
    heads = model.head_hidden(outputs.hidden_states)
    post_norm = outputs.hidden_states[-1]
    for index, block in enumerate(model.heads):
        expected = post_norm + torch.nn.functional.silu(block.linear(post_norm))
        torch.testing.assert_close(heads[index], expected)
    torch.testing.assert_close(model.head_hidden(outputs.hidden_states, which=[2, 0]), heads[[2, 0]])
    with pytest.raises(ValueError, match="final hidden state only"):
        MTPHeadsModel(backbone, head_type="medusa", weighted_hidden_states=True)


@pytest.mark.parametrize("targets", ["text", "model"])
def test_medusa_heads_train_alike_on_cached_states(targets):
    """The cached-features path (states before the final norm) gives the live loss."""
    from mtp_ext.heads.training import heads_loss_from_states

    backbone = tiny_model("llama", VOCAB)
    model = MTPHeadsModel(backbone, num_heads=2, head_type="medusa")
    perturb(model)
    input_ids = random_ids(2, LENGTH, seed=14)
    live = heads_loss(model, input_ids, targets=targets)
    outputs = backbone.base_model(input_ids=input_ids, output_hidden_states=True)
    cached = heads_loss_from_states(model, model.states_for_heads(outputs.hidden_states), input_ids, targets)
    torch.testing.assert_close(cached, live)
    cached.backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in model.heads.parameters())
