"""Fuzz test of every op in mtp_ext.ops: random shapes, dtypes, strides, NaN / inf placements,
top_p values (exact boundaries, tiny, 1), bad arguments and mixed devices.

Every case must end in the reference's answer (mtp_ext.reference; float outputs within
tolerances; a top-p nucleus may differ by one token only where a cumulative sum lies within
NUCLEUS_TOL of the target, as reference.py explains) or in a clear exception: ValueError,
RuntimeError or TypeError with a message naming one of the op's arguments. Cases built within
an op's documented contract must not raise at all. A signal is always a failure.

The cases run in a subprocess (this file run as a script, the cases on its standard input),
which prints one JSON line per case; if it dies by a signal, the first case without a line is
rerun alone to name it, and the rest continue in a new subprocess. Seeds are fixed;
MTP_EXT_FUZZ_CASES sets the cases per op (default 40).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import traceback

import pytest
import torch

CASES_PER_OP = int(os.environ.get("MTP_EXT_FUZZ_CASES", "40"))
NUCLEUS_TOL = 1e-6
ALLOWED_ERRORS = (ValueError, RuntimeError, TypeError)
# Names an error message may cite, per op (besides the op's own name).
ARGUMENTS = {
    "top_p_candidates": ["logits", "top_p", "max_candidates", "temperature"],
    "top_p_mask": ["logits", "top_p", "min_tokens_to_keep", "filter_value"],
    "tree_pack": ["tree_ids", "parents", "counts", "prefix_mask", "pad_id", "sliding_window"],
    "tree_pack_teacher": ["tree_ids", "parents", "counts", "seq_mask", "pad_id", "sliding_window",
                          "first_position"],
    "marginal_accumulate": ["weights", "logits"],
    "multihead_unembed_topk": ["hidden", "weight", "k"],
    "multihead_cross_entropy": ["hidden", "weight", "targets", "head_weights", "ignore_index"],
    "small_batch_linear": ["input", "weight", "bias"],
}
OPS = list(ARGUMENTS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ----------------------------------------------------------------------------- drawing inputs


class Draw:
    """Seeded random choices for one case."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def int(self, low: int, high: int) -> int:  # inclusive
        return int(torch.randint(low, high + 1, (1,), generator=self.generator))

    def chance(self, p: float) -> bool:
        return float(torch.rand((), generator=self.generator)) < p

    def pick(self, options):
        return options[self.int(0, len(options) - 1)]

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator)

    def rand(self, *shape) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator)

    def randint(self, low: int, high: int, shape) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.generator)


def strided(tensor: torch.Tensor, draw: Draw) -> torch.Tensor:
    """The same values in a random layout: contiguous, transposed storage or a slice of a
    larger tensor (row stride, column stride or storage offset)."""
    if tensor.dim() < 2 or tensor.numel() == 0:
        return tensor
    layout = draw.pick(["contiguous", "transposed", "column_slice", "row_offset"])
    if layout == "transposed":
        return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "column_slice":
        wide = torch.zeros((*tensor.shape[:-1], 2 * tensor.shape[-1]), dtype=tensor.dtype)
        wide[..., ::2] = tensor
        return wide[..., ::2]
    if layout == "row_offset":
        wide = torch.zeros((*tensor.shape[:-1], tensor.shape[-1] + 3), dtype=tensor.dtype)
        wide[..., 3:] = tensor
        return wide[..., 3:]
    return tensor


def draw_logits(draw: Draw, batch: int, vocab: int) -> torch.Tensor:
    kind = draw.pick(["randn", "peaked", "ties", "all_equal", "one_finite"])
    if kind == "randn":
        logits = draw.randn(batch, vocab)
    elif kind == "peaked":
        logits = draw.randn(batch, vocab) * 12
    elif kind == "ties":
        logits = draw.randint(0, 3, (batch, vocab)).float()
    elif kind == "all_equal":
        logits = torch.full((batch, vocab), float(draw.randn(1)) * 4)
    else:
        logits = torch.full((batch, vocab), -math.inf)
        logits[:, draw.int(0, vocab - 1)] = 0.0
    if draw.chance(0.3):  # some -inf, every row keeping a finite logit
        logits[draw.rand(batch, vocab) < 0.3] = -math.inf
        logits[:, draw.int(0, vocab - 1)] = 1.0
    return logits


