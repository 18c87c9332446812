"""Run by tests/e2e/test_parallel.py under a launcher (``mpirun -n N python tests/parallel_helper.py OUT``):
gm.parallel's start-up and collectives on N ranks. Each rank writes ``OUT/rank<r>.json``."""

import json
import os
import sys
import time
from pathlib import Path

start = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mindspore as ms  # noqa: E402

from gm.parallel import (  # noqa: E402
    ParallelError,
    check_ranks_agree,
    exit_after_mpirun_job,
    gather_rows,
    init_parallel,
    launcher,
)

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
context = init_parallel(True, "CPU")
started = time.perf_counter() - start
rows = gather_rows(context, [context.rank, 10 + context.rank])
same = check_ranks_agree(context, b"one value", "a shared value")
try:
    check_ranks_agree(context, f"rank {context.rank}".encode(), "a per-rank value")
    error = ""
except ParallelError as err:
    error = str(err)
result = {"rank": context.rank, "world_size": context.world_size, "rows": rows.tolist(), "same": same,
          "error": error, "seconds_to_start": started,
          "launcher": launcher(), "openmpi_rank": os.environ.get("OMPI_COMM_WORLD_RANK")}
(Path(sys.argv[1]) / f"rank{context.rank}.json").write_text(json.dumps(result))
exit_after_mpirun_job()
