"""`blocked_attention` equals XLA's attention, values and gradients, on every
row layout the model sees; it skips the blocks it must skip; and the whole
transformer with model.attention="blocked" gives the XLA path's log-probs
and gradients on a packed batch.

The XLA reference is `jax.nn.dot_product_attention(implementation="xla")`
with the model's mask (causal AND same segment). It lets padding attend to
padding, the blocked kernel gives padding queries 0 (DESIGN: not padding),
so outputs are compared on real queries and gradients under a cotangent
that is 0 on padding queries: then every dq, dk, dv entry must agree,
padding positions included (where both are 0).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from psipo_jax import hlo_collectives
from psipo_jax import models
from psipo_jax import sharding
from psipo_jax.models import blocked_attention as ba

TOL = 1e-5  # float32
BF16_TOL = 2e-2  # bfloat16 inputs and output (8 mantissa bits) vs float32


def _xla(q, k, v, segments):
  mask = segments[:, None, :, None] == segments[:, None, None, :]
  return jax.nn.dot_product_attention(
    q, k, v, mask=mask, is_causal=True, implementation="xla"
  )


def _blocked(block_size):
  def attend(q, k, v, segments):
    return ba.blocked_attention(q, k, v, segments, block_size=block_size)

  return attend


def _qkv(n, t, heads, kv_heads, head_dim=16, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(n, t, heads, head_dim))
  k, v = (rng.normal(size=(n, t, kv_heads, head_dim)) for _ in range(2))
  return [jnp.asarray(x, dtype) for x in (q, k, v)]


def _value_and_grads(attend, q, k, v, segments):
  """Output and d/d(q, k, v) of sum(out · w) with w = 0 on padding queries."""
  real = (segments != 0)[:, :, None, None]
  w = jnp.where(real, jnp.sin(jnp.arange(q.size).reshape(q.shape)), 0.0)

  def loss(q, k, v):
    return jnp.sum(attend(q, k, v, segments).astype(jnp.float32) * w)

  out = jax.jit(attend)(q, k, v, segments)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  return out, grads


def _segments(layout, n, t):
  """[n, t] int32 segment ids of a named row layout."""
  seg = np.zeros((n, t), np.int32)
  for r in range(n):
    if layout == "unpadded":
      seg[r] = 1
    elif layout == "right_padded":
      seg[r, : t - 13 * (r + 1)] = 1
    elif layout == "left_padded":
      seg[r, 11 * (r + 1) :] = 1
    elif layout == "packed":  # several sequences per row, then padding
      bounds = np.cumsum([0, 37 + 5 * r, 50, 3, 41 - 7 * r])
      for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        seg[r, a:b] = i + 1
    elif layout == "packed_and_fully_padded":
      if r == 1:
        continue  # a row of padding only
      bounds = np.cumsum([0, 70, 1, 60])
      for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        seg[r, a:b] = i + 1
    else:
      raise ValueError(layout)
  return jnp.asarray(seg)


def _assert_matches_xla(q, k, v, segments, block_size, tol):
  got, got_grads = _value_and_grads(_blocked(block_size), q, k, v, segments)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want, want_grads = _value_and_grads(_xla, *f32, segments)
  real = np.asarray(segments != 0)
  got, want = np.asarray(got, np.float32), np.asarray(want)
  np.testing.assert_allclose(got[real], want[real], rtol=tol, atol=tol)
  # Padding queries: exactly 0, never NaN.
  np.testing.assert_array_equal(got[~real], 0.0)
  for name, g, w in zip("qkv", got_grads, want_grads):
    g = np.asarray(g, np.float32)
    assert np.isfinite(g).all(), name
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=f"d{name}")


@pytest.mark.parametrize(
  "layout",
  [
    "unpadded",
    "right_padded",
    "left_padded",
    "packed",
    "packed_and_fully_padded",
  ],
)
def test_values_and_gradients_equal_xla(layout):
  # 4 blocks of 32 per row: skipped, partial and diagonal block pairs.
  segments = _segments(layout, 3, 128)
  q, k, v = _qkv(3, 128, heads=4, kv_heads=2)
  _assert_matches_xla(q, k, v, segments, block_size=32, tol=TOL)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_grouped_query_heads_equal_xla(heads, kv_heads):
  segments = _segments("packed", 2, 128)
  q, k, v = _qkv(2, 128, heads=heads, kv_heads=kv_heads)
  _assert_matches_xla(q, k, v, segments, block_size=32, tol=TOL)


@pytest.mark.parametrize("t,block_size", [(150, 32), (100, 128), (7, 4)])
def test_length_not_a_multiple_of_the_block_is_padded_inside(t, block_size):
  segments = _segments("packed", 2, 160)[:, :t]
  q, k, v = _qkv(2, t, heads=4, kv_heads=2)
  _assert_matches_xla(q, k, v, segments, block_size=block_size, tol=TOL)


def test_fully_padded_rows_give_zeros_and_zero_gradients():
  segments = jnp.zeros((2, 64), jnp.int32)
  q, k, v = _qkv(2, 64, heads=4, kv_heads=2)

  def loss(q, k, v):  # a nonzero cotangent on every (padding) query
    return jnp.sum(ba.blocked_attention(q, k, v, segments, block_size=16))

  out = ba.blocked_attention(q, k, v, segments, block_size=16)
  np.testing.assert_array_equal(out, 0.0)
  for g in jax.grad(loss, argnums=(0, 1, 2))(q, k, v):
    np.testing.assert_array_equal(g, 0.0)


def test_padding_queries_have_zero_gradient_under_any_cotangent():
  # A cotangent on padding queries too: the output there is the constant 0,
  # so the gradients are those of the real queries alone (= XLA's with the
  # padding cotangent zeroed).
  segments = _segments("packed", 2, 128)
  q, k, v = _qkv(2, 128, heads=4, kv_heads=2)
  w = jnp.sin(jnp.arange(q.size).reshape(q.shape))

  def loss(q, k, v):
    return jnp.sum(ba.blocked_attention(q, k, v, segments, block_size=32) * w)

  got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  _, want = _value_and_grads(_xla, q, k, v, segments)
  for name, g, x in zip("qkv", got, want):
    np.testing.assert_allclose(g, x, rtol=TOL, atol=TOL, err_msg=f"d{name}")


def test_bfloat16_within_tolerance_of_float32_xla():
  segments = _segments("packed", 2, 128)
  q, k, v = _qkv(2, 128, heads=4, kv_heads=2, dtype=jnp.bfloat16)
  out = ba.blocked_attention(q, k, v, segments, block_size=32)
  assert out.dtype == jnp.bfloat16
  _assert_matches_xla(q, k, v, segments, block_size=32, tol=BF16_TOL)


def test_masked_blocks_are_skipped_not_just_masked():
  # NaN keys/values in blocks a query block may not see: a computed block
  # would carry the NaN into the output (0 · NaN = NaN in P·V), a skipped
  # one does not. Block size 16, T 64: segment 1 fills blocks 0-1, segment 2
  # blocks 2-3; NaN in block 1 (segment 1: invisible to segment 2's blocks)
  # and in block 3 (after block 2: causally invisible to it).
  segments = jnp.asarray(np.repeat([[1, 2]], 32, axis=1), jnp.int32)
  q, k, v = _qkv(1, 64, heads=2, kv_heads=1)
  poison = np.zeros((1, 64, 1, 1), bool)
  poison[:, 16:32] = poison[:, 48:64] = True
  k_bad, v_bad = (jnp.where(poison, jnp.nan, x) for x in (k, v))
  out = np.asarray(
    ba.blocked_attention(q, k_bad, v_bad, segments, block_size=16)
  )
  assert np.isfinite(out[:, 32:48]).all()  # block 2 skipped blocks 1 and 3
  assert np.isnan(out[:, 48:]).all()  # block 3 needs itself (a real check)
  want = _xla(q, k, v, segments)
  np.testing.assert_allclose(out[:, 32:48], want[:, 32:48], rtol=TOL, atol=TOL)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(k_shape=(2, 32, 3, 16)), r"not a multiple of 3 key/value heads"),
    (dict(k_shape=(2, 31, 2, 16)), r"k \(2, 31, 2, 16\)"),
    (dict(seg_shape=(2, 31)), r"segment_ids \(2, 31\)"),
    (dict(block_size=0), r"model.attention_block_size must be >= 1"),
  ],
)
def test_bad_shapes_are_refused_naming_the_culprit(kwargs, match):
  q = jnp.zeros((2, 32, 4, 16))
  k = jnp.zeros(kwargs.get("k_shape", (2, 32, 2, 16)))
  segments = jnp.ones(kwargs.get("seg_shape", (2, 32)), jnp.int32)
  with pytest.raises(ValueError, match=match):
    ba.blocked_attention(
      q, k, k, segments, block_size=kwargs.get("block_size", 16)
    )


def test_a_batch_sharded_over_devices_gives_the_same_values_and_gradients():
  # Correct under the partitioner (rows gathered; see the module docstring).
  mesh = jax.make_mesh(
    (jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  n = jax.device_count()
  segments = jnp.tile(_segments("packed", 2, 96), (n // 2, 1))
  q, k, v = _qkv(n, 96, heads=4, kv_heads=2)
  want, want_grads = _value_and_grads(_blocked(32), q, k, v, segments)
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded = [jax.device_put(x, shard) for x in (q, k, v, segments)]
  got, got_grads = _value_and_grads(_blocked(32), *sharded)
  np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL)


def _on_mesh_equals_one_device(mesh, attend, q, k, v, segments):
  """Checks `attend` traced under `activation_sharding(mesh)`, on inputs
  split by rows, against one device; returns (its output, the mesh-traced
  function, the split inputs)."""

  def on_mesh(q, k, v, segments):
    with sharding.activation_sharding(mesh):
      return attend(q, k, v, segments)

  want, want_grads = _value_and_grads(attend, q, k, v, segments)
  rows = sharding.batch_sharding(mesh)
  sharded = [jax.device_put(x, rows) for x in (q, k, v, segments)]
  got, got_grads = _value_and_grads(on_mesh, *sharded)
  np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL)
  return got, on_mesh, sharded


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 1, 8)])
def test_under_a_mesh_each_device_attends_its_own_rows(shape):
  # Traced as the train step is (`sharding.activation_sharding`), the kernel
  # runs per device on its rows (and key/value heads, where `tensor` divides
  # them): the same values and gradients as one device, and on meshes that
  # split rows and heads no float array crosses devices but the loss.
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
  n = 8
  segments = jnp.tile(_segments("packed", 2, 96), (n // 2, 1))
  q, k, v = _qkv(n, 96, heads=4, kv_heads=2)
  _, on_mesh, sharded = _on_mesh_equals_one_device(
    mesh, _blocked(32), q, k, v, segments
  )
  if shape != (1, 1, 8):  # there 2 key/value heads stay whole on 8 devices
    loss = jax.grad(lambda q: jnp.sum(on_mesh(q, *sharded[1:])))
    sent = [
      c
      for c in hlo_collectives.collectives(
        jax.jit(loss).lower(sharded[0]).compile().as_text()
      )
      if c.is_float and c.size > 1
    ]
    assert not sent, sent


def test_branch_ids_under_a_mesh_equal_one_device():
  # The branch ids travel through `sharding.per_device` with the rows.
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  n, t = 8, 96
  segments = jnp.tile(_segments("packed", 2, t), (n // 2, 1))
  branches = jnp.asarray(
    np.random.default_rng(3).integers(0, 3, (n, t)), jnp.int32
  )
  q, k, v = _qkv(n, t, heads=4, kv_heads=2)

  def attend(q, k, v, segments):
    return ba.blocked_attention(
      q, k, v, segments, branch_ids=branches, block_size=32
    )

  got, _, _ = _on_mesh_equals_one_device(mesh, attend, q, k, v, segments)
  # The branch rule is in force on the mesh too.
  plain, _ = _value_and_grads(_blocked(32), q, k, v, segments)
  assert np.abs(np.asarray(plain - got)).max() > 1e-2


def _packed_batch():
  """A packed batch of the tiny model: 2 rows, 5 sequences, padding."""
  t = 96
  segments = np.zeros((2, t), np.int32)
  sequence_ids = np.full((2, t), -1, np.int32)
  loss_mask = np.zeros((2, t), np.int32)
  spans = [(0, 0, 40), (0, 40, 30), (0, 70, 20), (1, 0, 55), (1, 55, 33)]
  for slot, (row, start, length) in enumerate(spans):
    segment = 1 + sum(1 for r, s, _ in spans if r == row and s < start)
    segments[row, start : start + length] = segment
    sequence_ids[row, start : start + length] = slot
    loss_mask[row, start + length // 2 : start + length] = 1  # the response
  rng = np.random.default_rng(3)
  return {
    "input_ids": rng.integers(0, 256, (2, t)).astype(np.int32),
    "loss_mask": loss_mask,
    "segment_ids": segments,
    "sequence_ids": sequence_ids,
    "packed_row": np.asarray([r for r, _, _ in spans], np.int32),
  }


def _logps_and_grads(attention, inputs):
  config = ml_collections.ConfigDict(
    {
      "name": "transformer",
      "preset": "tiny",
      "attention": attention,
      "attention_block_size": 32,  # 3 blocks per row
    }
  )
  model = models.build_model(config, rngs=nnx.Rngs(0))

  def loss(m):
    logps = m(inputs).logps
    return jnp.sum(logps * jnp.arange(1.0, 6.0)), logps

  # One program for the values and the gradients (one compile, not two).
  (_, logps), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
  return np.asarray(logps), jax.tree.leaves(nnx.state(grads, nnx.Param))


def test_transformer_with_blocked_attention_equals_xla_on_packed_rows():
  inputs = _packed_batch()
  got, got_grads = _logps_and_grads("blocked", inputs)
  want, want_grads = _logps_and_grads("xla", inputs)
  assert got.shape == (5,)
  np.testing.assert_allclose(got, want, rtol=TOL, atol=1e-4)
  assert len(got_grads) == len(want_grads)
  for g, w in zip(got_grads, want_grads):
    assert np.isfinite(np.asarray(g)).all()
    # Float32 sums in another order: within 1e-5 of each leaf's scale.
    scale = float(np.abs(np.asarray(w)).max())
    np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL * scale)


def test_model_config_takes_blocked_and_checks_the_block_size():
  block = models.transformer.config_from_model_block
  config = {"name": "transformer", "preset": "tiny", "attention": "blocked"}
  assert block(ml_collections.ConfigDict(config)).attention == "blocked"
  assert block(ml_collections.ConfigDict(config)).attention_block_size == 64
  config["attention_block_size"] = 0
  with pytest.raises(ValueError, match=r"model.attention_block_size"):
    block(ml_collections.ConfigDict(config))


def test_branch_ids_equal_xla_with_the_branch_rule():
  """Shared prompts (data/packing.py): a key of branch b ≠ 0 is seen only by
  queries of branch b; values and gradients equal XLA's with that mask."""
  n, t = 2, 96
  segments = jnp.asarray(_segments("packed", n, t))
  rng = np.random.default_rng(3)
  branches = jnp.asarray(rng.integers(0, 3, (n, t)), jnp.int32)
  q, k, v = _qkv(n, t, heads=4, kv_heads=2)

  def xla(q, k, v, segments):
    mask = segments[:, None, :, None] == segments[:, None, None, :]
    bq, bk = branches[:, None, :, None], branches[:, None, None, :]
    mask = mask & ((bk == 0) | (bk == bq))
    return jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=True, implementation="xla"
    )

  def blocked(q, k, v, segments):
    return ba.blocked_attention(
      q, k, v, segments, branch_ids=branches, block_size=32
    )

  want, want_grads = _value_and_grads(xla, q, k, v, segments)
  got, got_grads = _value_and_grads(blocked, q, k, v, segments)
  real = np.asarray(segments != 0)
  np.testing.assert_allclose(got[real], want[real], rtol=TOL, atol=TOL)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL)
  # The rule matters: without it the outputs differ.
  plain, _ = _value_and_grads(_blocked(32), q, k, v, segments)
  assert np.abs(np.asarray(plain - got)[real]).max() > 1e-2


