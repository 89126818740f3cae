"""Tests of mtp_ext.tree_pack and mtp_ext.tree_pack_teacher.

The ground truth is mtp_ext.reference (node by node, from the definition); the end-to-end
tests check the definition itself: with the packed tokens, positions and mask over a prefix's
KV cache, a tiny random model gives every node the logits of [prefix, ancestors, node] run as
its own sequence.
"""
import pytest
import torch
from torch import Tensor
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

import mtp_ext
from mtp_ext import reference

CUDA_KERNELS = torch.cuda.is_available() and mtp_ext.build_info()["cuda"]
requires_cuda = pytest.mark.skipif(
    not CUDA_KERNELS, reason="needs a CUDA device and mtp_ext built with its CUDA kernels"
)

PAD_ID = -7
MASK_KINDS = ["all_real", "left_padded", "any_pattern", "all_padding"]


# ----------------------------------------------------------------------------- inputs


def draw_parents(nodes: int, max_depth: int, generator: torch.Generator) -> list[int]:
    """Random parents of one tree (each an earlier node or -1), no node deeper than max_depth."""
    parents, depths = [], []
    for node in range(nodes):
        choices = [-1] + [k for k in range(node) if depths[k] < max_depth]
        parent = choices[int(torch.randint(len(choices), (1,), generator=generator))]
        parents.append(parent)
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return parents


def draw_forest(shape, max_depth: int, generator: torch.Generator, counts_dtype=torch.int64):
    """tree_ids and parents [*shape] and counts [*shape[:-1]] for random trees; the padding
    slots hold garbage (parents included) that the ops must ignore."""
    *lead, nodes = shape
    trees = [draw_parents(nodes, max_depth, generator) for _ in range(torch.Size(lead).numel())]
    parents = torch.tensor(trees, dtype=torch.long).reshape(shape)
    counts = torch.randint(0, nodes + 1, lead, generator=generator)
    padding = torch.arange(nodes) >= counts[..., None]
    garbage = torch.randint(-50, 50, shape, generator=generator)
    parents = torch.where(padding, garbage, parents)
    tree_ids = torch.randint(0, 1000, shape, generator=generator)
    return tree_ids, parents, counts.to(counts_dtype)


def draw_mask_row(kind: str, length: int, generator: torch.Generator) -> Tensor:
    if kind == "all_real":
        return torch.ones(length, dtype=torch.long)
    if kind == "left_padded":
        pads = int(torch.randint(0, length, (1,), generator=generator))
        return (torch.arange(length) >= pads).long()
    if kind == "any_pattern":
        return (torch.rand(length, generator=generator) < 0.6).long()
    if kind == "all_padding":
        return torch.zeros(length, dtype=torch.long)
    raise ValueError(kind)


def draw_mask(batch: int, length: int, generator: torch.Generator, kinds=MASK_KINDS) -> Tensor:
    """An attention mask [batch, length], its rows cycling through `kinds`."""
    return torch.stack([draw_mask_row(kinds[row % len(kinds)], length, generator) for row in range(batch)])


def assert_same_packing(actual, expected):
    names = ["input_ids", "position_ids", "attention_mask"]
    for name, a, e in zip(names, actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, (name, a.dtype, e.dtype, a.shape, e.shape)
        assert torch.equal(a.cpu(), e.cpu()), f"{name} differs:\n{a}\n{e}"


# ----------------------------------------------------------------------------- against the reference

SHAPES = [(1, 1, 1), (2, 5, 3), (4, 17, 9), (3, 33, 20), (2, 70, 37), (1, 260, 64)]


@pytest.mark.parametrize("sliding_window", [0, 1, 4])
@pytest.mark.parametrize("max_depth", [1, 2, 3, 4])
@pytest.mark.parametrize("batch,length,nodes", SHAPES)
def test_tree_pack_matches_reference(batch, length, nodes, max_depth, sliding_window, generator):
    tree_ids, parents, counts = draw_forest((batch, nodes), max_depth, generator)
    prefix_mask = draw_mask(batch, length, generator)
    args = (tree_ids, parents, counts, prefix_mask, PAD_ID, sliding_window)
    assert_same_packing(mtp_ext.tree_pack(*args), reference.tree_pack(*args))


TEACHER_SHAPES = [(1, 1, 1), (2, 4, 3), (3, 9, 5), (2, 17, 8)]


@pytest.mark.parametrize("sliding_window", [0, 2])
@pytest.mark.parametrize("max_depth", [1, 3])
@pytest.mark.parametrize("batch,length,nodes", TEACHER_SHAPES)
def test_teacher_matches_reference(batch, length, nodes, max_depth, sliding_window, generator):
    tree_ids, parents, counts = draw_forest((batch, length, nodes), max_depth, generator)
    seq_mask = draw_mask(batch, length, generator)
    args = (tree_ids, parents, counts, seq_mask, PAD_ID, sliding_window)
    assert_same_packing(mtp_ext.tree_pack_teacher(*args), reference.tree_pack_teacher(*args))


@pytest.mark.parametrize("first_position,trees", [(0, 1), (3, 4), (6, 5), (10, 1)])
def test_teacher_window_of_positions_matches_reference(first_position, trees, generator):
    tree_ids, parents, counts = draw_forest((3, trees, 6), 3, generator)
    seq_mask = draw_mask(3, 11, generator)
    args = (tree_ids, parents, counts, seq_mask, PAD_ID, 3, first_position)
    assert_same_packing(mtp_ext.tree_pack_teacher(*args), reference.tree_pack_teacher(*args))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.int64, torch.uint8], ids=str)
