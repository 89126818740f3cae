// Draft-tree packing on the CPU: the rules of csrc/common/tree.h, nodes then mask rows in
// parallel.
#include <ATen/Parallel.h>

#include <algorithm>

#include "../common/tree.h"

namespace mtp_ext {
namespace {

// Slots per parallel task: a slot costs a walk up its tree.
constexpr int64_t kNodeGrain = 256;
// Mask bytes per parallel task, in whole rows.
constexpr int64_t kMaskGrainBytes = 65536;

void pack_trees_cpu(const TreePacking& packing, c10::Device /*device*/) {
  const int64_t slots = packing.batch * packed_slots(packing);
  at::parallel_for(0, slots, kNodeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) pack_node(packing, index);
  });
  const int64_t rows_per_task = std::max<int64_t>(1, kMaskGrainBytes / mask_columns(packing));
  at::parallel_for(0, slots, rows_per_task, [&](int64_t begin, int64_t end) {
    for (int64_t mask_row = begin; mask_row < end; ++mask_row) {
      pack_mask_row(packing, mask_row, /*first_column=*/0, /*column_step=*/1);
    }
  });
}

TreePackOutputs tree_pack_cpu(const at::Tensor& tree_ids, const at::Tensor& parents,
                              const at::Tensor& counts, const at::Tensor& prefix_mask,
                              int64_t pad_id, int64_t sliding_window) {
  return tree_pack_op(tree_ids, parents, counts, prefix_mask, pad_id, sliding_window,
                      /*check_values=*/true, pack_trees_cpu);
}

TreePackOutputs tree_pack_teacher_cpu(const at::Tensor& tree_ids, const at::Tensor& parents,
                                      const at::Tensor& counts, const at::Tensor& seq_mask,
                                      int64_t pad_id, int64_t sliding_window,
                                      int64_t first_position) {
  return tree_pack_teacher_op(tree_ids, parents, counts, seq_mask, pad_id, sliding_window,
                              first_position, /*check_values=*/true, pack_trees_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CPU, m) {
  m.impl("tree_pack", &tree_pack_cpu);
  m.impl("tree_pack_teacher", &tree_pack_teacher_cpu);
}

}  // namespace mtp_ext
