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