@pytest.mark.parametrize("counts_dtype", [torch.int32, torch.int64], ids=str)
def test_dtypes_give_the_same_packing(counts_dtype, mask_dtype, generator):
    tree_ids, parents, counts = draw_forest((3, 7), 3, generator)
    prefix_mask = draw_mask(3, 12, generator)
    expected = mtp_ext.tree_pack(tree_ids, parents, counts, prefix_mask, PAD_ID, 0)
    actual = mtp_ext.tree_pack(tree_ids, parents, counts.to(counts_dtype), prefix_mask.to(mask_dtype), PAD_ID, 0)
    assert_same_packing(actual, expected)


def test_non_contiguous_inputs_give_the_same_packing(generator):
    tree_ids, parents, counts = draw_forest((4, 6), 3, generator)
    prefix_mask = draw_mask(8, 10, generator)[::2]
    strided = (tree_ids.t().contiguous().t(), parents.t().contiguous().t(), counts, prefix_mask)
    dense = tuple(t.contiguous() for t in strided)
    assert not strided[0].is_contiguous() and not strided[3].is_contiguous()
    assert_same_packing(mtp_ext.tree_pack(*strided, PAD_ID, 2), mtp_ext.tree_pack(*dense, PAD_ID, 2))


def test_padding_slots_content_is_ignored(generator):
    tree_ids, parents, counts = draw_forest((4, 9), 4, generator)
    prefix_mask = draw_mask(4, 6, generator)
    padding = torch.arange(9) >= counts[:, None]
    other_ids = torch.where(padding, tree_ids + 1, tree_ids)
    other_parents = torch.where(padding, parents + 1, parents)
    assert_same_packing(mtp_ext.tree_pack(other_ids, other_parents, counts, prefix_mask, PAD_ID, 0),
                        mtp_ext.tree_pack(tree_ids, parents, counts, prefix_mask, PAD_ID, 0))


def test_hand_worked_example():
    # Row 0: prefix [pad, a, b], tree 0 -> {2 -> 3}, 1 (all in use). Row 1: prefix [a, b, c],
    # a chain 0 -> 1 and two padding slots.
    tree_ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    parents = torch.tensor([[-1, -1, 0, 2], [-1, 0, 99, -4]])
    counts = torch.tensor([4, 2])
    prefix_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    packed = mtp_ext.tree_pack(tree_ids, parents, counts, prefix_mask, pad_id=-1)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, -1, -1]]
    assert packed.position_ids.tolist() == [[2, 2, 3, 4], [3, 4, 3, 3]]
    assert packed.attention_mask.int().tolist() == [
        [[[0, 1, 1, 1, 0, 0, 0],
          [0, 1, 1, 0, 1, 0, 0],
          [0, 1, 1, 1, 0, 1, 0],
          [0, 1, 1, 1, 0, 1, 1]]],
        [[[1, 1, 1, 1, 0, 0, 0],
          [1, 1, 1, 1, 1, 0, 0],
          [0, 0, 0, 0, 0, 1, 0],
          [0, 0, 0, 0, 0, 0, 1]]],
    ]


