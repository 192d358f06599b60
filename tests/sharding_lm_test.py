"""The tiny transformer on data × fsdp × tensor meshes of 8 fake CPU devices.

One IPO train step on each mesh must give the one-device loss, gradients,
optimiser state and new parameters, with every parameter (and its optimiser
statistics) split as the rule table says.
"""

import argparse
import functools
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import xla_flags  # tests/xla_flags.py

from psipo_jax import models
from psipo_jax import sharding
from psipo_jax.loss_config import LossConfig
from psipo_jax.train_state import TrainState
from psipo_jax.train_step import make_train_step

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
_BATCH, _LENGTH = 8, 16  # pairs, tokens per row
_LR = 1e-2


def _keep_gradient() -> optax.GradientTransformation:
  """Passes the update through and keeps it in its (params-shaped) state, so
  the step's gradient can be read back, sharded like the parameters."""

  def init(params):
    return {"grad": jax.tree.map(jnp.zeros_like, params)}

  def update(updates, state, params=None):
    del state, params
    return updates, {"grad": updates}

  return optax.GradientTransformation(init, update)


# SGD with momentum: its trace mirrors the params; the new params are
# old − lr · g, so they inherit the gradients' float32 agreement. (Adam's first
# step, lr · g / (|g| + eps), would blow a few-ulp difference of a near-zero
# gradient entry up to a visible one; its mu/nu shardings are checked below.)
_OPTIMIZER = optax.chain(_keep_gradient(), optax.sgd(_LR, momentum=0.9))


def _model_block(scan_layers=True):
  return ml_collections.ConfigDict(
    {"name": "transformer", "preset": "tiny", "scan_layers": scan_layers}
  )


