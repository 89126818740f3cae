"""End to end: `mtp-ext eval` launched by torchrun, 2 ranks x 1 thread against 1 rank x 2 threads
(the baseline) on the same positions, in one run: whether scaling out costs anything before it
adds devices.

Real SmolLM2-135M on Austen when they are prepared (make prepare); otherwise a tiny random Llama
on random words (the extra_info says which). Each round is one launch; the timed figure is the
launch (start-up and model loading included), and extra_info holds the medians of what the
evaluation itself reports: positions per second (rank 0's wall time from the start of the work
to the reduced result) and the bytes each rank put into collectives per position.
"""
import json
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

POSITIONS = 128
SEQ_LEN = 65  # two sequences of 64 positions: one batch, whose windows the ranks share
CONTENDERS = {"1 rank x 2 threads": 1, "2 ranks x 1 thread": 2}
BASELINE = "1 rank x 2 threads"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    """(--model, --data, a description) of what is evaluated."""
    from mtp_ext.models import model_cache_dir

    try:
        from mtp_ext import data

        data.load_text("austen")
        if (model_cache_dir("smollm2-135m") / "config.json").is_file():
            return "smollm2-135m", "austen", "real SmolLM2-135M (dequantised Q4_1), Austen"
    except (ImportError, RuntimeError, ValueError):
        pass
    sys.path.insert(0, str(Path(__file__).parent.parent / "python_tests"))
    from test_distributed import WORDS, save_checkpoint

    root = tmp_path_factory.mktemp("bench-distributed")
    save_checkpoint(root / "model", "llama")
    (root / "text.txt").write_text(" ".join(WORDS[index % len(WORDS)] for index in range(0, 7 * 4000, 7)))
    return str(root / "model"), str(root / "text.txt"), "random tiny Llama, random words"


@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_eval_on_ranks(benchmark, model_and_data, tmp_path, contender):
    model, data, weights = model_and_data
    ranks = CONTENDERS[contender]
    benchmark.group = f"mtp-ext eval on torchrun, {weights}, steps=2, top-p 0.99, cap 64, {POSITIONS} positions"
    benchmark.extra_info.update(contender=contender, baseline=BASELINE, weights=weights)
    rates, bytes_per_position, reports = [], [], []

    def launch():
        path = tmp_path / "eval.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
                   "127.0.0.1", "--master-port", str(free_port()), "-m", "mtp_ext.cli", "eval", "--model", model,
                   "--data", data, "--tokens", str(POSITIONS), "--seq-len", str(SEQ_LEN), "--json", str(path)]
        subprocess.run(command, check=True, capture_output=True, timeout=1800)
        report = json.loads(path.read_text())
        rates.append(report["positions_per_second"])
        bytes_per_position.append(report["world"]["reduced_bytes"] / report["positions"])
        reports.append(report)

    benchmark.pedantic(launch, rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(positions_per_second=statistics.median(rates), rounds_positions_per_second=rates,
                                reduced_bytes_per_position=statistics.median(bytes_per_position),
                                world=reports[-1]["world"], step2_accuracy=reports[-1]["steps"][1]["accuracy"])
