"""Scale out with JAX's own SPMD runtime, and merge sweep results from many workers.

Data parallelism only, with nothing but ``jax.sharding``: a 1-D mesh over every device (axis
"data"), batches sharded on their leading axis (``NamedSharding(mesh, P("data"))``), parameters
replicated (``NamedSharding(mesh, P())``). ``jax.jit`` then partitions the computation (GSPMD) and
inserts the collectives itself (e.g. the gradient all-reduce of a data-parallel training step);
there is no home-made communication here.

Multi-host: call ``maybe_initialize_distributed()`` first thing in the program (before any JAX
computation); every process then sees all devices of all hosts in ``jax.devices()``, ``data_mesh()``
spans them, and ``shard_batch`` takes each process's *local* part of the global batch.

Sweeps: ``partition_points`` gives each worker (process, host or job-array task) its share of the
points; ``fgq_jax.fileio.append_rows_locked`` merges their rows into one CSV.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DATA_AXIS",
    "distributed_env",
    "maybe_initialize_distributed",
    "data_mesh",
    "pad_batch",
    "shard_batch",
    "replicate",
    "partition_points",
    "worker_from_env",
]

log = logging.getLogger(__name__)
DATA_AXIS = "data"

# --------------------------------------------------------------------------------------------------
# multi-process initialisation
# --------------------------------------------------------------------------------------------------
_COORD_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
_NPROC_VARS = ("JAX_NUM_PROCESSES", "NUM_PROCESSES")
_PID_VARS = ("JAX_PROCESS_ID", "PROCESS_ID")


def _first_env(names: Sequence[str], env: Mapping[str, str]) -> str | None:
    for n in names:
        v = env.get(n)
        if v not in (None, ""):
            return v
    return None


def distributed_env(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """What ``maybe_initialize_distributed`` would do in environment ``env`` (default os.environ).

    Returns None (single process: nothing to initialise) or the keyword arguments for
    ``jax.distributed.initialize`` ({} = let JAX auto-detect the cluster). Rules, first match wins:

    1. ``FGQ_DISTRIBUTED=0`` -> None (opt out); ``FGQ_DISTRIBUTED=1`` -> {} (force JAX's detection).
    2. explicit: a coordinator ``JAX_COORDINATOR_ADDRESS`` or ``COORDINATOR_ADDRESS`` (host:port of
       process 0) together with ``JAX_NUM_PROCESSES``/``NUM_PROCESSES`` and
       ``JAX_PROCESS_ID``/``PROCESS_ID`` -> those three (None if the process count is 1).
       A coordinator without count/id is left to JAX's detection ({}).
    3. clusters JAX detects by itself (``jax._src.clusters``), only when they hold > 1 process:
       Slurm (``SLURM_JOB_ID`` + ``SLURM_STEP_NODELIST`` + ``SLURM_NTASKS`` > 1 + ``SLURM_PROCID``),
       Open MPI / PMIx (``OMPI_MCA_orte_hnp_uri`` or ``OMPI_MCA_ess_base_jobid`` with
       ``OMPI_COMM_WORLD_SIZE`` > 1), multi-host Cloud TPU / GKE TPU (``TPU_WORKER_HOSTNAMES`` or
       ``TPU_PROCESS_ADDRESSES`` listing > 1 host, or ``MEGASCALE_COORDINATOR_ADDRESS``) -> {}.
    Anything else (a laptop, one CI runner, one GPU box) -> None.
    """
    env = os.environ if env is None else env
    flag = env.get("FGQ_DISTRIBUTED", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return None
    if flag in ("1", "true", "yes", "on"):
        return {}
    coord = _first_env(_COORD_VARS, env)
    nproc = _first_env(_NPROC_VARS, env)
    pid = _first_env(_PID_VARS, env)
    if coord is not None:
        if nproc is not None and pid is not None:
            if int(nproc) <= 1:
                return None
            return dict(coordinator_address=coord, num_processes=int(nproc), process_id=int(pid))
        return {}
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID")):
        if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
            return {}
    if ("OMPI_MCA_orte_hnp_uri" in env or "OMPI_MCA_ess_base_jobid" in env) and int(
        env.get("OMPI_COMM_WORLD_SIZE", "1") or 1
    ) > 1:
        return {}
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES")
    if (hosts and len([h for h in hosts.split(",") if h.strip()]) > 1) or env.get(
        "MEGASCALE_COORDINATOR_ADDRESS"
    ):
        return {}
    return None


def maybe_initialize_distributed(**overrides) -> bool:
    """Call ``jax.distributed.initialize()`` when the environment describes a multi-process job.

    See ``distributed_env`` for the variables read. ``overrides`` are passed to
    ``jax.distributed.initialize`` (e.g. ``local_device_ids``, ``initialization_timeout``). Must run
    before any JAX computation. Idempotent: returns True if the distributed runtime is (now or
    already) initialised, False for a single-process run (nothing done).
    """
    if _is_initialized():
        return True
    kwargs = distributed_env()
    if kwargs is None and not overrides:
        return False
    kwargs = {**(kwargs or {}), **overrides}
    log.info("jax.distributed.initialize(%s)", ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _is_initialized() -> bool:
    fn = getattr(jax.distributed, "is_initialized", None)
    if fn is not None:
        return bool(fn())
    from jax._src import distributed as _d  # older JAX

    return _d.global_state.client is not None


# --------------------------------------------------------------------------------------------------
# mesh, sharding
# --------------------------------------------------------------------------------------------------
def data_mesh(devices: Sequence[jax.Device] | None = None, axis: str = DATA_AXIS) -> Mesh:
    """1-D mesh over ``devices`` (default: all devices of all processes) with axis ``axis``.

    The axis is ``AxisType.Auto`` (classic GSPMD propagation inside jit), so model code needs no
    sharding annotations.
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (axis,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)


def _local_count(mesh: Mesh) -> int:
    return len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])


