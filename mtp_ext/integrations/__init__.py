"""Where other systems meet mtp_ext.

    hf.py   Hugging Face generation: TopPLogitsWarper, a drop-in logits processor without the sort
"""
from mtp_ext.integrations.hf import TopPLogitsWarper

__all__ = ["TopPLogitsWarper"]
