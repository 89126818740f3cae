"""eval, analyze and train-heads on torch.distributed: torchrun with 2 ranks (gloo, 127.0.0.1,
free ports, every launch bounded) against one process; a rank that fails; a rendezvous that
never completes; a model in part offloaded by a device map.

Launches cost seconds each (every rank imports torch and transformers), so one launch runs
several commands where it can (the driver below), in one torchrun process group each.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from mtp_ext.cli import main
from mtp_ext.evaluate import evaluate_mtp
from mtp_ext.integrations.distributed import DistributedError, World, balanced_share
from mtp_ext.models import load_model

from test_models_data import WORDS, tiny_tokenizer
from tiny_models import tiny_config

LAUNCH_TIMEOUT_S = 240
# Runs the CLI commands given as JSON in one process per rank, one World after another; can make
# one rank fail inside the evaluation of one command, or each training step slower (time to
# interrupt it).
DRIVER = """
import json, os, sys, time
from mtp_ext import evaluate
from mtp_ext.cli import main
from mtp_ext.heads import training

plan = json.loads(sys.argv[1])
if plan.get("step_sleep"):
    step = training._training_step
    def slow(*args):
        time.sleep(plan["step_sleep"])
        return step(*args)
    training._training_step = slow
for index, argv in enumerate(plan["commands"]):
    if index == plan.get("fail_command") and int(os.environ["RANK"]) == plan["fail_rank"]:
        def failing(*args):
            raise RuntimeError("injected failure")
        evaluate._evaluate_window = failing
    code = main(argv)
    if code:
        sys.exit(code)
"""


@pytest.fixture(autouse=True)
def one_thread():
    """The one-process runs take one thread, as each rank does: tiny models gain nothing from
    more, and on a busy machine every short parallel region waits for a descheduled thread."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_command(tmp_path, plan: dict | None = None, argv: list[str] | None = None) -> list[str]:
    """torchrun with 2 ranks on 127.0.0.1: the driver with `plan`, or `-m mtp_ext.cli` with `argv`."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(free_port())]
    if argv is not None:
        return launch + ["-m", "mtp_ext.cli", *argv]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return launch + [str(driver), json.dumps(plan)]


def torchrun(tmp_path, **what) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(tmp_path, **what), capture_output=True, text=True, cwd=tmp_path,
                          timeout=LAUNCH_TIMEOUT_S)


def two_machines(tmp_path, argv: list[str]) -> list[tuple[int, str]]:
    """`-m mtp_ext.cli argv` as on two machines: torchrun --nnodes 2 twice, one rank each, at a
    c10d rendezvous on 127.0.0.1; (exit status, output) of each launcher."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "two-machines",
               "-m", "mtp_ext.cli", *argv]
    launchers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
                 for _ in range(2)]
    results = []
    try:
        for launcher in launchers:
            output = launcher.communicate(timeout=LAUNCH_TIMEOUT_S)[0]
            results.append((launcher.returncode, output))
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
    return results


