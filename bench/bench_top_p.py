"""top_p_candidates and top_p_mask against Hugging Face's TopPLogitsWarper, the sort-based
reference and torch.softmax (the floor: one op that must read every logit).

    make bench PYTEST_ARGS="-k top_p --benchmark-json=bench/top_p.json"
    python bench/summarize.py bench/top_p.json
"""
import pytest
import torch
from transformers import TopPLogitsWarper as HFTopPLogitsWarper

import mtp_ext
from mtp_ext import reference

from conftest import time_on_device
from logits import LOGIT_KINDS

SHAPES = [(32, 49152), (8, 262144)]
TOP_P = 0.99


def run_top_p_candidates(logits):
    return mtp_ext.top_p_candidates(logits, TOP_P, max_candidates=256)


def run_top_p_mask(logits):
    return mtp_ext.top_p_mask(logits, TOP_P)


def run_hf_warper(logits):
    return HFTopPLogitsWarper(TOP_P)(None, logits)


def run_reference_candidates(logits):
    return reference.top_p_candidates(logits, TOP_P, max_candidates=256)


def run_softmax(logits):
    return torch.softmax(logits, dim=-1)


CONTENDERS = {
    "top_p_candidates": run_top_p_candidates,
    "top_p_mask": run_top_p_mask,
    "hf_warper": run_hf_warper,
    "reference": run_reference_candidates,
    "softmax": run_softmax,
}


@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("kind", list(LOGIT_KINDS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"B{shape[0]}xV{shape[1]}")
def test_top_p(benchmark, device, threads, shape, kind, contender):
    logits = LOGIT_KINDS[kind](*shape, device=device)
    function = CONTENDERS[contender]
    benchmark.group = f"top_p {device} {threads} {kind} B={shape[0]} V={shape[1]}"
    benchmark.extra_info.update(contender=contender, baseline="softmax")
    time_on_device(benchmark, device, function, logits)
