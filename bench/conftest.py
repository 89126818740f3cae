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


def smollm2_model(device: str = "cpu"):
    """(SmolLM2-135M on `device`, which weights, its tokenizer or None): the real one where it is
    prepared (make prepare), else random weights of its config (a GPU machine gets no real
    weights) and no tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    try:
        from mtp_ext.models import load_model, model_cache_dir

        if (model_cache_dir("smollm2-135m") / "config.json").is_file():
            model, tokenizer = load_model("smollm2-135m")
            return model.to(device), "real SmolLM2-135M (dequantised Q4_1)", tokenizer
    except (ImportError, RuntimeError):
        pass
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval().to(device), "random weights, SmolLM2-135M config", None
