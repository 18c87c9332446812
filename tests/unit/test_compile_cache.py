"""The keyed compile cache's guard: MindSpore hands a process graph N of the cache for its N-th
cached compile whatever that graph is, so the cache records what its train step was compiled for
and is used only for the same inputs and parameters; an incomplete folder is cleared first."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# a cell named like the train step (the one graph the cache holds); its factor is a graph constant
SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from gm.compile_cache import enable_compile_cache

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
enable_compile_cache(sys.argv[1], "key")
factor, rows = float(sys.argv[2]), int(sys.argv[3])


class TrainStep(nn.Cell):
    def __init__(self):
        super().__init__()
        self.factor = factor

    def construct(self, x):
        return x * self.factor


print(json.dumps(TrainStep()(Tensor(np.ones((rows, 3), np.float32))).asnumpy().tolist()))
"""


def _run(script: Path, root: Path, factor: float, rows: int):
    result = subprocess.run([sys.executable, str(script), str(root), str(factor), str(rows)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_cached_train_step_is_used_only_for_what_it_was_compiled_for(tmp_path):
    script = tmp_path / "step.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    root = tmp_path / "cache"
    marker = root / "key" / "train_step_signature.json"

    out, _ = _run(script, root, 2.0, 2)
    assert out == [[2.0] * 3] * 2 and marker.is_file()
    assert json.loads(marker.read_text())["inputs"] == [[[2, 3], "Float32"]]
    # same inputs and parameters: the cached graph is handed out (the code is part of the folder's
    # key, not of this check -- here the factor changed without a new key, so the old graph answers)
    out, _ = _run(script, root, 3.0, 2)
    assert out == [[2.0] * 3] * 2
    # other input shapes: compiled without the cache (MindSpore would hand out the 2-row graph)
    out, err = _run(script, root, 3.0, 4)
    assert out == [[3.0] * 3] * 4 and "compiled for other inputs or parameters" in err
    # no marker (a compile that never finished): the folder's graphs are cleared before caching
    marker.unlink()
    out, _ = _run(script, root, 3.0, 2)
    assert out == [[3.0] * 3] * 2 and marker.is_file()
    out, _ = _run(script, root, 5.0, 2)
    assert out == [[3.0] * 3] * 2  # and the new graph is the cached one


# MindSpore calls Cell.compile at every call of a graph-mode cell: the guard must cost nothing
# after the first call of a kind (its parameter digest walks the whole model, ~5 ms a step)
COUNTING = """
import json, sys
sys.path.insert(0, {repo!r})
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
import gm.compile_cache as compile_cache

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
compile_cache.enable_compile_cache(sys.argv[1], "key")
taken = []
signature = compile_cache.graph_signature
compile_cache.graph_signature = lambda cell, args: taken.append(1) or signature(cell, args)


class TrainStep(nn.Cell):
    def construct(self, x):
        return x * 2.0


step, counts = TrainStep(), []
for rows in (2, 2, 2, 4, 4, 2):
    step(Tensor(np.ones((rows, 3), np.float32)))
    counts.append(len(taken))
step.set_train(True)
step(Tensor(np.ones((2, 3), np.float32)))
counts.append(len(taken))
print(json.dumps(counts))
"""


def test_the_guard_is_checked_once_per_kind_of_call(tmp_path):
    script = tmp_path / "count.py"
    script.write_text(COUNTING.format(repo=str(REPO)))
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "cache")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # once for the 2-row input, once for the 4-row one, once more in train mode
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [1, 1, 1, 2, 2, 2, 3]
