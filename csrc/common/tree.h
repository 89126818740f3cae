// Draft-tree packing (tree_pack, tree_pack_teacher), written once for the CPU and the CUDA
// kernel.
//
// A packing holds, per batch row, `trees` trees of up to `nodes` nodes each, after a sequence
// of `seq_len` tokens that is already in the KV cache. Tree g hangs off sequence token
// anchor(g) = first_anchor + g: tree_pack has one tree at the last prefix token,
// tree_pack_teacher one tree per sequence token from first_position on. Packed node
// r = g * nodes + j is query row r of the mask; key columns are the sequence tokens
// [0, seq_len), then the packed nodes.
//
// Positions follow Hugging Face (position = cumsum(mask) - 1): a node of depth d (1 for a
// child of the anchor) sits at position(anchor) + d, as it would in the sequence
// [real tokens up to the anchor, its ancestors, itself]. A live node sees what it would see in
// that sequence: the real sequence tokens up to its anchor, its ancestors and itself, each
// only when closer than sliding_window positions (when sliding_window > 0). A padding node
// (slot >= count, or in teacher mode a tree anchored at a padding token) sits at the depth-1
// position and sees only itself, so that its attention row is never empty.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <functional>
#include <string>
#include <tuple>

#include "top_p.h"  // MTP_HD

