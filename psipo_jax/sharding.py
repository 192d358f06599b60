"""Device mesh, shardings and multi-host helpers: data, FSDP and tensor parallelism.

pmap's semantics (one pure step, averaged gradients) expressed as `jax.jit`
over a `Mesh` spanning every device of every process (DESIGN.md §2); XLA
inserts the collectives (gradient all-reduce, FSDP all-gathers and
reduce-scatters, tensor-parallel reductions) itself. Two kinds of mesh:

  * the default: one axis `data` over all devices, the batch split over it
    and the state replicated, or with `fsdp=True` every large array split
    along its largest divisible axis over `data` too;
  * from the `mesh.*` config block (`make_mesh(mesh_config)`): axes
    `data`, `fsdp` and `tensor` (MESH_AXES). The batch is split over
    `data`×`fsdp` (and replicated over `tensor`); parameters whose NNX
    metadata names their logical axes (the transformer's: vocab, embed,
    heads, kv_heads, head_dim, mlp, layers) are sharded by the rule table
    LOGICAL_AXIS_RULES (MaxText's `logical_axis_rules`, written for our
    names); parameters without names (the tabular policy) are split along
    their largest axis divisible by the `fsdp` axis when it has more than
    one device, else replicated. The optimiser state is sharded like the
    parameters it mirrors.

Activations. Where weights are split over `fsdp` too, the partitioner may
lay an activation out like the weight it meets, and then move activations
instead of weights (an LM head contracting a split model dimension
all-reduces [tokens, V] logits of the whole batch). The model therefore
names its activations' axes as well (activation_batch, activation_heads,
…: the same rule table) and pins them with `constrain`, which acts while a
step is traced under `activation_sharding(mesh)` (`jit_train_step`,
`jit_eval_step` and the sampler trace so, through `traced_under`) and is
the identity anywhere else. A kernel the partitioner cannot split (the
blocked attention's row loop) runs per device under the same context
(`per_device`, a `shard_map`). benchmarks/activation_sharding.py measures
the difference; BENCHMARKS.md.

Config keys of the `mesh.*` block (`make_mesh`): `data`, `fsdp`, `tensor`,
each a device count or −1 for "the remaining devices" (at most one −1); a
missing (or None) key is 1, except `data`, which takes the remaining
devices when no other key is −1. The product must equal the number of
devices. The top-level `fsdp=True` makes an unset `mesh.fsdp` −1 instead,
so `fsdp=True` alone is the mesh (1, N, 1).
"""

import functools
import math
import numbers
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from psipo_jax import config_checks

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
TENSOR_AXIS = "tensor"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)

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
    "Process %d of %d; %d local of %d devices.",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def _is_device_list(value: Any) -> bool:
  if isinstance(value, np.ndarray):
    return True
  return isinstance(value, (list, tuple)) and all(
    isinstance(d, jax.Device) for d in value
  )


def _given_sizes(mesh_config: Any, prefix: str) -> dict[str, Any]:
  """The set (not None) keys of a `mesh.*` block; unknown keys refused."""
  config_checks.check_keys(mesh_config, MESH_AXES, prefix=prefix)
  given = {k: mesh_config.get(k) for k in MESH_AXES}
  return {k: v for k, v in given.items() if v is not None}


def mesh_shape(
  mesh_config: Any, num_devices: int, *, prefix: str = "mesh."
) -> tuple[int, int, int]:
  """The (data, fsdp, tensor) sizes of a `mesh.*` block on `num_devices`.

  Raises:
    ValueError: naming the offending `mesh.<key>`.
  """
  given = _given_sizes(mesh_config, prefix)
  for key, value in given.items():
    if (
      isinstance(value, bool)
      or not isinstance(value, numbers.Integral)
      or (value != -1 and value < 1)
    ):
      raise ValueError(
        f"{prefix}{key} must be a positive device count or -1 (the"
        f" remaining devices), got {value!r}"
      )
  free = [k for k, v in given.items() if v == -1]
  if len(free) > 1:
    raise ValueError(
      f"{prefix}{free[0]} and {prefix}{free[1]} are both -1; at most one"
      " mesh axis can take the remaining devices"
    )
  if not free and DATA_AXIS not in given:
    given[DATA_AXIS], free = -1, [DATA_AXIS]
  sizes = {k: int(given.get(k, 1)) for k in MESH_AXES}
  fixed = math.prod(v for k, v in sizes.items() if k not in free)
  if free:
    if num_devices % fixed:
      others = ", ".join(
        f"{prefix}{k}={sizes[k]}" for k in MESH_AXES if k not in free
      )
      raise ValueError(
        f"{prefix}{free[0]}=-1 cannot take the remaining devices: {others}"
        f" multiply to {fixed}, which does not divide the {num_devices} devices"
      )
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    named = " x ".join(f"{prefix}{k}={sizes[k]}" for k in MESH_AXES)
    raise ValueError(
      f"{named} = {fixed} devices, but there are {num_devices}; set one of"
      " them to -1 to take the remaining devices"
    )
  return sizes[DATA_AXIS], sizes[FSDP_AXIS], sizes[TENSOR_AXIS]


