"""Device mesh, shardings and multi-host helpers for data-parallel training.

pmap's semantics (one pure step, data-parallel, averaged gradients) expressed
as `jax.jit` over a one-axis `Mesh` named `data` spanning every device of
every process (DESIGN.md §2): the batch is split along its leading axis over
`data`; the train state is replicated, or with `fsdp=True` every large array
is split over `data` too (for models that do not fit one device). XLA inserts
the gradient all-reduce (or the FSDP all-gathers / reduce-scatters) itself.
"""

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Environment of a manual multi-process launch (one process per host).
_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"


def initialize_distributed(*, auto_detect: bool = False) -> None:
  """Connects the processes of a multi-host run; a no-op for a single process.

  Call before any other JAX operation. Two ways to launch several processes:
    * set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N and
      JAX_PROCESS_ID=i (0 ≤ i < N) in every process's environment;
    * `auto_detect=True` on a managed cluster (Cloud TPU pod, SLURM, Open
      MPI, Kubernetes), whose environment `jax.distributed.initialize()`
      reads itself.
  """
  if os.environ.get(_ENV_COORDINATOR):
    missing = [
        k for k in (_ENV_NUM_PROCESSES, _ENV_PROCESS_ID) if not os.environ.get(k)
    ]
    if missing:
      raise ValueError(
          f"{_ENV_COORDINATOR} is set but {', '.join(missing)} is not"
      )
    jax.distributed.initialize(
        coordinator_address=os.environ[_ENV_COORDINATOR],
        num_processes=int(os.environ[_ENV_NUM_PROCESSES]),
        process_id=int(os.environ[_ENV_PROCESS_ID]),
    )
  elif auto_detect:
    jax.distributed.initialize()
  else:
    return
  logging.info(
      "Process %d of %d; %d local of %d devices.", jax.process_index(),
      jax.process_count(), jax.local_device_count(), jax.device_count(),
  )


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """One-axis mesh `data` over `devices` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], num_shards: int) -> P:
  """Splits the largest axis divisible by `num_shards`; else replicates."""
  candidates = [i for i, d in enumerate(shape) if d % num_shards == 0 and d > 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: shape[i])
  spec = [None] * len(shape)
  spec[axis] = DATA_AXIS
  return P(*spec)


def state_shardings(mesh: Mesh, abstract_state: Any, *, fsdp: bool = False) -> Any:
  """Shardings for every leaf of a (train) state pytree.

  Args:
    mesh: the `data` mesh.
    abstract_state: the state or its `jax.eval_shape`.
    fsdp: if True, split each array over `data` along its largest divisible
      axis (arrays with no such axis, e.g. scalars, stay replicated).
  """
  num_shards = mesh.shape[DATA_AXIS]

  def leaf_sharding(x):
    if fsdp and np.ndim(x) > 0:
      return NamedSharding(mesh, _fsdp_spec(np.shape(x), num_shards))
    return replicated(mesh)

  shardings = jax.tree.map(leaf_sharding, abstract_state)
  if fsdp and hasattr(abstract_state, "rng"):
    # Only parameters and optimiser state are worth splitting; a [2] key split
    # over two devices would be legal but pointless.
    shardings = shardings.replace(
        rng=jax.tree.map(lambda _: replicated(mesh), abstract_state.rng)
    )
  return shardings


def local_batch_rows(mesh: Mesh, global_batch_size: int) -> slice:
  """Rows of the global batch that this process feeds (contiguous)."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map(
      (global_batch_size,)
  )
  spans = sorted({
      (idx[0].start or 0,
       global_batch_size if idx[0].stop is None else idx[0].stop)
      for idx in index_map.values()
  })
  for (_, stop), (start, _) in zip(spans, spans[1:]):
    if start != stop:
      raise ValueError(
          f"this process's devices hold rows {spans} of the batch, not one"
          " contiguous slice"
      )
  return slice(spans[0][0], spans[-1][1])


def global_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles the global batch from each process's rows (`local_batch_rows`).

  Every process calls this with its own [B / num_processes, ...] arrays; the
  result is one global [B, ...] array per key, sharded over `data`.
  """
  sharding = batch_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in local_batch.items()
  }


def jit_train_step(
    step_fn: Callable[..., Any], mesh: Mesh, state_sharding: Any
) -> Callable[..., Any]:
  """Compiles `(state, batch) -> (state, metrics)` once for the mesh.

  The state is donated (updated in place), enters and leaves with
  `state_sharding`; the batch is split over `data`; metrics are replicated.
  """
  return jax.jit(
      step_fn,
      in_shardings=(state_sharding, batch_sharding(mesh)),
      out_shardings=(state_sharding, replicated(mesh)),
      donate_argnums=0,
  )


def jit_eval_step(
    eval_fn: Callable[..., Any], mesh: Mesh, state_sharding: Any
) -> Callable[..., Any]:
  """Compiles `(state, batch) -> metrics` for the mesh (nothing donated)."""
  return jax.jit(
      eval_fn,
      in_shardings=(state_sharding, batch_sharding(mesh)),
      out_shardings=replicated(mesh),
  )
