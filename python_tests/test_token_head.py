"""TokenHead (mtp_ext.token_head) on tiny random models: features, the draft vocabulary, what
the head computes, that training learns the model's choices, evaluation, save/load, the CLI and
bad input. Its drafter's losslessness is tested with the others in test_speculative.py."""
import json

import pytest
import torch

from mtp_ext.speculative import TokenHeadDrafter
from mtp_ext.speculative.protocol import TreeShape

from mtp_ext.models.introspection import final_norm
from mtp_ext.cli import main
from mtp_ext.heads.token_head import (
    Features,
    TokenHead,
    TokenHeadSettings,
    chain_loss,
    draft_vocabulary,
    evaluate_token_head,
    token_head_features,
    train_token_head,
)

from tiny_models import ARCHITECTURES, tiny_model

VOCAB = 13


def random_windows(count: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (count, length), generator=generator).tolist()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_features_are_the_models_states_and_choices(architecture):
    model = tiny_model(architecture, VOCAB, seed=1)
    windows = random_windows(3, 7, seed=2) + [random_windows(1, 4, seed=3)[0]]  # two lengths
    features = token_head_features(model, windows, batch_size=2, progress=False)
    assert features.hidden.shape == (3 * 6 + 3, model.config.hidden_size)
    position = 0
    for window in windows[:3] + windows[3:]:
        with torch.no_grad():
            output = model(torch.tensor([window]), output_hidden_states=True)
        choices = output.logits[0].argmax(-1)
        for t in range(len(window) - 1):
            torch.testing.assert_close(features.hidden[position], output.hidden_states[-1][0, t])
            assert int(features.next_tokens[position]) == window[t + 1]
            assert int(features.targets[position]) == int(choices[t + 1])
            assert int(features.choices[position]) == int(choices[t])
            position += 1
    window_ids = features.window_ids.tolist()
    assert window_ids == sorted(window_ids) and len(set(window_ids)) == 4  # one id per window, in order
    rows = torch.arange(len(window_ids))
    for levels in (0, 1, 5, 6):
        ahead = features.ahead(rows, levels).tolist()
        assert ahead == [row + levels < len(window_ids) and window_ids[row + levels] == window_ids[row]
                         for row in range(len(window_ids))]


def test_draft_vocabulary_takes_the_most_chosen_tokens_lower_id_first():
    targets = torch.tensor([5, 5, 5, 2, 2, 9, 9, 1])
    assert draft_vocabulary(targets, 12, 3).tolist() == [5, 2, 9]
    assert draft_vocabulary(targets, 12, 5).tolist() == [5, 2, 9, 1, 0]


def test_head_computes_its_formula_over_the_draft_vocabulary():
    model = tiny_model("llama", VOCAB, seed=4)
    head = TokenHead(model, torch.tensor([7, 0, 3]))
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
    hidden, tokens = torch.randn(5, model.config.hidden_size), torch.tensor([1, 2, 3, 4, 12])
    state = head.project(torch.cat([hidden, model.get_input_embeddings()(tokens)], -1))
    state = state + head.down(torch.nn.functional.silu(head.up(state)))
    expected = final_norm(model)(state) @ model.get_output_embeddings().weight[[7, 0, 3]].T
    with torch.no_grad():
        got = head(hidden, tokens)
    assert got.shape == (5, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected.detach())


def perturbed_head(model, vocab_ids, chain: int, seed: int = 0) -> TokenHead:
    head = TokenHead(model, torch.as_tensor(vocab_ids), chain)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)))
    return head


def test_step_also_predicts_the_next_state_and_forward_is_its_logits():
    model = tiny_model("llama", VOCAB, seed=4)
    head = perturbed_head(model, [7, 0, 3], chain=2)
    hidden, tokens = torch.randn(2, 5, model.config.hidden_size), torch.randint(0, VOCAB, (2, 5))
    state = head.project(torch.cat([hidden, model.get_input_embeddings()(tokens)], -1))
    state = state + head.down(torch.nn.functional.silu(head.up(state)))
    with torch.no_grad():
        logits, predicted = head.step(hidden, tokens)
        torch.testing.assert_close(predicted, final_norm(model)(state))
        torch.testing.assert_close(logits, head(hidden, tokens))
        torch.testing.assert_close(logits, predicted @ model.get_output_embeddings().weight[[7, 0, 3]].T)