def make_mesh(
  mesh_config: Any = None,
  devices: list[jax.Device] | None = None,
  *,
  fsdp: bool = False,
  prefix: str = "mesh.",
) -> Mesh:
  """The device mesh of a run, over `devices` (default: all devices of all hosts).

  Args:
    mesh_config: the `mesh.*` config block (module docstring), or None for
      the one-axis `data` mesh. A list of devices in this position is taken
      as `devices` (the one-argument form `make_mesh(devices)`).
    devices: the devices to span, in order.
    fsdp: the top-level `fsdp` switch: an unset `mesh.fsdp` becomes −1
      (unless another key is −1), so without a `mesh_config` the mesh is
      (1, N, 1), every device on `fsdp`. The `fsdp` axis must then have more
      than one device (unless there is only one device).
    prefix: how errors name the keys of `mesh_config` (a command line's
      flag instead of the config block).

  Returns:
    A mesh with `Auto` axis types (shardings are hints that XLA propagates;
    STACK_NOTES: the `Explicit` default of `jax.make_mesh` would make every
    operation check its operands' shardings).
  Raises:
    ValueError: naming the `mesh.<key>` (or `fsdp`) that is wrong.
  """
  if mesh_config is not None and _is_device_list(mesh_config):
    mesh_config, devices = None, mesh_config
  devices = list(jax.devices() if devices is None else devices)
  if mesh_config is None and not fsdp:
    return Mesh(np.asarray(devices), (DATA_AXIS,))
  if mesh_config is None:
    mesh_config = {}
  if fsdp:
    given = _given_sizes(mesh_config, prefix)
    if FSDP_AXIS not in given and -1 not in given.values():
      given[FSDP_AXIS] = -1  # the fsdp switch: fsdp takes the remaining devices
    mesh_config = given
  shape = mesh_shape(mesh_config, len(devices), prefix=prefix)
  if fsdp and shape[1] == 1 and len(devices) > 1:
    raise ValueError(
      f"fsdp=True but mesh.fsdp gives the fsdp axis 1 of {len(devices)}"
      " devices; set mesh.fsdp (e.g. -1) or drop fsdp=True"
    )
  # jax.make_mesh orders the devices by the physical topology (TPU), by id
  # (GPU) or as given (CPU: process by process), so that `tensor`, the
  # innermost axis, stays within a host when it divides the local count
  # (`local_batch_rows` refuses a mesh where it does not).
  return jax.make_mesh(
    shape,
    MESH_AXES,
    axis_types=(AxisType.Auto,) * len(MESH_AXES),
    devices=devices,
  )


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes that split the batch: `data` and `fsdp` where present."""
  return tuple(a for a in (DATA_AXIS, FSDP_AXIS) if a in mesh.axis_names)


def batch_shards(mesh: Mesh) -> int:
  """How many slices the batch is split into (`data` × `fsdp` devices)."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data` × `fsdp`, replicated over `tensor`."""
  axes = batch_axes(mesh)
  return NamedSharding(mesh, P(axes[0] if len(axes) == 1 else axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ------------------------------------------------------ logical axis rules

# Logical axis name -> the mesh axis (or tuple of axes, or None) splitting it.
# As MaxText's `logical_axis_rules`: the weights' model dimension over
# `fsdp` (ZeRO-3 style, gathered layer by layer), the dimensions that
# Megatron-style tensor parallelism splits (vocabulary, MLP hidden, query
# and key/value heads) over `tensor`; the stacked-layer axis and the head
# dimension never split (the scan slices `layers`; Dh is small).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("vocab", TENSOR_AXIS),
  ("embed", FSDP_AXIS),
  ("mlp", TENSOR_AXIS),
  ("heads", TENSOR_AXIS),
  ("kv_heads", TENSOR_AXIS),
  ("head_dim", None),
  ("layers", None),
  # Activations (`constrain`): rows over data × fsdp; the residual stream
  # and the positions whole, so that an `fsdp`-split weight is gathered for
  # the matmul rather than the activations; the tensor-parallel dimensions
  # split like their weights.
  ("activation_batch", (DATA_AXIS, FSDP_AXIS)),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_heads", TENSOR_AXIS),
  ("activation_kv_heads", TENSOR_AXIS),
  ("activation_mlp", TENSOR_AXIS),
  ("activation_vocab", TENSOR_AXIS),
)
_RULE_NAMES = frozenset(name for name, _ in LOGICAL_AXIS_RULES)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """`x` pinned to the mesh axes its logical `names` map to, while tracing
  under `activation_sharding(mesh)`; `x` unchanged under no mesh.

  The SPMD partitioner propagates the shardings of a step's inputs through
  the program, and between a batch split over `fsdp` and weights split over
  `fsdp` too it may pick the weights' layout for an activation: the LM head
  then contracts a split model dimension and all-reduces [tokens, V] logits
  of the whole batch. Pinning activations (MaxText's
  `nn.with_logical_constraint`) makes it gather the weights instead.

  Args:
    x: an activation, e.g. [N, T, d].
    names: one logical name (a `LOGICAL_AXIS_RULES` key) or None (never
      split) per dimension of `x`.
  Raises:
    ValueError: a name the rule table does not have.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  unknown = [n for n in names if n is not None and n not in _RULE_NAMES]
  if unknown:
    raise ValueError(
      f"logical axes {unknown} have no rule in LOGICAL_AXIS_RULES"
    )
  spec = logical_to_mesh_spec(x.shape, names, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def per_device(
  fn: Callable[..., jax.Array], in_names: tuple, out_names: tuple
) -> Callable[..., jax.Array]:
  """`fn` run by each device on its own blocks (`jax.shard_map`) while traced
  under `activation_sharding(mesh)`; `fn` itself anywhere else.

  For kernels the partitioner cannot split, e.g. a loop over rows that
  reads them with dynamic slices (it would gather every row on every
  device and compute them all there). Each argument and the result are split
  as their logical names say (`logical_to_mesh_spec`, so a dimension that a
  mesh axis does not divide stays whole); `fn` must compute each block of
  its result from the same blocks of its arguments, and give the same
  result on devices that hold the same blocks.

  Args:
    fn: (*arrays) -> one array; arguments may be None (passed through).
    in_names: one tuple of logical names (or None) per argument.
    out_names: the logical names of the result's dimensions.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn

  def spec(x, names):
    return None if x is None else logical_to_mesh_spec(x.shape, names, mesh)

  def run(*args):
    out_shape = jax.eval_shape(fn, *args).shape
    return jax.shard_map(
      fn,
      mesh=mesh,
      in_specs=tuple(spec(x, n) for x, n in zip(args, in_names)),
      out_specs=logical_to_mesh_spec(out_shape, out_names, mesh),
      # The kernels' loops start from constants and carry per-device values,
      # which the varying-axes check would refuse without gain here.
      check_vma=False,
    )(*args)

  return run


def batch_shards_in_context() -> int:
  """How many ways `constrain` splits "activation_batch" now: the `data` ×
  `fsdp` devices of the mesh being traced under, 1 under no mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else batch_shards(mesh)


def activation_sharding(mesh: Mesh):
  """Context (entered while tracing) in which `constrain` pins activations to
  `mesh` and `per_device` maps kernels over it (`traced_under`)."""
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def traced_under(
  mesh: Mesh,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Decorator: the function, when traced (by `jax.jit`), runs under
  `activation_sharding(mesh)`."""

  def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def traced(*args):
      with activation_sharding(mesh):
        return fn(*args)

    return traced

  return wrap


def logical_axes(model: Any) -> Any:
  """The logical axis names of a model's parameters, as a `P` per parameter.

  Args:
    model: an NNX module (or its `nnx.eval_shape`) whose parameters may name
      their axes in NNX sharding metadata (`out_sharding`).

  Returns:
    A pytree shaped like `TrainState.params` (`nnx.to_pure_dict` of the
    `nnx.Param` state) holding one `PartitionSpec` of logical names per
    parameter; `P()` where a parameter names no axes.
  """
  return nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))


