r"""Activation sharding constraints: per-device memory and traffic of a sharded LM step.

For each mesh (data, fsdp, tensor) of 8 fake CPU devices (or as many as
XLA_FLAGS asks for), the ΨPO train step (IPO, τ = 0.1, AdamW, the
reference's log-probs precomputed, as in benchmarks/lm_device.py) of
--preset in bfloat16 compute is compiled twice, only compiled, never run:

  * constrained: `sharding.jit_train_step`, which traces the step under
    `sharding.activation_sharding(mesh)`, so `sharding.constrain` pins the
    model's activations (rows over data × fsdp; heads, MLP hidden and
    vocabulary over tensor);
  * unconstrained: the same `jax.jit` with the same in/out shardings,
    traced outside that context, so every `constrain` is the identity,
    `per_device` calls its kernel as it is, and the log-prob loop sums the
    LM head's gradient in one [d, V] accumulator: the partitioner places
    activations as it likes, as before the constraints.

It prints, per device, XLA's temporary memory (`memory_analysis`, what the
step needs besides its arguments and outputs), the float data in the
collectives of the program text (`hlo_collectives`; a loop body counted
once, so this is a shape-by-shape comparison, not bytes per step), and the
largest collective array with where it comes from, then the ratios
constrained / unconstrained. XLA:CPU's buffer assignment is not a GPU's or a
TPU's, so the memory is a comparison of layouts, not a capacity plan.

Usage (repository root; about 65 s for 1b on 2 cores):

  PYTHONPATH=. python benchmarks/activation_sharding.py [--preset=1b] \
      [--pairs=16] [--seq_len=1024] [--meshes=8x1x1,1x8x1,2x2x2,1x1x8]
"""

import argparse
import math
import os

# Before JAX is imported: 8 fake CPU devices, unless the caller set a count.
if "xla_force_host_platform_device_count" not in os.environ.get(
  "XLA_FLAGS", ""
):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
  ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from psipo_jax import checkpointing  # noqa: E402
from psipo_jax import hlo_collectives  # noqa: E402
from psipo_jax import models  # noqa: E402
from psipo_jax import sharding  # noqa: E402
from psipo_jax.loss_config import LossConfig  # noqa: E402
from psipo_jax.train_state import TrainState  # noqa: E402
from psipo_jax.train_step import make_train_step  # noqa: E402

_MIB = 2**20


def abstract_step(preset: str, **model_overrides):
  """(step fn, abstract state, logical axes) of the preset (with other
  `model.*` values); nothing is materialised (the 1b state alone is 13 GB)."""
  block = ml_collections.ConfigDict(
    {"name": "transformer", "preset": preset, "dtype": "bfloat16"}
  )
  block.update(model_overrides)
  optimizer = optax.adamw(1e-5)

  def init_state():
    model = models.build_model(block, rngs=nnx.Rngs(0))
    key = jax.random.key_data(jax.random.key(0))
    # The reference's log-probs come with the batch: no reference on device.
    return TrainState.create(model, optimizer, rng=key, ref_params=None)[1]

  abstract_model = nnx.eval_shape(
    lambda: models.build_model(block, rngs=nnx.Rngs(0))
  )
  model_def = nnx.split(abstract_model)[0]
  step = make_train_step(model_def, LossConfig("ipo", tau=0.1), optimizer)
  return step, jax.eval_shape(init_state), sharding.logical_axes(abstract_model)


def abstract_batch(mesh, pairs: int, seq_len: int, *, packed: bool = False):
  """The step's batch as shapes: both sides padded to `seq_len`, or packed
  (data/packing.py's keys; `pairs` rows of `seq_len`, as when each row
  holds one pair), with the reference's summed log-probs."""
  rows = sharding.batch_sharding(mesh)

  def ints(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows)

  if packed:
    keys = ("input_ids", "loss_mask", "segment_ids", "positions")
    batch = {f"packed_{k}": ints(pairs, seq_len) for k in keys}
    batch["packed_sequence_ids"] = ints(pairs, seq_len)
    for side in ("chosen", "rejected"):
      batch[f"{side}_packed_row"] = ints(pairs)
  else:
    keys = ("input_ids", "loss_mask", "attention_mask")
    batch = {
      f"{side}_{k}": ints(pairs, seq_len)
      for side in ("chosen", "rejected")
      for k in keys
    }
  for side in ("chosen", "rejected"):
    batch[f"ref_{side}_logps"] = jax.ShapeDtypeStruct(
      (pairs,), jnp.float32, sharding=rows
    )
  return batch


def compile_step(
  mesh,
  step,
  state,
  axes,
  pairs: int,
  seq_len: int,
  *,
  constrained: bool,
  packed: bool = False,
):
  """The step compiled for `mesh` as `sharding.jit_train_step` compiles it,
  or (`constrained=False`) with the same shardings but traced outside
  `sharding.activation_sharding`."""
  shardings = sharding.state_shardings(mesh, state, logical_axes=axes)
  if constrained:
    jitted = sharding.jit_train_step(step, mesh, shardings)
  else:
    jitted = jax.jit(
      step,
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=0,
    )
  return jitted.lower(
    checkpointing.abstract_with_shardings(state, shardings),
    abstract_batch(mesh, pairs, seq_len, packed=packed),
  ).compile()


def measure(compiled) -> dict:
  """Temporary MiB per device, float collective MiB in the program text, and
  the largest float collective array."""
  floats = [
    c for c in hlo_collectives.collectives(compiled.as_text()) if c.is_float
  ]
  width = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2}
  largest = max(floats, key=lambda c: c.size, default=None)
  return {
    "temp": compiled.memory_analysis().temp_size_in_bytes / _MIB,
    "traffic": sum(c.size * width[c.dtype] for c in floats) / _MIB,
    "largest": "-"
    if largest is None
    else f"{largest.op} {largest.dtype}{list(largest.shape)}",
  }


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="1b")
  parser.add_argument("--pairs", type=int, default=16)
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument(
    "--meshes",
    default="8x1x1,1x8x1,2x4x1,2x2x2,1x2x4,1x1x8",
    help="comma-separated data x fsdp x tensor shapes",
  )
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  step, state, axes = abstract_step(args.preset)
  print(
    f"{args.preset} preset, bfloat16 compute, {args.pairs} pairs x"
    f" {args.seq_len} tokens per side, {jax.device_count()}"
    f" {jax.devices()[0].platform.upper()} devices; per device, compiled only."
  )
  header = (
    "mesh (d,f,t) | temp MiB: constrained / unconstrained (ratio) |"
    " collective float MiB in the program: constrained / unconstrained |"
    " largest collective array: constrained ; unconstrained"
  )
  print(header)
  for spec in args.meshes.split(","):
    shape = tuple(int(x) for x in spec.split("x"))
    mesh = sharding.make_mesh(
      dict(zip(sharding.MESH_AXES, shape)), jax.devices()[: math.prod(shape)]
    )
    on, off = (
      measure(
        compile_step(
          mesh, step, state, axes, args.pairs, args.seq_len, constrained=c
        )
      )
      for c in (True, False)
    )
    print(
      f"{spec:>12} | {on['temp']:9.1f} / {off['temp']:9.1f}"
      f" ({on['temp'] / off['temp']:.2f}x) |"
      f" {on['traffic']:9.1f} / {off['traffic']:9.1f} |"
      f" {on['largest']} ; {off['largest']}",
      flush=True,
    )


if __name__ == "__main__":
  main()