namespace mtp_ext {

// One batch row of a packing's inputs, all contiguous.
struct TreeRow {
  const int64_t* parents;        // [trees, nodes]: parent slot within the tree, -1 = the anchor
  const int64_t* counts;         // [trees]: slots in use
  const bool* seq_real;          // [seq_len]: a real token, not padding
  const int64_t* seq_positions;  // [seq_len]: cumsum(seq_real) - 1
  int64_t seq_len;
  int64_t nodes;
  int64_t first_anchor;              // sequence index of tree 0's anchor (-1: empty prefix)
  bool padding_anchor_empties_tree;  // teacher mode: no candidates after a padding token
};

// The parent of `node`, or -1 at the anchor. Parents precede their children (checked on the
// host); one that does not is read as the anchor, so that input left unchecked while a CUDA
// graph is captured can neither loop nor read out of bounds.
MTP_HD int64_t parent_of(const int64_t* parents, int64_t node) {
  const int64_t parent = parents[node];
  return parent < node ? parent : -1;
}

MTP_HD int64_t node_depth(const int64_t* parents, int64_t node) {
  int64_t depth = 1;
  for (node = parent_of(parents, node); node >= 0; node = parent_of(parents, node)) ++depth;
  return depth;
}

// Parents precede children, so walking up from `node` passes `ancestor` or skips below it.
MTP_HD bool is_ancestor_or_self(const int64_t* parents, int64_t ancestor, int64_t node) {
  while (node > ancestor) node = parent_of(parents, node);
  return node == ancestor;
}

MTP_HD bool within_window(int64_t query_position, int64_t key_position, int64_t sliding_window) {
  return sliding_window <= 0 || query_position - key_position < sliding_window;
}

MTP_HD int64_t anchor_of(const TreeRow& row, int64_t tree) {
  return row.first_anchor + tree;
}

// Position of the anchor token; -1 when there is none (an empty prefix).
MTP_HD int64_t anchor_position(const TreeRow& row, int64_t tree) {
  const int64_t anchor = anchor_of(row, tree);
  return anchor >= 0 ? row.seq_positions[anchor] : -1;
}

MTP_HD bool node_is_live(const TreeRow& row, int64_t tree, int64_t node) {
  if (node >= row.counts[tree]) return false;  // also negative counts, when left unchecked
  return !row.padding_anchor_empties_tree || row.seq_real[anchor_of(row, tree)];
}

MTP_HD int64_t node_position(const TreeRow& row, int64_t tree, int64_t node) {
  const int64_t depth = node_is_live(row, tree, node)
                            ? node_depth(row.parents + tree * row.nodes, node)
                            : 1;
  return anchor_position(row, tree) + depth;
}

// What a mask row needs to know about its query node, computed once per row.
struct TreeQuery {
  int64_t tree;
  int64_t node;
  int64_t slot;          // packed index, tree * nodes + node
  int64_t position;
  int64_t anchor;
  int64_t tree_begin;    // first key column of the query's tree
  bool live;
};

MTP_HD TreeQuery tree_query(const TreeRow& row, int64_t slot, const int64_t* node_positions) {
  TreeQuery query;
  query.tree = slot / row.nodes;
  query.node = slot - query.tree * row.nodes;
  query.slot = slot;
  query.position = node_positions[slot];
  query.anchor = anchor_of(row, query.tree);
  query.tree_begin = row.seq_len + query.tree * row.nodes;
  query.live = node_is_live(row, query.tree, query.node);
  return query;
}

// Whether the query may attend to key column `column` (node_positions: the row's positions).
MTP_HD bool tree_sees(const TreeRow& row, const TreeQuery& query, int64_t column,
                      const int64_t* node_positions, int64_t sliding_window) {
  if (!query.live) return column == row.seq_len + query.slot;
  if (column < row.seq_len) {
    return column <= query.anchor && row.seq_real[column] &&
           within_window(query.position, row.seq_positions[column], sliding_window);
  }
  if (column < query.tree_begin || column >= query.tree_begin + row.nodes) return false;
  const int64_t key_node = column - query.tree_begin;
  return is_ancestor_or_self(row.parents + query.tree * row.nodes, key_node, query.node) &&
         within_window(query.position, node_positions[query.slot - query.node + key_node],
                       sliding_window);
}

// A whole packing as the kernels read and write it: contiguous arrays, trees as
// [B, trees, nodes], packed slots as [B, trees * nodes].
struct TreePacking {
  const int64_t* tree_ids;       // [B, trees, nodes]
  const int64_t* parents;        // [B, trees, nodes]
  const int64_t* counts;         // [B, trees]
  const bool* seq_real;          // [B, seq_len]
  const int64_t* seq_positions;  // [B, seq_len]
  int64_t* input_ids;            // [B, trees * nodes]
  int64_t* position_ids;         // [B, trees * nodes]
  bool* attention_mask;          // [B, 1, trees * nodes, seq_len + trees * nodes]
  int64_t batch;
  int64_t trees;
  int64_t nodes;
  int64_t seq_len;
  int64_t first_anchor;
  bool padding_anchor_empties_tree;
  int64_t pad_id;
  int64_t sliding_window;
};

MTP_HD int64_t packed_slots(const TreePacking& packing) { return packing.trees * packing.nodes; }

MTP_HD int64_t mask_columns(const TreePacking& packing) {
  return packing.seq_len + packed_slots(packing);
}

MTP_HD TreeRow tree_row(const TreePacking& packing, int64_t b) {
  return TreeRow{packing.parents + b * packed_slots(packing),
                 packing.counts + b * packing.trees,
                 packing.seq_real + b * packing.seq_len,
                 packing.seq_positions + b * packing.seq_len,
                 packing.seq_len,
                 packing.nodes,
                 packing.first_anchor,
                 packing.padding_anchor_empties_tree};
}

// Writes input_ids and position_ids of packed slot `index` in [0, B * trees * nodes).
MTP_HD void pack_node(const TreePacking& packing, int64_t index) {
  const int64_t b = index / packed_slots(packing);
  const int64_t slot = index - b * packed_slots(packing);
  const int64_t tree = slot / packing.nodes;
  const int64_t node = slot - tree * packing.nodes;
  const TreeRow row = tree_row(packing, b);
  const bool live = node_is_live(row, tree, node);
  packing.input_ids[index] = live ? packing.tree_ids[index] : packing.pad_id;
  packing.position_ids[index] = node_position(row, tree, node);
}

// Writes columns first_column, first_column + column_step, ... of mask row `mask_row` in
// [0, B * trees * nodes). Reads position_ids: pack_node must have run for the batch row.
MTP_HD void pack_mask_row(const TreePacking& packing, int64_t mask_row, int64_t first_column,
                          int64_t column_step) {
  const int64_t b = mask_row / packed_slots(packing);
  const TreeRow row = tree_row(packing, b);
  const int64_t* node_positions = packing.position_ids + b * packed_slots(packing);
  const TreeQuery query = tree_query(row, mask_row - b * packed_slots(packing), node_positions);
  const int64_t columns = mask_columns(packing);
  bool* out = packing.attention_mask + mask_row * columns;
  for (int64_t column = first_column; column < columns; column += column_step) {
    out[column] = tree_sees(row, query, column, node_positions, packing.sliding_window);
  }
}

// ----------------------------------------------------------------------------- host side
// Checks and preparation shared by both backends; only the kernels' schedules differ.

using TreePackOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// A backend's kernels: pack_node for every slot, then pack_mask_row for every mask row, on
// `device` (where the tensors are, checked to be the same for all).
using TreePackKernels = std::function<void(const TreePacking& packing, c10::Device device)>;

// The inputs in the kernels' layout.
struct TreeInputs {
  at::Tensor tree_ids;  // [B, trees, nodes]
  at::Tensor parents;   // [B, trees, nodes]
  at::Tensor counts;    // [B, trees]
  int64_t first_anchor;
  bool padding_anchor_empties_tree;
};

inline void check_tree_tensor(const at::Tensor& tensor, const char* name, at::IntArrayRef shape,
                              const at::Tensor& tree_ids, const char* op) {
  TORCH_CHECK(tensor.sizes() == shape, op, ": ", name, " must have shape ", shape,
              " (from tree_ids), got ", tensor.sizes());
  TORCH_CHECK(tensor.device() == tree_ids.device(), op, ": ", name, " is on ", tensor.device(),
              " but tree_ids is on ", tree_ids.device());
}

// Shapes, dtypes and devices. tree_ids is [B, N] (tree_pack) or [B, T, N] (teacher);
// `mask_name` is the sequence mask's argument name.
inline void check_tree_args(const at::Tensor& tree_ids, const at::Tensor& parents,
                            const at::Tensor& counts, const at::Tensor& seq_mask,
                            int64_t sliding_window, const char* mask_name, const char* op) {
  const int64_t tree_dims = tree_ids.dim();
  TORCH_CHECK(tree_ids.scalar_type() == at::kLong, op, ": tree_ids must be int64, got ",
              tree_ids.scalar_type());
  TORCH_CHECK(parents.scalar_type() == at::kLong, op, ": parents must be int64, got ",
              parents.scalar_type());
  TORCH_CHECK(counts.scalar_type() == at::kLong || counts.scalar_type() == at::kInt, op,
              ": counts must be int32 or int64, got ", counts.scalar_type());
  const auto mask_dtype = seq_mask.scalar_type();
  TORCH_CHECK(mask_dtype == at::kBool || at::isIntegralType(mask_dtype, /*includeBool=*/false),
              op, ": ", mask_name, " must be bool or an integer dtype, got ", mask_dtype);
  TORCH_CHECK(sliding_window >= 0, op, ": sliding_window must be >= 0 (0: no window), got ",
              sliding_window);
  TORCH_CHECK(seq_mask.dim() == 2, op, ": ", mask_name, " must be 2-D [batch, length], got shape ",
              seq_mask.sizes());
  const at::IntArrayRef tree_shape = tree_ids.sizes();
  check_tree_tensor(parents, "parents", tree_shape, tree_ids, op);
  check_tree_tensor(counts, "counts", tree_shape.slice(0, tree_dims - 1), tree_ids, op);
  TORCH_CHECK(seq_mask.size(0) == tree_ids.size(0), op, ": ", mask_name, " has ",
              seq_mask.size(0), " rows but tree_ids has ", tree_ids.size(0));
  TORCH_CHECK(seq_mask.device() == tree_ids.device(), op, ": ", mask_name, " is on ",
              seq_mask.device(), " but tree_ids is on ", tree_ids.device());
}

// The index of the first true entry of `bad`, as "b, j" or "b, t, j".
inline std::string first_index(const at::Tensor& bad) {
  const at::Tensor index = bad.nonzero().select(0, 0).cpu();
  std::string text;
  for (int64_t dim = 0; dim < index.numel(); ++dim) {
    text += (dim ? ", " : "") + std::to_string(index[dim].item<int64_t>());
  }
  return text;
}

// Reads the values, so on CUDA it synchronises: callers skip it while a graph is captured.
// Only slots in use are checked: padding slots may hold anything.
inline void check_tree_values(const at::Tensor& parents, const at::Tensor& counts,
                              const char* op) {
  if (counts.numel() == 0) return;
  const int64_t nodes = parents.size(-1);
  const int64_t min_count = counts.min().item<int64_t>();
  const int64_t max_count = counts.max().item<int64_t>();
  TORCH_CHECK(min_count >= 0 && max_count <= nodes, op, ": counts must lie in [0, ", nodes,
              "] (the nodes per tree), got min ", min_count, ", max ", max_count);
  const at::Tensor slot = at::arange(nodes, parents.options());
  const at::Tensor in_use = slot < counts.unsqueeze(-1);
  const at::Tensor bad = in_use & ((parents >= slot) | (parents < -1));
  TORCH_CHECK(!bad.any().item<bool>(), op,
              ": parents must be -1 (the prefix) or the index of an earlier node of the same "
              "tree, got parents[", first_index(bad), "] = ",
              parents.masked_select(bad)[0].item<int64_t>());
}

inline TreePackOutputs run_tree_packing(const TreeInputs& inputs, const at::Tensor& seq_mask,
                                        int64_t pad_id, int64_t sliding_window,
                                        const TreePackKernels& kernels) {
  const at::Tensor tree_ids = inputs.tree_ids.contiguous();
  const at::Tensor parents = inputs.parents.contiguous();
  const at::Tensor counts = inputs.counts.to(at::kLong).contiguous();
  const at::Tensor seq_real = (seq_mask != 0).contiguous();
  const at::Tensor seq_positions = seq_real.cumsum(1, at::kLong).sub_(1);
  const int64_t batch = tree_ids.size(0);
  const int64_t trees = tree_ids.size(1);
  const int64_t nodes = tree_ids.size(2);
  const int64_t seq_len = seq_real.size(1);
  const int64_t packed = trees * nodes;
  const auto options = tree_ids.options();
  const TreePackOutputs out{
      at::empty({batch, packed}, options), at::empty({batch, packed}, options),
      at::empty({batch, 1, packed, seq_len + packed}, options.dtype(at::kBool))};
  const auto& [input_ids, position_ids, attention_mask] = out;
  if (batch == 0 || packed == 0) return out;
  kernels(TreePacking{tree_ids.data_ptr<int64_t>(), parents.data_ptr<int64_t>(),
                      counts.data_ptr<int64_t>(), seq_real.data_ptr<bool>(),
                      seq_positions.data_ptr<int64_t>(), input_ids.data_ptr<int64_t>(),
                      position_ids.data_ptr<int64_t>(), attention_mask.data_ptr<bool>(), batch,
                      trees, nodes, seq_len, inputs.first_anchor,
                      inputs.padding_anchor_empties_tree, pad_id, sliding_window},
          tree_ids.device());
  return out;
}

inline TreePackOutputs tree_pack_op(const at::Tensor& tree_ids, const at::Tensor& parents,
                                    const at::Tensor& counts, const at::Tensor& prefix_mask,
                                    int64_t pad_id, int64_t sliding_window, bool check_values,
                                    const TreePackKernels& kernels) {
  constexpr const char* op = "mtp_ext::tree_pack";
  TORCH_CHECK(tree_ids.dim() == 2, op, ": tree_ids must be 2-D [batch, nodes], got shape ",
              tree_ids.sizes());
  check_tree_args(tree_ids, parents, counts, prefix_mask, sliding_window, "prefix_mask", op);
  if (check_values) check_tree_values(parents, counts, op);
  // One tree per row, anchored at the last prefix slot, present whatever that slot holds.
  const TreeInputs inputs{tree_ids.unsqueeze(1), parents.unsqueeze(1), counts.unsqueeze(1),
                          /*first_anchor=*/prefix_mask.size(1) - 1,
                          /*padding_anchor_empties_tree=*/false};
  return run_tree_packing(inputs, prefix_mask, pad_id, sliding_window, kernels);
}

inline TreePackOutputs tree_pack_teacher_op(const at::Tensor& tree_ids, const at::Tensor& parents,
                                            const at::Tensor& counts, const at::Tensor& seq_mask,
                                            int64_t pad_id, int64_t sliding_window,
                                            int64_t first_position, bool check_values,
                                            const TreePackKernels& kernels) {
  constexpr const char* op = "mtp_ext::tree_pack_teacher";
  TORCH_CHECK(tree_ids.dim() == 3, op,
              ": tree_ids must be 3-D [batch, trees, nodes], got shape ", tree_ids.sizes());
  check_tree_args(tree_ids, parents, counts, seq_mask, sliding_window, "seq_mask", op);
  // Compared as first_position <= length - trees: the sum could overflow int64.
  TORCH_CHECK(first_position >= 0 && first_position <= seq_mask.size(1) - tree_ids.size(1), op,
              ": first_position + trees must lie in [0, length of seq_mask] (one tree per token), "
              "got first_position ", first_position, ", ", tree_ids.size(1), " trees, length ",
              seq_mask.size(1));
  if (check_values) check_tree_values(parents, counts, op);
  const TreeInputs inputs{tree_ids, parents, counts, first_position,
                          /*padding_anchor_empties_tree=*/true};
  return run_tree_packing(inputs, seq_mask, pad_id, sliding_window, kernels);
}

}  // namespace mtp_ext
