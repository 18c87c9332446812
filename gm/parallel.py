"""Data-parallel set-up on MindSpore's own collectives (HCCL, NCCL, MCCL on CPU), for both launchers.

- ``msrun --worker_num=N --local_worker_num=N train_dreambooth.py ... --is_parallel True``: msrun
  starts a scheduler (the same script with ``MS_ROLE=MS_SCHED``; its ``init()`` serves the cluster
  and ends the process) and sets MindSpore's dynamic-cluster variables for each worker.
- ``mpirun -n N python train_dreambooth.py ... --is_parallel True``: MPI only says who is who. Each
  process asks MPI through ``mpi4py`` (rank, size, ranks on its machine), so any MPI works
  (OpenMPI, MPICH, Intel MPI; OpenMPI is the tested one), rank 0 picks a free scheduler port and
  broadcasts it; MindSpore's own collectives carry the job (MPI idles until a final barrier). A plain
  ``init()`` fails on the CPU target under mpirun (MindSpore 2.10, measured), so each process sets
  the same dynamic-cluster variables msrun would (``MS_ROLE``, ``MS_WORKER_NUM``, ``MS_NODE_ID``,
  ``MS_SCHED_HOST``, ``MS_SCHED_PORT``) and rank 0 starts the one scheduler process. Every rank
  waits until the scheduler's port accepts connections before ``init()``: a worker that finds no
  scheduler backs off for a minute or more (measured on CPU: 74 s to start 2 ranks without the
  wait, 4-6 s with it, imports included). Rank 0 first checks that the port is free (something
  else listening there would swallow the workers).

Multi-machine mpirun: pass the address of rank 0's machine, ``mpirun -x MS_SCHED_HOST=10.0.0.1``
(and optionally ``-x MS_SCHED_PORT=P``; by default rank 0 picks a free port).

Timeouts (defaults set here unless the environment already has them): a rank that waits in a
collective while rank 0 alone samples validation images or generates its larger share of class
images must not give up after MindSpore's CPU default of ~30 s (``MS_CPU_COMM_OP_TIMEOUT``,
raised to 1800 s here). A rank that *dies* is still noticed quickly: mpirun aborts the job at
once; msrun (``--join True``) kills the other workers within a second and exits once its
scheduler has timed the dead node out (``MS_NODE_TIMEOUT``, 30 s); without a launcher watching,
the scheduler's heartbeat check ends the survivors after about the same time.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np

from gm.errors import ConfigError, UserError

_logger = logging.getLogger(__name__)

# Workers learn the cluster state through their heartbeats; every 1-2 s instead of MindSpore's
# 3-5 s starts 2 CPU ranks ~3 s sooner (measured). Very large clusters may want MindSpore's values.
_ENV_DEFAULTS = {"MS_RETRY_INTERVAL_LOWER": "1", "MS_RETRY_INTERVAL_UPPER": "2"}
_CPU_COMM_OP_TIMEOUT_S = "1800"
_SCHEDULER_WAIT_S = 600.0
_SCHEDULER_GRACE_S = 10
# The mpirun scheduler serves the cluster until every worker has unregistered. If rank 0 (its
# parent) disappears it lingers a little for the others to unregister, then exits, so a killed
# job leaves no process behind.
_SCHEDULER_CODE = f"""
import os, threading, time
parent = os.getppid()
def _exit_after_parent():
    while os.getppid() == parent:
        time.sleep(0.5)
    time.sleep({_SCHEDULER_GRACE_S})
    os._exit(0)
threading.Thread(target=_exit_after_parent, daemon=True).start()
from mindspore.communication import init
init()
"""


class ParallelError(UserError):
    """The data-parallel group cannot go on: a rank stopped, timed out or disagrees with the others."""


@dataclass(frozen=True)
class ParallelContext:
    """Who this process is in the data-parallel group."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, samples validation images and writes files."""
        return self.rank == 0


# Set by the MPI launchers in every process they start: OpenMPI (``OMPI_COMM_WORLD_*``; PMIx in
# 4.x and 5.x), MPICH's and Intel MPI's Hydra (``PMI_*``), Slurm's ``srun --mpi=pmix``.
_MPI_LAUNCH_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK")
# Kept from the scheduler's environment: it is MindSpore's, not one of MPI's processes.
_MPI_PREFIXES = ("OMPI_", "PMIX_", "PMI_", "MPI_LOCAL")


def launcher() -> str:
    """``"mpirun"`` (an MPI launcher's variables are set), ``"msrun"`` (MindSpore's) or ``""``.

    MPI's come first: under mpirun this module sets MindSpore's variables too."""
    if any(key in os.environ for key in _MPI_LAUNCH_VARIABLES):
        return "mpirun"
    if "MS_ROLE" in os.environ:
        return "msrun"
    return ""


