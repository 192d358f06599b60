"""Tests of the pure train/eval step on 1 and 8 (fake CPU) devices."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from psipo_jax import sharding
from psipo_jax.models import PolicyOutput, TabularPolicy
from psipo_jax.train_state import TrainState
from psipo_jax.loss_config import LossConfig
from psipo_jax.train_step import make_eval_step, make_train_step, pair_inputs

NUM_DEVICES = 8


class TokenPolicy(nnx.Module):
  """Context-free sequence policy: log π(y) = Σ_t mask_t · log softmax(θ)[y_t].

  The smallest model with the sequence contract (input_ids, loss_mask,
  token counts that differ between responses).
  """

  def __init__(self, vocab: int, *, rngs: nnx.Rngs):
    self.logits = nnx.Param(jax.random.normal(rngs.params(), (vocab,)))

  def __call__(self, inputs, *, rngs=None):
    token_logps = jax.nn.log_softmax(self.logits[...])[
      inputs["input_ids"]
    ]  # [N, T]
    mask = inputs["loss_mask"].astype(jnp.float32)  # [N, T]
    return PolicyOutput(
      logps=(token_logps * mask).sum(-1), num_tokens=mask.sum(-1)
    )


def _sequence_batch(seed, batch_size=16, length=6, vocab=7):
  rng = np.random.default_rng(seed)
  batch = {}
  for side in ("chosen", "rejected"):
    batch[f"{side}_input_ids"] = rng.integers(
      0, vocab, (batch_size, length), dtype=np.int32
    )
    lengths = rng.integers(
      1, length + 1, batch_size
    )  # at least one response token
    batch[f"{side}_loss_mask"] = (np.arange(length) < lengths[:, None]).astype(
      np.int32
    )
  batch["weight"] = rng.uniform(0.5, 2.0, batch_size).astype(np.float32)
  return batch


def _sequence_state(optimizer, seed=0):
  model = TokenPolicy(7, rngs=nnx.Rngs(seed))
  graphdef, state = TrainState.create(
    model, optimizer, rng=jax.random.PRNGKey(seed)
  )
  # A reference different from the policy, so that h ≠ 0 at step 0.
  ref = jax.tree.map(
    lambda x: x + 0.3 * jnp.arange(x.size, dtype=x.dtype), state.params
  )
  return graphdef, state.replace(ref_params=ref)


def _run(step_fn, mesh, state, batches):
  state_sharding = sharding.state_shardings(mesh, state)
  jitted = sharding.jit_train_step(step_fn, mesh, state_sharding)
  # A private copy: the jitted step donates (deletes) its input state.
  state = jax.device_put(jax.tree.map(jnp.copy, state), state_sharding)
  for batch in batches:
    state, metrics = jitted(state, sharding.global_batch(mesh, batch))
  return jax.device_get(state), jax.device_get(metrics)


def _assert_trees_close(a, b, rtol=2e-6, atol=2e-6):
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def test_eight_devices_equal_one_device():
  assert jax.device_count() == NUM_DEVICES
  optimizer = optax.adam(0.1)
  graphdef, state = _sequence_state(optimizer)
  loss_config = LossConfig("dpo", tau=0.5, normalize="mean", nll_weight=0.1)
  step = make_train_step(graphdef, loss_config, optimizer)
  batch = _sequence_batch(0)
  state_1, metrics_1 = _run(
    step, sharding.make_mesh(jax.devices()[:1]), state, [batch]
  )
  state_8, metrics_8 = _run(step, sharding.make_mesh(), state, [batch])
  _assert_trees_close(state_8.params, state_1.params)
  _assert_trees_close(state_8.opt_state, state_1.opt_state)
  _assert_trees_close(metrics_8, metrics_1)
  assert not np.allclose(state_8.params["logits"], state.params["logits"])


def test_gradient_accumulation_equals_one_big_batch():
  optimizer = optax.sgd(1.0)
  graphdef, state = _sequence_state(optimizer)
  loss_config = LossConfig("ipo", tau=0.5, normalize="mean", nll_weight=0.2)
  batch = _sequence_batch(
    1, batch_size=32
  )  # unequal weights across micro-batches
  mesh = sharding.make_mesh()
  whole, whole_metrics = _run(
    make_train_step(graphdef, loss_config, optimizer), mesh, state, [batch]
  )
  accumulated, accumulated_metrics = _run(
    make_train_step(graphdef, loss_config, optimizer, micro_batches=4),
    mesh,
    state,
    [batch],
  )
  _assert_trees_close(accumulated.params, whole.params)
  _assert_trees_close(accumulated_metrics, whole_metrics)


def test_reference_frozen_and_step_traced_once():
  optimizer = optax.adam(0.05)
  model = TabularPolicy(jnp.log(jnp.array([0.2, 0.3, 0.5])))
  graphdef, state = TrainState.create(
    model, optimizer, rng=jax.random.PRNGKey(0)
  )
  ref_before = jax.device_get(state.ref_params)
  params_before = jax.device_get(state.params)
  step = chex.assert_max_traces(
    make_train_step(graphdef, LossConfig("ipo", tau=0.1), optimizer), n=1
  )
  rng = np.random.default_rng(0)
  batches = [
    {"chosen": rng.integers(0, 3, 16), "rejected": rng.integers(0, 3, 16)}
    for _ in range(30)
  ]
  final, _ = _run(step, sharding.make_mesh(), state, batches)
  chex.clear_trace_counter()
  np.testing.assert_array_equal(
    final.ref_params["logits"], ref_before["logits"]
  )
  assert final.ref_params["logits"].tobytes() == ref_before["logits"].tobytes()
  assert not np.allclose(final.params["logits"], params_before["logits"])
  assert int(final.step) == 30
  assert not np.array_equal(final.rng, state.rng)


def test_ipo_step_matches_closed_form():
  """Loss and SGD update against NumPy: ℓ = (h − 1/(2τ))² + α·(−log π(y_w))."""
  tau, alpha = 0.25, 0.3
  theta = np.array([0.1, -0.4, 0.7, 0.0], np.float64)
  theta_ref = np.array([0.3, 0.2, -0.1, 0.5], np.float64)
  chosen = np.array([0, 2, 1, 3, 0, 2, 2, 1])
  rejected = np.array([1, 3, 0, 2, 3, 1, 0, 3])
  weight = np.array([1.0, 2.0, 0.5, 1.0, 1.5, 1.0, 0.25, 3.0])

  optimizer = optax.sgd(1.0)
  model = TabularPolicy(theta.astype(np.float32))
  graphdef, state = TrainState.create(
    model,
    optimizer,
    rng=jax.random.PRNGKey(0),
    ref_params={"logits": jnp.asarray(theta_ref, jnp.float32)},
  )
  step = make_train_step(
    graphdef, LossConfig("ipo", tau=tau, nll_weight=alpha), optimizer
  )
  batch = {
    "chosen": chosen,
    "rejected": rejected,
    "weight": weight.astype(np.float32),
  }
  new_state, metrics = _run(step, sharding.make_mesh(), state, [batch])

  def log_softmax(x):
    return x - np.log(np.sum(np.exp(x)))

  logp, logp_ref = log_softmax(theta), log_softmax(theta_ref)
  h = (logp[chosen] - logp_ref[chosen]) - (logp[rejected] - logp_ref[rejected])
  per_pair = (h - 1 / (2 * tau)) ** 2 - alpha * logp[chosen]
  expected_loss = np.sum(weight * per_pair) / np.sum(weight)
  # d log π(a) / dθ = e_a − softmax(θ)
  probs = np.exp(logp)
  dlogp = lambda a: np.eye(4)[a] - probs  # [B, K]
  grad_pair = 2 * (h - 1 / (2 * tau))[:, None] * (
    dlogp(chosen) - dlogp(rejected)
  ) - alpha * dlogp(chosen)
  expected_grad = np.sum(weight[:, None] * grad_pair, 0) / np.sum(weight)

  np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
  np.testing.assert_allclose(
    metrics["h"], np.sum(weight * h) / np.sum(weight), rtol=1e-5
  )
  np.testing.assert_allclose(
    metrics["grad_norm"], np.linalg.norm(expected_grad), rtol=1e-5
  )
  np.testing.assert_allclose(
    new_state.params["logits"], theta - expected_grad, rtol=1e-5, atol=1e-6
  )


def test_precomputed_reference_logps_equal_reference_forward():
  optimizer = optax.sgd(0.5)
  graphdef, state = _sequence_state(optimizer)
  loss_config = LossConfig("dpo", tau=0.5, normalize="mean")
  batch = _sequence_batch(2)
  reference = nnx.merge(graphdef, state.ref_params)
  ref_out = reference(
    pair_inputs({k: jnp.asarray(v) for k, v in batch.items()})
  )
  precomputed = dict(batch)
  precomputed["ref_chosen_logps"] = np.asarray(ref_out.logps[:16])  # summed
  precomputed["ref_rejected_logps"] = np.asarray(ref_out.logps[16:])

  mesh = sharding.make_mesh()
  step = make_train_step(graphdef, loss_config, optimizer)
  with_ref, metrics = _run(step, mesh, state, [batch])
  without_ref, metrics_pre = _run(
    step, mesh, state.replace(ref_params=None), [precomputed]
  )
  _assert_trees_close(without_ref.params, with_ref.params)
  _assert_trees_close(metrics_pre, metrics)


def test_nonfinite_update_is_dropped_and_counted():
  optimizer = optax.adam(0.1)
  model = TabularPolicy(jnp.zeros(3))
  graphdef, state = TrainState.create(
    model, optimizer, rng=jax.random.PRNGKey(0)
  )
  step = make_train_step(graphdef, LossConfig("dpo", tau=1.0), optimizer)
  weight = np.ones(8, np.float32)
  weight[3] = np.nan
  batch = {
    "chosen": np.zeros(8, np.int32),
    "rejected": np.ones(8, np.int32),
    "weight": weight,
  }
  new_state, metrics = _run(step, sharding.make_mesh(), state, [batch])
  assert not np.isfinite(metrics["loss"])
  assert (
    int(metrics["update_skipped"]) == 1 and int(new_state.skipped_updates) == 1
  )
  assert int(new_state.step) == 1
  chex.assert_trees_all_equal(new_state.params, jax.device_get(state.params))
  chex.assert_trees_all_equal(
    new_state.opt_state, jax.device_get(state.opt_state)
  )


def test_eval_step_reports_train_metrics_without_update():
  optimizer = optax.adam(0.1)
  graphdef, state = _sequence_state(optimizer)
  loss_config = LossConfig("ipo", tau=0.5, normalize="sum", nll_weight=0.1)
  batch = _sequence_batch(3)
  mesh = sharding.make_mesh()
  state_sharding = sharding.state_shardings(mesh, state)
  state = jax.device_put(state, state_sharding)
  global_batch = sharding.global_batch(mesh, batch)
  eval_step = sharding.jit_eval_step(
    make_eval_step(graphdef, loss_config), mesh, state_sharding
  )
  eval_metrics = jax.device_get(eval_step(state, global_batch))
  params_before = jax.device_get(state.params)
  _, train_metrics = _run(
    make_train_step(graphdef, loss_config, optimizer), mesh, state, [batch]
  )
  np.testing.assert_allclose(
    eval_metrics.pop("weight_sum"), batch["weight"].sum(), rtol=1e-6
  )
  for key, value in eval_metrics.items():
    np.testing.assert_allclose(
      value, train_metrics[key], rtol=1e-6, err_msg=key
    )
  chex.assert_trees_all_equal(jax.device_get(state.params), params_before)


def test_reference_free_loss_needs_no_reference():
  optimizer = optax.sgd(0.1)
  graphdef, state = _sequence_state(optimizer)
  step = make_train_step(
    graphdef, LossConfig("simpo", tau=2.0, normalize="mean"), optimizer
  )
  new_state, metrics = _run(
    step,
    sharding.make_mesh(),
    state.replace(ref_params=None),
    [_sequence_batch(4)],
  )
  assert np.isfinite(metrics["loss"]) and new_state.ref_params is None


@pytest.mark.parametrize(
  "kwargs, key",
  [
    (dict(name="nope", tau=0.1), "loss.name"),
    (dict(name="ipo", tau=0.0), "loss.tau"),
    (dict(name="ipo", tau=0.1, normalize="max"), "loss.normalize"),
    (
      dict(name="ipo", tau=0.1, options={"label_smoothing": 0.1}),
      "loss.label_smoothing",
    ),
    (dict(name="ipo", tau=0.1, nll_weight=-1.0), "loss.nll_weight"),
  ],
)
def test_loss_config_errors_name_the_key(kwargs, key):
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    LossConfig(**kwargs)


def test_pair_inputs_stacks_chosen_then_rejected():
  batch = {
    "chosen_input_ids": jnp.array([[1, 2]]),
    "rejected_input_ids": jnp.array([[3, 4]]),
    "chosen_loss_mask": jnp.array([[1, 1]]),
    "rejected_loss_mask": jnp.array([[0, 1]]),
    "ref_chosen_logps": jnp.array([0.0]),
    "weight": jnp.array([1.0]),
  }
  inputs = pair_inputs(batch)
  assert sorted(inputs) == ["input_ids", "loss_mask"]
  np.testing.assert_array_equal(inputs["input_ids"], [[1, 2], [3, 4]])
  np.testing.assert_array_equal(
    pair_inputs({"chosen": jnp.array([2]), "rejected": jnp.array([0])})[
      "action"
    ],
    [2, 0],
  )
  with pytest.raises(ValueError, match="rejected_input_ids"):
    pair_inputs({"chosen_input_ids": jnp.array([[1]])})


def test_batch_coupled_loss_refuses_per_pair_weights():
  optimizer = optax.sgd(0.1)
  graphdef, state = _sequence_state(optimizer)
  step = make_train_step(graphdef, LossConfig("aot", tau=0.5), optimizer)
  with pytest.raises(ValueError, match="'aot' sorts the batch"):
    _run(step, sharding.make_mesh(), state, [_sequence_batch(5)])
  unweighted = {k: v for k, v in _sequence_batch(5).items() if k != "weight"}
  _, metrics = _run(step, sharding.make_mesh(), state, [unweighted])
  assert np.isfinite(metrics["loss"])


def test_empty_response_is_counted_and_leaves_the_loss_finite():
  optimizer = optax.sgd(0.1)
  graphdef, state = _sequence_state(optimizer)
  batch = _sequence_batch(6)
  batch["rejected_loss_mask"][3] = 0  # a response with no tokens
  step = make_train_step(graphdef, LossConfig("dpo", tau=0.5), optimizer)
  _, metrics = _run(step, sharding.make_mesh(), state, [batch])
  assert int(metrics["empty_responses"]) == 1
  assert np.isfinite(metrics["loss"])
