"""Tests of per-sequence log-probs: the naive reference and the memory-lean path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from psipo_jax import logprobs

N, T, D, V = 4, 13, 8, 23


def _inputs(seed=0, n=N, t=T, d=D, v=V, counts=(5, 13, 0, 1)):
  """Random hidden states and W; row n scores `counts[n]` scattered positions."""
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(n, t, d)).astype(np.float32)
  w = rng.normal(size=(d, v)).astype(np.float32)
  labels = rng.integers(0, v, size=(n, t)).astype(np.int32)
  mask = np.zeros((n, t), bool)
  for row, count in enumerate(counts):
    mask[row, rng.choice(t, size=count, replace=False)] = True
  return hidden, w, labels, mask


def _numpy_token_logps(hidden, w, labels, mask):
  """Independent float64 formula: log_softmax(h W)[label] on the mask."""
  logits = np.einsum(
    "ntd,dv->ntv", hidden.astype(np.float64), w.astype(np.float64)
  )
  logits -= logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
  return np.where(mask, picked, 0.0)


def _chunked(chunk_size):
  return lambda *args: logprobs.token_logps_chunked(
    *args, chunk_size=chunk_size
  )


def _loss(token_fn, labels, mask):
  """A non-linear function of the per-row sums, so per-token cotangents differ."""

  def loss(hidden, w):
    sums, _ = logprobs.sequence_sums(token_fn(hidden, w, labels, mask), mask)
    return jnp.sum(jnp.sin(sums) + 0.1 * sums**2)

  return loss


@pytest.mark.parametrize(
  "token_fn",
  [logprobs.token_logps_naive, _chunked(4)],
  ids=["naive", "chunked"],
)
def test_token_logps_equal_numpy_log_softmax(token_fn):
  hidden, w, labels, mask = _inputs()
  got = token_fn(hidden, w, labels, mask)
  assert got.dtype == jnp.float32 and got.shape == (N, T)
  np.testing.assert_allclose(
    got, _numpy_token_logps(hidden, w, labels, mask), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 5, 13, 64])
def test_chunked_equals_naive_values_and_gradients(chunk_size):
  # Counts 5, 13, 0, 1: chunk sizes 3, 4 and 5 do not divide 13 (nor 5 for 3, 4).
  hidden, w, labels, mask = _inputs()
  lean = jax.jit(_chunked(chunk_size))(hidden, w, labels, mask)
  naive = logprobs.token_logps_naive(hidden, w, labels, mask)
  np.testing.assert_allclose(lean, naive, rtol=1e-6, atol=1e-6)

  grad = lambda fn: jax.jit(jax.grad(_loss(fn, labels, mask), argnums=(0, 1)))
  lean_grads = grad(_chunked(chunk_size))(hidden, w)
  naive_grads = grad(logprobs.token_logps_naive)(hidden, w)
  for lean_g, naive_g in zip(lean_grads, naive_grads):
    assert lean_g.dtype == jnp.float32
    np.testing.assert_allclose(lean_g, naive_g, rtol=1e-5, atol=1e-5)
  assert np.abs(naive_grads[1]).max() > 0.1  # the comparison is not of zeros


def test_chunked_gradients_pass_float64_check():
  hidden, w, labels, mask = _inputs(t=7, counts=(3, 7, 0, 2))
  with jax.enable_x64(True):
    loss = _loss(_chunked(2), labels, mask)
    check_grads(
      loss,
      (hidden.astype(np.float64), w.astype(np.float64)),
      order=1,
      modes=["rev"],
      atol=1e-6,
      rtol=1e-6,
    )


def test_unscored_positions_never_reach_the_lm_head():
  # A NaN hidden state at a prompt position cannot change anything if the LM
  # head only ever sees response positions.
  hidden, w, labels, mask = _inputs()
  poisoned = np.where(mask[..., None], hidden, np.nan).astype(np.float32)
  clean = _chunked(4)(hidden, w, labels, mask)
  lean = _chunked(4)(poisoned, w, labels, mask)
  np.testing.assert_array_equal(lean, clean)
  d_hidden, d_w = jax.grad(_loss(_chunked(4), labels, mask), argnums=(0, 1))(
    poisoned, w
  )
  assert np.isfinite(d_w).all() and np.isfinite(d_hidden).all()
  np.testing.assert_array_equal(d_hidden[~mask], 0.0)


def test_response_only_head_equals_full_head_at_response_positions():
  # Half the positions of each row scored, as in a prompt + response batch.
  hidden, w, labels, _ = _inputs()
  mask = np.zeros((N, T), bool)
  mask[:, T // 2 : -1] = True
  full = _numpy_token_logps(
    hidden, w, labels, np.ones_like(mask)
  )  # every position
  lean = _chunked(3)(hidden, w, labels, mask)
  np.testing.assert_allclose(lean[mask], full[mask], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(lean[~mask], 0.0)


def test_bfloat16_inputs_use_float32_maths_within_stated_tolerance():
  hidden, w, labels, mask = _inputs()
  h16, w16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  lean = _chunked(4)(h16, w16, labels, mask)
  assert lean.dtype == jnp.float32
  # Against float32 maths on the same rounded inputs: float32 rounding only.
  rounded = _numpy_token_logps(
    np.asarray(h16, np.float32), np.asarray(w16, np.float32), labels, mask
  )
  np.testing.assert_allclose(lean, rounded, rtol=1e-5, atol=1e-5)
  # Against float32 inputs: the module's bound 2^-6 max_v sum_d |h_d W_dv|.
  bound = 2.0**-6 * np.einsum("ntd,dv->ntv", np.abs(hidden), np.abs(w)).max(-1)
  error = np.abs(np.asarray(lean) - _numpy_token_logps(hidden, w, labels, mask))
  assert np.all(error <= bound + 1e-5), (error.max(), bound.min())
  assert error.max() > 0  # bf16 did round something

  d_h16, d_w16 = jax.grad(_loss(_chunked(4), labels, mask), argnums=(0, 1))(
    h16, w16
  )
  assert d_h16.dtype == jnp.bfloat16 and d_w16.dtype == jnp.bfloat16
  d_h, d_w = jax.grad(
    _loss(logprobs.token_logps_naive, labels, mask), argnums=(0, 1)
  )(np.asarray(h16, np.float32), np.asarray(w16, np.float32))
  for low, ref in ((d_h16, d_h), (d_w16, d_w)):
    np.testing.assert_allclose(
      np.asarray(low, np.float32), ref, atol=2e-2 * np.abs(ref).max()
    )


@pytest.mark.parametrize(
  "token_fn",
  [logprobs.token_logps_naive, _chunked(4)],
  ids=["naive", "chunked"],
)
def test_rows_without_scored_tokens_give_zero_not_nan(token_fn):
  hidden, w, labels, mask = _inputs()
  for m in (mask, np.zeros_like(mask)):  # one empty row; every row empty
    sums, counts = logprobs.sequence_sums(token_fn(hidden, w, labels, m), m)
    empty = ~m.any(1)
    np.testing.assert_array_equal(sums[empty], 0.0)
    np.testing.assert_array_equal(counts, m.sum(1))
    grads = jax.grad(_loss(token_fn, labels, m), argnums=(0, 1))(hidden, w)
    assert all(np.isfinite(g).all() for g in grads)


def test_sequence_sums_of_either_implementation():
  hidden, w, labels, mask = _inputs()
  expected = _numpy_token_logps(hidden, w, labels, mask).sum(1)
  for implementation in logprobs.IMPLEMENTATIONS:
    tokens = logprobs.token_logps(
      hidden, w, labels, mask, implementation=implementation, chunk_size=2
    )
    sums, counts = logprobs.sequence_sums(tokens, mask)
    np.testing.assert_allclose(sums, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(counts, mask.sum(1))


def test_next_token_targets_shift_and_stop_at_segment_boundaries():
  input_ids = np.array([[5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 0, 0]])
  loss_mask = np.array([[0, 0, 1, 1, 0, 1], [0, 1, 1, 1, 0, 0]])
  segment_ids = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0]])
  labels, mask = logprobs.next_token_targets(input_ids, loss_mask)
  np.testing.assert_array_equal(labels[:, :-1], input_ids[:, 1:])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 0, 1, 0], [1, 1, 1, 0, 0, 0]])
  _, mask = logprobs.next_token_targets(input_ids, loss_mask, segment_ids)
  # Token 3 of row 0 opens segment 2: position 2 (segment 1) must not score it.
  np.testing.assert_array_equal(mask, [[0, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0]])


def test_segment_sums_equal_a_loop_over_segments():
  rng = np.random.default_rng(1)
  token_logps = rng.normal(size=(3, 10)).astype(np.float32)
  mask = rng.random((3, 10)) < 0.7
  segment_ids = np.array(
    [
      [1, 1, 1, 2, 2, 3, 3, 3, 0, 0],
      [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
      [0, 0, 2, 2, 2, 2, 0, 0, 0, 0],  # no segment 1: its column stays (0, 0)
    ]
  )
  sums, counts = logprobs.segment_sums(
    token_logps, mask, segment_ids, num_segments=3
  )
  assert sums.shape == counts.shape == (3, 3)
  for row in range(3):
    for s in range(3):
      member = mask[row] & (segment_ids[row] == s + 1)
      np.testing.assert_allclose(
        sums[row, s], token_logps[row][member].sum(), rtol=1e-6
      )
      assert counts[row, s] == member.sum()


def _shapes(jaxpr):
  """Shapes of every value in a jaxpr and all jaxprs nested in it."""
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield getattr(var.aval, "shape", ())
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _shapes(inner)


def test_lean_path_never_builds_full_logits_forward_or_backward():
  hidden, w, labels, mask = _inputs()
  for token_fn, has_full in (
    (logprobs.token_logps_naive, True),
    (_chunked(4), False),
  ):
    loss = _loss(token_fn, labels, mask)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(hidden, w)
    # A custom VJP's backward is traced when transposed, i.e. inside this jaxpr.
    largest = max(int(np.prod(s)) for s in _shapes(jaxpr.jaxpr))
    assert (largest >= N * T * V) == has_full, largest


def test_lean_path_temp_memory_is_well_below_naive():
  n, t, d, v = 8, 256, 64, 4096
  shapes = (
    jax.ShapeDtypeStruct((n, t, d), jnp.float32),
    jax.ShapeDtypeStruct((d, v), jnp.float32),
    jax.ShapeDtypeStruct((n, t), jnp.int32),
    jax.ShapeDtypeStruct((n, t), jnp.bool_),
  )

  def temp_bytes(token_fn):
    def loss(hidden, w, labels, mask):
      return jnp.sum(
        logprobs.sequence_sums(token_fn(hidden, w, labels, mask), mask)[0]
      )

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return step.lower(*shapes).compile().memory_analysis().temp_size_in_bytes

  naive = temp_bytes(logprobs.token_logps_naive)
  lean = temp_bytes(_chunked(16))
  assert naive >= n * t * v * 4  # it does hold full logits
  assert lean < 0.1 * naive, (lean, naive)


def test_bad_arguments_are_named():
  hidden, w, labels, mask = _inputs()
  with pytest.raises(ValueError, match="chunk_size"):
    logprobs.token_logps_chunked(hidden, w, labels, mask, chunk_size=0)
  with pytest.raises(ValueError, match="unembedding"):
    logprobs.token_logps_naive(hidden, w.T, labels, mask)
  with pytest.raises(ValueError, match="labels"):
    logprobs.token_logps_chunked(hidden, w, labels[:, 1:], mask, chunk_size=2)
  with pytest.raises(ValueError, match="implementation"):
    logprobs.token_logps(
      hidden, w, labels, mask, implementation="fused", chunk_size=2
    )
