"""mtp_ext.small_batch_linear against the reference (F.linear), torch.library checks, bad input,
and small_batch_linears, which routes a model's few-row nn.Linear calls through it."""
import json
import math

import pytest
import torch

import mtp_ext
from mtp_ext import reference
from mtp_ext.models import linear_choice
from mtp_ext.models.adapters import small_batch_linears

from tiny_models import tiny_model

CUDA_KERNELS = torch.cuda.is_available() and mtp_ext.build_info()["cuda"]
requires_cuda = pytest.mark.skipif(
    not CUDA_KERNELS, reason="needs a CUDA device and mtp_ext built with its CUDA kernels"
)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]


def draw(rows: int, in_features: int, out_features: int, generator, device="cpu", bias=True):
    x = torch.randn((rows, in_features), generator=generator)
    weight = torch.randn((out_features, in_features), generator=generator) / in_features**0.5
    b = torch.randn((out_features,), generator=generator) if bias else None
    return x.to(device), weight.to(device), None if b is None else b.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 5, 6, 7, 8, 16, 17])
@pytest.mark.parametrize("in_features,out_features", [(1, 1), (7, 65), (576, 193), (1536, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(rows, in_features, out_features, bias, device, generator):
    x, weight, b = draw(rows, in_features, out_features, generator, device, bias)
    got = mtp_ext.small_batch_linear(x, weight, b)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference.small_batch_linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_integer_inputs_are_exact_and_rows_independent(generator):
    x = torch.randint(-4, 5, (5, 40), generator=generator).float()
    weight = torch.randint(-4, 5, (33, 40), generator=generator).float()
    got = mtp_ext.small_batch_linear(x, weight)
    assert torch.equal(got, x @ weight.T)
    for row in range(5):  # a row's result does not depend on the rows beside it
        assert torch.equal(mtp_ext.small_batch_linear(x[row:row + 1], weight), got[row:row + 1])


@pytest.mark.parametrize("shape", [(3, 0), (2, 3, 0), (0,)])
def test_no_input_features_gives_the_bias(shape):
    # K = 0: the op accepts it; the wrapper's flattening must too.
    weight, bias = torch.ones(4, 0), torch.arange(4.0)
    got = mtp_ext.small_batch_linear(torch.ones(shape), weight, bias)
    assert torch.equal(got, torch.nn.functional.linear(torch.ones(shape), weight, bias))


def test_leading_dimensions_and_non_contiguous_inputs(generator):
    x = torch.randn((2, 3, 24), generator=generator)
    weight = torch.randn((40, 12), generator=generator)
    strided_x, strided_weight = x[..., ::2], weight.T.contiguous().T  # both non-contiguous
    assert not strided_x.is_contiguous() and not strided_weight.is_contiguous()
    torch.testing.assert_close(mtp_ext.small_batch_linear(strided_x, strided_weight),
                               torch.nn.functional.linear(strided_x, strided_weight), rtol=1e-5, atol=1e-5)


def test_gradients_match_reference(generator):
    x, weight, b = (t.requires_grad_() for t in draw(3, 9, 5, generator))
    mtp_ext.small_batch_linear(x, weight, b).square().sum().backward()
    got = [t.grad.clone() for t in (x, weight, b)]
    for t in (x, weight, b):
        t.grad = None
    torch.nn.functional.linear(x, weight, b).square().sum().backward()
    for grad, t in zip(got, (x, weight, b)):
        torch.testing.assert_close(grad, t.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias, device, generator):
    x, weight, b = draw(3, 16, 10, generator, device, bias)
    torch.library.opcheck(torch.ops.mtp_ext.small_batch_linear, (x, weight, b))
    x.requires_grad_()
    torch.library.opcheck(torch.ops.mtp_ext.small_batch_linear, (x, weight, b))


def test_compile_fullgraph_matches_eager(generator):
    x, weight, b = draw(4, 16, 10, generator)
    torch._dynamo.reset()
    compiled = torch.compile(mtp_ext.small_batch_linear, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, weight, b), mtp_ext.small_batch_linear(x, weight, b))


X, W, B = torch.ones(2, 4), torch.ones(3, 4), torch.ones(3)
BAD = {
    "input_1d": ((torch.ones(4)[0], W, B), ValueError, "input must have at least one dimension"),
    "features_differ": ((X, torch.ones(3, 5), B), RuntimeError, "input has 4 features but weight expects 5"),
    "weight_3d": ((X, torch.ones(1, 3, 4), B), RuntimeError, "weight must be 2-D"),
    "float64": ((X.double(), W.double(), B.double()), RuntimeError, "input and weight must be float32"),
    "bf16": ((X.bfloat16(), W.bfloat16(), None), RuntimeError, "input and weight must be float32"),
    "bias_shape": ((X, W, torch.ones(4)), RuntimeError, r"bias must have shape \[out_features\] = \[3\]"),
    "bias_int": ((X, W, torch.ones(3, dtype=torch.long)), RuntimeError, "bias must be float32"),
    "weight_on_meta": ((X, W.to("meta"), B), ValueError, "weight is on meta but input is on cpu"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_input_raises(bad):
    args, error, message = BAD[bad]
    with pytest.raises(error, match=message):
        mtp_ext.small_batch_linear(*args)


# ----------------------------------------------------------------------------- small_batch_linears


def count_op_calls(monkeypatch) -> list:
    calls = []
    original = torch.ops.mtp_ext.small_batch_linear

    def counting(*args):
        calls.append(args[0].shape[0])
        return original(*args)

    monkeypatch.setattr(torch.ops.mtp_ext, "small_batch_linear", counting)
    return calls


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_small_batch_linears_route_few_rows_and_restore(architecture, monkeypatch):
    model = tiny_model(architecture, 23)
    calls = count_op_calls(monkeypatch)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        expected_short, expected_long = model(ids[:, :3]).logits, model(ids).logits
        with small_batch_linears(model, max_rows=4):
            short, long = model(ids[:, :3]).logits, model(ids).logits
            assert calls and set(calls) == {3}  # 3 rows: the op; 10 rows: F.linear
        torch.testing.assert_close(short, expected_short, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(long, expected_long, rtol=0, atol=0)
        calls.clear()
        model(ids[:, :3])
    assert not calls  # restored on exit
    assert all("forward" not in vars(module) for module in model.modules())


def test_small_batch_linears_leave_other_dtypes_and_autograd_alone(monkeypatch):
    calls = count_op_calls(monkeypatch)
    model = tiny_model("llama", 23).double()
    with torch.no_grad(), small_batch_linears(model):
        model(torch.tensor([[1, 2]]))
    model = tiny_model("llama", 23)
    with small_batch_linears(model):  # gradients wanted: F.linear, with its autograd
        model(torch.tensor([[1, 2]])).logits.sum().backward()
    assert not calls


def test_small_batch_linears_restore_after_an_error():
    model = tiny_model("llama", 23)
    with pytest.raises(RuntimeError, match="inside"):
        with small_batch_linears(model):
            raise RuntimeError("inside")
    assert all("forward" not in vars(module) for module in model.modules())


# ----------------------------------------------------------------------------- the measured choice


@pytest.fixture
def fresh_choices(tmp_path, monkeypatch):
    """linear_choice with no choices yet, its disk cache under tmp_path, in auto mode."""
    monkeypatch.setenv("MTP_EXT_CACHE", str(tmp_path))
    monkeypatch.setenv("MTP_EXT_LINEAR", "auto")
    monkeypatch.setattr(linear_choice, "_choices", {})
    monkeypatch.setattr(linear_choice, "_decided", {})
    monkeypatch.setattr(linear_choice, "_loaded_from", None)
    return tmp_path


def test_the_faster_side_is_chosen_once_and_kept_on_disk(fresh_choices, monkeypatch):
    timings = {1: (1.0, 2.0, True), 2: (1.0, 1.02, True), 4: (3.0, 2.0, True)}  # kernel, F.linear seconds
    measured = []

    def fake_measure(out_features, in_features, rows):
        measured.append(rows)
        return timings[rows]

    monkeypatch.setattr(linear_choice, "measure", fake_measure)
    assert linear_choice.kernel_is_faster(8, 4, 1)  # clearly faster
    assert not linear_choice.kernel_is_faster(8, 4, 2)  # within the margin: torch's path
    assert not linear_choice.kernel_is_faster(8, 4, 3)  # 3 rows are decided at 4
    assert linear_choice.kernel_is_faster(8, 4, 1) and measured == [1, 2, 4]
    saved = json.loads((fresh_choices / "linear_choices.json").read_text())
    assert sorted(saved.values()) == [False, False, True]
    # Another process reads them back without measuring.
    monkeypatch.setattr(linear_choice, "_choices", {})
    monkeypatch.setattr(linear_choice, "_decided", {})
    monkeypatch.setattr(linear_choice, "_loaded_from", None)
    assert linear_choice.kernel_is_faster(8, 4, 1) and not linear_choice.kernel_is_faster(8, 4, 4)
    assert measured == [1, 2, 4]


def test_a_rebuilt_library_measures_again(fresh_choices, monkeypatch):
    timings = iter([(1.0, 2.0, True), (3.0, 2.0, True)])  # the old build's kernel wins, the new one's loses
    monkeypatch.setattr(linear_choice, "measure", lambda *shape: next(timings))
    assert linear_choice.kernel_is_faster(8, 4, 1)
    monkeypatch.setattr(linear_choice, "_library_build", lambda: "another build")
    monkeypatch.setattr(linear_choice, "_choices", {})
    monkeypatch.setattr(linear_choice, "_decided", {})
    monkeypatch.setattr(linear_choice, "_loaded_from", None)
    assert not linear_choice.kernel_is_faster(8, 4, 1)


def test_a_damaged_cache_is_measured_again(fresh_choices, monkeypatch):
    (fresh_choices / "linear_choices.json").write_text("{not json")
    monkeypatch.setattr(linear_choice, "measure", lambda *shape: (1.0, 2.0, True))
    assert linear_choice.kernel_is_faster(8, 4, 1)


def test_a_busy_measurement_serves_its_process_only(fresh_choices, monkeypatch):
    monkeypatch.setattr(linear_choice, "measure", lambda *shape: (1.0, 2.0, False))
    assert linear_choice.kernel_is_faster(8, 4, 1)
    assert not (fresh_choices / "linear_choices.json").exists()


def test_measure_times_both_sides_on_real_weights(fresh_choices, monkeypatch):
    monkeypatch.setattr(linear_choice, "_SWEEP_BYTES", 1 << 16)
    kernel_seconds, torch_seconds, steady = linear_choice.measure(64, 32, 2)
    assert 0 < kernel_seconds < math.inf and 0 < torch_seconds < math.inf and isinstance(steady, bool)


@pytest.mark.parametrize("mode,expected", [("kernel", {3}), ("torch", set())])
def test_the_environment_forces_a_side(mode, expected, monkeypatch):
    monkeypatch.setenv("MTP_EXT_LINEAR", mode)
    monkeypatch.setattr(linear_choice, "measure", lambda *shape: pytest.fail("measured despite the override"))
    calls = count_op_calls(monkeypatch)
    model = tiny_model("llama", 23)
    with torch.no_grad(), small_batch_linears(model):
        model(torch.tensor([[1, 2, 3]]))
    assert set(calls) == expected


def test_small_batch_linears_follow_the_measured_choice(fresh_choices, monkeypatch):
    # F.linear measured faster for the model's every shape: the op is never called.
    monkeypatch.setattr(linear_choice, "measure", lambda *shape: (2.0, 1.0, True))
    calls = count_op_calls(monkeypatch)
    model = tiny_model("llama", 23)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected = model(ids).logits
        with small_batch_linears(model):
            got = model(ids).logits
    assert not calls and torch.equal(got, expected)
