"""Our compiled CPU linear and convolution kernels (``gm.modules.native_matmul``) behind
``layers.Linear`` and ``layers.Conv2d``: outputs and every gradient equal torch's, in graph mode and
PyNative, for each geometry the models use (and a large image unfolded in bands); frozen weights
leave the input gradient unchanged; non-float32 layers and a missing library fall back to
MindSpore's MatMul."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from gm.modules import layers, native_matmul


def _draws(x_shape, w_shape, out_channels, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(np.float32)
    weight = (rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    return x, weight, bias


def _torch(kind, x, weight, bias, dy, stride=1, padding=0):
    import torch

    tx, tw = (torch.from_numpy(a).requires_grad_(True) for a in (x, weight))
    tb = torch.from_numpy(bias).requires_grad_(True) if bias is not None else None
    if kind == "linear":
        out = torch.nn.functional.linear(tx, tw, tb)
    else:
        out = torch.nn.functional.conv2d(tx, tw, tb, stride, padding)
    out.backward(torch.from_numpy(dy))
    grads = [tx.grad.numpy(), tw.grad.numpy()] + ([tb.grad.numpy()] if tb is not None else [])
    return out.detach().numpy(), grads


def _ours(layer, x, dy, mode, frozen=False):
    """Output, then the gradients of sum(layer(x) * dy) for x, weight[, bias] (x only if frozen)."""
    params = [] if frozen else [p for p in (layer.weight, layer.bias) if p is not None]

    def loss(inp):
        return (layer(inp) * Tensor(dy)).sum()

    grad_fn = ms.value_and_grad(loss, grad_position=0, weights=params or None)
    if mode == "graph":
        grad_fn = ms.jit(grad_fn)
    else:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        out = layer(Tensor(x)).asnumpy()
        _, grads = grad_fn(Tensor(x))
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    if not params:
        return out, [grads.asnumpy()]
    dx, dparams = grads
    return out, [dx.asnumpy()] + [g.asnumpy() for g in dparams]


def _assert_close(case, ours, theirs):
    names = ("output", "d input", "d weight", "d bias")
    for name, a, b in zip(names, [ours[0], *ours[1]], [theirs[0], *theirs[1]]):
        assert a.shape == b.shape, f"{case} {name}: shape {a.shape} against torch's {b.shape}"
        scale, diff = float(np.abs(b).max()), float(np.abs(a - b).max())
        assert diff <= 2e-5 * scale, f"{case} {name}: max diff {diff:.3g} against max |torch| {scale:.3g}"


LINEAR_CASES = {
    # (input shape, out features, bias): tokens with a bias, a 2-D batch without one (q/k/v), a LoRA down
    "tokens_bias": ((2, 77, 64), 96, True),
    "rows_no_bias": ((300, 48), 32, False),
    "lora_down": ((2, 64, 160), 4, False),
}

CONV_CASES = {
    # (input shape, out channels, kernel, stride, padding, bias)
    "3x3": ((2, 8, 16, 16), 12, 3, 1, 1, True),
    "3x3_one_sample": ((1, 16, 12, 12), 8, 3, 1, 1, True),
    "downsample": ((2, 8, 17, 16), 12, 3, 2, 1, True),
    "pointwise_skip": ((3, 16, 8, 8), 24, 1, 1, 0, False),
    "odd_geometry": ((1, 4, 7, 6), 5, 3, 3, 2, True),
    # 576 taps x 130 columns per output row: the column matrix is built in bands of rows
    "banded": ((2, 64, 130, 130), 4, 3, 1, 1, True),
}


@pytest.fixture(autouse=True, scope="module")
def _kernels_built():
    assert native_matmul.kernels() is not None, "the kernels did not build (is g++ installed?)"


@pytest.mark.parametrize("mode", ["graph", "pynative"])
@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_linear_output_and_gradients_match_torch(case, mode):
    shape, out_features, bias = LINEAR_CASES[case]
    x, weight, b = _draws(shape, (out_features, shape[-1]), out_features, seed=len(case))
    layer = layers.Linear(shape[-1], out_features, bias=bias)
    assert layer.native is not None
    layer.weight.set_data(Tensor(weight))
    if bias:
        layer.bias.set_data(Tensor(b))
    dy = np.random.default_rng(1).standard_normal(shape[:-1] + (out_features,)).astype(np.float32)
    _assert_close(case, _ours(layer, x, dy, mode), _torch("linear", x, weight, b if bias else None, dy))


@pytest.mark.parametrize("mode", ["graph", "pynative"])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_output_and_gradients_match_torch(case, mode):
    shape, out_channels, k, stride, padding, bias = CONV_CASES[case]
    if case == "banded" and mode == "pynative":
        pytest.skip("the banded geometry runs once, in graph mode")
    x, weight, b = _draws(shape, (out_channels, shape[1], k, k), out_channels, seed=len(case))
    layer = layers.Conv2d(shape[1], out_channels, k, stride=stride, padding=padding, bias=bias)
    assert layer.native is not None
    layer.weight.set_data(Tensor(weight))
    if bias:
        layer.bias.set_data(Tensor(b))
    h_out = (shape[2] + 2 * padding - k) // stride + 1
    w_out = (shape[3] + 2 * padding - k) // stride + 1
    dy = np.random.default_rng(1).standard_normal((shape[0], out_channels, h_out, w_out)).astype(np.float32)
    _assert_close(case, _ours(layer, x, dy, mode), _torch("conv", x, weight, b if bias else None, dy, stride, padding))


@pytest.mark.parametrize("mode", ["graph", "pynative"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_lora_linear_as_one_op_matches_torch(bias, mode):
    """``LoRALinear`` runs base product, bias and low-rank update as one op; output and the gradients
    of input, base weight, bias and both factors equal torch's ``linear(x) + scale * up(down(x))``
    (the form of diffusers' peft layers)."""
    import torch

    from gm.modules.lora import LoRALinear

    rng = np.random.default_rng(5)
    base = layers.Linear(48, 40, bias=bias)
    cell = LoRALinear(base, rank=4, alpha=8)  # scale 2
    assert cell.fused is not None
    up = rng.standard_normal((40, 4)).astype(np.float32)  # the zero init would hide the update's terms
    cell.lora_up.weight.set_data(Tensor(up))
    arrays = {"x": rng.standard_normal((2, 30, 48)).astype(np.float32), "weight": base.weight.asnumpy(),
              "lora_down.weight": cell.lora_down.weight.asnumpy(), "lora_up.weight": up}
    if bias:
        arrays["bias"] = base.bias.asnumpy()
    dy = rng.standard_normal((2, 30, 40)).astype(np.float32)
    t = {k: torch.from_numpy(v).requires_grad_(True) for k, v in arrays.items()}
    expected = (torch.nn.functional.linear(t["x"], t["weight"], t.get("bias"))
                + 2.0 * torch.nn.functional.linear(torch.nn.functional.linear(t["x"], t["lora_down.weight"]),
                                                   t["lora_up.weight"]))
    expected.backward(torch.from_numpy(dy))

    params = [base.weight] + ([base.bias] if bias else []) + [cell.lora_down.weight, cell.lora_up.weight]
    names = ["weight"] + (["bias"] if bias else []) + ["lora_down.weight", "lora_up.weight"]

    def loss(inp):
        return (cell(inp) * Tensor(dy)).sum()

    grad_fn = ms.value_and_grad(loss, grad_position=0, weights=params)
    if mode == "graph":
        grad_fn = ms.jit(grad_fn)
    else:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        out = cell(Tensor(arrays["x"])).asnumpy()
        _, (dx, dparams) = grad_fn(Tensor(arrays["x"]))
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    ours = {"output": out, "x": dx.asnumpy(), **{n: g.asnumpy() for n, g in zip(names, dparams)}}
    theirs = {"output": expected.detach().numpy(), **{k: v.grad.numpy() for k, v in t.items()}}
    for name, value in ours.items():
        scale, diff = float(np.abs(theirs[name]).max()), float(np.abs(value - theirs[name]).max())
        assert diff <= 2e-5 * scale, f"{name}: max diff {diff:.3g} against max |torch| {scale:.3g}"


def test_variants_of_one_kernel_in_one_graph_keep_their_own_shapes_and_gradients():
    """Convolutions of two strides, with and without a bias, and linear layers with and without
    one, in one graph: each keeps its own output shape and bprop (MindSpore shares a custom op's
    bprop graph between ops of equal attributes, see ``native_build.KernelOp``)."""
    import torch
    from mindspore import nn

    class Chain(nn.Cell):
        def __init__(self):
            super().__init__()
            self.a = layers.Conv2d(4, 6, 3, stride=1, padding=1)
            self.b = layers.Conv2d(6, 5, 3, stride=2, padding=1, bias=False)
            self.c = layers.Linear(4, 3, bias=True)
            self.d = layers.Linear(3, 7, bias=False)

        def construct(self, x):
            return self.d(self.c(self.b(self.a(x))))  # (2, 5, 4, 4) -> ... -> (2, 5, 4, 7)

    chain = Chain()
    x = np.random.default_rng(6).standard_normal((2, 4, 8, 8)).astype(np.float32)
    params = chain.trainable_params()

    def loss_fn(inp):
        return chain(inp).sum()

    grad_fn = ms.jit(ms.value_and_grad(loss_fn, grad_position=0, weights=params))
    loss, (dx, dparams) = grad_fn(Tensor(x))
    t = {p.name: torch.from_numpy(p.asnumpy()).requires_grad_(True) for p in params}
    tx = torch.from_numpy(x).requires_grad_(True)
    functional = torch.nn.functional
    out = functional.conv2d(functional.conv2d(tx, t["a.weight"], t["a.bias"], 1, 1), t["b.weight"], None, 2, 1)
    out = functional.linear(functional.linear(out, t["c.weight"], t["c.bias"]), t["d.weight"])
    out.sum().backward()
    np.testing.assert_allclose(float(loss), float(out.sum()), rtol=1e-5)
    np.testing.assert_allclose(dx.asnumpy(), tx.grad.numpy(), atol=1e-5)
    for param, grad in zip(params, dparams):
        np.testing.assert_allclose(grad.asnumpy(), t[param.name].grad.numpy(), atol=2e-5, err_msg=param.name)


def test_frozen_weights_give_the_same_input_gradient():
    """LoRA training freezes the base: graph mode then drops the weight-gradient op; the input
    gradient must not change with it."""
    x, weight, b = _draws((2, 8, 10, 10), (6, 8, 3, 3), 6, seed=3)
    layer = layers.Conv2d(8, 6, 3, padding=1)
    layer.weight.set_data(Tensor(weight))
    layer.bias.set_data(Tensor(b))
    dy = np.random.default_rng(4).standard_normal((2, 6, 10, 10)).astype(np.float32)
    _, trained = _ours(layer, x, dy, "graph")
    _, frozen = _ours(layer, x, dy, "graph", frozen=True)
    np.testing.assert_array_equal(frozen[0], trained[0])


def test_a_float16_layer_keeps_mindspores_matmul():
    """The kernels read float32 buffers; a float16 layer (frozen fp16 weights) takes MindSpore's path."""
    layer = layers.Linear(8, 4, dtype=ms.float16)
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float16)
    expected = x.astype(np.float32) @ layer.weight.asnumpy().astype(np.float32).T + layer.bias.asnumpy()
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy().astype(np.float32), expected, atol=1e-2)