def pad_batch(batch: Any, multiple: int) -> tuple[Any, int]:
    """Zero-pad every leaf of ``batch`` along axis 0 to a multiple of ``multiple``.

    Returns (padded batch, original size). Leaves must share their leading size. Padding rows are
    zeros (False for bool masks): mask them out of counts/losses, e.g. with a ``valid`` leaf.
    """
    leaves = jax.tree.leaves(batch)
    if not leaves:
        return batch, 0
    sizes = {int(np.shape(x)[0]) for x in leaves}
    if len(sizes) != 1:
        raise ValueError(f"batch leaves have different leading sizes {sorted(sizes)}")
    n = sizes.pop()
    pad = (-n) % multiple
    if pad == 0:
        return batch, n

    def _pad(x):
        if isinstance(x, jax.Array):
            return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        x = np.asarray(x)
        return np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))

    return jax.tree.map(_pad, batch), n


def shard_batch(batch: Any, mesh: Mesh, axis: str = DATA_AXIS) -> Any:
    """Place ``batch`` (any pytree of arrays with a common leading batch axis) on ``mesh``, split
    along that axis: ``NamedSharding(mesh, P(axis))``.

    The batch is zero-padded to a multiple of the number of this process's devices in the mesh (use
    ``pad_batch`` yourself to know the original size, or carry a ``valid`` mask leaf — it pads with
    False). Single process: ``batch`` is the whole batch. Multi-process: ``batch`` is this process's
    local part, and the global array is the concatenation over processes in process order
    (``jax.make_array_from_process_local_data``); every process must pass the same local size.
    """
    batch, _ = pad_batch(batch, max(_local_count(mesh), 1))
    sharding = NamedSharding(mesh, P(axis))
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copy ``tree`` (params, optimizer state, act steps, ...) to every device of ``mesh``:
    ``NamedSharding(mesh, P())``. Multi-process: every process must pass the same values."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


# --------------------------------------------------------------------------------------------------
# sweeps over many workers
# --------------------------------------------------------------------------------------------------
def partition_points(points: Sequence[Any], worker_index: int, num_workers: int) -> list[Any]:
    """This worker's share of the sweep points: every ``num_workers``-th point starting at
    ``worker_index`` (round robin, so expensive neighbouring points spread out). The shares of
    workers 0..num_workers-1 are disjoint and together are exactly ``points``."""
    if num_workers < 1 or not 0 <= worker_index < num_workers:
        raise ValueError(f"need 0 <= worker_index < num_workers, got {worker_index}, {num_workers}")
    return list(points)[worker_index::num_workers]


def worker_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(worker_index, num_workers) of a sweep worker: ``FGQ_WORKER_INDEX``/``FGQ_NUM_WORKERS``, else
    a Slurm job array (``SLURM_ARRAY_TASK_ID`` - ``SLURM_ARRAY_TASK_MIN`` / ``SLURM_ARRAY_TASK_COUNT``),
    else (0, 1)."""
    env = os.environ if env is None else env
    if env.get("FGQ_NUM_WORKERS"):
        return int(env.get("FGQ_WORKER_INDEX", "0")), int(env["FGQ_NUM_WORKERS"])
    if env.get("SLURM_ARRAY_TASK_COUNT") and env.get("SLURM_ARRAY_TASK_ID"):
        lo = int(env.get("SLURM_ARRAY_TASK_MIN", "0") or 0)
        return int(env["SLURM_ARRAY_TASK_ID"]) - lo, int(env["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1
