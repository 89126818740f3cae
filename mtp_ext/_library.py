"""Loads the compiled library and explains what went wrong when it cannot."""
import torch


def load_compiled_library():
    """Import mtp_ext._C (which registers torch.ops.mtp_ext.*) and check it matches torch."""
    try:
        from mtp_ext import _C
    except ImportError as error:
        raise ImportError(
            "mtp_ext's compiled library (mtp_ext._C) could not be loaded: "
            f"{error}. Build it with `pip install --no-build-isolation -e .` after installing "
            "torch (or run `make test`, which does both). If it was built, it may have been "
            "built against another torch: rebuild it."
        ) from error
    built_for = _C.torch_version
    if built_for != torch.__version__:
        raise ImportError(
            f"mtp_ext._C was built against torch {built_for} but torch {torch.__version__} is "
            "installed: rebuild with `pip install --no-build-isolation -e .`"
        )
    return _C


def build_info() -> dict:
    """How the compiled library was built: torch version, CUDA kernels and their archs."""
    from mtp_ext import _C

    return {"torch": _C.torch_version, "cuda": bool(_C.with_cuda), "cuda_archs": _C.cuda_archs}