def test_chain_loss_is_the_levels_cross_entropy_and_the_feature_regression_by_hand():
    model = tiny_model("llama", VOCAB, seed=13)
    features = token_head_features(model, random_windows(3, 6, seed=14), progress=False)  # 5 rows per window
    head = perturbed_head(model, torch.arange(VOCAB), chain=2, seed=1)
    slots = features.targets.clone()
    slots[::4] = -1  # some targets outside the draft vocabulary
    rows = torch.tensor([0, 3, 4, 9, 14])  # 4 and 9 and 14: the last of their windows, no level 2
    settings = TokenHeadSettings(chain=2, feature_weight=0.7)
    expected_ce, expected_regression = [], []
    with torch.no_grad():
        logits1, predicted = head.step(features.hidden[rows], features.next_tokens[rows])
        keep = slots[rows] >= 0
        expected_ce.append(torch.nn.functional.cross_entropy(logits1[keep], slots[rows][keep]))
        inside = torch.tensor([True, True, False, False, False])
        logits2, _ = head.step(predicted, features.next_tokens[(rows + 1).clamp(max=14)])
        keep2 = inside & (slots[(rows + 1).clamp(max=14)] >= 0)
        expected_ce.append(torch.nn.functional.cross_entropy(logits2[keep2], slots[(rows + 1).clamp(max=14)][keep2]))
        expected_regression = torch.nn.functional.smooth_l1_loss(predicted[inside], features.hidden[(rows + 1).clamp(max=14)][inside])
        expected = sum(expected_ce) / 2 + 0.7 * expected_regression
        torch.testing.assert_close(chain_loss(head, features, slots, rows, settings), expected)
        plain = torch.nn.functional.cross_entropy(logits1[keep], slots[rows][keep])
        torch.testing.assert_close(chain_loss(head, features, slots, rows, TokenHeadSettings()), plain)


def test_a_chained_head_learns_its_second_level():
    model = tiny_model("llama", VOCAB, seed=5)
    features = token_head_features(model, random_windows(40, 12, seed=6), progress=False)
    held_out = token_head_features(model, random_windows(10, 12, seed=7), progress=False)
    settings = dict(epochs=40, batch_size=64, lr=1e-2, draft_vocab=VOCAB)
    single, _ = train_token_head(model, features, TokenHeadSettings(**settings), progress=False)
    chained, record = train_token_head(model, features, TokenHeadSettings(chain=2, **settings), progress=False)
    unchained = evaluate_token_head(single, held_out, levels=2)
    trained = evaluate_token_head(chained, held_out)
    assert chained.chain == 2 and len(trained.level_top1) == 2 and trained.level_top1[0] == trained.top1
    assert record["epoch_losses"][-1] < 0.7 * record["epoch_losses"][0]
    assert trained.level_top1[1] > unchained.level_top1[1] + 0.1  # the level that single-level training never saw
    assert trained.top1 > unchained.top1 - 0.1  # ... without giving up much of the first


def test_chained_evaluation_counts_hits_by_hand():
    model = tiny_model("llama", VOCAB, seed=15)
    features = token_head_features(model, random_windows(3, 5, seed=16), progress=False)  # 4 rows per window
    head = perturbed_head(model, torch.arange(VOCAB), chain=3, seed=2)
    accuracy = evaluate_token_head(head, features, chunk=5)
    hits, counts, greedy_hits, greedy_counts = [0] * 3, [0] * 3, [0] * 3, [0] * 3
    with torch.no_grad():
        for row in range(12):
            hidden, greedy = features.hidden[row], True
            for level in range(3):
                at = row + level
                if at >= 12 or at // 4 != row // 4:
                    break
                logits, hidden = head.step(hidden, features.next_tokens[at])
                hit = int(logits.argmax()) == int(features.targets[at])
                greedy = greedy and int(features.next_tokens[at]) == int(features.choices[at])
                hits[level] += hit
                counts[level] += 1
                greedy_hits[level] += hit and greedy
                greedy_counts[level] += greedy
    assert counts == [12, 9, 6]
    assert accuracy.level_top1 == pytest.approx([h / c for h, c in zip(hits, counts)])
    assert accuracy.level_top1[0] == pytest.approx(accuracy.top1)
    for got, h, c in zip(accuracy.greedy_level_top1, greedy_hits, greedy_counts):
        assert got == pytest.approx(h / c) if c else got != got


