"""Tests of the mesh, shardings, global batches and FSDP."""

import chex
import jax
import jax.numpy as jnp
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
      "matrix": jnp.zeros((3, 16)), "vector": jnp.zeros(5), "scalar": jnp.zeros(()),
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
  graphdef, state = TrainState.create(model, optimizer, rng=jax.random.PRNGKey(0))
  step = make_train_step(graphdef, LossConfig("ipo", tau=0.3), optimizer)
  rng = np.random.default_rng(0)
  batch = {"chosen": rng.integers(0, 16, 32), "rejected": rng.integers(0, 16, 32)}
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
