"""The fused multi-head unembedding ops against the plain approach: N separate linear layers to
full logits, then topk / cross_entropy per head (SmolLM2-135M's sizes: H=576, V=49,152).

On the CPU each case runs with torch's default thread count and with one thread.

- multihead_unembed_topk (N=4 heads, B=64 rows, k=8 and 64) against F.linear + topk per head,
  and F.linear + topk + logsumexp per head (the same outputs as the op).
- multihead_cross_entropy forward + backward (N=4, M=2,048, fp32) against F.linear +
  cross_entropy per head, then the mean. Besides the time, each case records its peak memory
  (extra_info peak_mib): on the CPU the growth of the peak resident set of a fresh process
  over one forward + backward, after the inputs exist (torch's CPU allocator keeps no
  statistics; RSS also counts freed memory that malloc keeps, so it is an upper bound); on
  CUDA torch.cuda.max_memory_allocated above the memory held before the call.

The cross-entropy case does about 1.4 TFLOP per call: slow on a CPU, hence few rounds.

    make bench PYTEST_ARGS="-k multihead --benchmark-json=bench/multihead.json"
    python bench/summarize.py bench/multihead.json
"""
import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import mtp_ext

from conftest import synchronize, time_on_device

HIDDEN_SIZE = 576
VOCAB = 49152
TOPK_HEADS, TOPK_ROWS = 4, 64
CE_HEADS, CE_ROWS = 4, 2048


def unembedding(device: str, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(VOCAB, HIDDEN_SIZE, generator=generator) / HIDDEN_SIZE**0.5).to(device, dtype)


def hidden_states(heads: int, rows: int, device: str, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(heads, rows, HIDDEN_SIZE, generator=generator) * 3).to(device, dtype)


# ----------------------------------------------------------------------------- top-k


def run_multihead_unembed_topk(hidden, weight, k):
    return mtp_ext.multihead_unembed_topk(hidden, weight, k)


def run_linear_topk(hidden, weight, k):
    return [torch.topk(F.linear(head, weight).float(), k, dim=-1) for head in hidden]


def run_linear_topk_logsumexp(hidden, weight, k):
    results = []
    for head in hidden:
        logits = F.linear(head, weight).float()
        results.append((torch.topk(logits, k, dim=-1), torch.logsumexp(logits, dim=-1)))
    return results


TOPK_CONTENDERS = {
    "multihead_unembed_topk": run_multihead_unembed_topk,
    "linear_topk": run_linear_topk,
    "linear_topk_logsumexp": run_linear_topk_logsumexp,
}
TOPK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("contender", list(TOPK_CONTENDERS))
@pytest.mark.parametrize("k", [8, 64])
@pytest.mark.parametrize("dtype", list(TOPK_DTYPES))
def test_multihead_unembed_topk(benchmark, device, threads, dtype, k, contender):
    weight = unembedding(device, TOPK_DTYPES[dtype])
    hidden = hidden_states(TOPK_HEADS, TOPK_ROWS, device, TOPK_DTYPES[dtype])
    benchmark.group = (f"multihead_unembed_topk {device} {threads} {dtype} N={TOPK_HEADS} B={TOPK_ROWS} "
                       f"H={HIDDEN_SIZE} V={VOCAB} k={k}")
    benchmark.extra_info.update(contender=contender, baseline="linear_topk")
    time_on_device(benchmark, device, TOPK_CONTENDERS[contender], hidden, weight, k)


# ----------------------------------------------------------------------------- cross-entropy


def run_multihead_cross_entropy(hidden, weight, targets):
    return mtp_ext.multihead_cross_entropy(hidden, weight, targets)


def run_linear_cross_entropy(hidden, weight, targets):
    losses = [F.cross_entropy(F.linear(head, weight), head_targets) for head, head_targets in zip(hidden, targets)]
    return torch.stack(losses).mean()


CE_CONTENDERS = {
    "multihead_cross_entropy": run_multihead_cross_entropy,
    "linear_cross_entropy": run_linear_cross_entropy,
}


def cross_entropy_inputs(device: str):
    """Leaf hidden and weight that need gradients, and targets with a tenth ignored."""
    generator = torch.Generator().manual_seed(2)
    targets = torch.randint(0, VOCAB, (CE_HEADS, CE_ROWS), generator=generator)
    targets[torch.rand((CE_HEADS, CE_ROWS), generator=generator) < 0.1] = -100
    hidden = hidden_states(CE_HEADS, CE_ROWS, device).requires_grad_()
    return hidden, unembedding(device).requires_grad_(), targets.to(device)


def forward_backward(contender: str, hidden, weight, targets):
    hidden.grad = weight.grad = None
    CE_CONTENDERS[contender](hidden, weight, targets).backward()


_PEAK_RSS_SCRIPT = """
import sys
sys.path.insert(0, {bench_dir!r})
import torch
from bench_multihead import cross_entropy_inputs, forward_backward

def rss_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))

inputs = cross_entropy_inputs("cpu")
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # resets the peak resident set (VmHWM) to the current one
before = rss_kib("VmRSS:")
forward_backward({contender!r}, *inputs)
print((rss_kib("VmHWM:") - before) / 1024)
"""


@functools.lru_cache(maxsize=None)
def peak_memory_mib(contender: str, device: str) -> float:
    """Peak memory that one forward + backward adds to its inputs (see the module docstring),
    measured once per contender and device (with torch's default thread count)."""
    if device == "cuda":
        inputs = cross_entropy_inputs(device)
        synchronize(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward(contender, *inputs)
        synchronize(device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    script = _PEAK_RSS_SCRIPT.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), contender=contender)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            check=True)
    return float(result.stdout.split()[-1])


@pytest.mark.benchmark(min_rounds=3, warmup=False)
@pytest.mark.parametrize("contender", list(CE_CONTENDERS))
def test_multihead_cross_entropy(benchmark, device, threads, contender):
    inputs = cross_entropy_inputs(device)
    benchmark.group = (f"multihead_cross_entropy forward+backward {device} {threads} fp32 N={CE_HEADS} M={CE_ROWS} "
                       f"H={HIDDEN_SIZE} V={VOCAB}")
    benchmark.extra_info.update(contender=contender, baseline="linear_cross_entropy",
                                peak_mib=round(peak_memory_mib(contender, device), 1))
    time_on_device(benchmark, device, forward_backward, contender, *inputs)
