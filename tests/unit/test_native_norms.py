"""Our compiled CPU norm kernels (``gm.modules.native_norms``) behind ``layers.LayerNorm`` and
``layers.GroupNorm`` (and ``GroupNorm.with_silu``, norm and SiLU in one op): outputs and all three
gradients equal torch's, in graph mode and PyNative; the library is built once and reused; without
a compiler the layers keep MindSpore's kernels."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from gm.modules import layers, native_norms


def _torch_norm(kind, x, weight, bias, dy, eps, groups=None):
    import torch

    tx, tw, tb = (torch.from_numpy(a).requires_grad_(True) for a in (x, weight, bias))
    if kind == "layer":
        out = torch.nn.functional.layer_norm(tx, (x.shape[-1],), tw, tb, eps)
    else:
        out = torch.nn.functional.group_norm(tx, groups, tw, tb, eps)
    if kind == "group_silu":
        out = torch.nn.functional.silu(out)
    out.backward(torch.from_numpy(dy))
    return [out.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(), tb.grad.numpy()]


def _draws(shape, channels, seed):
    rng = np.random.default_rng(seed)
    # activations with a large mean and spread, as deep in a network: the statistics' terms matter
    x = (rng.standard_normal(shape) * 3.0 + 2.0).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    weight, bias = (rng.standard_normal(channels).astype(np.float32) for _ in range(2))
    return x, dy, weight, bias


CASES = {
    # (kind, input shape, eps, groups): the UNet's tokens, its GroupNorm, the VAE's eps, a 3-D input
    "layer_tokens": ("layer", (2, 48, 64), 1e-5, None),
    "group_unet": ("group", (2, 64, 8, 8), 1e-5, 32),
    "group_vae": ("group", (1, 96, 6, 10), 1e-6, 32),
    "group_3d": ("group", (3, 32, 20), 1e-5, 8),
    # silu(GroupNorm(x)): the ResNet blocks' pairs, UNet and VAE; a size split across threads
    "group_silu_unet": ("group_silu", (2, 64, 8, 8), 1e-5, 32),
    "group_silu_vae": ("group_silu", (1, 96, 6, 10), 1e-6, 32),
    "group_silu_large": ("group_silu", (2, 128, 32, 32), 1e-5, 32),
}


@pytest.mark.parametrize("mode", ["graph", "pynative"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_output_and_gradients_match_torch(case, mode):
    kind, shape, eps, groups = CASES[case]
    assert native_norms.kernels() is not None, "the kernels did not build (is g++ installed?)"
    channels = shape[-1] if kind == "layer" else shape[1]
    x, dy, weight, bias = _draws(shape, channels, seed=len(case))
    norm = layers.LayerNorm(channels, eps=eps) if kind == "layer" else layers.GroupNorm(groups, channels, eps=eps)
    assert norm.native is not None
    norm.weight.set_data(Tensor(weight))
    norm.bias.set_data(Tensor(bias))
    forward = norm.with_silu if kind == "group_silu" else norm
    assert kind != "group_silu" or norm.native_silu is not None

    def loss(inp):
        return (forward(inp) * Tensor(dy)).sum()

    grad_fn = ms.value_and_grad(loss, grad_position=0, weights=[norm.weight, norm.bias])
    if mode == "graph":
        grad_fn = ms.jit(grad_fn)
    else:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        out = (ms.jit(forward) if mode == "graph" else forward)(Tensor(x)).asnumpy()
        _, (dx, (dw, db)) = grad_fn(Tensor(x))
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    expected = _torch_norm(kind, x, weight, bias, dy, eps, groups)
    for name, ours, theirs in zip(("output", "d input", "d weight", "d bias"),
                                  (out, dx.asnumpy(), dw.asnumpy(), db.asnumpy()), expected):
        scale, diff = float(np.abs(theirs).max()), float(np.abs(ours - theirs).max())
        assert diff <= 2e-5 * scale, f"{case} {name}: max diff {diff:.3g} against max |torch| {scale:.3g}"


def test_library_is_built_once_into_the_cache_and_reused(tmp_path):
    first = native_norms.build_library(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert first.is_file() and first.parent.parent == tmp_path
    assert native_norms.build_library(tmp_path) == first
    assert first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == ["native_norms.so"]  # no partial files left


def test_without_a_compiler_the_layers_keep_mindspores_norms(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        native_norms.build_library(tmp_path)
    native_norms.kernels.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            norm = layers.GroupNorm(4, 8)
        assert norm.native is None
        assert "CPU norm kernels unavailable" in caplog.text
        x = np.random.default_rng(0).standard_normal((2, 8, 3, 3)).astype(np.float32)
        expected = _torch_norm("group", x, np.ones(8, np.float32), np.zeros(8, np.float32), x, 1e-5, 4)[0]
        np.testing.assert_allclose(norm(Tensor(x)).asnumpy(), expected, atol=1e-5)
        # the ResNet blocks' norm -> SiLU, in a graph as they call it
        assert norm.native_silu is None
        silu = ms.jit(norm.with_silu)(Tensor(x)).asnumpy()
        np.testing.assert_allclose(silu, expected / (1 + np.exp(-expected)), atol=1e-5)
    finally:
        native_norms.kernels.cache_clear()


def test_a_non_float32_input_is_refused_when_the_graph_is_built():
    """The kernels read float32 buffers; anything else would be read as garbage, so it fails early
    with the switch to MindSpore's kernels named (fp16/bf16 are refused on the CPU target anyway)."""
    norm = layers.LayerNorm(8)
    assert norm.native is not None
    with pytest.raises(TypeError, match="takes float32 inputs.*SDXL_MS_NATIVE_NORMS=0"):
        norm(Tensor(np.ones((2, 8), np.float16)))


def test_a_deep_copied_layer_shares_the_kernel_and_computes_the_same():
    """``gm.modules.shared_graphs`` deep-copies blocks; MindSpore cannot rebuild a custom op."""
    import copy

    norm = layers.GroupNorm(4, 8)
    twin = copy.deepcopy(norm)
    assert twin.native is norm.native
    x = Tensor(np.random.default_rng(0).standard_normal((2, 8, 3, 3)).astype(np.float32))
    np.testing.assert_array_equal(twin(x).asnumpy(), norm(x).asnumpy())
