"""Our one-kernel AdamW (``gm.modules.native_adamw``) behind ``gm.optim.FusedAdamW`` on the CPU target:
parameters of many shapes in two groups (one large enough to be split across threads), several
updates with a clip factor and a changing learning rate, against ``torch.optim.AdamW``; the update
is in place, every parameter and moment is written, a call told not to update changes nothing (not
even the update count), and the bits do not depend on the core count. The train step's use of it is
checked against torch in test_train_step.py."""

import mindspore as ms
import numpy as np
import pytest
import torch
from core_count import assert_same_bits_on_one_and_two_cores
from mindspore import Parameter, Tensor, nn, ops

from gm.optim import build_optimizer

SHAPES = [(4, 3), (5,), (1,), (64, 32, 3, 3), (600, 512), (7, 2, 2)]  # (600, 512): above the one-thread size
GROUPS = [dict(lr=3e-3, weight_decay=1e-2), dict(lr=1e-3, weight_decay=0.0)]
SPLIT = 3  # parameters [0, 3) in the first group
BETAS, EPS = (0.9, 0.98), 1e-7


@pytest.fixture(scope="module", autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


class _Update(nn.Cell):
    """One optimizer call as the train step makes it: ``flat`` = the gradients concatenated."""

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer = optimizer

    def construct(self, update, grads, clip, lrs):
        flat = ops.concat([g.reshape(-1) for g in grads])
        return self.optimizer.update_flat(update, clip, lrs, flat)


def _values(seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]


def test_updates_match_torch_adamw():
    initial = _values(0)
    params = [Parameter(Tensor(v.copy()), name=f"p{i}") for i, v in enumerate(initial)]
    groups = [dict(params=params[:SPLIT], **GROUPS[0]), dict(params=params[SPLIT:], **GROUPS[1])]
    optimizer = build_optimizer(groups, betas=BETAS, eps=EPS)
    assert optimizer.native is not None
    update = _Update(optimizer)

    theirs = [torch.tensor(v.copy(), requires_grad=True) for v in initial]
    reference = torch.optim.AdamW([dict(params=theirs[:SPLIT], **GROUPS[0]), dict(params=theirs[SPLIT:], **GROUPS[1])],
                                  betas=BETAS, eps=EPS)
    yes, no = Tensor(True), Tensor(False)
    for t, (clip, lr_factor) in enumerate([(1.0, 1.0), (0.3, 0.5), (0.8, 2.0), (1.0, 0.1)]):
        grads = tuple(Tensor(g) for g in _values(t + 1))
        lrs = Tensor(np.array([g["lr"] * lr_factor for g in GROUPS], np.float32))
        # told not to update (accumulating, a skipped overflow, a measurement): nothing changes
        before = [p.asnumpy().copy() for p in (*params, *optimizer.exp_avg, *optimizer.exp_avg_sq)]
        update(no, grads, Tensor(clip, ms.float32), lrs)
        after = [p.asnumpy() for p in (*params, *optimizer.exp_avg, *optimizer.exp_avg_sq)]
        assert all(np.array_equal(a, b) for a, b in zip(before, after)) and int(optimizer.state_step.asnumpy()) == t
        for i in range(len(GROUPS)):
            reference.param_groups[i]["lr"] = GROUPS[i]["lr"] * lr_factor
        update(yes, grads, Tensor(clip, ms.float32), lrs)
        grads = [g.asnumpy() for g in grads]
        for p, g in zip(theirs, grads):
            p.grad = torch.from_numpy(g * np.float32(clip))
        reference.step()
        for i, (ours, p) in enumerate(zip(params, theirs)):
            expected = p.detach().numpy()
            assert not np.array_equal(ours.asnumpy(), initial[i])
            np.testing.assert_allclose(ours.asnumpy(), expected, rtol=0, atol=2e-7 * np.abs(expected).max(),
                                       err_msg=f"parameter {i} after update {t + 1}")
        for name, moments in (("exp_avg", optimizer.exp_avg), ("exp_avg_sq", optimizer.exp_avg_sq)):
            for i, (ours, p) in enumerate(zip(moments, theirs)):
                expected = reference.state[p][name].numpy()
                np.testing.assert_allclose(ours.asnumpy(), expected, rtol=0, atol=2e-7 * np.abs(expected).max(),
                                           err_msg=f"{name} of parameter {i} after update {t + 1}")
    assert int(optimizer.state_step.asnumpy()) == 4


def test_same_bits_on_one_and_two_cores(tmp_path):
    body = (
        "from mindspore import Parameter, nn, ops\n"
        "from gm.optim import build_optimizer\n"
        "rng = np.random.default_rng(0)\n"
        f"shapes = {SHAPES!r}\n"
        "params = [Parameter(Tensor(rng.standard_normal(s).astype(np.float32)), name=f'p{i}') "
        "for i, s in enumerate(shapes)]\n"
        "opt = build_optimizer([dict(params=params, lr=1e-3, weight_decay=1e-2)])\n"
        "assert opt.native is not None\n"
        "class Update(nn.Cell):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.opt = opt\n"
        "    def construct(self, grads):\n"
        "        one = ops.ones((), ms.float32)\n"
        "        lrs = ops.ones((1,), ms.float32) * 1e-3\n"
        "        flat = ops.concat([g.reshape(-1) for g in grads])\n"
        "        return self.opt.update_flat(ops.ones((), ms.bool_), one, lrs, flat)\n"
        "update = Update()\n"
        "for _ in range(3):\n"
        "    update(tuple(Tensor(rng.standard_normal(s).astype(np.float32)) for s in shapes))\n"
        "parts = [*params, *opt.exp_avg, *opt.exp_avg_sq]\n"
    )
    assert_same_bits_on_one_and_two_cores(tmp_path, body)
