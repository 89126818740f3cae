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
}