def _largest_axis_spec(shape: tuple[int, ...], axis: str, num_shards: int) -> P:
  """Splits the largest dimension divisible by `num_shards` over `axis`; else P()."""
  candidates = [i for i, d in enumerate(shape) if d % num_shards == 0 and d > 0]
  if not candidates:
    return P()
  split = max(candidates, key=lambda i: shape[i])
  spec = [None] * len(shape)
  spec[split] = axis
  return P(*spec)


def logical_to_mesh_spec(
  shape: tuple[int, ...],
  names: P | tuple[str | None, ...],
  mesh: Mesh,
  rules: Any = LOGICAL_AXIS_RULES,
) -> P:
  """The mesh `PartitionSpec` of an array whose axes have logical `names`.

  Each name maps to the mesh axes of its rule; a mesh axis is dropped where
  it is not in `mesh`, is already used by an earlier dimension of the same
  array, or does not divide the dimension (with the axes kept before it), so
  that the dimension is split less (or not at all) rather than unevenly.
  For example kv_heads=2 on `tensor`=8 stays whole. A name without a rule
  is not split.
  """
  table = dict(rules)
  if len(names) != len(shape):
    raise ValueError(f"logical axes {tuple(names)} do not match shape {shape}")
  used: set[str] = set()
  spec = []
  for dim, name in zip(shape, names):
    target = table.get(name) if name is not None else None
    wanted = (
      ()
      if target is None
      else (target,)
      if isinstance(target, str)
      else tuple(target)
    )
    kept, size = [], 1
    for axis in wanted:
      if (
        axis not in mesh.axis_names
        or axis in used
        or dim % (size * mesh.shape[axis])
      ):
        continue
      kept.append(axis)
      size *= mesh.shape[axis]
    used.update(kept)
    spec.append(
      None if not kept else kept[0] if len(kept) == 1 else tuple(kept)
    )
  return P(*spec)