def test_a_shared_pairs_other_branch_is_skipped_not_just_masked():
  # One shared pair, block 16, T 96: prompt blocks 0-1 (branch 0), chosen
  # blocks 2-3 (branch 1), rejected blocks 4-5 (branch 2). NaN keys/values
  # in the chosen blocks reach the rejected queries only if computed.
  segments = jnp.ones((1, 96), jnp.int32)
  branches = jnp.asarray(np.repeat([[0, 1, 2]], 32, axis=1), jnp.int32)
  q, k, v = _qkv(1, 96, heads=2, kv_heads=1)
  poison = np.zeros((1, 96, 1, 1), bool)
  poison[:, 32:64] = True
  k_bad, v_bad = (jnp.where(poison, jnp.nan, x) for x in (k, v))
  out = np.asarray(
    ba.blocked_attention(
      q, k_bad, v_bad, segments, branch_ids=branches, block_size=16
    )
  )
  assert np.isfinite(out[:, 64:]).all()  # rejected skipped the chosen blocks
  assert np.isnan(out[:, 32:64]).all()  # the chosen blocks need themselves
  mask = (branches[:, None, None, :] == 0) | (
    branches[:, None, None, :] == branches[:, None, :, None]
  )
  want = jax.nn.dot_product_attention(
    q, k, v, mask=mask, is_causal=True, implementation="xla"
  )
  np.testing.assert_allclose(out[:, 64:], want[:, 64:], rtol=TOL, atol=TOL)