def save_checkpoint(path, architecture: str) -> None:
    """A tiny random model of `architecture` with the tiny word tokenizer, peaked enough that
    nuclei of every size occur."""
    tokenizer = tiny_tokenizer()
    config = tiny_config(architecture, len(tokenizer), context=64)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(6.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"llama": dir, "gemma3": dir, "text": a text file of random words}."""
    root = tmp_path_factory.mktemp("distributed")
    paths = {architecture: root / architecture for architecture in ("llama", "gemma3")}
    for architecture, path in paths.items():
        save_checkpoint(path, architecture)
    generator = torch.Generator().manual_seed(1)
    paths["text"] = root / "text.txt"
    paths["text"].write_text("\n".join(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,),
                                                                                  generator=generator))
                                       for _ in range(60)))
    return paths


def assert_same_results(single, distributed, path=""):
    """Integers (counts) identical, floats (sums, means) within 1e-6 relative, the rest equal."""
    if isinstance(single, dict):
        assert single.keys() == distributed.keys(), path
        for key in single:
            assert_same_results(single[key], distributed[key], f"{path}.{key}")
    elif isinstance(single, list):
        assert len(single) == len(distributed), path
        for index, (one, other) in enumerate(zip(single, distributed)):
            assert_same_results(one, other, f"{path}[{index}]")
    elif isinstance(single, float):
        assert distributed == pytest.approx(single, rel=1e-6, abs=1e-12), path
    else:
        assert single == distributed and type(single) is type(distributed), path


def without(report: dict, *keys: str) -> dict:
    return {key: value for key, value in report.items() if key not in keys}


def eval_argv(model, text, json_path) -> list[str]:
    # 3 steps with capped nuclei and trees: bounds that are not trivial; batches of 3 sequences
    # and windows of 2 anchors: many units, unevenly shared.
    return ["eval", "--model", str(model), "--data", str(text), "--tokens", "131", "--seq-len", "24", "--steps", "3",
            "--top-p", "0.9", "--max-candidates", "6", "--max-nodes", "24", "--batch-size", "3", "--json",
            str(json_path)]


def analyze_argv(model, text, out) -> list[str]:
    return ["analyze", "--model", str(model), "--data", str(text), "--tokens", "131", "--seq-len", "24", "--out",
            str(out)]


def heads_argv(model, text, out, *extra: str) -> list[str]:
    return ["train-heads", "--model", str(model), "--data", str(text), "--seq-len", "8", "--heads", "2",
            "--batch-size", "3", "--lr", "1e-2", "--eval-tokens", "30", "--out", str(out), *extra]


def test_balanced_share_is_contiguous_complete_and_balanced(generator):
    for size in (1, 2, 3, 5):
        for count in (0, 1, 4, 7, 30):
            weights = torch.randint(0, 50, (count,), generator=generator).tolist()
            shares = [balanced_share(weights, rank, size) for rank in range(size)]
            assert [index for share in shares for index in share] == list(range(count))
            total = sum(weights)
            for share in shares:  # no share exceeds its part by more than one item's weight
                assert sum(weights[index] for index in share) <= total / size + max(weights, default=0)
    assert balanced_share([0, 0, 0], 1, 2) == range(1, 3)  # no weight: split by count


def waiting_rank(timeout_s: float = 0.3) -> World:
    """Rank 0 of 2 on an in-process store, with no other rank behind it: what it sees of the
    others is what the test writes into the store."""
    return World(rank=0, size=2, timeout_s=timeout_s, store=torch.distributed.HashStore(), namespace="test")


def test_a_rank_that_makes_no_progress_is_named_after_the_timeout():
    world = waiting_rank()
    with world.progress([5, 5, 5, 5], disable=True) as bar:  # rank 0: items 0-1, rank 1: items 2-3
        bar.update(10)
        world.store.add(f"{bar.key}/1", 3)
        world.store.add(bar.key, 3)
        started = time.monotonic()
        with pytest.raises(DistributedError, match="no rank made progress for 0 s .rank 1 at 3 of 10.: those ranks "
                                                   "died or hung"):
            bar.wait()
        assert time.monotonic() - started < 5


def test_waiting_ranks_stop_on_a_reported_failure_and_name_it():
    store = torch.distributed.HashStore()
    rank = {index: World(rank=index, size=2, timeout_s=60, store=store, namespace="test") for index in (0, 1)}
    rank[1].record_failure(ValueError("the data is bad\nmore detail"))
    with rank[0].progress([1, 1], disable=True) as bar:
        with pytest.raises(DistributedError, match="rank 0 of 2: stopping: rank 1 failed: ValueError: the data is bad$"):
            bar.wait()
    rank[0].record_failure(RuntimeError("out of memory"))
    with pytest.raises(DistributedError, match="rank 1 of 2: stopping: rank 0 failed: RuntimeError: out of memory$"):
        with rank[1].main_first("the feature cache"):
            pass
    late = World(rank=1, size=2, timeout_s=0.2, store=torch.distributed.HashStore(), namespace="test")
    with pytest.raises(DistributedError, match="rank 0 has not finished the feature cache within 0 s"):
        with late.main_first("the feature cache"):
            pass


def test_two_ranks_equal_one_process_and_a_failing_rank_ends_the_launch(tmp_path, files):
    """eval and analyze (two architectures) and joint heads on 2 ranks against one process; then,
    in the same launch, an eval in which rank 1 raises."""
    runs = {name: tmp_path / name for name in ("two", "one")}
    for run in runs.values():
        run.mkdir()
    commands = {name: [eval_argv(files[a], files["text"], run / f"eval-{a}.json") for a in ("llama", "gemma3")]
                + [analyze_argv(files[a], files["text"], run / f"analysis-{a}") for a in ("llama", "gemma3")]
                + [heads_argv(files["llama"], files["text"], run / "joint", "--joint", "--steps", "4",
                              "--backbone-lr", "1e-3")]
                for name, run in runs.items()}
    failed_json = tmp_path / "failed.json"
    failing = eval_argv(files["llama"], files["text"], failed_json) + ["--dist-timeout", "30"]
    started = time.monotonic()
    launched = torchrun(tmp_path, plan={"commands": commands["two"] + [failing], "fail_command": 5, "fail_rank": 1})
    assert time.monotonic() - started < LAUNCH_TIMEOUT_S
    assert launched.returncode != 0
    assert "error: rank 1 of 2: injected failure" in launched.stderr, launched.stderr[-3000:]
    assert "mtp_ext/evaluate.py" not in launched.stderr  # said in a line, not with a traceback
    assert not failed_json.exists() and not list(tmp_path.glob(".failed.json.*"))  # no partial JSON
    for argv in commands["one"]:
        assert main(argv) == 0
    # Rank 0 alone prints the tables.
    assert launched.stdout.count("| step | positions |") == 2 + 1  # two evaluations, the heads' held-out table
    for architecture in ("llama", "gemma3"):
        one = json.loads((runs["one"] / f"eval-{architecture}.json").read_text())
        two = json.loads((runs["two"] / f"eval-{architecture}.json").read_text())
        assert two["world"]["size"] == 2 and two["world"]["backend"] == "gloo" and one["world"]["size"] == 1
        assert 0 < two["world"]["reduced_bytes"] < 1024  # the counts and sums, not the data
        assert two["positions"] % 2 == 1  # shares of positions that cannot be equal
        assert two["steps"][2]["accuracy_lower"]["top5"] < two["steps"][2]["accuracy_upper"]["top5"]  # capped trees
        assert_same_results(without(one, "seconds", "positions_per_second", "world"),
                            without(two, "seconds", "positions_per_second", "world"))
        one = json.loads((runs["one"] / f"analysis-{architecture}" / "analysis.json").read_text())
        two = json.loads((runs["two"] / f"analysis-{architecture}" / "analysis.json").read_text())
        assert two["world"]["size"] == 2 and len(two["nucleus_size_histogram"]["0.99"]) > 1
        assert_same_results(without(one, "world"), without(two, "world"))
        assert (runs["two"] / f"analysis-{architecture}" / "nucleus_sizes.png").is_file()
    one = json.loads((runs["one"] / "joint" / "train.json").read_text())["training"]
    two = json.loads((runs["two"] / "joint" / "train.json").read_text())["training"]
    assert two["world_size"] == 2 and len(two["losses"]) == 4
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["losses"][-1] < two["losses"][0]


def test_train_heads_interrupted_on_two_ranks_resumes_to_the_uninterrupted_heads(tmp_path, files, capsys):
    steps, out = 24, tmp_path / "two"
    extra = ("--whs", "--steps", str(steps), "--checkpoint-every", "1", "--shuffle", "--train-windows", "7",
             "--eval-every", "10", "--features", str(tmp_path / "features"), "--features-dtype", "float32")
    argv = heads_argv(files["llama"], files["text"], out, *extra)
    launcher = subprocess.Popen(torchrun_command(tmp_path, plan={"commands": [argv], "step_sleep": 0.2}),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not (out / "train.json").exists() and time.monotonic() < deadline:
            if (out / "training_state.pt").is_file() and torch.load(out / "training_state.pt")["record"]["step"] >= 3:
                launcher.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        output, _ = launcher.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    stopped = torch.load(out / "training_state.pt")["record"]
    assert 3 <= stopped["step"] < steps, output[-3000:]
    assert not (out / "train.json").exists()
    later = tmp_path / "one-rank-later"  # the same checkpoint, resumed on one rank
    later.mkdir()
    for name in ("training_state.pt", "heads.safetensors", "heads_config.json"):
        (later / name).write_bytes((out / name).read_bytes())

    # Resumed by 2 "machines": two launchers of one rank each, meeting at a c10d rendezvous.
    for code, output in two_machines(tmp_path, argv + ["--threads", "1"]):
        assert code == 0, output[-3000:]
    assert main(heads_argv(files["llama"], files["text"], tmp_path / "one", *extra)) == 0
    assert main(heads_argv(files["llama"], files["text"], later, *extra)) == 0
    assert "trained on 2 rank(s)) on 1: each step is the same 3 windows" in capsys.readouterr().err

    one = json.loads((tmp_path / "one" / "train.json").read_text())["training"]
    two = json.loads((out / "train.json").read_text())["training"]
    assert len(two["losses"]) == steps and two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert [point["step"] for point in two["curve"]] == [0, 10, 20, 24]
    for got, want in zip(two["curve"], one["curve"]):
        assert [step["loss"] for step in got["held_out"]] == pytest.approx([step["loss"] for step in want["held_out"]],
                                                                           rel=1e-5)
    straight = load_file(tmp_path / "one" / "heads.safetensors")
    for directory in (out, later):
        heads = load_file(directory / "heads.safetensors")
        assert heads.keys() == straight.keys()
        for name, value in heads.items():
            torch.testing.assert_close(value, straight[name], rtol=1e-5, atol=1e-6)


def test_a_rendezvous_that_never_completes_is_an_error_naming_it(files, monkeypatch, capsys, restore_num_threads):
    port = free_port()
    for name, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert main(eval_argv(files["llama"], files["text"], files["text"].parent / "never.json")
                + ["--dist-timeout", "1"]) == 2
    error = capsys.readouterr().err
    assert f"error: rank 0 of 2: the rendezvous at 127.0.0.1:{port} did not complete within 1 s" in error
    assert "--nproc-per-node" in error and "Traceback" not in error
    assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) // 2)  # the cores split between 2 ranks


def offloaded_checkpoint(path) -> None:
    """A 4-layer tiny Llama, large enough for a device map to matter at a budget of kilobytes."""
    config = LlamaConfig(vocab_size=len(tiny_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(6.0)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)


def test_a_model_offloaded_in_part_to_the_disk_evaluates_as_the_plain_one(tmp_path, files, capsys):
    offloaded_checkpoint(tmp_path / "model")
    placement = dict(device_map="auto", max_memory={"cpu": "100KB"}, offload_folder=tmp_path / "offload")
    model, _ = load_model(str(tmp_path / "model"), **placement)
    devices = model.hf_device_map
    assert {"cpu", "disk"} <= set(devices.values())  # part in memory, part on the disk: the hooks load them
    assert devices["model.embed_tokens"] == devices["lm_head"] == "cpu"
    plain, _ = load_model(str(tmp_path / "model"))
    sequences = [[1, 5, 2, 8, 3, 9, 4, 7, 7, 1], [4, 3, 2, 6, 5]]
    got = evaluate_mtp(model, sequences, steps=3, top_p=0.9, max_candidates=6, progress=False).to_dict()
    want = evaluate_mtp(plain, sequences, steps=3, top_p=0.9, max_candidates=6, progress=False).to_dict()
    assert without(got, "seconds", "positions_per_second") == without(want, "seconds", "positions_per_second")

    def argv(name: str) -> list[str]:
        return ["eval", "--model", str(tmp_path / "model"), "--data", str(files["text"]), "--tokens", "47",
                "--seq-len", "24", "--max-candidates", "6", "--json", str(tmp_path / name)]

    assert main(argv("offloaded.json") + ["--device-map", "auto", "--max-memory", "cpu=100KB", "--offload-folder",
                                          str(tmp_path / "cli-offload")]) == 0
    assert main(argv("plain.json")) == 0
    offloaded, plain_report = (json.loads((tmp_path / name).read_text()) for name in ("offloaded.json", "plain.json"))
    assert_same_results(without(plain_report, "seconds", "positions_per_second"),
                        without(offloaded, "seconds", "positions_per_second"))
    capsys.readouterr()
    assert main(argv("never.json") + ["--device-map", "auto", "--max-memory", "cpu=100KB"]) == 2
    assert "--offload-folder" in capsys.readouterr().err
    # Speculative decoding through the hooks: greedy output is model.generate's.
    assert main(["generate", "--model", str(tmp_path / "model"), "--prompt", "a b c hello world", "--max-new-tokens",
                 "8", "--compare", "--device-map", "auto", "--max-memory", "cpu=100KB", "--offload-folder",
                 str(tmp_path / "generate-offload")]) == 0
    assert "outputs identical" in capsys.readouterr().out


def test_train_token_head_refuses_several_ranks(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train-token-head", "--model", str(files["llama"]), "--data", str(files["text"]), "--out",
                 str(tmp_path / "head")]) == 2
    assert "train-token-head runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "head").exists()