@functools.lru_cache(maxsize=None)
def _setup(scan_layers=True):
  """(graphdef, initial state, logical axes, step fn, batch), built once per
  layer loop (the same parameters either way)."""
  model = models.build_model(_model_block(scan_layers), rngs=nnx.Rngs(0))
  # Away from the initialisation (biases 0, norms 1): every parameter matters.
  graphdef, params = nnx.split(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [
    x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)
  ]
  model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
  axes = sharding.logical_axes(model)
  graphdef, state = TrainState.create(
    model, _OPTIMIZER, rng=jax.random.key_data(jax.random.key(0))
  )
  # A reference unlike the policy, so that the IPO loss is not at its minimum.
  state = state.replace(
    ref_params=jax.tree.map(lambda x: 0.9 * x, state.ref_params)
  )
  step = make_train_step(graphdef, LossConfig(name="ipo", tau=0.1), _OPTIMIZER)
  rng = np.random.default_rng(0)
  batch = {}
  for side in ("chosen", "rejected"):
    batch[f"{side}_input_ids"] = rng.integers(1, 256, (_BATCH, _LENGTH)).astype(
      np.int32
    )
    loss_mask = np.zeros((_BATCH, _LENGTH), np.int32)
    prompt = rng.integers(2, _LENGTH // 2, _BATCH)
    length = rng.integers(_LENGTH - 4, _LENGTH + 1, _BATCH)
    for row in range(_BATCH):
      loss_mask[row, prompt[row] : length[row]] = (
        1  # responses of different lengths
      )
    batch[f"{side}_loss_mask"] = loss_mask
    batch[f"{side}_attention_mask"] = (
      np.arange(_LENGTH) < length[:, None]
    ).astype(np.int32)
  return graphdef, state, axes, step, batch


def _run(mesh, scan_layers=True):
  """One jitted train step on `mesh`: (new state, metrics, global batch)."""
  _, state, axes, step, batch = _setup(scan_layers)
  shardings = sharding.state_shardings(mesh, state, logical_axes=axes)
  jitted = sharding.jit_train_step(step, mesh, shardings)
  global_batch = sharding.global_batch(mesh, batch)
  new_state, metrics = jitted(
    jax.device_put(jax.tree.map(jnp.copy, state), shardings), global_batch
  )
  return new_state, metrics, global_batch


@functools.lru_cache(maxsize=None)
def _one_device():
  new_state, metrics, _ = _run(sharding.make_mesh(jax.devices()[:1]))
  return jax.device_get((new_state, metrics))


def _gradient(state):
  return state.opt_state[0]["grad"]


def _assert_close(got, want, rtol=2e-5):
  """Leaf by leaf, relative to each leaf's largest magnitude (float32 sums
  taken in another order differ by a few ulps of the largest term)."""

  def check(path, g, w):
    g, w = np.asarray(g), np.asarray(w)
    scale = max(float(np.abs(w).max()), 1e-30)
    np.testing.assert_allclose(
      g, w, rtol=rtol, atol=rtol * scale, err_msg=jax.tree_util.keystr(path)
    )

  jax.tree_util.tree_map_with_path(check, got, want)


# The rule table's outcome for the tiny preset (V 256, L 2, d 64, H 4, K 2,
# Dh 16, F 128), written out by hand per mesh shape (data, fsdp, tensor):
# embed -> fsdp, vocab/mlp/heads/kv_heads -> tensor unless the axis does not
# divide the dimension, layers/head_dim never split.
def _expected_specs(shape):
  _, fsdp, tensor = shape
  heads = "tensor" if 4 % tensor == 0 else None
  kv_heads = "tensor" if 2 % tensor == 0 else None
  layer = {
    "attention": {
      "q_proj": P(None, "fsdp", heads, None),
      "k_proj": P(None, "fsdp", kv_heads, None),
      "v_proj": P(None, "fsdp", kv_heads, None),
      "o_proj": P(None, heads, None, "fsdp"),
    },
    "input_norm": {"scale": P(None, "fsdp")},
    "post_attention_norm": {"scale": P(None, "fsdp")},
    "mlp": {
      "gate_proj": P(None, "fsdp", "tensor"),
      "up_proj": P(None, "fsdp", "tensor"),
      "down_proj": P(None, "tensor", "fsdp"),
    },
  }
  del fsdp  # 64 divides by every fsdp size used here
  return {
    "embed_tokens": P("tensor", "fsdp"),
    "layers": layer,
    "final_norm": {"scale": P("fsdp")},
    "lm_head": P("fsdp", "tensor"),
  }


def _shard_shape(global_shape, spec, mesh):
  """Per-device block shape of `spec`, from the mesh sizes alone."""
  out = []
  for i, dim in enumerate(global_shape):
    entry = spec[i] if i < len(spec) else None
    axes = (
      () if entry is None else (entry,) if isinstance(entry, str) else entry
    )
    out.append(dim // int(np.prod([mesh.shape[a] for a in axes])))
  return tuple(out)


@pytest.mark.parametrize(
  "shape", MESHES, ids=["x".join(map(str, s)) for s in MESHES]
)
def test_mesh_step_equals_one_device_and_params_follow_the_rule_table(shape):
  data, fsdp, tensor = shape
  mesh = sharding.make_mesh(
    ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
  )
  assert mesh.axis_names == sharding.MESH_AXES
  assert tuple(mesh.shape.values()) == shape
  new_state, metrics, global_batch = _run(mesh)

  # The batch: split over data x fsdp, replicated over tensor.
  ids = global_batch["chosen_input_ids"]
  assert ids.sharding.spec == P(("data", "fsdp"))
  assert {s.data.shape for s in ids.addressable_shards} == {
    (_BATCH // (data * fsdp), _LENGTH)
  }

  # Parameters, reference and optimiser statistics sharded as the table says.
  expected = _expected_specs(shape)
  for tree in (
    new_state.params,
    new_state.ref_params,
    _gradient(new_state),
    new_state.opt_state[1][0].trace,
  ):

    def check(path, x, spec):
      assert x.sharding.spec == spec, (
        jax.tree_util.keystr(path),
        x.sharding.spec,
        spec,
      )
      blocks = {s.data.shape for s in x.addressable_shards}
      assert blocks == {_shard_shape(x.shape, spec, mesh)}, (
        jax.tree_util.keystr(path),
        blocks,
      )

    jax.tree_util.tree_map_with_path(check, tree, expected)
  assert (
    new_state.rng.sharding.spec == P() and new_state.step.sharding.spec == P()
  )

  # The same step as on one device.
  one_state, one_metrics = _one_device()
  got_state, got_metrics = jax.device_get((new_state, metrics))
  assert one_metrics["update_skipped"] == 0 and np.isfinite(one_metrics["loss"])
  assert abs(float(one_metrics["loss"])) > 1e-3  # a loss, not 0 = 0
  for key in ("loss", "grad_norm", "param_norm", "rewards/accuracies"):
    np.testing.assert_allclose(
      got_metrics[key], one_metrics[key], rtol=2e-5, err_msg=key
    )
  grads = _gradient(one_state)
  assert all(
    np.abs(g).max() > 0 for g in jax.tree.leaves(grads)
  )  # every parameter has gradient
  _assert_close(_gradient(got_state), grads)
  _assert_close(got_state.opt_state, one_state.opt_state)
  _assert_close(got_state.params, one_state.params, rtol=1e-6)


def test_unrolled_layers_on_a_mesh_equal_scanned_layers_on_one_device():
  mesh = sharding.make_mesh(
    ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2))
  )
  new_state, metrics, _ = _run(mesh, scan_layers=False)
  one_state, one_metrics = _one_device()
  got_state, got_metrics = jax.device_get((new_state, metrics))
  np.testing.assert_allclose(
    got_metrics["loss"], one_metrics["loss"], rtol=2e-5
  )
  _assert_close(_gradient(got_state), _gradient(one_state))
  _assert_close(got_state.params, one_state.params, rtol=1e-6)


def test_logical_axes_of_the_transformer_and_of_an_unnamed_model():
  model = nnx.eval_shape(
    lambda: models.build_model(_model_block(), rngs=nnx.Rngs(0))
  )
  axes = sharding.logical_axes(model)
  assert axes["embed_tokens"] == P("vocab", "embed")
  assert axes["layers"]["attention"]["k_proj"] == P(
    "layers", "embed", "kv_heads", "head_dim"
  )
  tabular = models.TabularPolicy(jnp.zeros(16))
  assert sharding.logical_axes(tabular) == {"logits": P()}
  # An unnamed parameter on a mesh with fsdp > 1: largest divisible axis over fsdp.
  mesh = sharding.make_mesh(dict(data=2, fsdp=4))
  spec = sharding.param_shardings(
    mesh, {"logits": jnp.zeros(16)}, sharding.logical_axes(tabular)
  )
  assert spec["logits"].spec == P("fsdp")
  # On (8, 1, 1) nothing is split: pure data parallelism.
  mesh = sharding.make_mesh(dict(data=8))
  spec = sharding.param_shardings(
    mesh, {"logits": jnp.zeros(16)}, sharding.logical_axes(tabular)
  )
  assert spec["logits"].spec == P()


def test_fsdp_switch_is_every_device_on_the_fsdp_axis():
  mesh = sharding.make_mesh(fsdp=True)
  assert tuple(mesh.shape.values()) == (1, 8, 1)
  _, state, axes, _, _ = _setup()
  shardings = sharding.state_shardings(
    mesh, state, fsdp=True, logical_axes=axes
  )
  assert shardings.params["embed_tokens"].spec == P("tensor", "fsdp")
  assert shardings.params["layers"]["mlp"]["down_proj"].spec == P(
    None, "tensor", "fsdp"
  )
  # AdamW's moments mirror the params; its step count stays whole.
  adam_state = state.replace(opt_state=optax.adamw(1e-3).init(state.params))
  shardings = sharding.state_shardings(
    mesh, adam_state, fsdp=True, logical_axes=axes
  )
  adam = shardings.opt_state[0]
  assert adam.count.spec == P()
  for moments in (adam.mu, adam.nu):
    assert jax.tree.map(lambda s: s.spec, moments) == jax.tree.map(
      lambda s: s.spec, shardings.params
    )
  with pytest.raises(ValueError, match=r"fsdp=True.*mesh\.fsdp"):
    sharding.make_mesh(dict(data=-1), fsdp=True)


# ---------- 2 processes x 4 devices == 1 process x 8 ----------

_MULTI_MESH = dict(data=2, fsdp=2, tensor=2)


def _worker_main():
  """One process of the two-process run (this file run as a script)."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = xla_flags.xla_flags()  # 4 devices, set below
  os.environ["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{args.port}"
  os.environ["JAX_NUM_PROCESSES"] = "2"
  os.environ["JAX_PROCESS_ID"] = str(args.process_id)
  jax.config.update("jax_num_cpu_devices", 4)
  sharding.initialize_distributed()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  _, state, axes, step, batch = _setup()
  mesh = sharding.make_mesh(_MULTI_MESH)
  rows = sharding.local_batch_rows(mesh, _BATCH)
  assert rows == slice(4 * args.process_id, 4 * args.process_id + 4), rows
  shardings = sharding.state_shardings(mesh, state, logical_axes=axes)
  # Every process holds the same initial state (same seeds); device_put
  # takes each process's own shards of it.
  state = jax.device_put(jax.device_get(state), shardings)
  jitted = sharding.jit_train_step(step, mesh, shardings)
  new_state, metrics = jitted(
    state, sharding.global_batch(mesh, {k: v[rows] for k, v in batch.items()})
  )
  gathered = multihost_utils.process_allgather(
    {"grad": _gradient(new_state), "params": new_state.params}, tiled=True
  )
  if args.process_id == 0:
    flat = {
      jax.tree_util.keystr(p): np.asarray(x)
      for p, x in jax.tree_util.tree_leaves_with_path(gathered)
    }
    np.savez(args.out, loss=np.asarray(metrics["loss"]), **flat)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_of_four_devices_equal_one_device(tmp_path):
  port, out = _free_port(), tmp_path / "result.npz"
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = dict(
    os.environ,
    PYTHONPATH=f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
  )
  processes = [
    subprocess.Popen(
      [
        sys.executable,
        __file__,
        f"--process_id={i}",
        f"--port={port}",
        f"--out={out}",
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for p, output in zip(processes, outputs):
    assert p.returncode == 0, output[-3000:]
  result = np.load(out)
  one_state, one_metrics = _one_device()
  np.testing.assert_allclose(result["loss"], one_metrics["loss"], rtol=2e-5)
  for name, want in (
    ("grad", _gradient(one_state)),
    ("params", one_state.params),
  ):
    leaves = [
      result[jax.tree_util.keystr((jax.tree_util.DictKey(name), *path))]
      for path, _ in jax.tree_util.tree_leaves_with_path(want)
    ]
    _assert_close(
      jax.tree_util.tree_unflatten(jax.tree.structure(want), leaves),
      want,
      rtol=2e-5 if name == "grad" else 1e-6,
    )


if __name__ == "__main__":
  _worker_main()
