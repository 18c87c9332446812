"""The CPU kernels' batch layouts: one matmul per sample (DreamBooth's default) and one over the
whole batch (pretraining's ``kernels.unet_fold_batch``) both equal numpy's product."""

import numpy as np
import pytest
from mindspore import Tensor

from gm.modules import cpu_kernels


@pytest.fixture(params=[False, True], ids=["per_sample", "folded"])
def layout(request):
    cpu_kernels.fold_batch_into_matmul(request.param)
    yield request.param
    cpu_kernels.fold_batch_into_matmul(False)


def test_weight_matmul_matches_numpy_in_either_layout(layout):
    rng = np.random.default_rng(0)
    weight, x = rng.standard_normal((5, 7), np.float32), rng.standard_normal((3, 7, 11), np.float32)
    out = cpu_kernels.weight_matmul(Tensor(weight), Tensor(x)).asnumpy()
    assert out.shape == (3, 5, 11)
    np.testing.assert_allclose(out, np.einsum("ok,bkl->bol", weight, x), rtol=1e-5, atol=1e-5)


def test_conv3x3_matches_a_direct_convolution_in_either_layout(layout):
    rng = np.random.default_rng(1)
    x, weight, bias = (rng.standard_normal(s, np.float32) for s in ((2, 3, 5, 6), (4, 3, 3, 3), (4,)))
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = np.zeros((2, 4, 5, 6), np.float32) + bias[None, :, None, None]
    for i in range(3):
        for j in range(3):
            expected += np.einsum("oc,bchw->bohw", weight[:, :, i, j], padded[:, :, i:i + 5, j:j + 6])
    out = cpu_kernels.conv3x3_same(Tensor(x), Tensor(weight), Tensor(bias)).asnumpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def _torch_group_norm_grads(x, weight, bias, dy, groups: int, eps: float):
    import torch

    tx, tw, tb = (torch.from_numpy(a).requires_grad_(True) for a in (x, weight, bias))
    out = torch.nn.functional.group_norm(tx, groups, tw, tb, eps)
    out.backward(torch.from_numpy(dy))
    return [out.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(), tb.grad.numpy()]


def _assert_close_to(ours, theirs, names=("output", "d input", "d weight", "d bias")):
    for name, a, e in zip(names, ours, theirs):
        scale = float(np.abs(e).max())
        diff = float(np.abs(a - e).max())
        assert diff <= 2e-5 * scale, f"{name}: max diff {diff:.3g} against max |torch| {scale:.3g}"


def _draws(shape, seed):
    rng = np.random.default_rng(seed)
    # activations with a large mean and spread, as deep in a network: the statistics' terms matter
    x = (rng.standard_normal(shape) * 3.0 + 2.0).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    weight, bias = (rng.standard_normal(shape[1]).astype(np.float32) for _ in range(2))
    return x, dy, weight, bias


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_group_norm_function_output_and_gradients_match_torch(mode):
    """``GroupNormFunction``: group_norm_2d's forward with a closed-form backward, since autodiff
    through group_norm_2d (inference BatchNorms, statistics taken as constants) gets dx wrong."""
    import mindspore as ms

    x, dy, weight, bias = _draws((2, 64, 8, 8), 2)
    norm = cpu_kernels.GroupNormFunction(32, 1e-6)

    def loss(inp, w, b):
        return (norm(inp, w, b) * Tensor(dy)).sum()

    grads = ms.grad(loss, grad_position=(0, 1, 2))
    if mode == "graph":
        grads = ms.jit(grads)
    else:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        dx, dw, db = grads(Tensor(x), Tensor(weight), Tensor(bias))
        out = norm(Tensor(x), Tensor(weight), Tensor(bias))
        ours = [a.asnumpy() for a in (out, dx, dw, db)]
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    _assert_close_to(ours, _torch_group_norm_grads(x, weight, bias, dy, 32, 1e-6))


def test_vae_group_norm_on_large_inputs_trains_with_the_true_gradients():
    """The VAE's GroupNorm takes group_norm_2d from 128x32x32 elements per sample on the CPU target;
    training the VAE there (tools/pretrain_toy_world.py with a larger crop) needs torch's gradients."""
    import mindspore as ms

    from gm.modules.diffusionmodules import model

    shape = (2, 128, 32, 32)
    assert shape[1] * shape[2] * shape[3] >= model._FAST_NORM_MIN_ELEMENTS  # the fast path, not ops.group_norm
    x, dy, weight, bias = _draws(shape, 3)
    norm = model.normalize(shape[1])
    norm.weight.set_data(Tensor(weight))
    norm.bias.set_data(Tensor(bias))

    def loss(inp):
        return (norm(inp) * Tensor(dy)).sum()

    dx, (dw, db) = ms.jit(ms.grad(loss, grad_position=0, weights=[norm.weight, norm.bias]))(Tensor(x))
    ours = [norm(Tensor(x)).asnumpy(), dx.asnumpy(), dw.asnumpy(), db.asnumpy()]
    _assert_close_to(ours, _torch_group_norm_grads(x, weight, bias, dy, 32, model.VAE_NORM_EPS))
