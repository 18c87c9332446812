"""StepCell: a graph-mode top cell passes its phase to its sub-cells when the phase changes, not
at every call (MindSpore's own walk over every sub-cell costs ms per call at UNet size)."""

import numpy as np
import pytest
from mindspore import Tensor, nn

from gm.step_cell import StepCell


class _Scale(nn.Cell):
    def construct(self, x):
        return x * 3.0


class _Plain(nn.Cell):
    def __init__(self):
        super().__init__()
        self.inner = _Scale()

    def construct(self, x):
        return self.inner(x) + 1.0


class _Top(StepCell, _Plain):
    """_Plain as a StepCell."""


pytestmark = pytest.mark.usefixtures("graph_mode")  # conftest: graph mode, restored after


def test_sub_cells_get_the_phase_only_when_it_changes():
    top = _Top()
    x2, x4 = Tensor(np.ones((2, 3), np.float32)), Tensor(np.ones((4, 3), np.float32))
    np.testing.assert_array_equal(top(x2).asnumpy(), np.full((2, 3), 4.0, np.float32))
    first = top.compile_phase
    assert first and top.inner.compile_phase == first
    # another top cell sharing the sub-cell would leave its own phase there: a repeated call with
    # the same inputs does not walk the sub-cells again, and still computes the same
    object.__setattr__(top.inner, "_compile_phase", "someone else's")
    np.testing.assert_array_equal(top(x2).asnumpy(), np.full((2, 3), 4.0, np.float32))
    assert top.compile_phase == first and top.inner.compile_phase == "someone else's"
    # new inputs, a new phase (a graph to parse): passed down again
    np.testing.assert_array_equal(top(x4).asnumpy(), np.full((4, 3), 4.0, np.float32))
    assert top.compile_phase != first and top.inner.compile_phase == top.compile_phase


def test_a_plain_cell_walks_its_sub_cells_at_every_call():
    # what StepCell avoids, so this test notices when MindSpore stops doing it
    plain, x2 = _Plain(), Tensor(np.ones((2, 3), np.float32))
    plain(x2)
    object.__setattr__(plain.inner, "_compile_phase", "someone else's")
    plain(x2)
    assert plain.inner.compile_phase == plain.compile_phase
