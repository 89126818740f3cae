"""small_batch_linear against F.linear over a whole model's worth of linear layers: the 210
weight matrices of SmolLM2-135M's 30 decoder layers (q, k, v, o, gate, up, down; 425 MB of
float32, far more than the caches hold, as in a forward pass), at 1-32 rows (the tokens of a
draft tree's verification pass, a batch's, or 1 for plain decoding). One call covers all 210 layers.

On the CPU each case runs with torch's default thread count and with one thread; on CUDA the
op is at::linear, so only the CPU is measured. "measured_choice" is what small_batch_linears
runs: per layer shape and row count, whichever of the two was measured faster on this machine
(mtp_ext.models.linear_choice; MTP_EXT_LINEAR unset).

    make bench PYTEST_ARGS="-k linear --benchmark-json=bench/linear.json"
    python bench/summarize.py bench/linear.json
"""
import pytest
import torch
import torch.nn.functional as F

import mtp_ext
from mtp_ext.models.adapters import SMALL_BATCH_ROWS, _small_batch_forward

HIDDEN, INTERMEDIATE, KV = 576, 1536, 192  # SmolLM2-135M
LAYER_SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
                (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
LAYERS = 30


@pytest.fixture(scope="module")
def weights() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator) / shape[1] ** 0.5
            for _ in range(LAYERS) for shape in LAYER_SHAPES]


def every_layer(function, inputs: dict, weights: list[torch.Tensor]) -> None:
    for weight in weights:
        function(inputs[weight.shape[1]], weight)


class MeasuredChoice:
    """What small_batch_linears runs for each layer: the faster of the two as measured on this
    machine, each layer's forward bound once as the context manager binds it."""

    def __init__(self):
        self.forwards = {}

    def __call__(self, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        forward = self.forwards.get(id(weight))
        if forward is None:
            forward = self.forwards[id(weight)] = _small_batch_forward(weight, None, SMALL_BATCH_ROWS)
        return forward(input)


def every_layer_without_grad(function, inputs: dict, weights: list[torch.Tensor]) -> None:
    with torch.no_grad():  # as in decoding: small_batch_linears leaves autograd to F.linear
        every_layer(function, inputs, weights)


CONTENDERS = {
    "small_batch_linear": mtp_ext.small_batch_linear,
    "F.linear": F.linear,
    "measured_choice": MeasuredChoice(),
}


@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("rows", [1, 2, 4, 8, 16, 24, 32])
def test_linear(benchmark, device, threads, weights, rows, contender):
    if device != "cpu":
        pytest.skip("on CUDA small_batch_linear is at::linear")
    benchmark.group = f"linear {threads} rows={rows} (SmolLM2's 210 layers)"
    benchmark.extra_info.update(contender=contender, baseline="F.linear", rows=rows)
    generator = torch.Generator().manual_seed(rows)
    inputs = {size: torch.randn((rows, size), generator=generator) for size in (HIDDEN, INTERMEDIATE)}
    sweep = every_layer_without_grad if contender == "measured_choice" else every_layer
    sweep(CONTENDERS[contender], inputs, weights)  # the measured choice is made here, not timed
    benchmark(sweep, CONTENDERS[contender], inputs, weights)
