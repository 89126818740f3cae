"""Every op, called through torch.ops with one argument on the meta device and the rest on the
CPU: a clear error naming the argument. Such a call dispatches to the fake kernel, which once
returned unfilled CPU tensors."""
import pytest
import torch

import mtp_ext  # noqa: F401  (registers the ops and their fake kernels)

LOGITS = torch.randn(2, 16)
TREE_IDS = torch.zeros(2, 3, dtype=torch.long)
PARENTS = torch.full((2, 3), -1, dtype=torch.long)
COUNTS = torch.full((2,), 3, dtype=torch.long)
MASK = torch.ones(2, 5, dtype=torch.long)
HIDDEN = torch.randn(2, 3, 8)
WEIGHT = torch.randn(10, 8)

CALLS = {
    "top_p_candidates": (lambda a: torch.ops.mtp_ext.top_p_candidates(*a, 4, 1.0), (LOGITS, torch.full((2,), 0.9))),
    "top_p_mask": (lambda a: torch.ops.mtp_ext.top_p_mask(*a, 1, float("-inf")), (LOGITS, torch.full((2,), 0.9))),
    "tree_pack": (lambda a: torch.ops.mtp_ext.tree_pack(*a, 0, 0), (TREE_IDS, PARENTS, COUNTS, MASK)),
    "tree_pack_teacher": (lambda a: torch.ops.mtp_ext.tree_pack_teacher(*a, 0, 0, 0),
                          (TREE_IDS[:, None], PARENTS[:, None], COUNTS[:, None], MASK)),
    "marginal_accumulate": (lambda a: torch.ops.mtp_ext.marginal_accumulate(*a), (torch.ones(2, 3), torch.randn(2, 3, 16))),
    "multihead_unembed_topk": (lambda a: torch.ops.mtp_ext.multihead_unembed_topk(*a, 2), (HIDDEN, WEIGHT)),
    "multihead_cross_entropy": (lambda a: torch.ops.mtp_ext.multihead_cross_entropy(*a, -100, False, False),
                                (HIDDEN, WEIGHT, torch.zeros(2, 3, dtype=torch.long), torch.ones(2))),
    "small_batch_linear": (lambda a: torch.ops.mtp_ext.small_batch_linear(*a), (torch.randn(2, 8), WEIGHT, torch.randn(10))),
}
CASES = [(op, position) for op, (_, args) in CALLS.items() for position in range(len(args))]


@pytest.mark.parametrize("op,meta_argument", CASES, ids=[f"{op}-{i}" for op, i in CASES])
def test_one_meta_argument_raises(op, meta_argument):
    call, args = CALLS[op]
    args = [arg.to("meta") if i == meta_argument else arg for i, arg in enumerate(args)]
    with pytest.raises(RuntimeError, match=rf"mtp_ext::{op}: \w+ is on (meta|cpu) but \w+ is on (cpu|meta)"):
        call(args)


@pytest.mark.parametrize("op", list(CALLS))
def test_all_meta_arguments_give_shapes(op):
    # All on meta is the fake kernel's own case: shapes, no error.
    call, args = CALLS[op]
    outputs = call([arg.to("meta") for arg in args])
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert all(output.device.type == "meta" for output in outputs)