def test_depth_one_tree_is_the_paper_k2_case(generator):
    # Every candidate a child of the last prefix token: all at the next position, each seeing
    # the real prefix and itself only.
    batch, length, nodes = 3, 8, 5
    prefix_mask = draw_mask(batch, length, generator, ["left_padded"])
    tree_ids = torch.randint(0, 100, (batch, nodes), generator=generator)
    packed = mtp_ext.tree_pack(tree_ids, torch.full((batch, nodes), -1), torch.full((batch,), nodes), prefix_mask)
    assert torch.equal(packed.position_ids, prefix_mask.sum(1, keepdim=True).expand(-1, nodes))
    expected = torch.cat([prefix_mask.bool()[:, None, :].expand(-1, nodes, -1),
                          torch.eye(nodes, dtype=torch.bool).expand(batch, -1, -1)], dim=2)
    assert torch.equal(packed.attention_mask[:, 0], expected)


def test_sliding_window_one_sees_only_itself(generator):
    tree_ids, parents, counts = draw_forest((3, 6), 4, generator)
    packed = mtp_ext.tree_pack(tree_ids, parents, counts, torch.ones((3, 5), dtype=torch.long), 0, 1)
    only_self = torch.cat([torch.zeros((6, 5), dtype=torch.bool), torch.eye(6, dtype=torch.bool)], dim=1)
    assert torch.equal(packed.attention_mask[:, 0], only_self.expand(3, -1, -1))


def test_tree_pack_is_teacher_at_the_last_position(generator):
    # Teacher trees that are all empty but the last one pack that tree as tree_pack does, when
    # the last token is real (tree_pack also packs after a padding token; teacher does not).
    batch, length, nodes = 3, 9, 7
    tree_ids, parents, counts = draw_forest((batch, length, nodes), 3, generator)
    counts[:, :-1] = 0
    seq_mask = draw_mask(batch, length, generator, ["all_real", "left_padded"])
    for window in (0, 3):
        teacher = mtp_ext.tree_pack_teacher(tree_ids, parents, counts, seq_mask, PAD_ID, window)
        single = mtp_ext.tree_pack(tree_ids[:, -1], parents[:, -1], counts[:, -1], seq_mask, PAD_ID, window)
        last = slice((length - 1) * nodes, length * nodes)
        columns = list(range(length)) + list(range(length + last.start, length + last.stop))
        assert torch.equal(teacher.input_ids[:, last], single.input_ids)
        assert torch.equal(teacher.position_ids[:, last], single.position_ids)
        assert torch.equal(teacher.attention_mask[:, :, last][..., columns], single.attention_mask)


def test_empty_shapes():
    empty_trees = mtp_ext.tree_pack(torch.zeros((2, 0), dtype=torch.long), torch.zeros((2, 0), dtype=torch.long),
                                    torch.zeros(2, dtype=torch.long), torch.ones((2, 3), dtype=torch.bool))
    assert empty_trees.attention_mask.shape == (2, 1, 0, 3)
    no_rows = mtp_ext.tree_pack(torch.zeros((0, 4), dtype=torch.long), torch.zeros((0, 4), dtype=torch.long),
                                torch.zeros(0, dtype=torch.long), torch.ones((0, 3), dtype=torch.bool))
    assert no_rows.attention_mask.shape == (0, 1, 4, 7)
    no_prefix = mtp_ext.tree_pack(torch.tensor([[4, 5]]), torch.tensor([[-1, 0]]), torch.tensor([2]),
                                  torch.ones((1, 0), dtype=torch.bool))
    assert no_prefix.position_ids.tolist() == [[0, 1]]
    assert no_prefix.attention_mask.int().tolist() == [[[[1, 0], [1, 1]]]]


# ----------------------------------------------------------------------------- end to end

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
MODELS = {
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=2)), 0),
    "gpt_neox": (lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**TINY)), 0),
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                                eos_token_id=0)), 0),
    # A sliding-window model: the packed mask carries the window (ancestors included).
    "mistral_window_2": (lambda: MistralForCausalLM(MistralConfig(**TINY, num_key_value_heads=2, sliding_window=2)), 2),
}


def tiny_model(name: str):
    torch.manual_seed(0)
    return MODELS[name][0]().eval()


