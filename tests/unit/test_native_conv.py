"""Our compiled CPU convolution kernels (``gm.modules.native_conv``, oneDNN's convolution
primitives) behind ``layers.Conv2d``: output and every gradient equal torch's, in graph mode and
PyNative, for each geometry the models use (and a large odd-sized image); variants of one kernel
keep their own shapes and gradients in one graph; frozen weights leave the input gradient
unchanged; the bits do not depend on the core count; non-float32 layers and a missing library fall
back to the im2col route."""

import mindspore as ms
import numpy as np
import pytest
from core_count import assert_same_bits_on_one_and_two_cores
from mindspore import Tensor

from gm.modules import layers, native_conv


def _draws(x_shape, w_shape, out_channels, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(np.float32)
    weight = (rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    return x, weight, bias


def _torch(x, weight, bias, dy, stride=1, padding=0):
    import torch

    tx, tw = (torch.from_numpy(a).requires_grad_(True) for a in (x, weight))
    tb = torch.from_numpy(bias).requires_grad_(True) if bias is not None else None
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


CONV_CASES = {
    # (input shape, out channels, kernel, stride, padding, bias)
    "3x3": ((2, 8, 16, 16), 12, 3, 1, 1, True),
    "3x3_one_sample": ((1, 16, 12, 12), 8, 3, 1, 1, True),
    "downsample": ((2, 8, 17, 16), 12, 3, 2, 1, True),
    "pointwise_skip": ((3, 16, 8, 8), 24, 1, 1, 0, False),
    "odd_geometry": ((1, 4, 7, 6), 5, 3, 3, 2, True),
    # a large odd-sized image: oneDNN's blocked layouts pad the width, the conversions must not
    "large_odd": ((2, 64, 130, 129), 4, 3, 1, 1, True),
}


@pytest.fixture(autouse=True, scope="module")
def _kernels_built():
    assert native_conv.kernels() is not None, "the kernels did not build (is g++ installed?)"


@pytest.mark.parametrize("mode", ["graph", "pynative"])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_output_and_gradients_match_torch(case, mode):
    shape, out_channels, k, stride, padding, bias = CONV_CASES[case]
    if case == "large_odd" and mode == "pynative":
        pytest.skip("the large geometry runs once, in graph mode")
    x, weight, b = _draws(shape, (out_channels, shape[1], k, k), out_channels, seed=len(case))
    layer = layers.Conv2d(shape[1], out_channels, k, stride=stride, padding=padding, bias=bias)
    assert layer.native is not None
    layer.weight.set_data(Tensor(weight))
    if bias:
        layer.bias.set_data(Tensor(b))
    h_out = (shape[2] + 2 * padding - k) // stride + 1
    w_out = (shape[3] + 2 * padding - k) // stride + 1
    dy = np.random.default_rng(1).standard_normal((shape[0], out_channels, h_out, w_out)).astype(np.float32)
    _assert_close(case, _ours(layer, x, dy, mode), _torch(x, weight, b if bias else None, dy, stride, padding))


def test_variants_of_one_kernel_in_one_graph_keep_their_own_shapes_and_gradients():
    """Convolutions of three geometries, with and without a bias, in one graph: each keeps its own
    output shape and bprop (MindSpore shares a custom op's bprop graph between ops of equal
    attributes, see ``native_build.KernelOp``)."""
    import torch
    from mindspore import nn

    class Chain(nn.Cell):
        def __init__(self):
            super().__init__()
            self.a = layers.Conv2d(4, 6, 3, stride=1, padding=1)
            self.b = layers.Conv2d(6, 5, 3, stride=2, padding=1, bias=False)
            self.c = layers.Conv2d(5, 7, 1, bias=True)

        def construct(self, x):
            return self.c(self.b(self.a(x)))  # (2, 4, 8, 8) -> (2, 6, 8, 8) -> (2, 5, 4, 4) -> (2, 7, 4, 4)

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
    out = functional.conv2d(out, t["c.weight"], t["c.bias"])
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


def test_a_float16_layer_keeps_the_im2col_route():
    """The kernels read float32 buffers; a float16 layer (frozen fp16 weights) takes MindSpore's ops."""
    layer = layers.Conv2d(3, 4, 3, padding=1, dtype=ms.float16)
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float16)
    expected, _ = _torch(x.astype(np.float32), layer.weight.asnumpy().astype(np.float32),
                         layer.bias.asnumpy().astype(np.float32), np.zeros((2, 4, 6, 6), np.float32), 1, 1)
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy().astype(np.float32), expected, atol=2e-2)


def test_without_the_library_the_layers_keep_the_im2col_route(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    monkeypatch.setattr(native_conv, "CACHE_ROOT", native_conv.CACHE_ROOT / "never-built")
    native_conv.kernels.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            conv = layers.Conv2d(3, 5, 3, padding=1)
        assert conv.native is None
        assert "CPU convolution kernels unavailable" in caplog.text
        x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
        expected, _ = _torch(x, conv.weight.asnumpy(), conv.bias.asnumpy(),
                             np.zeros((2, 5, 6, 6), np.float32), 1, 1)
        np.testing.assert_allclose(conv(Tensor(x)).asnumpy(), expected, atol=1e-5)
    finally:
        native_conv.kernels.cache_clear()


def test_results_do_not_depend_on_the_number_of_cores(tmp_path):
    """oneDNN splits each convolution into a fixed number of parts whatever the core count: one
    core and two give the same bits for the output and the input and weight gradients (resume on a
    machine with another core count stays exact)."""
    assert_same_bits_on_one_and_two_cores(tmp_path, (
        "from gm.modules import layers\n"
        "conv = layers.Conv2d(64, 64, 3, padding=1)\n"
        "x = Tensor(np.random.default_rng(0).standard_normal((1, 64, 24, 24)).astype(np.float32))\n"
        "def loss(v):\n"
        "    return (conv(v) * v).sum()\n"
        "grad = ms.jit(ms.grad(loss, grad_position=0, weights=conv.trainable_params()))\n"
        "dx, (dw, db) = grad(x)\n"
        "parts = [conv(x), dx, dw, db]\n"
    ))
