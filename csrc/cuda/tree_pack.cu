// Draft-tree packing on CUDA: the rules of csrc/common/tree.h, a thread per packed slot, then
// a block per mask row with a thread per column.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/tree.h"
#include "graph_capture.h"

namespace mtp_ext {
namespace {

constexpr int kThreads = 256;
// Enough blocks of the slot kernel to fill any GPU; it loops over the rest.
constexpr int64_t kMaxNodeBlocks = 4096;

__global__ void __launch_bounds__(kThreads) pack_nodes_kernel(TreePacking packing) {
  const int64_t slots = packing.batch * packed_slots(packing);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; index < slots;
       index += stride) {
    pack_node(packing, index);
  }
}

__global__ void __launch_bounds__(kThreads) pack_mask_kernel(TreePacking packing) {
  pack_mask_row(packing, blockIdx.x, threadIdx.x, kThreads);
}

void pack_trees_cuda(const TreePacking& packing, c10::Device device) {
  const c10::cuda::CUDAGuard guard(device);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t slots = packing.batch * packed_slots(packing);
  const int64_t node_blocks = std::min((slots + kThreads - 1) / kThreads, kMaxNodeBlocks);
  pack_nodes_kernel<<<node_blocks, kThreads, 0, stream>>>(packing);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  pack_mask_kernel<<<slots, kThreads, 0, stream>>>(packing);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TreePackOutputs tree_pack_cuda(const at::Tensor& tree_ids, const at::Tensor& parents,
                               const at::Tensor& counts, const at::Tensor& prefix_mask,
                               int64_t pad_id, int64_t sliding_window) {
  // The value checks synchronise, so they are skipped while a CUDA graph is captured.
  return tree_pack_op(tree_ids, parents, counts, prefix_mask, pad_id, sliding_window,
                      /*check_values=*/!capturing_graph(), pack_trees_cuda);
}

TreePackOutputs tree_pack_teacher_cuda(const at::Tensor& tree_ids, const at::Tensor& parents,
                                       const at::Tensor& counts, const at::Tensor& seq_mask,
                                       int64_t pad_id, int64_t sliding_window,
                                       int64_t first_position) {
  return tree_pack_teacher_op(tree_ids, parents, counts, seq_mask, pad_id, sliding_window,
                              first_position, /*check_values=*/!capturing_graph(),
                              pack_trees_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CUDA, m) {
  m.impl("tree_pack", &tree_pack_cuda);
  m.impl("tree_pack_teacher", &tree_pack_teacher_cuda);
}

}  // namespace mtp_ext