def additive_mask(allowed: Tensor) -> Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def cached_run(model, input_ids: Tensor, attention_mask: Tensor):
    """Runs a (left-padded) batch and returns its KV cache. A plain DynamicCache keeps every
    position, also in sliding-window layers, so the packed mask can address all of them."""
    cache = DynamicCache()
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
          use_cache=True)
    return cache


def packed_logits(model, packed, cache) -> Tensor:
    return model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                 attention_mask=additive_mask(packed.attention_mask), past_key_values=cache, use_cache=True).logits


def path_to(parents: list[int], node: int) -> list[int]:
    """The node's ancestors and the node, root first."""
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def alone_logits(model, tokens: Tensor) -> Tensor:
    return model(input_ids=tokens[None]).logits[0, -1]


LEFT_PADDED = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]])


@pytest.mark.filterwarnings("ignore:.*past_key_values")
@pytest.mark.parametrize("model_name", list(MODELS))
@torch.no_grad()
def test_packed_logits_equal_separate_runs(model_name, generator):
    model, window = tiny_model(model_name), MODELS[model_name][1]
    batch, length, nodes = 3, 7, 6
    prefix = torch.randint(1, 61, (batch, length), generator=generator)
    tree_ids = torch.randint(1, 61, (batch, nodes), generator=generator)
    parents = torch.tensor([[-1, 0, 1, 2, 3, 1], [-1, -1, 0, 1, 2, 2], [-1, 0, 0, 1, 3, 4]])  # depths up to 5
    counts = torch.tensor([6, 4, 5])
    cache = cached_run(model, prefix, LEFT_PADDED)
    packed = mtp_ext.tree_pack(tree_ids, parents, counts, LEFT_PADDED, sliding_window=window)
    logits = packed_logits(model, packed, cache)
    for b in range(batch):
        real_prefix = prefix[b][LEFT_PADDED[b].bool()]
        for node in range(int(counts[b])):
            alone = alone_logits(model, torch.cat([real_prefix, tree_ids[b, path_to(parents[b].tolist(), node)]]))
            torch.testing.assert_close(logits[b, node], alone, rtol=0, atol=1e-4, msg=f"row {b}, node {node}")
    # The packed pass appended the tree tokens to the cache: cropping them (crop(-nodes), which
    # transformers 5.17 and 5.24 both take) restores the prefix cache for the next pass.
    assert cache.get_seq_length() == length + nodes
    cache.crop(-nodes)
    assert torch.equal(packed_logits(model, packed, cache), logits)


@pytest.mark.filterwarnings("ignore:.*past_key_values")
@pytest.mark.parametrize("first_position,trees", [(0, 7), (3, 3)])
@pytest.mark.parametrize("model_name", ["llama", "mistral_window_2"])
@torch.no_grad()
def test_teacher_logits_equal_separate_runs(model_name, first_position, trees, generator):
    model, window = tiny_model(model_name), MODELS[model_name][1]
    batch, length, nodes = 3, 7, 4
    sequence = torch.randint(1, 61, (batch, length), generator=generator)
    tree_ids, parents, counts = draw_forest((batch, trees, nodes), 3, generator)
    tree_ids = tree_ids % 60 + 1
    cache = cached_run(model, sequence, LEFT_PADDED)
    packed = mtp_ext.tree_pack_teacher(tree_ids, parents, counts, LEFT_PADDED, sliding_window=window,
                                       first_position=first_position)
    logits = packed_logits(model, packed, cache)
    checked = 0
    for b in range(batch):
        for w in range(trees):
            t = first_position + w
            if not LEFT_PADDED[b, t]:
                continue
            real_sequence = sequence[b, : t + 1][LEFT_PADDED[b, : t + 1].bool()]
            for node in range(int(counts[b, w])):
                path = tree_ids[b, w, path_to(parents[b, w].tolist(), node)]
                alone = alone_logits(model, torch.cat([real_sequence, path]))
                torch.testing.assert_close(logits[b, w * nodes + node], alone, rtol=0, atol=1e-4,
                                           msg=f"row {b}, token {t}, node {node}")
                checked += 1
    assert checked > 0


# ----------------------------------------------------------------------------- torch.library


def _op_args(op_name: str, generator) -> tuple:
    if op_name == "tree_pack":
        return (*draw_forest((3, 5), 3, generator), draw_mask(3, 6, generator), PAD_ID, 2)
    return (*draw_forest((3, 6, 4), 2, generator), draw_mask(3, 6, generator), PAD_ID, 0, 0)


