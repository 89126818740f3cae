"""Where other systems meet mtp_ext.

    hf.py   Hugging Face generation: TopPLogitsWarper, a drop-in logits processor without the sort
    vllm.py vLLM serving: MTP heads exported as vLLM's Medusa, its speculative_config, greedy runs
            (imported on its own: `from mtp_ext.integrations.vllm import ...`)
    distributed.py  torch.distributed: the World of a torchrun rank (its share of the work, sums
            over the ranks, one progress bar, failures named), what eval, analyze and train-heads
            run in
"""
from mtp_ext.integrations.hf import TopPLogitsWarper

__all__ = ["TopPLogitsWarper"]