@dataclass(frozen=True)
class _MpiWorld:
    rank: int
    size: int
    local_size: int  # ranks on this machine
    scheduler_port: int  # rank 0's pick, the same on every rank


@functools.cache
def _mpi_world() -> _MpiWorld:
    """Rank, size and a scheduler port from MPI itself (``mpi4py``)."""
    try:
        import mpi4py

        # A rank that stops on an error must not wait in MPI_Finalize (a collective) for ranks
        # still busy: without it mpirun sees the exit and ends the job. Success finalises in
        # exit_after_mpirun_job.
        mpi4py.rc.finalize = False
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError) as err:
        raise ConfigError(f"started by an MPI launcher, but mpi4py cannot load an MPI library ({err}): install "
                          "mpi4py built against the MPI that runs mpirun (pip install --no-binary mpi4py mpi4py), "
                          "or launch with msrun") from err
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    machine = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_size = machine.Get_size()
    machine.Free()
    port = 0
    if rank == 0 and "MS_SCHED_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
    port = comm.bcast(port, root=0)
    # MPI stays initialised (idle) until exit_after_mpirun_job's barrier
    return _MpiWorld(rank, size, local_size, port)


def _launched_world_size() -> int:
    if launcher() == "mpirun":
        return _mpi_world().size
    return int(os.environ["MS_WORKER_NUM"]) if os.environ.get("MS_WORKER_NUM", "").isdigit() else 1


def _setup_mpirun_cluster() -> None:
    """MPI's rank/size -> MindSpore's dynamic-cluster variables; rank 0 starts the scheduler."""
    world = _mpi_world()
    if "MS_SCHED_HOST" not in os.environ:
        if world.local_size != world.size:
            raise ConfigError("mpirun over several machines: pass the address of rank 0's machine to every rank, "
                              "e.g. mpirun -x MS_SCHED_HOST=10.0.0.1 ... (rank 0 runs MindSpore's scheduler there)")
        os.environ["MS_SCHED_HOST"] = "127.0.0.1"
    os.environ.setdefault("MS_SCHED_PORT", str(world.scheduler_port))
    os.environ.update(MS_ROLE="MS_WORKER", MS_WORKER_NUM=str(world.size), MS_NODE_ID=str(world.rank))
    host, port = os.environ["MS_SCHED_HOST"], int(os.environ["MS_SCHED_PORT"])
    scheduler, log_path = _start_scheduler(host, port) if world.rank == 0 else (None, None)
    _wait_for_scheduler(host, port, scheduler, log_path)


def _start_scheduler(host: str, port: int):
    with socket.socket() as probe:  # a port something else listens on would swallow the workers
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ParallelError(f"cannot start MindSpore's scheduler on {host}:{port} ({err}): "
                                "pick a free port with mpirun -x MS_SCHED_PORT=P") from err
    env = {k: v for k, v in os.environ.items() if not k.startswith(_MPI_PREFIXES)}
    env.update(MS_ROLE="MS_SCHED", MS_NODE_ID="scheduler")
    log_path = Path(tempfile.gettempdir()) / f"gm_ms_scheduler_{port}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-c", _SCHEDULER_CODE], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    atexit.register(log_path.unlink, missing_ok=True)  # kept only while the job runs
    return process, log_path


def _wait_for_scheduler(host: str, port: int, scheduler: Optional[subprocess.Popen],
                        log_path: Optional[Path]) -> None:
    deadline = time.monotonic() + _SCHEDULER_WAIT_S
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if scheduler is not None and scheduler.poll() is not None:
            tail = log_path.read_text(errors="replace")[-1500:] if log_path and log_path.exists() else ""
            raise ParallelError(f"MindSpore's scheduler on port {port} exited with code {scheduler.returncode} "
                                f"before accepting workers (port taken? set MS_SCHED_PORT): {tail.strip()}")
        if time.monotonic() > deadline:
            raise ParallelError(f"no MindSpore scheduler at {host}:{port} after {_SCHEDULER_WAIT_S:.0f} s; with "
                                "several machines check MS_SCHED_HOST (rank 0's address) and the firewall")
        time.sleep(0.05)