@pytest.mark.parametrize("op_name", ["tree_pack", "tree_pack_teacher"])
def test_opcheck_cpu(op_name, generator):
    torch.library.opcheck(getattr(torch.ops.mtp_ext, op_name), _op_args(op_name, generator))


def _compilable(tree_ids, parents, counts, prefix_mask):
    single = mtp_ext.tree_pack(tree_ids, parents, counts, prefix_mask, sliding_window=2)
    teacher = mtp_ext.tree_pack_teacher(tree_ids[:, None], parents[:, None], counts[:, None], prefix_mask,
                                        first_position=prefix_mask.shape[1] - 1)
    return single, teacher


def test_compile_fullgraph_matches_eager(generator):
    # aot_eager traces through the fake kernels like inductor does, without compiling C++.
    args = (*draw_forest((3, 5), 3, generator), draw_mask(3, 6, generator, ["all_real", "left_padded"]))
    torch._dynamo.reset()
    compiled = torch.compile(_compilable, fullgraph=True, backend="aot_eager")
    for actual, expected in zip(compiled(*args), _compilable(*args)):
        assert_same_packing(actual, expected)


# ----------------------------------------------------------------------------- bad input

GOOD_IDS = torch.tensor([[5, 6, 7], [8, 9, 10]])
GOOD_PARENTS = torch.tensor([[-1, 0, 0], [-1, -1, 1]])
GOOD_COUNTS = torch.tensor([3, 2])
GOOD_MASK = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])


def _pack(tree_ids=GOOD_IDS, parents=GOOD_PARENTS, counts=GOOD_COUNTS, prefix_mask=GOOD_MASK, sliding_window=0):
    return mtp_ext.tree_pack(tree_ids, parents, counts, prefix_mask, 0, sliding_window)


BAD_TREE_PACK = {
    "ids_float": (dict(tree_ids=GOOD_IDS.float()), "tree_ids must be int64"),
    "ids_3d": (dict(tree_ids=GOOD_IDS[None]), "tree_ids must be 2-D"),
    "parents_int32": (dict(parents=GOOD_PARENTS.int()), "parents must be int64"),
    "parents_shape": (dict(parents=GOOD_PARENTS[:, :2]), "parents must have shape"),
    "parent_is_self": (dict(parents=torch.tensor([[-1, 1, 0], [-1, -1, 1]])), r"parents.*parents\[0, 1\] = 1"),
    "parent_after_node": (dict(parents=torch.tensor([[-1, 0, 0], [1, -1, 1]])), r"parents.*parents\[1, 0\] = 1"),
    "parent_below_minus_one": (dict(parents=torch.tensor([[-1, 0, -2], [-1, -1, 1]])), r"parents\[0, 2\] = -2"),
    "counts_float": (dict(counts=GOOD_COUNTS.float()), "counts must be int32 or int64"),
    "counts_shape": (dict(counts=GOOD_COUNTS[:1]), "counts must have shape"),
    "counts_above_nodes": (dict(counts=torch.tensor([3, 4])), r"counts must lie in \[0, 3\]"),
    "counts_negative": (dict(counts=torch.tensor([-1, 2])), r"counts must lie in \[0, 3\]"),
    "mask_float": (dict(prefix_mask=GOOD_MASK.float()), "prefix_mask must be bool or an integer"),
    "mask_1d": (dict(prefix_mask=GOOD_MASK[0]), "prefix_mask must be 2-D"),
    "mask_rows": (dict(prefix_mask=GOOD_MASK[:1]), "prefix_mask has 1 rows"),
    "negative_window": (dict(sliding_window=-1), "sliding_window must be >= 0"),
}


@pytest.mark.parametrize("bad", list(BAD_TREE_PACK))
def test_bad_tree_pack_input_raises(bad):
    changes, message = BAD_TREE_PACK[bad]
    with pytest.raises(RuntimeError, match=message):
        _pack(**changes)


def test_bad_parents_in_padding_slots_are_allowed():
    packed = _pack(parents=torch.tensor([[-1, 0, 0], [-1, -1, 7]]), counts=torch.tensor([3, 2]))
    assert packed.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]]