def top_p_value(draw: Draw, logits: torch.Tensor):
    """A top_p: exact decimal boundaries (k of V equal tokens), tiny, 1, random, per row."""
    vocab = logits.shape[1]
    kind = draw.pick(["boundary", "decimal", "tiny", "one", "uniform", "per_row"])
    if kind == "boundary":
        return draw.int(1, vocab) / vocab
    if kind == "decimal":
        return draw.pick([0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
    if kind == "tiny":
        return draw.pick([1e-6, 1e-30, 2.0**-149])
    if kind == "one":
        return 1.0
    if kind == "uniform":
        return 1.0 - float(draw.rand(1))
    return 1.0 - draw.rand(logits.shape[0])


def poison(draw: Draw, tensor: torch.Tensor) -> bool:
    """Sometimes puts NaN or +inf into `tensor` (float, in place); returns whether it did."""
    if tensor.numel() == 0 or not draw.chance(0.15):
        return False
    flat = tensor.view(-1)
    flat[draw.int(0, flat.numel() - 1)] = draw.pick([math.nan, math.inf])
    return True


def maybe_meta(draw: Draw, args: dict, names: list[str]) -> bool:
    """Sometimes moves one tensor argument to the meta device; returns whether it did."""
    tensors = [name for name in names if isinstance(args.get(name), torch.Tensor)]
    if len(tensors) < 2 or not draw.chance(0.08):  # one tensor alone on meta is no mismatch
        return False
    name = draw.pick(tensors)
    args[name] = args[name].to("meta")
    return True


# ----------------------------------------------------------------------------- cases, one per op
# Each returns (call, check, valid): call() runs the op, check(result) compares it with the
# reference and returns None or a description of the difference; valid says the inputs lie
# within the op's contract, so that an exception is a failure.


def case_top_p(draw: Draw, op_name: str):
    import mtp_ext
    from mtp_ext import reference

    batch, vocab = draw.int(1, 5), draw.pick([1, 2, 7, 10, 33, 100, 1000, 2049])
    dtype = draw.pick(DTYPES)
    logits = draw_logits(draw, batch, vocab).to(dtype)
    valid = not poison(draw, logits)
    top_p = top_p_value(draw, logits)
    if draw.chance(0.08):
        top_p, valid = draw.pick([0.0, -0.5, 1.5, math.nan]), False
    args = {"logits": strided(logits, draw), "top_p": top_p}
    if op_name == "top_p_candidates":
        args["max_candidates"] = draw.pick([1, 3, 64, vocab, vocab + 5])
        args["temperature"] = draw.pick([0.5, 1.0, 2.0])
    else:
        args["min_tokens_to_keep"] = draw.pick([1, 1, 2, 5, vocab + 2])
        args["filter_value"] = draw.pick([-math.inf, -1e4, 0.0])
    direct = draw.chance(0.15)
    if direct:  # the raw op: top_p as the float32 [B] tensor it takes
        args["top_p"] = torch.as_tensor(top_p, dtype=torch.float32).expand(batch).contiguous()
    if maybe_meta(draw, args, ["logits", "top_p"]):
        valid = False

    def call():
        values = list(args.values())
        if direct:
            return getattr(torch.ops.mtp_ext, op_name)(*values)
        return getattr(mtp_ext, op_name)(*values)

    def check(result):
        dense = args["logits"].contiguous()
        if op_name == "top_p_candidates":
            return check_candidates(result, dense, top_p, args["max_candidates"], args["temperature"], reference)
        return check_mask(result, dense, top_p, args["min_tokens_to_keep"], args["filter_value"], reference)

    return call, check, valid


def near_target(logits, top_p, temperature, position, reference) -> bool:
    """Whether the live mass before `position` (per row, in the reference's order) lies within
    NUCLEUS_TOL of the target, where a nucleus may end on either side."""
    _, _, cum_before, target, _ = reference.nucleus_in_order(logits, top_p, temperature)
    index = position.clamp(0, cum_before.shape[1] - 1)[:, None]
    return ((cum_before.gather(1, index) - target).abs() <= NUCLEUS_TOL).flatten()


def check_candidates(result, logits, top_p, cap, temperature, reference):
    ids, probs, counts, mass = result
    r_ids, r_probs, r_counts, r_mass = reference.top_p_candidates(logits, top_p, cap, temperature)
    if ids.shape != r_ids.shape or counts.dtype != torch.int32 or probs.dtype != torch.float32:
        return f"shapes/dtypes {ids.shape} {counts.dtype} {probs.dtype}"
    counts, r_counts = counts.long(), r_counts.long()
    shorter = torch.minimum(counts, r_counts)
    differ = counts != r_counts
    allowed = ((counts - r_counts).abs() == 1) & near_target(logits, top_p, temperature, shorter, reference)
    if (differ & ~allowed).any():
        return f"counts {counts.tolist()} != reference {r_counts.tolist()}"
    slots = torch.arange(ids.shape[1])[None, :]
    common = slots < shorter[:, None]
    if not torch.equal(ids[common], r_ids[common]):
        return "ids differ from the reference"
    unused = slots >= counts[:, None]
    if (ids[unused] != -1).any() or (probs[unused] != 0).any():
        return "unused slots are not -1 / 0"
    if not torch.allclose(probs[common], r_probs[common], rtol=1e-4, atol=1e-6):
        return "probs differ from the reference"
    if not torch.allclose(mass, probs.double().sum(1).float(), rtol=1e-5, atol=1e-6):
        return "mass is not the sum of the returned probs"
    return None


def check_mask(masked, logits, top_p, min_tokens_to_keep, filter_value, reference):
    expected = reference.top_p_mask(logits, top_p, min_tokens_to_keep, filter_value)
    if masked.dtype != logits.dtype or masked.shape != logits.shape:
        return f"dtype/shape {masked.dtype} {tuple(masked.shape)}"
    same = (masked == expected) | (torch.isnan(masked) & torch.isnan(expected))
    bad_rows = ~same.all(dim=1)
    if not bad_rows.any():
        return None
    kept, r_kept = (masked != filter_value).sum(1), (expected != filter_value).sum(1)
    allowed = ((kept - r_kept).abs() == 1) & (torch.maximum(kept, r_kept) > min_tokens_to_keep)
    allowed &= near_target(logits, top_p, 1.0, torch.minimum(kept, r_kept), reference)
    if (bad_rows & ~allowed).any():
        return f"kept {kept.tolist()} != reference {r_kept.tolist()}"
    return None


def draw_forest(draw: Draw, lead: tuple, nodes: int):
    """tree_ids, parents [*lead, nodes], counts [*lead]; padding slots hold garbage."""
    count = int(torch.Size(lead).numel())
    parents = torch.full((count, nodes), -1, dtype=torch.long)
    for tree in range(count):
        for node in range(1, nodes):
            parents[tree, node] = draw.int(-1, node - 1)
    parents = parents.reshape(*lead, nodes)
    counts = draw.randint(0, nodes + 1, lead)
    padding = torch.arange(nodes) >= counts[..., None]
    parents = torch.where(padding, draw.randint(-9, 9, parents.shape), parents)
    return draw.randint(0, 500, parents.shape), parents, counts


def case_tree(draw: Draw, op_name: str):
    import mtp_ext
    from mtp_ext import reference

    batch, length, nodes = draw.int(1, 3), draw.int(1, 10), draw.int(1, 6)
    mask = (draw.rand(batch, length) < 0.7).long()
    args = {}
    valid = True
    if op_name == "tree_pack":
        tree_ids, parents, counts = draw_forest(draw, (batch,), nodes)
        args.update(tree_ids=tree_ids, parents=parents, counts=counts, prefix_mask=mask)
    else:
        trees = draw.int(1, length)
        tree_ids, parents, counts = draw_forest(draw, (batch, trees), nodes)
        args.update(tree_ids=tree_ids, parents=parents, counts=counts, seq_mask=mask)
    args["pad_id"] = draw.pick([0, -7])
    args["sliding_window"] = draw.pick([0, 0, 1, 3])
    if op_name == "tree_pack_teacher":
        args["first_position"] = draw.int(0, length - trees)
        if draw.chance(0.15):
            args["first_position"] = draw.pick([-1, length, 2**62, 2**63 - 1, -(2**63)])
            valid = False
    if draw.chance(0.1):  # a parent that is not an earlier node
        args["parents"] = args["parents"].clone()
        args["counts"] = torch.full_like(args["counts"], nodes)
        args["parents"].view(-1, nodes)[0, draw.int(0, nodes - 1)] = draw.pick([nodes, -2, 10**6])
        valid = False
    if draw.chance(0.08):
        args["counts"] = args["counts"] + draw.pick([nodes + 1, -nodes - 1])
        valid = False
    if draw.chance(0.1):
        args["counts"] = args["counts"].int()
    if draw.chance(0.1):
        args["tree_ids"] = strided(args["tree_ids"], draw)
    if maybe_meta(draw, args, ["tree_ids", "parents", "counts", "prefix_mask", "seq_mask"]):
        valid = False
    direct = draw.chance(0.15)

    def call():
        if direct:
            return getattr(torch.ops.mtp_ext, op_name)(*args.values())
        return getattr(mtp_ext, op_name)(*args.values())

    def check(result):
        expected = getattr(reference, op_name)(*args.values())
        for name, got, want in zip(["input_ids", "position_ids", "attention_mask"], result, expected):
            if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
                return f"{name} differs from the reference"
        return None

    return call, check, valid


def case_marginal(draw: Draw, op_name: str):
    import mtp_ext
    from mtp_ext import reference

    batch, candidates, vocab = draw.int(1, 3), draw.int(1, 5), draw.pick([1, 7, 100, 600, 2100])
    dtype = draw.pick(DTYPES)
    weights = draw.rand(batch, candidates)
    weights[draw.rand(batch, candidates) < 0.3] = 0.0
    logits = draw.randn(batch, candidates, vocab) * draw.pick([1.0, 5.0])
    logits[draw.rand(batch, candidates, vocab) < 0.1] = -math.inf
    logits[..., 0] = 0.5  # a finite logit per row
    logits[weights == 0] = math.nan  # never read
    valid = True
    if draw.chance(0.05):
        weights[0, 0], valid = draw.pick([-1.0, math.nan, math.inf]), False
    logits = logits.to(dtype)
    if valid and draw.chance(0.5):  # a live row holding NaN or +inf must be refused
        live = (weights > 0).nonzero()
        if len(live):
            b, n = live[0].tolist()
            logits[b, n, draw.int(0, vocab - 1)] = draw.pick([math.nan, math.inf])
            valid = False
    args = {"weights": weights, "logits": strided(logits, draw)}
    if maybe_meta(draw, args, ["weights", "logits"]):
        valid = False
    direct = draw.chance(0.15)

    def call():
        fn = torch.ops.mtp_ext.marginal_accumulate if direct else mtp_ext.marginal_accumulate
        return fn(args["weights"], args["logits"])

    def check(result):
        expected = reference.marginal_accumulate(args["weights"], args["logits"])
        if result.dtype != torch.float32 or result.shape != expected.shape:
            return f"dtype/shape {result.dtype} {tuple(result.shape)}"
        if not torch.allclose(result, expected, rtol=1e-4, atol=1e-6):
            return f"max difference {(result - expected).abs().max():.3g}"
        return None

    return call, check, valid


def draw_heads(draw: Draw, dtype):
    heads, rows, size, vocab = draw.int(1, 3), draw.int(0, 5), draw.int(1, 24), draw.pick([1, 5, 100, 4097])
    if draw.chance(0.3):  # small integers: exact logits and many exact ties
        hidden = draw.randint(-2, 3, (heads, rows, size)).float()
        weight = draw.randint(-2, 3, (vocab, size)).float()
    else:
        hidden = draw.randn(heads, rows, size)
        weight = draw.randn(vocab, size) / size**0.5
    return hidden.to(dtype), weight.to(dtype)


def case_unembed_topk(draw: Draw, op_name: str):
    import mtp_ext
    from mtp_ext import reference

    dtype = draw.pick(DTYPES)
    hidden, weight = draw_heads(draw, dtype)
    vocab = weight.shape[0]
    poison(draw, hidden)  # NaN / inf logits are data here: they rank as torch.sort ranks them
    poison(draw, weight)
    k = draw.int(1, min(vocab, 8))
    valid = True
    if draw.chance(0.1):
        k, valid = draw.pick([0, vocab + 1, -3]), False
    args = {"hidden": strided(hidden, draw), "weight": strided(weight, draw), "k": k}
    if maybe_meta(draw, args, ["hidden", "weight"]):
        valid = False
    direct = draw.chance(0.15)

    def call():
        fn = torch.ops.mtp_ext.multihead_unembed_topk if direct else mtp_ext.multihead_unembed_topk
        return fn(*args.values())

    def check(result):
        values, ids, lse = result
        r_values, r_ids, r_lse = reference.multihead_unembed_topk(args["hidden"], args["weight"], k)
        if values.shape != r_values.shape or ids.dtype != torch.int64 or lse.shape != r_lse.shape:
            return f"shapes/dtypes {tuple(values.shape)} {ids.dtype} {tuple(lse.shape)}"
        if ((ids < 0) | (ids >= vocab)).any():
            return f"ids outside [0, {vocab})"
        if not torch.allclose(values, r_values, rtol=1e-4, atol=1e-4, equal_nan=True):
            return "values differ from the reference"
        if not torch.allclose(lse, r_lse, rtol=1e-4, atol=1e-4, equal_nan=True):
            return "lse differs from the reference"
        nan = torch.isnan(r_values)
        if not torch.equal(ids[nan], r_ids[nan]):
            return "ids of NaN logits differ from the reference"
        exact = torch.matmul(args["hidden"].double(), args["weight"].double().t())
        at_ids = exact.gather(2, ids).float()
        if not torch.allclose(at_ids[~nan], r_values[~nan], rtol=1e-4, atol=1e-4, equal_nan=True):
            return "an id's logit is not the reference's value at its slot"
        if k > 1 and (ids.sort(-1).values.diff(dim=-1) == 0).any():
            return "repeated ids in a row"
        return None

    return call, check, valid


def case_cross_entropy(draw: Draw, op_name: str):
    import mtp_ext
    from mtp_ext import reference

    dtype = draw.pick(DTYPES + [torch.float64])
    hidden, weight = draw_heads(draw, dtype)
    heads, rows, vocab = hidden.shape[0], hidden.shape[1], weight.shape[0]
    targets = draw.randint(0, vocab, (heads, rows))
    targets[draw.rand(heads, rows) < 0.2] = -100
    valid = True
    if draw.chance(0.1) and targets.numel():
        targets.view(-1)[0], valid = draw.pick([vocab, -1, -5]), False
    head_weights = draw.rand(heads).to(torch.float64 if dtype == torch.float64 else torch.float32)
    if draw.chance(0.3):
        head_weights = None
    if draw.chance(0.05):
        head_weights, valid = torch.ones(heads + 1), False
    args = {"hidden": strided(hidden, draw), "weight": weight, "targets": targets, "head_weights": head_weights}
    if maybe_meta(draw, args, ["hidden", "weight", "targets", "head_weights"]):
        valid = False
    with_grad = dtype in (torch.float32, torch.float64) and draw.chance(0.5) and args["hidden"].device.type == "cpu"

    def call():
        hidden_in = args["hidden"].detach().requires_grad_(with_grad)
        loss = mtp_ext.multihead_cross_entropy(hidden_in, args["weight"], args["targets"], args["head_weights"])
        grad = torch.autograd.grad(loss, hidden_in)[0] if with_grad and loss.requires_grad else None
        return loss, grad

    def check(result):
        loss, grad = result
        hidden_ref = args["hidden"].detach().requires_grad_(with_grad)
        expected = reference.multihead_cross_entropy(hidden_ref, args["weight"], args["targets"], args["head_weights"])
        if loss.shape != () or loss.dtype != expected.dtype:
            return f"loss shape/dtype {tuple(loss.shape)} {loss.dtype}"
        if not torch.allclose(loss.detach(), expected.detach(), rtol=1e-4, atol=1e-5, equal_nan=True):
            return f"loss {float(loss):.6g} != reference {float(expected):.6g}"
        if grad is not None and expected.requires_grad:
            expected_grad = torch.autograd.grad(expected, hidden_ref)[0]
            if not torch.allclose(grad, expected_grad, rtol=1e-3, atol=1e-5, equal_nan=True):
                return "gradient differs from the reference"
        return None

    return call, check, valid


def case_linear(draw: Draw, op_name: str):
    import mtp_ext
    from mtp_ext import reference

    dtype = torch.float32 if draw.chance(0.85) else draw.pick([torch.bfloat16, torch.float64])
    lead = draw.pick([(), (3,), (2, 2), (17,), (0,)])
    in_features, out_features = draw.int(0, 70), draw.int(1, 40)
    inputs = draw.randn(*lead, in_features)
    weight = draw.randn(out_features, in_features)
    bias = draw.randn(out_features) if draw.chance(0.5) else None
    poison(draw, inputs)  # NaN / inf propagate as in F.linear
    valid = dtype == torch.float32
    args = {"input": strided(inputs.to(dtype), draw), "weight": strided(weight.to(dtype), draw),
            "bias": None if bias is None else bias.to(dtype)}
    if maybe_meta(draw, args, ["input", "weight", "bias"]):
        valid = False

    def call():
        return mtp_ext.small_batch_linear(*args.values())

    def check(result):
        expected = reference.small_batch_linear(*args.values())
        if result.shape != expected.shape or result.dtype != expected.dtype:
            return f"shape/dtype {tuple(result.shape)} {result.dtype}"
        if not torch.allclose(result, expected, rtol=1e-4, atol=1e-4, equal_nan=True):
            return "differs from F.linear"
        return None

    return call, check, valid


CASE_BUILDERS = {
    "top_p_candidates": case_top_p,
    "top_p_mask": case_top_p,
    "tree_pack": case_tree,
    "tree_pack_teacher": case_tree,
    "marginal_accumulate": case_marginal,
    "multihead_unembed_topk": case_unembed_topk,
    "multihead_cross_entropy": case_cross_entropy,
    "small_batch_linear": case_linear,
}


def seed_of(op_name: str, case: int) -> int:
    return OPS.index(op_name) * 1_000_003 + case


def run_case(op_name: str, seed: int) -> dict:
    """One case, in this process: its outcome as a JSON-able record."""
    record = {"op": op_name, "seed": seed}
    call, check, valid = CASE_BUILDERS[op_name](Draw(seed), op_name)
    try:
        result = call()
    except ALLOWED_ERRORS as error:
        message = str(error).splitlines()[0][:300] if str(error) else ""
        names_argument = any(name in message for name in ARGUMENTS[op_name])
        if valid:
            return {**record, "outcome": "fail", "detail": f"raised on valid input: {type(error).__name__}: {message}"}
        if not names_argument:
            return {**record, "outcome": "fail", "detail": f"message names no argument: {type(error).__name__}: {message}"}
        return {**record, "outcome": "error", "detail": f"{type(error).__name__}: {message}"}
    except Exception as error:  # any other type is not a clear error
        return {**record, "outcome": "fail", "detail": f"{type(error).__name__}: {str(error)[:300]}"}
    try:
        difference = check(result)
    except Exception:
        difference = "checking the result raised: " + traceback.format_exc(limit=2)[-300:]
    if difference is not None:
        return {**record, "outcome": "fail", "detail": difference + ("" if valid else " (invalid input accepted)")}
    return {**record, "outcome": "match"}


def worker(jobs: list[tuple[str, int]]) -> None:
    import mtp_ext  # noqa: F401  (registers the ops)

    torch.set_num_threads(2)
    for op_name, seed in jobs:
        print(json.dumps(run_case(op_name, seed)), flush=True)


# ----------------------------------------------------------------------------- the parent


def run_worker(jobs: list[tuple[str, int]]) -> tuple[dict, int]:
    """Runs the cases in a subprocess: (records by (op, seed), return code)."""
    command = [sys.executable, os.path.abspath(__file__)]
    done = subprocess.run(command, input=json.dumps(jobs), capture_output=True, text=True, timeout=1800,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    records = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            records[(record["op"], record["seed"])] = record
    if done.returncode > 0 and not records:
        raise RuntimeError(f"fuzz worker failed: {done.stderr[-2000:]}")
    return records, done.returncode


def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def run_all(jobs: list[tuple[str, int]]) -> dict:
    """Every case's record; a case that kills its subprocess is rerun alone to name it."""
    records, pending = {}, list(jobs)
    while pending:
        batch, returncode = run_worker(pending)
        records.update(batch)
        pending = [job for job in pending if job not in records]
        if not pending:
            break
        suspect, pending = pending[0], pending[1:]
        alone, alone_code = run_worker([suspect])
        if suspect in alone:
            records.update(alone)
            detail = f"passed alone, but its batch died by {signal_name(returncode)}"
            if alone[suspect]["outcome"] != "fail":
                records[suspect] = {**alone[suspect], "outcome": "fail", "detail": detail}
        else:
            ending = f"killed by {signal_name(alone_code)}" if alone_code < 0 else f"exit code {alone_code}"
            records[suspect] = {"op": suspect[0], "seed": suspect[1], "outcome": "fail", "detail": ending}
    return records


@pytest.fixture(scope="module")
def fuzz_records():
    jobs = [(op_name, seed_of(op_name, case)) for op_name in OPS for case in range(CASES_PER_OP)]
    return run_all(jobs)


@pytest.mark.parametrize("op_name", OPS)
def test_fuzz(op_name, fuzz_records):
    records = [record for (op, _), record in fuzz_records.items() if op == op_name]
    assert len(records) == CASES_PER_OP
    failures = [f"seed {r['seed']}: {r['detail']}" for r in records if r["outcome"] == "fail"]
    assert not failures, f"{len(failures)} of {len(records)} cases failed:\n" + "\n".join(failures[:20])
    # The draws reach both ends: answers compared with the reference, and refused inputs.
    outcomes = {record["outcome"] for record in records}
    assert "match" in outcomes


def test_a_crashing_case_is_named(monkeypatch):
    # The parent's bookkeeping: a case that kills its subprocess is reported by seed, and the
    # cases after it still run.
    calls = []

    def fake_worker(jobs):
        calls.append(list(jobs))
        records = {}
        for job in jobs:
            if job == ("tree_pack", 2):
                return records, -signal.SIGSEGV
            records[job] = {"op": job[0], "seed": job[1], "outcome": "match"}
        return records, 0

    monkeypatch.setattr(sys.modules[__name__], "run_worker", fake_worker)
    jobs = [("tree_pack", seed) for seed in range(5)]
    records = run_all(jobs)
    assert records[("tree_pack", 2)]["outcome"] == "fail"
    assert "SIGSEGV" in records[("tree_pack", 2)]["detail"]
    assert all(records[("tree_pack", seed)]["outcome"] == "match" for seed in (0, 1, 3, 4))


if __name__ == "__main__":
    worker([tuple(job) for job in json.load(sys.stdin)])
