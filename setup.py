"""Builds mtp_ext._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is
found. MTP_EXT_CUDA=1 forces CUDA (and fails loudly without it), MTP_EXT_CUDA=0 skips it.

Install with `pip install --no-build-isolation -e .` after installing torch: an isolated build
would fetch its own torch, a CUDA build of it on a machine without a GPU."""
import glob
import os
import platform
import shutil

# torch reads CUDA_HOME when cpp_extension is imported; /usr/local/bin/nvcc is a wrapper
# script that makes torch guess /usr/local.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_wanted() -> bool:
    choice = os.environ.get("MTP_EXT_CUDA", "auto").lower()
    available = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if choice in ("1", "true", "yes"):
        if not available:
            raise RuntimeError(
                "MTP_EXT_CUDA=1 but this torch has no CUDA "
                f"(torch {torch.__version__}) or nvcc is not on PATH"
            )
        return True
    if choice in ("0", "false", "no"):
        return False
    return available


def host_simd_flags() -> list[str]:
    """The widest of AVX-512 / AVX2 (+ FMA) that this x86 machine has: the exp loops vectorise
    16 or 8 wide and fmaf becomes one instruction. The library is built where it runs, like
    -march=native; MTP_EXT_NATIVE=0 builds for any x86-64."""
    if os.environ.get("MTP_EXT_NATIVE", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set(cpuinfo.read().split())
    except OSError:
        return []
    if not {"avx2", "fma"} <= flags:
        return []
    simd = ["-mavx2", "-mfma"]
    if {"avx512f", "avx512dq", "avx512vl"} <= flags:
        simd += ["-mavx512f", "-mavx512dq", "-mavx512vl"]
    return simd


def extension():
    with_cuda = cuda_wanted()
    sources = ["csrc/ops.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math lets gcc if-convert and vectorise the exp loops (values are unchanged).
    # -fopenmp: at::parallel_for is inline OpenMP, serial in a library built without it.
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-fno-trapping-math",
                 f'-DMTP_EXT_TORCH_VERSION="{torch.__version__}"']
    cxx_flags += host_simd_flags()
    if not with_cuda:
        return CppExtension("mtp_ext._C", sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=["-fopenmp"])
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    cxx_flags += ["-DMTP_EXT_WITH_CUDA", f'-DMTP_EXT_CUDA_ARCHS="{archs}"']
    nvcc_flags = ["-O3", "-lineinfo", "-DMTP_EXT_WITH_CUDA", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "mtp_ext._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["mtp_ext", "mtp_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
