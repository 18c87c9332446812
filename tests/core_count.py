"""The check that a compiled CPU kernel gives the same bits on one core and on two: a script run
twice under ``taskset``, its results compared bit for bit (resume on a machine with another core
count stays exact)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PREAMBLE = (
    f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
    "import numpy as np, mindspore as ms\n"
    "from mindspore import Tensor\n"
    "ms.set_context(mode=ms.GRAPH_MODE, device_target='CPU')\n"
    "ms.set_seed(0)\n"
)


def assert_same_bits_on_one_and_two_cores(tmp_path: Path, body: str) -> None:
    """Run ``body`` (after imports of numpy as np, mindspore as ms and Tensor, graph mode, seed 0;
    it leaves a list of tensors in ``parts``) on one core, then on two, and compare the results."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 or shutil.which("taskset") is None:
        pytest.skip("needs two cores and taskset")
    source = tmp_path / "bits.py"  # MindSpore compiles graphs only from source files
    save = "\nnp.save(sys.argv[1], np.concatenate([p.asnumpy().ravel() for p in parts]))\n"
    source.write_text(PREAMBLE + body + save)
    outputs = []
    for cpus in ([cores[0]], cores[:2]):
        target = tmp_path / f"{len(cpus)}.npy"
        subprocess.run(["taskset", "-c", ",".join(map(str, cpus)), sys.executable, str(source), str(target)],
                       check=True, cwd=REPO, capture_output=True)
        outputs.append(np.load(target))
    np.testing.assert_array_equal(outputs[0], outputs[1])
