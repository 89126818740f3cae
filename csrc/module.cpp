// The Python module mtp_ext._C. The ops are reached through torch.ops.mtp_ext.*; this module
// only tells `import mtp_ext` how the library was built, so that a mismatch can be explained.
#include <torch/extension.h>

#ifndef MTP_EXT_TORCH_VERSION
#define MTP_EXT_TORCH_VERSION "unknown"
#endif
#ifndef MTP_EXT_CUDA_ARCHS
#define MTP_EXT_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, module) {
  module.attr("torch_version") = MTP_EXT_TORCH_VERSION;
#ifdef MTP_EXT_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
  module.attr("cuda_archs") = MTP_EXT_CUDA_ARCHS;
}
