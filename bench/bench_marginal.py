"""marginal_accumulate against the reference (softmax, zeroing rows of weight 0, bmm), a plain
softmax + bmm that does not guard against garbage rows, and torch.softmax alone (the floor:
one op that must read every logit).

Every weight is positive, the worst case for the fused kernel: it reads every row twice.
On the CPU each case runs with torch's default thread count and with one thread.

    make bench PYTEST_ARGS="-k marginal --benchmark-json=bench/marginal.json"
    python bench/summarize.py bench/marginal.json
"""
import pytest
import torch

import mtp_ext
from mtp_ext import reference

from conftest import time_on_device
from logits import lm_like_logits

SHAPES = [(8, 64, 49152)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run_marginal_accumulate(weights, logits):
    return mtp_ext.marginal_accumulate(weights, logits)


def run_reference(weights, logits):
    return reference.marginal_accumulate(weights, logits)


def run_softmax_bmm(weights, logits):
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return torch.bmm(weights[:, None, :], probs)[:, 0]


def run_softmax(weights, logits):
    return torch.softmax(logits, dim=-1)


CONTENDERS = {
    "marginal_accumulate": run_marginal_accumulate,
    "reference": run_reference,
    "softmax_bmm": run_softmax_bmm,
    "softmax": run_softmax,
}


@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "B{}xN{}xV{}".format(*shape))
def test_marginal(benchmark, device, threads, shape, dtype, contender):
    batch, candidates, vocab = shape
    logits = lm_like_logits(batch * candidates, vocab).reshape(shape).to(device, DTYPES[dtype])
    weights = torch.softmax(torch.randn(batch, candidates), dim=1).to(device)
    function = CONTENDERS[contender]
    benchmark.group = f"marginal {device} {threads} {dtype} B={batch} N={candidates} V={vocab}"
    benchmark.extra_info.update(contender=contender, baseline="softmax")
    time_on_device(benchmark, device, function, weights, logits)
