"""Our compiled CPU attention kernels (``gm.modules.native_attention``, products on oneDNN's sgemm)
behind ``CrossAttention``: the output and the gradients of the input, the context and every
projection weight equal torch's ``scaled_dot_product_attention`` path, in graph mode and PyNative,
for self- and cross-attention, a shape above the single-thread threshold and scores wide enough to
underflow the softmax; the bits do not depend on the core count; switched off, attention keeps
MindSpore's ops with the same results. The GEGLU kernels of the same library behind ``GEGLU``
(``a * gelu(b)``, exact erf GELU): output and gradients equal torch's, GELU itself within float32
rounding over [-12, 12], threads or not."""

import math

import mindspore as ms
import numpy as np
import pytest
from core_count import assert_same_bits_on_one_and_two_cores
from mindspore import Tensor

from gm.modules import native_attention
from gm.modules.attention import GEGLU, CrossAttention

CASES = {
    # (batch, tokens, context tokens or None for self-attention, query width, context width, heads,
    #  head width, weight scale)
    "self": (2, 64, None, 32, None, 2, 16, 0.3),
    "cross": (2, 64, 77, 32, 96, 2, 16, 0.3),
    "one_head_one_sample": (1, 16, 9, 8, 12, 1, 8, 0.3),
    # ~140 MFLOP: split across threads
    "self_large": (2, 256, None, 128, None, 4, 32, 0.3),
    # scores in the hundreds: most softmax terms underflow to exactly 0
    "wide_scores": (2, 32, 40, 32, 48, 2, 16, 3.0),
}


def _layer(case):
    batch, tokens, ctx_tokens, width, ctx_width, heads, head_width, scale = CASES[case]
    layer = CrossAttention(width, ctx_width, heads, head_width)
    rng = np.random.default_rng(len(case))
    for p in layer.get_parameters():
        p.set_data(Tensor((rng.standard_normal(p.shape) * scale / np.sqrt(p.shape[-1])).astype(np.float32)))
    x = rng.standard_normal((batch, tokens, width)).astype(np.float32)
    context = None if ctx_tokens is None else rng.standard_normal((batch, ctx_tokens, ctx_width)).astype(np.float32)
    dy = rng.standard_normal((batch, tokens, width)).astype(np.float32)
    return layer, x, context, dy


def _run(layer, inputs, dy, mode):
    """Output, then the gradients of sum(layer(*inputs) * dy): each input, then each weight."""
    weights = layer.trainable_params()

    def loss(*args):
        return (layer(*args) * Tensor(dy)).sum()

    grad_fn = ms.grad(loss, grad_position=tuple(range(len(inputs))), weights=weights)
    if mode == "graph":
        grad_fn = ms.jit(grad_fn)
    else:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        out = layer(*inputs).asnumpy()
        input_grads, weight_grads = grad_fn(*inputs)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    input_grads = input_grads if isinstance(input_grads, tuple) else (input_grads,)
    return out, [g.asnumpy() for g in (*input_grads, *weight_grads)], [p.name for p in weights]


def _ours(layer, x, context, dy, mode):
    """Output, then the gradients of sum(layer(x, context) * dy): x[, context], then each weight."""
    inputs = (Tensor(x),) if context is None else (Tensor(x), Tensor(context))
    return _run(layer, inputs, dy, mode)