def test_the_drafter_grows_each_level_from_the_state_predicted_at_the_parent():
    model = tiny_model("llama", VOCAB, seed=17)
    head = perturbed_head(model, torch.tensor([5, 1, 8, 2, 11, 0]), chain=2, seed=3)
    stop_hidden, roots = torch.randn(2, model.config.hidden_size), torch.tensor([4, 9])

    class Previous:  # what draft reads of a VerifiedPass
        next_tokens = roots

        @staticmethod
        def stop_hidden():
            return stop_hidden

    forest = TokenHeadDrafter(head, branching=(3, 2), max_nodes=8).draft(Previous())
    assert forest.counts.tolist() == [8, 8] and forest.leaf_counts.tolist() == [4, 4]
    with torch.no_grad():
        logits, predicted = head.step(stop_hidden, roots)
        probs, slots = torch.softmax(logits, -1).topk(3, -1)
        for row in range(2):
            assert forest.token_ids[row, 1:4].tolist() == head.vocab_ids[slots[row]].tolist()
            children = forest.token_ids[row, 1:4]
            child_logits, _ = head.step(predicted[row].expand(3, -1), children)
            child_probs, child_slots = torch.softmax(child_logits, -1).topk(2, -1)
            paths = (probs[row][:, None] * child_probs).flatten()
            best = paths.argsort(descending=True, stable=True)[:4]  # the budget keeps the 4 likeliest paths
            assert forest.parents[row, 4:].tolist() == [1 + int(index) // 2 for index in best]
            assert forest.token_ids[row, 4:].tolist() == head.vocab_ids[child_slots.flatten()[best]].tolist()
            torch.testing.assert_close(forest.weights[row, 4:], paths[best])
    with pytest.raises(ValueError, match="trained for 2 drafting level"):
        TokenHeadDrafter(head, branching=(2, 1, 1))
    assert TokenHeadDrafter(head).tree_shape(torch.device("cpu")).branching == (3,)
    assert TokenHeadDrafter(head).tree_shape(torch.device("cpu"), batch=8).branching == (2,)
    assert TokenHeadDrafter(head, branching=[3]).tree_shape(torch.device("cpu"), batch=8).branching == (3,)
    assert TokenHeadDrafter(head).tree_shape(torch.device("meta")) == TreeShape((8, 1), 17)


def test_training_learns_the_models_next_choice():
    model = tiny_model("llama", VOCAB, seed=5)
    features = token_head_features(model, random_windows(40, 12, seed=6), progress=False)
    held_out = token_head_features(model, random_windows(10, 12, seed=7), progress=False)
    untrained = evaluate_token_head(TokenHead(model, torch.arange(VOCAB)), held_out)
    head, record = train_token_head(model, features, TokenHeadSettings(epochs=40, batch_size=64, lr=1e-2,
                                                                       draft_vocab=VOCAB), progress=False)
    trained = evaluate_token_head(head, held_out)
    assert record["epoch_losses"][-1] < 0.7 * record["epoch_losses"][0]
    assert trained.top1 > untrained.top1 + 0.2 and trained.top3 > 0.8
    assert trained.vocab_coverage == 1.0 and trained.positions == 10 * 11


def test_evaluation_counts_hits_by_hand():
    model = tiny_model("llama", VOCAB, seed=8)
    head = TokenHead(model, torch.tensor([4, 6, 8, 10]))
    features = token_head_features(model, random_windows(4, 9, seed=9), progress=False)
    with torch.no_grad():
        guesses = head.vocab_ids[head(features.hidden, features.next_tokens).topk(3, -1).indices]
    greedy = features.next_tokens == features.choices
    top3 = [int(target) in row for target, row in zip(features.targets, guesses.tolist())]
    accuracy = evaluate_token_head(head, features, chunk=5)
    assert accuracy.top1 == pytest.approx(float((guesses[:, 0] == features.targets).float().mean()))
    assert accuracy.top3 == pytest.approx(sum(top3) / len(top3))
    assert accuracy.greedy_positions == int(greedy.sum())
    assert accuracy.vocab_coverage == pytest.approx(float(torch.isin(features.targets, head.vocab_ids).float().mean()))


def test_save_load_round_trip_and_refusals(tmp_path):
    model = tiny_model("llama", VOCAB, seed=10)
    features = token_head_features(model, random_windows(6, 8, seed=11), progress=False)
    head, record = train_token_head(model, features, TokenHeadSettings(epochs=1, batch_size=8, draft_vocab=5),
                                    progress=False)
    head.save(tmp_path / "head", {"note": "test"})
    loaded = TokenHead.load(tmp_path / "head", model)
    assert torch.equal(loaded.vocab_ids, head.vocab_ids) and loaded.chain == 1
    perturbed_head(model, [1, 2], chain=3).save(tmp_path / "chained")
    assert TokenHead.load(tmp_path / "chained", model).chain == 3
    config = json.loads((tmp_path / "chained" / "token_head.json").read_text())
    del config["chain"]  # a head saved before chained drafting: one level
    (tmp_path / "chained" / "token_head.json").write_text(json.dumps(config))
    assert TokenHead.load(tmp_path / "chained", model).chain == 1
    with torch.no_grad():
        assert torch.equal(loaded(features.hidden, features.next_tokens), head(features.hidden, features.next_tokens))
    assert json.loads((tmp_path / "head" / "token_head.json").read_text())["training"] == {"note": "test"}
    with pytest.raises(ValueError, match="belongs to another model"):
        TokenHead.load(tmp_path / "head", tiny_model("gemma3", VOCAB, seed=10))
    with pytest.raises(ValueError, match="holds no token head"):
        TokenHead.load(tmp_path, model)


def test_bad_arguments():
    model = tiny_model("llama", VOCAB, seed=12)
    for vocab_ids, message in (([], "non-empty"), ([1, VOCAB], "must lie in"), ([-1], "must lie in"),
                               ([2, 2], "twice")):
        with pytest.raises(ValueError, match=message):
            TokenHead(model, torch.tensor(vocab_ids, dtype=torch.long))
    features = Features(torch.zeros(2, model.config.hidden_size), torch.zeros(2, dtype=torch.long),
                        torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                        torch.zeros(2, dtype=torch.long))
    for chain in (0, -1, 1.5):
        with pytest.raises(ValueError, match="chain"):
            TokenHead(model, torch.tensor([1]), chain)
    for settings, message in ((TokenHeadSettings(epochs=0), "epochs"), (TokenHeadSettings(lr=0.0), "lr"),
                              (TokenHeadSettings(chain=0), "chain"),
                              (TokenHeadSettings(feature_weight=-1.0), "feature_weight"),
                              (TokenHeadSettings(draft_vocab=VOCAB + 1), "exceeds the model's vocabulary")):
        with pytest.raises(ValueError, match=message):
            train_token_head(model, features, settings, progress=False)
    with pytest.raises(ValueError, match="no window"):
        token_head_features(model, [[3]], progress=False)


def test_cli_trains_and_the_generate_command_drafts_with_it(tmp_path, tiny_checkpoint, capsys):
    model, text = tiny_checkpoint
    common = ["--model", str(model), "--data", str(text), "--seq-len", "16"]
    out = tmp_path / "token-head"
    assert main(["train-token-head", *common, "--out", str(out), "--tokens", "300", "--eval-tokens", "60",
                 "--epochs", "2", "--batch-size", "32", "--draft-vocab", "10"]) == 0
    printed = capsys.readouterr().out
    assert "the model's own next choice among the head's guesses" in printed and "draft vocabulary: 10" in printed
    saved = json.loads((out / "token_head.json").read_text())
    assert saved["draft_vocab_size"] == 10 and saved["training"]["held_out"]["positions"] == 60
    assert main(["generate", "--model", str(model), "--prompt", "the", "--max-new-tokens", "6", "--compare",
                 "--drafter", f"token-head:{out}", "--branching", "2"]) == 0
    assert "outputs identical" in capsys.readouterr().out
    assert main(["generate", "--model", str(model), "--prompt", "the", "--drafter", f"token-head:{out}",
                 "--branching", "2", "1"]) == 2
    assert "trained for 1 drafting level(s)" in capsys.readouterr().err
    chained = tmp_path / "chained"
    assert main(["train-token-head", *common, "--out", str(chained), "--tokens", "300", "--eval-tokens", "60",
                 "--epochs", "2", "--batch-size", "32", "--draft-vocab", "10", "--chain", "2",
                 "--feature-weight", "0.5"]) == 0
    assert "| level 2 (chained, x_(t+3))" in capsys.readouterr().out
    saved = json.loads((chained / "token_head.json").read_text())
    assert saved["chain"] == 2 and len(saved["training"]["held_out"]["level_top1"]) == 2
    assert saved["training"]["training"]["settings"]["feature_weight"] == 0.5
    assert main(["generate", "--model", str(model), "--prompt", "the", "--max-new-tokens", "6", "--compare",
                 "--drafter", f"token-head:{chained}", "--branching", "2", "2", "--max-nodes", "5"]) == 0
    assert "outputs identical" in capsys.readouterr().out
    assert main(["train-token-head", *common, "--out", str(tmp_path / "y"), "--feature-weight", "-1"]) == 2
    assert "must be a number >= 0" in capsys.readouterr().err
    assert main(["train-token-head", *common, "--out", str(tmp_path / "x"), "--draft-vocab", "0"]) == 2
    assert "draft_vocab must be an integer >= 1" in capsys.readouterr().err


def test_a_stopped_training_goes_on_from_its_features_and_epochs(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from safetensors.torch import load_file

    from mtp_ext.heads import token_head as module

    model, text = tiny_checkpoint
    monkeypatch.setattr(module, "PARTS_BATCHES", 2)  # several parts of features
    arguments = ["train-token-head", "--model", str(model), "--data", str(text), "--seq-len", "16", "--tokens", "300",
                 "--eval-tokens", "60", "--epochs", "3", "--batch-size", "32", "--draft-vocab", "10", "--chain", "2"]
    straight = tmp_path / "straight"
    assert main([*arguments, "--out", str(straight)]) == 0
    resume = tmp_path / "resume"

    real_loss, calls = module.chain_loss, []

    def stop_in_the_second_epoch(*args):
        calls.append(1)
        if len(calls) == 10:  # 9 steps an epoch: the first epoch is kept
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(module, "chain_loss", stop_in_the_second_epoch)
    assert main([*arguments, "--out", str(tmp_path / "stopped"), "--resume-dir", str(resume)]) == 130
    assert f"the features and the epochs finished so far are in {resume}" in capsys.readouterr().err
    parts = sorted(path.name for path in resume.glob("features-*.pt"))
    assert len(parts) > 1 and (resume / module.TRAINING_STATE_FILE).is_file()

    real_batch, passes = module._batch_features, []
    monkeypatch.setattr(module, "_batch_features", lambda *args: passes.append(1) or real_batch(*args))
    monkeypatch.setattr(module, "chain_loss", real_loss)
    resumed = tmp_path / "resumed"
    assert main([*arguments, "--out", str(resumed), "--resume-dir", str(resume)]) == 0
    assert len(passes) == 1  # the held-out windows' one batch: every training feature came from the kept parts
    want, got = load_file(straight / "token_head.safetensors"), load_file(resumed / "token_head.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[name], got[name]) for name in want)
    record = json.loads((resumed / "token_head.json").read_text())["training"]["training"]
    assert record["epoch_losses"] == json.loads((straight / "token_head.json").read_text())["training"]["training"][
        "epoch_losses"]

    # other settings against the kept state, other windows against the kept features: refused, saying what to do
    assert main([*arguments[:-2], "--chain", "1", "--out", str(tmp_path / "other"), "--resume-dir", str(resume)]) == 2
    assert "holds a training with other settings" in capsys.readouterr().err
    other_windows = [*arguments, "--out", str(tmp_path / "other"), "--resume-dir", str(resume)]
    other_windows[other_windows.index("--tokens") + 1] = "200"
    assert main(other_windows) == 2
    assert "keeps the features of other windows" in capsys.readouterr().err
