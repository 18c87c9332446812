"""Data-parallel set-up on MindSpore's own collectives, for both launchers.

- ``msrun --worker_num=N --local_worker_num=N train_dreambooth.py ... --is_parallel True``: msrun
  starts a scheduler and sets MindSpore's dynamic-cluster variables for each worker itself.
- ``mpirun -n N python train_dreambooth.py ... --is_parallel True``: OpenMPI only says who is who
  (``OMPI_COMM_WORLD_RANK``/``SIZE``), so each process sets the dynamic-cluster variables
  (``MS_ROLE``, ``MS_WORKER_NUM``, ``MS_NODE_ID``, ``MS_SCHED_HOST``, ``MS_SCHED_PORT``) from those and
  rank 0 starts the one scheduler process, as msrun would. A plain ``init()`` under mpirun fails
  on the CPU target with MindSpore 2.10 (measured); this path is the same on Ascend and GPU.

Multi-machine: set ``MS_SCHED_HOST`` (the address of rank 0's machine, reachable from all) and
optionally ``MS_SCHED_PORT`` in every process's environment (``mpirun -x MS_SCHED_HOST=...``).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

_logger = logging.getLogger(__name__)
_SCHEDULER_CODE = "from mindspore.communication import init; init()"


@dataclass(frozen=True)
class ParallelContext:
    """Who this process is in the data-parallel group."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, samples validation images and writes files."""
        return self.rank == 0


def launched_by_mpirun() -> bool:
    return "OMPI_COMM_WORLD_SIZE" in os.environ and "MS_ROLE" not in os.environ


def _default_port() -> int:
    # every rank of one mpirun job derives the same port; concurrent jobs get different ones
    job = os.environ.get("OMPI_MCA_ess_base_jobid") or os.environ.get("OMPI_MCA_orte_hnp_uri", "") or str(os.getppid())
    return 20000 + int(hashlib.sha1(job.encode()).hexdigest(), 16) % 20000


def setup_mpirun_cluster() -> None:
    """Translate OpenMPI's rank/size into MindSpore's dynamic-cluster environment (see module doc)."""
    rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
    size = int(os.environ["OMPI_COMM_WORLD_SIZE"])
    os.environ.setdefault("MS_SCHED_HOST", "127.0.0.1")
    os.environ.setdefault("MS_SCHED_PORT", str(_default_port()))
    os.environ.update(MS_ROLE="MS_WORKER", MS_WORKER_NUM=str(size), MS_NODE_ID=str(rank))
    if rank == 0:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
        env.update(MS_ROLE="MS_SCHED", MS_NODE_ID="scheduler")
        scheduler = subprocess.Popen([sys.executable, "-c", _SCHEDULER_CODE], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        atexit.register(_stop, scheduler)


def _stop(process: subprocess.Popen) -> None:
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def init_parallel(is_parallel: bool) -> ParallelContext:
    """Initialise collective communication and data-parallel mode (gradient mean) when asked."""
    if not is_parallel:
        return ParallelContext()
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    if launched_by_mpirun():
        setup_mpirun_cluster()
    init()
    world_size = get_group_size()
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=world_size)
    context = ParallelContext(rank=get_rank(), world_size=world_size)
    _logger.info("data parallel: rank %d of %d", context.rank, context.world_size)
    return context


def barrier(context: Optional[ParallelContext]) -> None:
    """Wait for every rank (no-op when not parallel)."""
    if context is None or context.world_size == 1:
        return
    import mindspore as ms
    from mindspore import ops

    ops.AllReduce()(ms.Tensor([1.0], ms.float32)).asnumpy()
