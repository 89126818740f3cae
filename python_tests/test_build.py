"""The build: build information, the CMake library, the import error messages."""
import os
import subprocess
import sys

import pytest
import torch

import mtp_ext
from mtp_ext import _library


def test_build_info_matches_installed_torch():
    info = mtp_ext.build_info()
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"]


def test_import_error_says_how_to_rebuild(monkeypatch):
    monkeypatch.setattr(mtp_ext._C, "torch_version", "0.0.0-other")
    with pytest.raises(ImportError, match="built against torch 0.0.0-other.*rebuild"):
        _library.load_compiled_library()


CMAKE_LIBRARY = os.environ.get("MTP_EXT_CMAKE_LIB", "")


@pytest.mark.skipif(not os.path.exists(CMAKE_LIBRARY),
                    reason="no CMake build given (make test sets MTP_EXT_CMAKE_LIB)")
def test_cmake_library_registers_working_ops():
    # A fresh interpreter: the Python package registers the same op library.
    script = f"""
import torch
torch.ops.load_library({CMAKE_LIBRARY!r})
logits = torch.tensor([[3.0, 1.0, 2.0, -1.0]])
ids, probs, counts, mass = torch.ops.mtp_ext.top_p_candidates(logits, torch.tensor([0.8]), 3, 1.0)
assert ids.tolist() == [[0, 2, -1]], ids
assert counts.tolist() == [2], counts
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