def _fsdp_axis(mesh: Mesh) -> str:
  return FSDP_AXIS if FSDP_AXIS in mesh.axis_names else DATA_AXIS


def _split_unnamed(mesh: Mesh, fsdp: bool) -> bool:
  """Whether arrays without logical names are split (largest axis over fsdp)."""
  return fsdp or mesh.shape.get(FSDP_AXIS, 1) > 1


def _unnamed_sharding(mesh: Mesh, x: Any, fsdp: bool) -> NamedSharding:
  if np.ndim(x) == 0 or not _split_unnamed(mesh, fsdp):
    return replicated(mesh)
  axis = _fsdp_axis(mesh)
  return NamedSharding(
    mesh, _largest_axis_spec(np.shape(x), axis, mesh.shape[axis])
  )


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, P)


def param_shardings(
  mesh: Mesh,
  abstract_params: Any,
  axes: Any = None,
  rules: Any = LOGICAL_AXIS_RULES,
  *,
  fsdp: bool = False,
) -> Any:
  """A `NamedSharding` for every parameter.

  Args:
    mesh: a mesh of `make_mesh`.
    abstract_params: the parameter pytree (arrays or `jax.ShapeDtypeStruct`s).
    axes: `logical_axes(model)`, a `P` of logical names per parameter (or a
      prefix of the tree; None: no names anywhere).
    rules: the rule table (`LOGICAL_AXIS_RULES`).
    fsdp: split unnamed parameters even when the mesh has no `fsdp` axis
      of more than one device (the one-axis mesh's `fsdp=True`).

  On the one-axis `data` mesh names are not used (there is no `fsdp` or
  `tensor` axis): parameters are replicated, or with `fsdp=True` split along
  their largest divisible axis over `data`. On the three-axis mesh a named
  parameter follows `logical_to_mesh_spec`; an unnamed one (`P()` on an
  array with dimensions) the largest-axis rule over `fsdp`.
  """
  if axes is None:
    axes = jax.tree.map(lambda _: None, abstract_params)
  legacy = FSDP_AXIS not in mesh.axis_names

  def leaf(names, x):
    if legacy or not names or np.ndim(x) == 0:
      return _unnamed_sharding(mesh, x, fsdp)
    return NamedSharding(
      mesh, logical_to_mesh_spec(np.shape(x), names, mesh, rules)
    )

  return jax.tree.map(leaf, axes, abstract_params, is_leaf=_is_spec)


