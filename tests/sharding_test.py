"""Tests of the mesh, shardings, global batches and FSDP."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from psipo_jax import sharding
from psipo_jax.models import TabularPolicy
from psipo_jax.train_state import TrainState
from psipo_jax.loss_config import LossConfig
from psipo_jax.train_step import make_train_step


def test_mesh_spans_all_devices_on_the_data_axis():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == (sharding.DATA_AXIS,)
  assert mesh.size == jax.device_count() == 8


def test_global_batch_is_split_over_devices():
  mesh = sharding.make_mesh()
  assert sharding.local_batch_rows(mesh, 16) == slice(0, 16)  # one process
  batch = sharding.global_batch(mesh, {"chosen": np.arange(16)})
  shards = batch["chosen"].addressable_shards
  assert len(shards) == 8
  assert all(s.data.shape == (2,) for s in shards)
  np.testing.assert_array_equal(np.asarray(batch["chosen"]), np.arange(16))


def test_fsdp_splits_the_largest_divisible_axis():
  mesh = sharding.make_mesh()
  tree = {
    "matrix": jnp.zeros((3, 16)),
    "vector": jnp.zeros(5),
    "scalar": jnp.zeros(()),
  }
  fsdp = sharding.state_shardings(mesh, tree, fsdp=True)
  assert fsdp["matrix"].spec == P(None, sharding.DATA_AXIS)
  assert fsdp["vector"].spec == P() and fsdp["scalar"].spec == P()
  replicated = sharding.state_shardings(mesh, tree)
  assert all(s.spec == P() for s in jax.tree.leaves(replicated))


def test_fsdp_picks_the_largest_of_several_divisible_axes():
  # Both axes of (8, 32) divide by 8 devices: the larger one (32) is split, so
  # each device holds [8, 4] rather than [1, 32] and the all-gathers are even.
  mesh = sharding.make_mesh()
  assert mesh.shape[sharding.DATA_AXIS] == 8
  tree = {"wide": jnp.zeros((8, 32)), "tall": jnp.zeros((64, 8))}
  fsdp = sharding.state_shardings(mesh, tree, fsdp=True)
  assert fsdp["wide"].spec == P(None, sharding.DATA_AXIS)
  assert fsdp["tall"].spec == P(sharding.DATA_AXIS, None)


def test_fsdp_step_equals_replicated_step():
  optimizer = optax.adam(0.1)
  model = TabularPolicy(jnp.linspace(-1.0, 1.0, 16))
  graphdef, state = TrainState.create(
    model, optimizer, rng=jax.random.PRNGKey(0)
  )
  step = make_train_step(graphdef, LossConfig("ipo", tau=0.3), optimizer)
  rng = np.random.default_rng(0)
  batch = {
    "chosen": rng.integers(0, 16, 32),
    "rejected": rng.integers(0, 16, 32),
  }
  mesh = sharding.make_mesh()
  results = []
  for fsdp in (False, True):
    state_sharding = sharding.state_shardings(mesh, state, fsdp=fsdp)
    jitted = sharding.jit_train_step(step, mesh, state_sharding)
    new_state, metrics = jitted(
      jax.device_put(jax.tree.map(jnp.copy, state), state_sharding),
      sharding.global_batch(mesh, batch),
    )
    results.append(jax.device_get((new_state, metrics)))
  assert new_state.params["logits"].sharding.spec == P(sharding.DATA_AXIS)
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_initialize_distributed(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  sharding.initialize_distributed()  # single process: nothing to do
  assert jax.process_count() == 1
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    sharding.initialize_distributed()


# ---------- The data x fsdp x tensor mesh ----------


def test_make_mesh_keeps_its_one_argument_form():
  mesh = sharding.make_mesh(jax.devices()[:1])
  assert mesh.axis_names == (sharding.DATA_AXIS,) and mesh.size == 1
  mesh = sharding.make_mesh(devices=jax.devices()[:2])
  assert mesh.shape == {"data": 2}


@pytest.mark.parametrize(
  "config, shape",
  [
    ({}, (8, 1, 1)),
    (dict(fsdp=2), (4, 2, 1)),
    (dict(fsdp=-1, tensor=2), (1, 4, 2)),
    (dict(data=2, fsdp=2, tensor=2), (2, 2, 2)),
    (dict(data=None, tensor=-1), (1, 1, 8)),
  ],
)
def test_mesh_config_sizes_and_minus_one(config, shape):
  mesh = sharding.make_mesh(ml_collections.ConfigDict(config))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == shape
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert sharding.batch_shards(mesh) == shape[0] * shape[1]
  # Device order is kept: `tensor` innermost, neighbours in jax.devices().
  np.testing.assert_array_equal(
    np.vectorize(lambda d: d.id)(mesh.devices).ravel(),
    [d.id for d in jax.devices()],
  )


@pytest.mark.parametrize(
  "config, message",
  [
    (
      dict(data=3),
      r"mesh\.data=3 x mesh\.fsdp=1 x mesh\.tensor=1 = 3 devices, but there are 8",
    ),
    (dict(data=-1, fsdp=-1), r"mesh\.data and mesh\.fsdp are both -1"),
    (dict(fsdp=3), r"mesh\.data=-1 cannot take .*mesh\.fsdp=3"),
    (dict(tensor=0), r"mesh\.tensor must be a positive device count or -1"),
    (dict(fsdp=True), r"mesh\.fsdp must be"),
    (dict(fsdp=2.0), r"mesh\.fsdp must be"),
    (dict(tensr=2), r"mesh\.tensr \(did you mean mesh\.tensor\?\)"),
  ],
)
def test_bad_mesh_configs_name_the_key(config, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(ml_collections.ConfigDict(config))


def test_fsdp_switch_on_a_mesh_config_needs_an_fsdp_axis():
  assert tuple(sharding.make_mesh(fsdp=True).shape.values()) == (1, 8, 1)
  assert tuple(
    sharding.make_mesh(dict(data=2, fsdp=-1), fsdp=True).shape.values()
  ) == (2, 4, 1)
  assert tuple(
    sharding.make_mesh(dict(tensor=2), fsdp=True).shape.values()
  ) == (1, 4, 2)
  for config in (dict(data=-1), dict(fsdp=1)):
    with pytest.raises(ValueError, match=r"fsdp=True but mesh\.fsdp"):
      sharding.make_mesh(config, fsdp=True)
  with pytest.raises(ValueError, match=r"mesh\.fsdpp"):
    sharding.make_mesh(dict(fsdpp=2), fsdp=True)


def test_batch_splits_over_data_and_fsdp_and_repeats_over_tensor():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
  assert sharding.local_batch_rows(mesh, 8) == slice(0, 8)  # one process
  batch = sharding.global_batch(mesh, {"chosen": np.arange(8)})["chosen"]
  np.testing.assert_array_equal(np.asarray(batch), np.arange(8))
  rows = {}
  for shard in batch.addressable_shards:
    rows.setdefault(shard.index[0].start, []).append(shard.device)
  # 4 blocks of 2 rows, each on the 2 devices of one tensor group.
  assert sorted(rows) == [0, 2, 4, 6] and all(
    len(d) == 2 for d in rows.values()
  )


def test_rule_table_drops_axes_that_do_not_divide_or_repeat():
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=4))
  spec = sharding.logical_to_mesh_spec
  assert spec((256, 64), P("vocab", "embed"), mesh) == P("tensor", "fsdp")
  assert spec((6, 64), P("vocab", "embed"), mesh) == P(
    None, "fsdp"
  )  # 6 % 4 != 0
  assert spec(
    (2, 64, 2, 16), P("layers", "embed", "kv_heads", "head_dim"), mesh
  ) == P(None, "fsdp", None, None)
  # Two dimensions asking for `tensor`: only the first gets it.
  assert spec((128, 128), P("mlp", "vocab"), mesh) == P("tensor", None)
  # A rule naming several mesh axes keeps those that divide, in order.
  rules = (("embed", ("fsdp", "tensor")),)
  assert spec((64,), P("embed"), mesh, rules) == P(("fsdp", "tensor"))
  assert spec((6,), P("embed"), mesh, rules) == P("fsdp")
  assert spec((64,), P("unknown"), mesh) == P(None)
  with pytest.raises(ValueError, match=r"do not match shape"):
    spec((64, 2), P("embed"), mesh)
