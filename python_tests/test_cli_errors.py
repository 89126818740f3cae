"""Every user error of `mtp-ext` ends in one line on stderr, `error: ...` (argparse's own errors:
its usage and its error line), and exit status 2, without a traceback and naming the file or the
argument at fault; arguments and output paths are checked before any model is loaded. A model
name that is neither built in nor a local directory fails at once, without the network. A tiny
Llama checkpoint stands in for the real models."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from mtp_ext.cli import main

# Cases whose error argparse reports (usage line + "mtp-ext CMD: error: argument ...").
ARGPARSE = "argparse"


@pytest.fixture(scope="module", autouse=True)
def no_loading_bars():
    """Transformers draws a bar on stderr while it loads weights: not the command's output."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny checkpoint, a text file, untrained heads and a token head, which the cases copy
    before damaging them."""
    from test_models_data import WORDS, save_tiny_checkpoint

    from mtp_ext.heads import MTPHeadsModel
    from mtp_ext.models import load_model
    from mtp_ext.heads.token_head import TokenHead

    root = tmp_path_factory.mktemp("cli-errors")
    save_tiny_checkpoint(root / "model")
    generator = torch.Generator().manual_seed(0)
    text = root / "text.txt"
    text.write_text("\n".join(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=generator))
                              for _ in range(60)))
    backbone = load_model(str(root / "model"))[0]
    MTPHeadsModel(backbone, num_heads=2).save(root / "heads")
    TokenHead(backbone, torch.arange(5)).save(root / "token-head")
    return {"model": root / "model", "text": text, "heads": root / "heads", "token-head": root / "token-head"}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def garbage(path: Path) -> None:
    path.write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00 this is no safetensors file \xff\xfe" * 4)


def copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def write_lines(path: Path, *lines: str) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# Each case: (files, a scratch directory) -> (argv, the strings the error must hold).
Case = Callable[[dict, Path], tuple[list, list]]


def data_case(make_data: Callable[[Path], str], *expected: str) -> Case:
    def case(files, tmp):
        data = make_data(tmp)
        return ["eval", "--model", str(files["model"]), "--data", data, "--tokens", "20", "--seq-len", "8"], \
            [data, *expected]
    return case


def directory(path: Path) -> str:
    path.mkdir()
    return str(path)


def latin1_text(tmp: Path) -> str:
    (tmp / "latin1.txt").write_bytes("café ".encode("latin-1") * 50)
    return str(tmp / "latin1.txt")


def heads_case(damage: Callable[[Path], None], file: str, *expected: str) -> Case:
    def case(files, tmp):
        heads = copy(files["heads"], tmp / "heads")
        damage(heads / file)
        return ["generate", "--model", str(files["model"]), "--prompt", "hello", "--max-new-tokens", "2",
                "--drafter", f"heads:{heads}"], [str(heads / file), *expected]
    return case


def token_head_case(damage: Callable[[Path], None], file: str, *expected: str) -> Case:
    def case(files, tmp):
        head = copy(files["token-head"], tmp / "token-head")
        damage(head / file)
        return ["generate", "--model", str(files["model"]), "--prompt", "hello", "--max-new-tokens", "2",
                "--drafter", f"token-head:{head}"], [str(head / file), *expected]
    return case


def without_model_entry(path: Path) -> None:
    config = json.loads(path.read_text())
    del config["model"]
    path.write_text(json.dumps(config))


def training_state_case(damage: Callable[[Path], None]) -> Case:
    def case(files, tmp):
        out = tmp / "run"
        out.mkdir()
        state = out / "training_state.pt"
        torch.save({"record": {"step": 1}}, state)
        damage(state)
        return ["train-heads", "--model", str(files["model"]), "--data", str(files["text"]), "--seq-len", "16",
                "--steps", "1", "--out", str(out)], [str(state), "delete it to start over"]
    return case


def model_case(damage: Callable[[Path], None], *expected: str) -> Case:
    def case(files, tmp):
        model = copy(files["model"], tmp / "model")
        damage(model)
        return ["eval", "--model", str(model), "--data", str(files["text"]), "--tokens", "20", "--seq-len", "8"], \
            [str(model), *expected]
    return case


def eval_argument_case(*arguments: str) -> Case:
    def case(files, tmp):
        return ["eval", "--model", str(files["model"]), "--data", str(files["text"]), *arguments], \
            [ARGPARSE, f"argument {arguments[0]}"]
    return case


def output_case(command: str, flag: str, target: Callable[[Path], Path], *expected: str) -> Case:
    """An unwritable output path, with a --model that cannot load: the path is checked first."""
    def case(files, tmp):
        path = target(tmp)
        argv = [command, "--model", str(tmp / "no-model"), "--data", str(files["text"]), flag, str(path)]
        if command == "eval-heads":
            argv += ["--heads-dir", str(files["heads"])]
        return argv, [f"cannot write {flag} {path}", *expected]
    return case


def report_case(file: str, content: str, *expected: str) -> Case:
    def case(files, tmp):
        results = tmp / "results"
        results.mkdir()
        (results / file).write_text(content)
        return ["report", str(results), "--out", str(tmp / "report")], [str(results / file), *expected]
    return case


def directory_of(name: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).mkdir()
        return tmp / name
    return make


STEP = {"step": 1, "positions": 3, "accuracy": {}, "accuracy_lower": {}, "accuracy_upper": {}, "captured_mass": 1.0}

CASES: dict[str, Case] = {
    "data-missing": data_case(lambda tmp: str(tmp / "missing.txt"), "does not exist"),
    "data-directory": data_case(lambda tmp: directory(tmp / "corpus.txt"), "is a directory"),
    "data-directory-without-suffix": data_case(lambda tmp: directory(tmp / "corpus"), "is a directory"),
    "data-not-utf8": data_case(latin1_text, "UTF-8"),
    "jsonl-bad-json": data_case(lambda tmp: write_lines(tmp / "bad.jsonl", '{"text": "a b"}', "", '{"text": oops}'),
                                "line 3"),
    "jsonl-not-an-object": data_case(lambda tmp: write_lines(tmp / "list.jsonl", "", "[1, 2]"), "line 2"),
    "jsonl-record-without-text": data_case(lambda tmp: write_lines(tmp / "title.jsonl", "", '{"title": "x"}'),
                                           "line 2", "record 1"),
    "jsonl-pair-without-target": data_case(
        lambda tmp: write_lines(tmp / "pairs.jsonl", '{"source": "a", "target": "b"}', "", '{"source": "c"}'),
        "line 3", "record 2"),
    "heads-truncated": heads_case(truncate, "heads.safetensors"),
    "heads-empty": heads_case(empty, "heads.safetensors"),
    "heads-garbage": heads_case(garbage, "heads.safetensors"),
    "heads-weights-missing": heads_case(lambda path: path.unlink(), "heads.safetensors", "missing"),
    "heads-config-without-model": heads_case(without_model_entry, "heads_config.json", "'model'"),
    "heads-config-not-json": heads_case(lambda path: path.write_text("{num_heads: 2"), "heads_config.json"),
    "heads-dir-missing": lambda files, tmp: (
        ["eval-heads", "--model", str(tmp / "no-model"), "--data", str(files["text"]),
         "--heads-dir", str(tmp / "none")],
        [f"--heads-dir {tmp / 'none'} holds no MTP heads checkpoint", "no such directory"]),
    "token-head-truncated": token_head_case(truncate, "token_head.safetensors"),
    "token-head-empty": token_head_case(empty, "token_head.safetensors"),
    "token-head-garbage": token_head_case(garbage, "token_head.safetensors"),
    "token-head-config-without-model": token_head_case(without_model_entry, "token_head.json", "'model'"),
    "training-state-truncated": training_state_case(truncate),
    "training-state-empty": training_state_case(empty),
    "training-state-garbage": training_state_case(garbage),
    "training-state-incomplete": training_state_case(lambda path: None),
    "model-config-corrupt": model_case(lambda model: (model / "config.json").write_text('{"model_type": "lla')),
    "model-weights-truncated": model_case(lambda model: truncate(model / "model.safetensors")),
    "model-without-config": model_case(lambda model: (model / "config.json").unlink(), "config.json"),
    "init-from-missing": lambda files, tmp: (
        ["train-heads", "--model", str(tmp / "no-model"), "--data", str(files["text"]), "--steps", "1",
         "--out", str(tmp / "run"), "--init-from", str(tmp / "none")],
        [f"--init-from {tmp / 'none'} holds no MTP heads checkpoint"]),
    "eval-too-little-text": lambda files, tmp: (
        ["eval", "--model", str(files["model"]), "--data", str(files["text"]), "--seq-len", "5000"],
        [f"{str(files['text'])!r} holds too little text for one sequence of 5000 tokens"]),
    "train-heads-held-out-share-1": lambda files, tmp: (
        ["train-heads", "--data", str(files["text"]), "--steps", "1", "--out", str(tmp / "run"),
         "--held-out-share", "1"], [ARGPARSE, "argument --held-out-share"]),
    "eval-max-candidates-0": eval_argument_case("--max-candidates", "0"),
    "eval-max-nodes-0": eval_argument_case("--max-nodes", "0", "--steps", "3"),
    "eval-batch-size-0": eval_argument_case("--batch-size", "0"),
    "eval-top-p-above-1": eval_argument_case("--top-p", "1.5"),
    "eval-tokens-not-a-number": eval_argument_case("--tokens", "many"),
    "eval-json-proc": output_case("eval", "--json", lambda tmp: Path("/proc/mtp-ext-results.json"),
                                  "/proc is not a writable directory"),
    "eval-json-directory": output_case("eval", "--json", directory_of("out.json"), "it is a directory"),
    "eval-plot-missing-directory": output_case("eval", "--plot", lambda tmp: tmp / "missing" / "fig.png"),
    "eval-heads-json-directory": output_case("eval-heads", "--json", directory_of("out"), "it is a directory"),
    "report-eval-json-incomplete": report_case("eval.json", json.dumps({"model": "m"}), "'steps'"),
    "report-eval-step-incomplete": report_case(
        "eval.json", json.dumps({"model": "m", "data": "d", "task": "t", "steps": [STEP, {"step": 2}]}),
        "step 2", "'captured_mass'"),
    "report-eval-json-not-json": report_case("eval.json", '{"model": "m", "steps": [', "eval"),
    "report-analysis-json-incomplete": report_case("analysis.json", json.dumps({"model": "m", "data": "d",
                                                                                "summary": {}}), "'positions'"),
}


def test_every_case_is_listed():
    assert len(CASES) >= 31


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_and_exit_2(name, files, tmp_path, capsys, monkeypatch):
    if name == "eval-json-proc" and not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    monkeypatch.setenv("MTP_EXT_OFFLINE", "1")
    argv, expected = CASES[name](files, tmp_path)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if expected and expected[0] == ARGPARSE:
        assert lines[0].startswith("usage: mtp-ext") and lines[-1].startswith(f"mtp-ext {argv[0]}: error: "), err
        expected = expected[1:]
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    for part in expected:
        assert part in lines[-1], err


def run_python(script: str, *, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=Path(__file__).parent)


NO_NETWORK = """
import socket, sys, time
attempts = []
def refuse(*args, **kwargs):
    attempts.append(args[1:])
    raise OSError("the test allows no network")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.getaddrinfo = refuse