def _mirror_params(
  mesh: Mesh, tree: Any, params: Any, shardings: Any, fsdp: bool
) -> Any:
  """Shardings of an optimiser state: a leaf whose path ends with a
  parameter's path and has its shape gets that parameter's sharding (optax
  states hold params-shaped trees, e.g. Adam's mu and nu); any other leaf
  (step counts, factored statistics) the unnamed rule."""
  by_path = {}
  for (path, p), (_, s) in zip(
    jax.tree_util.tree_leaves_with_path(params),
    jax.tree_util.tree_leaves_with_path(shardings),
  ):
    by_path[tuple(path)] = (np.shape(p), s)
  lengths = sorted({len(p) for p in by_path}, reverse=True)

  def leaf(path, x):
    for n in lengths:
      match = (
        by_path.get(tuple(path[len(path) - n :])) if len(path) >= n else None
      )
      if match is not None and match[0] == np.shape(x):
        return match[1]
    return _unnamed_sharding(mesh, x, fsdp)

  return jax.tree_util.tree_map_with_path(leaf, tree)


def state_shardings(
  mesh: Mesh,
  abstract_state: Any,
  *,
  fsdp: bool = False,
  logical_axes: Any = None,
  rules: Any = LOGICAL_AXIS_RULES,
) -> Any:
  """Shardings for every leaf of a (train) state pytree.

  Args:
    mesh: a mesh of `make_mesh`.
    abstract_state: the state or its `jax.eval_shape`: a `TrainState`, or any
      pytree (then every leaf is treated as an unnamed parameter).
    fsdp: the `fsdp=True` switch (`param_shardings`).
    logical_axes: `logical_axes(model)` of the policy, for `params`,
      `ref_params` and the optimiser state; None for no names.
    rules: the rule table.

  The step, rng and counters are replicated; `params` and `ref_params`
  follow `param_shardings`; the optimiser state mirrors `params`.
  """
  if not hasattr(abstract_state, "opt_state"):
    return param_shardings(mesh, abstract_state, None, rules, fsdp=fsdp)
  params = param_shardings(
    mesh, abstract_state.params, logical_axes, rules, fsdp=fsdp
  )
  # Only parameters and optimiser state are worth splitting; a [2] key split
  # over two devices would be legal but pointless.
  shardings = jax.tree.map(lambda _: replicated(mesh), abstract_state)
  return shardings.replace(
    params=params,
    ref_params=None if abstract_state.ref_params is None else params,
    opt_state=_mirror_params(
      mesh, abstract_state.opt_state, abstract_state.params, params, fsdp
    ),
  )


def local_batch_rows(mesh: Mesh, global_batch_size: int) -> slice:
  """Rows of the global batch that this process feeds (contiguous)."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map(
    (global_batch_size,)
  )
  spans = sorted(
    {
      (
        idx[0].start or 0,
        global_batch_size if idx[0].stop is None else idx[0].stop,
      )
      for idx in index_map.values()
    }
  )
  for (_, stop), (start, _) in zip(spans, spans[1:]):
    if start != stop:
      raise ValueError(
        f"this process's devices hold rows {spans} of the batch, not one"
        " contiguous slice"
      )
  rows = slice(spans[0][0], spans[-1][1])
  if (rows.stop - rows.start) * jax.process_count() != global_batch_size:
    # The data pipeline gives each process B / num_processes distinct rows.
    raise ValueError(
      f"this process's devices hold rows {rows.start}:{rows.stop} of"
      f" {global_batch_size}, not 1/{jax.process_count()} of the batch: the"
      " mesh's `tensor` axis (which replicates the batch) spans processes;"
      " make mesh.tensor divide the devices of one host"
    )
  return rows


def global_batch(
  mesh: Mesh, local_batch: Mapping[str, np.ndarray]
) -> dict[str, jax.Array]:
  """Assembles the global batch from each process's rows (`local_batch_rows`).

  Every process calls this with its own [B / num_processes, ...] arrays; the
  result is one global [B, ...] array per key, sharded over `data` × `fsdp`
  (`batch_sharding`) and replicated over `tensor`.
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
  `state_sharding`; the batch is split by `batch_sharding`; metrics are
  replicated.
  """
  return jax.jit(
    traced_under(mesh)(step_fn),
    in_shardings=(state_sharding, batch_sharding(mesh)),
    out_shardings=(state_sharding, replicated(mesh)),
    donate_argnums=0,
  )


def jit_eval_step(
  eval_fn: Callable[..., Any], mesh: Mesh, state_sharding: Any
) -> Callable[..., Any]:
  """Compiles `(state, batch) -> metrics` for the mesh (nothing donated)."""
  return jax.jit(
    traced_under(mesh)(eval_fn),
    in_shardings=(state_sharding, batch_sharding(mesh)),
    out_shardings=replicated(mesh),
  )