BAD_TEACHER = {
    "ids_2d": (dict(tree_ids=torch.zeros((2, 4), dtype=torch.long)), "tree_ids must be 3-D"),
    "counts_shape": (dict(counts=torch.zeros(2, dtype=torch.long)), "counts must have shape"),
    "too_many_trees": (dict(first_position=1), "first_position"),
    "negative_first_position": (dict(first_position=-1), "first_position"),
    # first_position + trees overflows int64: the bound must still hold.
    "first_position_overflows": (dict(first_position=2**63 - 1), "first_position"),
    "parent_is_self": (dict(parents=torch.zeros((2, 4, 3), dtype=torch.long)), r"parents\[0, 0, 0\] = 0"),
    "mask_float": (dict(seq_mask=GOOD_MASK.float()), "seq_mask must be bool or an integer"),
}


@pytest.mark.parametrize("bad", list(BAD_TEACHER))
def test_bad_teacher_input_raises(bad):
    changes, message = BAD_TEACHER[bad]
    args = dict(tree_ids=torch.zeros((2, 4, 3), dtype=torch.long), parents=torch.full((2, 4, 3), -1),
                counts=torch.full((2, 4), 3), seq_mask=GOOD_MASK, first_position=0)
    args.update(changes)
    with pytest.raises(RuntimeError, match=message):
        mtp_ext.tree_pack_teacher(args["tree_ids"], args["parents"], args["counts"], args["seq_mask"],
                                  first_position=args["first_position"])


# ----------------------------------------------------------------------------- CUDA (run on a GPU)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("sliding_window", [0, 3])
@pytest.mark.parametrize("batch,length,nodes", SHAPES + [(2, 600, 300)])
def test_cuda_tree_pack_equals_cpu(batch, length, nodes, sliding_window, generator):
    tree_ids, parents, counts = draw_forest((batch, nodes), 4, generator, torch.int32)
    prefix_mask = draw_mask(batch, length, generator).bool()
    args = (tree_ids, parents, counts, prefix_mask)
    on_gpu = mtp_ext.tree_pack(*(t.cuda() for t in args), PAD_ID, sliding_window)
    assert all(t.is_cuda for t in on_gpu)
    assert_same_packing(on_gpu, mtp_ext.tree_pack(*args, PAD_ID, sliding_window))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("first_position", [0, 5])
@pytest.mark.parametrize("batch,length,nodes", TEACHER_SHAPES[1:] + [(2, 130, 9)])
def test_cuda_teacher_equals_cpu(batch, length, nodes, first_position, generator):
    trees = length - first_position
    if trees < 1:
        pytest.skip("no trees")
    tree_ids, parents, counts = draw_forest((batch, trees, nodes), 3, generator)
    seq_mask = draw_mask(batch, length, generator)
    args = (tree_ids, parents, counts, seq_mask)
    on_gpu = mtp_ext.tree_pack_teacher(*(t.cuda() for t in args), PAD_ID, 2, first_position)
    assert_same_packing(on_gpu, mtp_ext.tree_pack_teacher(*args, PAD_ID, 2, first_position))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("op_name", ["tree_pack", "tree_pack_teacher"])
def test_opcheck_cuda(op_name, generator):
    args = tuple(a.cuda() if isinstance(a, Tensor) else a for a in _op_args(op_name, generator))
    torch.library.opcheck(getattr(torch.ops.mtp_ext, op_name), args)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("bad", ["parent_is_self", "counts_above_nodes"])
def test_cuda_bad_values_raise(bad):
    changes, message = BAD_TREE_PACK[bad]
    args = dict(tree_ids=GOOD_IDS, parents=GOOD_PARENTS, counts=GOOD_COUNTS, prefix_mask=GOOD_MASK)
    args.update(changes)
    with pytest.raises(RuntimeError, match=message):
        _pack(**{name: t.cuda() for name, t in args.items()})


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("on_cpu", ["parents", "counts", "prefix_mask"])
def test_cuda_inputs_on_different_devices_raise(on_cpu):
    args = dict(tree_ids=GOOD_IDS.cuda(), parents=GOOD_PARENTS.cuda(), counts=GOOD_COUNTS.cuda(),
                prefix_mask=GOOD_MASK.cuda())
    args[on_cpu] = args[on_cpu].cpu()
    with pytest.raises(RuntimeError, match=f"{on_cpu} is on cpu"):
        _pack(**args)