def _torch(layer, x, context, dy, heads, names):
    import torch

    params = {p.name: torch.from_numpy(p.asnumpy()).requires_grad_(True) for p in layer.get_parameters()}
    weight = {n.split(".")[-2] if "to_out" not in n else "out_" + n.split(".")[-1]: t for n, t in params.items()}
    tx = torch.from_numpy(x).requires_grad_(True)
    tc = tx if context is None else torch.from_numpy(context).requires_grad_(True)
    q, k, v = tx @ weight["to_q"].T, tc @ weight["to_k"].T, tc @ weight["to_v"].T
    b, tokens, inner = q.shape

    def split(t):
        return t.reshape(b, -1, heads, inner // heads).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    out = out.transpose(1, 2).reshape(b, tokens, inner) @ weight["out_weight"].T + weight["out_bias"]
    out.backward(torch.from_numpy(dy))
    grads = [tx.grad.numpy()] + ([] if context is None else [tc.grad.numpy()])
    return out.detach().numpy(), grads + [params[n].grad.numpy() for n in names]


@pytest.fixture(autouse=True, scope="module")
def _kernels_built():
    assert native_attention.kernels() is not None, "the kernels did not build (is g++ installed?)"


@pytest.mark.parametrize("mode", ["graph", "pynative"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_output_and_gradients_match_torch(case, mode):
    layer, x, context, dy = _layer(case)
    assert layer.native is not None
    out, grads, names = _ours(layer, x, context, dy, mode)
    expected, expected_grads = _torch(layer, x, context, dy, CASES[case][5], names)
    labels = ["output", "dx"] + ([] if context is None else ["dcontext"]) + names
    for label, a, b in zip(labels, [out, *grads], [expected, *expected_grads]):
        assert a.shape == b.shape, f"{case} {label}: shape {a.shape} against torch's {b.shape}"
        scale, diff = float(np.abs(b).max()), float(np.abs(a - b).max())
        assert diff <= 1e-5 * scale, f"{case} {label}: max diff {diff:.3g} against max |torch| {scale:.3g}"


def test_switched_off_attention_keeps_mindspore_ops_with_the_same_results(monkeypatch):
    layer, x, context, dy = _layer("cross")
    on, on_grads, _ = _ours(layer, x, context, dy, "pynative")
    monkeypatch.setenv(native_attention.ENV_SWITCH, "0")
    native_attention.kernels.cache_clear()
    try:
        off_layer = CrossAttention(32, 96, 2, 16)
        assert off_layer.native is None
        for mine, theirs in zip(off_layer.get_parameters(), layer.get_parameters()):
            mine.set_data(theirs.data.copy())
        off, off_grads, _ = _ours(off_layer, x, context, dy, "pynative")
    finally:
        native_attention.kernels.cache_clear()
    for a, b in zip([on, *on_grads], [off, *off_grads]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def test_results_do_not_depend_on_the_number_of_cores(tmp_path):
    """Each (sample, head) is computed whole by one thread: one core and two give the same bits
    (resume on a machine with another core count stays exact)."""
    assert_same_bits_on_one_and_two_cores(tmp_path, (
        "from gm.modules.attention import CrossAttention\n"
        "layer = CrossAttention(128, None, 4, 32)\n"
        "assert layer.native is not None\n"
        "x = Tensor(np.random.default_rng(0).standard_normal((2, 256, 128)).astype(np.float32))\n"
        "def loss(v):\n"
        "    return (layer(v) * v).sum()\n"
        "grad = ms.jit(ms.grad(loss, grad_position=0, weights=layer.trainable_params()))\n"
        "dx, dw = grad(x)\n"
        "parts = [layer(x), dx, *dw]\n"
    ))


GEGLU_CASES = {
    # (input shape, hidden width, weight scale): gates mostly within a few units, then far into the tails
    "tokens": ((2, 64, 32), 48, 1.0),
    "wide_gates": ((2, 40, 16), 24, 8.0),
    # ~1.3 M elements: split across threads
    "large": ((2, 1024, 64), 640, 1.0),
}


@pytest.mark.parametrize("mode", ["graph", "pynative"])
@pytest.mark.parametrize("case", sorted(GEGLU_CASES))
def test_geglu_output_and_gradients_match_torch(case, mode):
    import torch

    shape, hidden, scale = GEGLU_CASES[case]
    layer = GEGLU(shape[-1], hidden)
    assert layer.native is not None
    rng = np.random.default_rng(len(case))
    for p in layer.get_parameters():
        p.set_data(Tensor((rng.standard_normal(p.shape) * scale / np.sqrt(p.shape[-1])).astype(np.float32)))
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal((*shape[:-1], hidden)).astype(np.float32)

    out, (dx, dweight, dbias), _ = _run(layer, (Tensor(x),), dy, mode)

    weight = torch.from_numpy(layer.proj.weight.asnumpy()).requires_grad_(True)
    bias = torch.from_numpy(layer.proj.bias.asnumpy()).requires_grad_(True)
    tx = torch.from_numpy(x).requires_grad_(True)
    value, gate = torch.nn.functional.linear(tx, weight, bias).chunk(2, -1)
    expected = value * torch.nn.functional.gelu(gate)
    expected.backward(torch.from_numpy(dy))
    for label, a, b in [("output", out, expected), ("dx", dx, tx.grad), ("dweight", dweight, weight.grad),
                        ("dbias", dbias, bias.grad)]:
        b = b.detach().numpy()
        scale, diff = float(np.abs(b).max()), float(np.abs(a - b).max())
        assert diff <= 1e-5 * scale, f"{case} {label}: max diff {diff:.3g} against max |torch| {scale:.3g}"


def test_gelu_is_exact_to_float_rounding():
    """GELU alone (value half 1) over [-12, 12] against float64: within ~3 float32 ulps of 1 in
    absolute terms (torch's own float32 GELU is within ~9), and its relative error stays small in
    the negative tail where it is a tiny number."""
    x = np.linspace(-12, 12, 240001).astype(np.float32)
    hidden = np.concatenate([np.ones((1, x.size), np.float32), x[None]], 1)
    ours = native_attention.kernels().geglu(Tensor(hidden)).asnumpy()[0].astype(np.float64)
    # x Phi(x) through erfc: 1 + erf(x / sqrt 2) cancels to 0 in the tail even in float64
    exact = x * 0.5 * np.vectorize(math.erfc)(-x.astype(np.float64) / math.sqrt(2.0))
    assert np.abs(ours - exact).max() <= 4e-7
    tail = (x < -2) & (x > -9)
    assert (np.abs(ours - exact)[tail] / np.abs(exact[tail])).max() <= 1e-5


def test_geglu_does_not_depend_on_the_number_of_cores(tmp_path):
    """The kernels alone (the projection's weight gradient is MindSpore's MatMul, whose sums follow
    its own thread split): ~1.3 M elements, split across threads."""
    assert_same_bits_on_one_and_two_cores(tmp_path, (
        "from gm.modules import native_attention\n"
        "geglu = native_attention.kernels().geglu\n"
        "rng = np.random.default_rng(0)\n"
        "h = Tensor((rng.standard_normal((2, 1024, 1280)) * 3).astype(np.float32))\n"
        "dy = Tensor(rng.standard_normal((2, 1024, 640)).astype(np.float32))\n"
        "def loss(v):\n"
        "    return (geglu(v) * dy).sum()\n"
        "parts = [geglu(h), ms.jit(ms.grad(loss))(h)]\n"
    ))