def test_without_the_library_the_layers_keep_mindspores_matmul(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    monkeypatch.setattr(native_matmul, "CACHE_ROOT", native_matmul.CACHE_ROOT / "never-built")
    native_matmul.kernels.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            linear, conv = layers.Linear(8, 4), layers.Conv2d(3, 5, 3, padding=1)
        assert linear.native is None and conv.native is None
        assert "CPU matmul kernels unavailable" in caplog.text
        x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
        expected, _ = _torch("conv", x, conv.weight.asnumpy(), conv.bias.asnumpy(),
                             np.zeros((2, 5, 6, 6), np.float32), 1, 1)
        np.testing.assert_allclose(conv(Tensor(x)).asnumpy(), expected, atol=1e-5)
    finally:
        native_matmul.kernels.cache_clear()


def test_results_do_not_depend_on_the_number_of_cores(tmp_path):
    """Each product is split into fixed blocks of output, one per core: one core and two give the
    same bits (resume on a machine with another core count stays exact). One sample, so that on two
    cores every product of the convolution is split (two samples would run one per core)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    script = (
        f"import sys; sys.path.insert(0, {str(repo)!r})\n"
        "import numpy as np, mindspore as ms\n"
        "from mindspore import Tensor\n"
        "ms.set_context(mode=ms.GRAPH_MODE, device_target='CPU')\n"
        "from gm.modules import layers\n"
        "ms.set_seed(0)\n"
        "conv = layers.Conv2d(64, 64, 3, padding=1)\n"
        "x = Tensor(np.random.default_rng(0).standard_normal((1, 64, 24, 24)).astype(np.float32))\n"
        "def loss(v):\n"
        "    return (conv(v) * v).sum()\n"
        "grad = ms.jit(ms.grad(loss))\n"
        "np.save(__import__('sys').argv[1], np.concatenate([conv(x).asnumpy().ravel(), grad(x).asnumpy().ravel()]))\n"
    )
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 or shutil.which("taskset") is None:
        pytest.skip("needs two cores and taskset")

    source = tmp_path / "conv_bits.py"  # MindSpore compiles graphs only from source files
    source.write_text(script)
    outputs = []
    for cpus in ([cores[0]], cores[:2]):
        target = tmp_path / f"{len(cpus)}.npy"
        subprocess.run(["taskset", "-c", ",".join(map(str, cpus)), sys.executable, str(source), str(target)],
                       check=True, cwd=repo, capture_output=True)
        outputs.append(np.load(target))
    np.testing.assert_array_equal(outputs[0], outputs[1])
