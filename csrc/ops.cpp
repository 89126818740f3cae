// Every op's schema, in one place. Kernels are registered per backend in cpu/ and cuda/;
// fake (meta) kernels and autograd live in mtp_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(mtp_ext, m) {
  // Nucleus of each row as a padded candidate set: ids [B, C] int64 and probs [B, C] float32
  // in order of descending probability (ties: lower id first), counts [B] int32 and the
  // captured mass [B] float32. Unused slots hold id -1 and probability 0.
  m.def(
      "top_p_candidates(Tensor logits, Tensor top_p, int max_candidates, float temperature)"
      " -> (Tensor ids, Tensor probs, Tensor counts, Tensor mass)");
  // The logits with every token outside the nucleus (grown to min_tokens_to_keep) set to
  // filter_value: Hugging Face's TopPLogitsWarper without the sort.
  m.def(
      "top_p_mask(Tensor logits, Tensor top_p, int min_tokens_to_keep, float filter_value)"
      " -> Tensor");
  // A draft tree per row after a prefix held in a KV cache, packed for one forward pass:
  // input_ids [B, N] int64 (pad_id in unused slots), position_ids [B, N] int64 and
  // attention_mask [B, 1, N, T + N] bool (True = may attend), in which every node sees the
  // real prefix tokens, its ancestors and itself (within sliding_window positions, if > 0).
  m.def(
      "tree_pack(Tensor tree_ids, Tensor parents, Tensor counts, Tensor prefix_mask, int pad_id,"
      " int sliding_window) -> (Tensor input_ids, Tensor position_ids, Tensor attention_mask)");
  // tree_pack for a tree after each of the tokens first_position .. first_position + W - 1
  // of a sequence [B, T] held in a KV cache (teacher forcing): trees [B, W, N] packed into
  // [B, W * N] tokens and a mask [B, 1, W * N, T + W * N].
  m.def(
      "tree_pack_teacher(Tensor tree_ids, Tensor parents, Tensor counts, Tensor seq_mask,"
      " int pad_id, int sliding_window, int first_position=0)"
      " -> (Tensor input_ids, Tensor position_ids, Tensor attention_mask)");
  // sum_n weights[b, n] * softmax(logits[b, n]) as float32 [B, V], fused: the probabilities
  // are never written, and rows of weight 0 are never read.
  m.def("marginal_accumulate(Tensor weights, Tensor logits) -> Tensor");
  // Per head n, the k largest logits of hidden[n] @ weight.T (float32, computed in float32):
  // values [N, B, k] float32 in descending order (ties: lower id first), their ids [N, B, k]
  // int64, and each row's log-sum-exp [N, B] float32. The weight is read once for all heads.
  m.def(
      "multihead_unembed_topk(Tensor hidden, Tensor weight, int k)"
      " -> (Tensor values, Tensor ids, Tensor lse)");
  // sum_n head_weights[n] * (head n's mean cross-entropy of hidden[n] @ weight.T against
  // targets[n], over the targets that are not ignore_index; 0 for a head without any), and the
  // gradients of that loss for hidden and weight when asked for (computed in the same pass;
  // empty [0] otherwise). head_losses [N] are the unweighted per-head means. Computed in
  // float32 (float64 for float64 inputs).
  m.def(
      "multihead_cross_entropy(Tensor hidden, Tensor weight, Tensor targets, Tensor head_weights,"
      " int ignore_index, bool hidden_grad, bool weight_grad)"
      " -> (Tensor loss, Tensor head_losses, Tensor grad_hidden, Tensor grad_weight)");
  // input [M, K] @ weight [N, K].T + bias [N] as float32 [M, N], for few rows M (a draft
  // tree's verification pass): the weights are read once, at memory speed.
  m.def("small_batch_linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
}