from mtp_ext.cli import main
started = time.perf_counter()
code = main(sys.argv[1:])
print(f"seconds={time.perf_counter() - started:.3f} attempts={len(attempts)}")
sys.exit(code)
"""


def test_unknown_model_fails_at_once_without_the_network(files):
    """In a subprocess, whose hub libraries start with HF_HUB_OFFLINE unset; also the exit status
    and the streams of a whole command."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MTP_EXT_OFFLINE")}
    result = subprocess.run([sys.executable, "-c", NO_NETWORK, "eval", "--model", "org/typo", "--data",
                             str(files["text"])], capture_output=True, text=True, timeout=120, env=env)
    fields = dict(field.split("=") for field in result.stdout.split())
    assert result.returncode == 2 and fields["attempts"] == "0", result.stderr
    assert float(fields["seconds"]) < 5
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'org/typo'"), result.stderr
    for part in ("smollm2-135m", "gemma3-270m", "local checkpoint directory", "--allow-download"):
        assert part in lines[0]


NAN_HEADS = """
import sys, torch
from mtp_ext.cli import main
from mtp_ext.heads import MTPHeadsModel
from mtp_ext.heads.training import greedy_sequence
from mtp_ext.models import load_model
model, heads_dir, text = sys.argv[1:]
backbone = load_model(model)[0]
heads = MTPHeadsModel(backbone, num_heads=2)
with torch.no_grad():
    heads.heads[0].linear.weight.fill_(float("nan"))
heads.save(heads_dir)
common = ["--model", model, "--data", text, "--seq-len", "16"]
print("eval-heads", main(["eval-heads", *common, "--heads-dir", heads_dir, "--tokens", "30"]), flush=True)
print("generate", main(["generate", "--model", model, "--prompt", "hello world", "--max-new-tokens", "4",
                        "--drafter", f"heads:{heads_dir}"]), flush=True)
with torch.no_grad():
    backbone.model.norm.weight.fill_(float("nan"))
try:
    greedy_sequence(heads, heads(torch.tensor([[1, 2, 3, 4]]))[0], torch.tensor([[1, 2, 3, 4]]))
except ValueError as error:
    print("greedy", error, flush=True)
"""


def test_nan_heads_are_an_error_not_silent_nan(files, tmp_path):
    """In a subprocess: multihead_unembed_topk crashed on NaN logits before csrc/cpu/multihead.cpp
    ranked them like torch.sort; a crash here means that kernel fix is missing."""
    heads = tmp_path / "nan-heads"
    result = run_python(NAN_HEADS.replace("sys.argv[1:]", repr([str(files["model"]), str(heads),
                                                                 str(files["text"])])))
    assert result.returncode >= 0, (f"the subprocess died of signal {-result.returncode}: multihead_unembed_topk "
                                    f"lacks the NaN fix\n{result.stdout}")
    assert result.returncode == 0, result.stderr
    printed = result.stdout
    assert "eval-heads 2" in printed and "generate 2" in printed and "greedy the heads produce NaN logits" in printed
    message = f"error: the heads produce NaN logits: the checkpoint {heads} or the model holds NaN/inf weights"
    assert result.stderr.count(message) == 2, result.stderr
