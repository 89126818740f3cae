"""Where other systems meet mtp_ext.

    hf.py   Hugging Face generation: TopPLogitsWarper, a drop-in logits processor without the sort
    vllm.py vLLM serving: MTP heads exported as vLLM's Medusa, its speculative_config, greedy runs
            (imported on its own: `from mtp_ext.integrations.vllm import ...`)
"""
from mtp_ext.integrations.hf import TopPLogitsWarper

__all__ = ["TopPLogitsWarper"]
