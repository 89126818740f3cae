"""Fixtures shared by the python tests."""
import os
import zlib

import pytest
import torch

import mtp_ext

# The tests exercise small_batch_linear wherever a model's few-row linears may use it, whichever
# path is faster on this machine; test_linear.py tests the measured choice itself.
os.environ.setdefault("MTP_EXT_LINEAR", "kernel")


def cuda_kernels_available() -> bool:
    """A CUDA device is present and mtp_ext was built with its CUDA kernels."""
    return torch.cuda.is_available() and mtp_ext.build_info()["cuda"]


def pytest_report_header(config):
    # Says up front whether the `cuda` tests can run, so that a run full of skips explains itself.
    return f"mtp_ext build: {mtp_ext.build_info()}; CUDA kernels usable: {cuda_kernels_available()}"


@pytest.fixture
def generator(request) -> torch.Generator:
    """A CPU generator seeded from the test's id: every parametrisation draws its own fresh
    inputs, and a rerun of the same test draws the same ones."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def restore_num_threads():
    """Puts torch's intra-op thread count back after a test that changes it."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny Llama checkpoint directory and a text file of random words, for the CLI tests."""
    from test_models_data import WORDS, save_tiny_checkpoint

    path = tmp_path / "model"
    save_tiny_checkpoint(path)
    text = tmp_path / "text.txt"
    generator = torch.Generator().manual_seed(0)
    text.write_text("\n".join(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=generator))
                              for _ in range(60)))
    return path, text
