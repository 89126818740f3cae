"""TokenHead (mtp_ext.token_head) on tiny random models: features, the draft vocabulary, what
the head computes, that training learns the model's choices, evaluation, save/load, the CLI and
bad input. Its drafter's losslessness is tested with the others in test_speculative.py."""
import json

import pytest
import torch

from mtp_ext.models.introspection import final_norm
from mtp_ext.cli import main
from mtp_ext.heads.token_head import (
    Features,
    TokenHead,
    TokenHeadSettings,
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
    assert torch.equal(loaded.vocab_ids, head.vocab_ids)
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
                        torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    for settings, message in ((TokenHeadSettings(epochs=0), "epochs"), (TokenHeadSettings(lr=0.0), "lr"),
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
                 "--max-nodes", "3"]) == 2
    assert "the token head drafter takes one branching count" in capsys.readouterr().err
    assert main(["train-token-head", *common, "--out", str(tmp_path / "x"), "--draft-vocab", "0"]) == 2
    assert "draft_vocab must be an integer >= 1" in capsys.readouterr().err