def exit_after_mpirun_job(code: int = 0) -> None:
    """Under mpirun, end the process now that its work is written: MindSpore's interpreter-exit
    teardown of the cluster objects sometimes segfaults (seen twice in 2026-12-01's runs, rank 1,
    after every file was written; mpirun then reports the job failed). Elsewhere: nothing.

    The ranks first meet in an MPI barrier: a rank that left its last MindSpore collective may
    still owe a peer the data of it, and ending at once lost that data (measured: 3 of 6 runs,
    the peer waited, then MindSpore's heartbeat check killed it)."""
    if launcher() != "mpirun":
        return
    if code == 0 and _mpi_world.cache_info().currsize:
        from mpi4py import MPI

        MPI.COMM_WORLD.Barrier()
        MPI.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def init_parallel(is_parallel: bool, device_target: str = "CPU") -> ParallelContext:
    """Initialise collective communication and data-parallel mode (gradient mean) when asked.

    Raises ConfigError when the processes were launched as a group but ``--is_parallel`` is off
    (each would train alone and write the same files), or the other way round.
    """
    mode = launcher()
    if not is_parallel:
        if _launched_world_size() > 1 or mode == "msrun":
            raise ConfigError(f"started by {mode or 'a launcher'} as {_launched_world_size()} processes but "
                              "--is_parallel is not set: add --is_parallel True (or run one plain process)")
        return ParallelContext()
    if not mode and not os.environ.get("RANK_TABLE_FILE"):
        raise ConfigError("--is_parallel True needs a launcher: mpirun -n N python train_dreambooth.py ... or "
                          "msrun --worker_num=N --local_worker_num=N train_dreambooth.py ... (see README)")
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if device_target == "CPU":
        os.environ.setdefault("MS_CPU_COMM_OP_TIMEOUT", _CPU_COMM_OP_TIMEOUT_S)
    if mode == "mpirun":
        _setup_mpirun_cluster()
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    init()  # the msrun scheduler's process ends inside this call once the job is over
    world_size = get_group_size()
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=world_size)
    context = ParallelContext(rank=get_rank(), world_size=world_size)
    _logger.info("data parallel: rank %d of %d (%s, %s)", context.rank, world_size, mode or "rank table",
                 device_target)
    return context


def barrier(context: Optional[ParallelContext]) -> None:
    """Wait for every rank (no-op when not parallel)."""
    if context is None or context.world_size == 1:
        return
    gather_rows(context, np.zeros(1, np.float32))


def gather_rows(context: ParallelContext, row: np.ndarray) -> np.ndarray:
    """Every rank's ``row`` (1-D float32 of small integers, the same length everywhere) -> (W, n).

    An AllReduce sum of one-hot placed rows: an all-gather every backend has. Exact for integers
    below 2**24.
    """
    row = np.asarray(row, np.float32).reshape(-1)
    if context.world_size == 1:
        return row[None]
    import mindspore as ms
    from mindspore import ops

    rows = np.zeros((context.world_size, row.size), np.float32)
    rows[context.rank] = row
    return ops.AllReduce()(ms.Tensor(rows)).asnumpy()


def check_ranks_agree(context: ParallelContext, value: bytes, what: str) -> List[str]:
    """All ranks compare ``sha256(value)``; returns the per-rank hex digests (rank order).

    Raises ParallelError naming the ranks whose ``what`` differs from rank 0's. A collective: every
    rank must call it at the same point.
    """
    digest = hashlib.sha256(value).digest()
    rows = gather_rows(context, np.frombuffer(digest, np.uint8).astype(np.float32))
    digests = [bytes(r.astype(np.uint8).tolist()).hex() for r in rows]
    differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ParallelError(f"{what} differs between rank 0 and rank(s) {differ} of {context.world_size}")
    return digests


def parameters_bytes(named_parameters: Sequence) -> bytes:
    """Names and float values of ``(name, Parameter)`` pairs as one byte string, for ``check_ranks_agree``."""
    parts = []
    for name, param in sorted(named_parameters, key=lambda item: item[0]):
        parts += [name.encode(), np.ascontiguousarray(param.asnumpy()).tobytes()]
    return b"\0".join(parts)


@contextmanager
def stop_on_collective_failure(context: ParallelContext) -> Iterator[None]:
    """In a data-parallel run, turn an error of a collective (a peer died or timed out) into a
    ParallelError that says so (one line); the original stays chained (``GM_DEBUG=1`` shows it)."""
    try:
        yield
    except RuntimeError as err:
        if context.world_size == 1:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ParallelError(f"rank {context.rank} of {context.world_size} stopped: {first}. In a data-parallel run "
                            "this usually means another rank stopped first (see its log) or a collective timed "
                            "out (MS_CPU_COMM_OP_TIMEOUT on CPU, HCCL_EXEC_TIMEOUT on Ascend)") from err
