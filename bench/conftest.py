"""Shared benchmark settings. Every benchmark compares an op with its baselines in the same run;
bench/summarize.py turns the JSON that pytest-benchmark writes into median ratios."""
import pytest
import torch


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.benchmark(min_rounds=5, warmup=True))


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return request.param


@pytest.fixture(params=["default", "1"])
def threads(request, device):
    """torch's intra-op threads for the CPU runs: the default, or one."""
    if request.param == "1" and device != "cpu":
        pytest.skip("thread count applies to the CPU")
    saved = torch.get_num_threads()
    if request.param == "1":
        torch.set_num_threads(1)
    yield f"{torch.get_num_threads()} threads" if device == "cpu" else "gpu"
    torch.set_num_threads(saved)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_on_device(benchmark, device: str, function, *args):
    """Benchmarks function(*args), waiting for the device so that GPU work is timed too."""

    def timed():
        result = function(*args)
        synchronize(device)
        return result

    return benchmark(timed)
