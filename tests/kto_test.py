"""Tests for KTO (psipo_jax.kto): the loss, z₀, the step on 1 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.test_util import check_grads

from psipo_jax import kto, sharding
from psipo_jax.models import PolicyOutput, TabularPolicy
from psipo_jax.train_state import TrainState
from psipo_jax.train_step import make_eval_step, make_train_step


def np_sigmoid(x):
  return np.exp(-np.logaddexp(0.0, -x))


def np_kto(policy, ref, label, policy_kl, ref_kl, beta, lam_d=1.0, lam_u=1.0):
  """Ethayarajh et al., L_KTO = λ_y − v(x, y), with z₀ from mismatched pairs.

  v = λ_D σ(β(r − z₀)) for desirable y, λ_U σ(β(z₀ − r)) otherwise;
  z₀ = max(0, mean of the mismatched pairs' log-ratios).
  """
  z0 = max(0.0, float(np.mean(policy_kl - ref_kl)))
  r = policy - ref
  value = np.where(
    label,
    lam_d * np_sigmoid(beta * (r - z0)),
    lam_u * np_sigmoid(beta * (z0 - r)),
  )
  lam = np.where(label, lam_d, lam_u)
  return lam - value, z0


def _inputs(seed, n=12, kl_shift=0.0):
  rng = np.random.default_rng(seed)
  policy = -rng.uniform(1, 20, n)
  ref = policy - rng.normal(0, 2, n)
  label = rng.random(n) < 0.5
  label[:2] = [True, False]
  policy_kl = -rng.uniform(1, 20, n)
  ref_kl = policy_kl - rng.normal(kl_shift, 1, n)
  return policy, ref, label, policy_kl, ref_kl


@pytest.mark.parametrize("tau", [0.05, 0.5, 3.0])
@pytest.mark.parametrize("kl_shift", [2.0, -2.0])  # z₀ > 0, and clamped at 0
def test_golden_against_the_paper_formula(tau, kl_shift):
  policy, ref, label, policy_kl, ref_kl = _inputs(
    int(tau * 10), kl_shift=kl_shift
  )
  want, want_z0 = np_kto(policy, ref, label, policy_kl, ref_kl, tau, 1.3, 0.7)
  assert (want_z0 > 0) == (kl_shift > 0)
  with jax.enable_x64(True):
    z0 = kto.reference_point(jnp.asarray(policy_kl), jnp.asarray(ref_kl))
    got = kto.kto_loss(
      jnp.asarray(policy),
      jnp.asarray(ref),
      jnp.asarray(label),
      z0,
      tau=tau,
      desirable_weight=1.3,
      undesirable_weight=0.7,
    )
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(float(z0), want_z0, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  got32 = kto.kto_loss(
    jnp.asarray(policy, jnp.float32),
    jnp.asarray(ref, jnp.float32),
    label,
    kto.reference_point(
      jnp.asarray(policy_kl, jnp.float32), jnp.asarray(ref_kl, jnp.float32)
    ),
    tau=tau,
    desirable_weight=1.3,
    undesirable_weight=0.7,
  )
  assert got32.dtype == jnp.float32
  np.testing.assert_allclose(got32, want, rtol=1e-4, atol=1e-5)


def test_reference_point_clamps_weights_and_stops_gradient():
  p, r = jnp.array([-1.0, -2.0, -3.0]), jnp.array([-2.0, -1.0, -5.0])
  # log-ratios 1, −1, 2: mean 2/3; weights (0, 1, 0) pick −1 → clamped to 0.
  np.testing.assert_allclose(kto.reference_point(p, r), 2 / 3, rtol=1e-6)
  assert float(kto.reference_point(p, r, jnp.array([0.0, 1.0, 0.0]))) == 0.0
  np.testing.assert_allclose(
    kto.reference_point(p, r, jnp.array([1.0, 0.0, 3.0])), 7 / 4, rtol=1e-6
  )
  grad = jax.grad(lambda q: kto.reference_point(q, r))(p)
  np.testing.assert_array_equal(grad, np.zeros(3))


def test_closed_form_derivative_and_check_grads():
  tau, lam_d, lam_u = 0.4, 1.5, 0.8
  policy, ref, label, policy_kl, ref_kl = _inputs(3)
  with jax.enable_x64(True):
    z0 = kto.reference_point(jnp.asarray(policy_kl), jnp.asarray(ref_kl))
    fn = lambda p, q: kto.kto_loss(
      p, q, label, z0, tau=tau, desirable_weight=lam_d, undesirable_weight=lam_u
    )
    args = (jnp.asarray(policy), jnp.asarray(ref))
    check_grads(fn, args, order=2)
    g_policy, g_ref = jax.grad(lambda p, q: fn(p, q).sum(), argnums=(0, 1))(
      *args
    )
    z = tau * (policy - ref - float(z0))
  # d/dr of λ_D σ(−z) is −λ_D τ σ(z)σ(−z); of λ_U σ(z) it is +λ_U τ σ(z)σ(−z).
  slope = tau * np_sigmoid(z) * np_sigmoid(-z)
  want = np.where(label, -lam_d * slope, lam_u * slope)
  np.testing.assert_allclose(g_policy, want, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(g_ref, -want, rtol=1e-10, atol=1e-14)


def test_finite_at_extremes_and_bad_options_named():
  policy = jnp.array([-2e4, -1.0, -1e-3, -1e4])
  ref = jnp.array([-1.0, -2e4, -5.0, -1e4])
  label = jnp.array([True, False, True, False])
  value, grad = jax.value_and_grad(
    lambda p: kto.kto_loss(p, ref, label, 1e3, tau=10.0).sum()
  )(policy)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  for key in ("tau", "desirable_weight", "undesirable_weight"):
    options = {"tau": 0.1, key: 0.0}
    with pytest.raises(ValueError, match=key):
      kto.kto_loss(policy, ref, label, 0.0, **options)


def test_config_refuses_unknown_and_bad_keys():
  import ml_collections

  good = ml_collections.ConfigDict({"tau": 0.1, "undesirable_weight": 1.33})
  config = kto.KTOConfig.from_config(good)
  assert config.undesirable_weight == 1.33 and config.desirable_weight == 1.0
  with pytest.raises(ValueError, match="loss.nll_weight"):
    kto.KTOConfig.from_config(
      ml_collections.ConfigDict({"tau": 0.1, "nll_weight": 0.1})
    )
  with pytest.raises(ValueError, match="loss.name='ipo'"):
    kto.KTOConfig.from_config(
      ml_collections.ConfigDict({"tau": 0.1, "name": "ipo"})
    )
  with pytest.raises(ValueError, match="loss.tau"):
    kto.KTOConfig(tau=-1.0)


# ---------------------------------------------------------------------------
# The objective in the train step.


def _tabular_state(theta, theta_ref, optimizer):
  return TrainState.create(
    TabularPolicy(jnp.asarray(theta, jnp.float32)),
    optimizer,
    rng=jax.random.PRNGKey(0),
    ref_params={"logits": jnp.asarray(theta_ref, jnp.float32)},
  )


def test_train_step_on_actions_matches_numpy():
  tau = 0.5
  theta = np.array([0.4, -0.3, 1.2, 0.0])
  theta_ref = np.array([0.0, 0.2, -0.1, 0.5])
  completion = np.array([0, 2, 1, 3, 2, 2, 0, 1])
  label = np.array([1, 1, 0, 0, 1, 0, 1, 0], np.int32)
  kl = np.roll(completion, 1)  # the mismatched rows: y_{i−1}
  optimizer = optax.sgd(1.0)
  graphdef, state = _tabular_state(theta, theta_ref, optimizer)
  config = kto.KTOConfig(tau=tau, undesirable_weight=1.2)
  objective = kto.make_objective(graphdef, config)
  step = make_train_step(graphdef, None, optimizer, objective=objective)
  batch = {"completion": completion, "kl": kl, "label": label}
  _, metrics = jax.jit(step)(state, batch)

  log_softmax = lambda x: x - np.log(np.sum(np.exp(x)))
  logp, logp_ref = log_softmax(theta), log_softmax(theta_ref)
  want, z0 = np_kto(
    logp[completion],
    logp_ref[completion],
    label.astype(bool),
    logp[kl],
    logp_ref[kl],
    tau,
    1.0,
    1.2,
  )
  np.testing.assert_allclose(metrics["loss"], want.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"], z0, rtol=1e-5, atol=1e-7)
  rewards = tau * (logp - logp_ref)[completion]
  d = label.astype(bool)
  np.testing.assert_allclose(
    metrics["rewards/desirable"], rewards[d].mean(), rtol=1e-5
  )
  np.testing.assert_allclose(
    metrics["rewards/undesirable"], rewards[~d].mean(), rtol=1e-5
  )
  np.testing.assert_allclose(metrics["desirable_fraction"], d.mean())


class TokenPolicy(nnx.Module):
  """A prompt-aware sequence policy: token logits depend on the first token.

  log π(y|x) = Σ_t mask_t · log softmax(θ[ids_0])[ids_t], so a mismatched
  pair (x_i, y_j) scores differently from (x_j, y_j).
  """

  def __init__(self, vocab: int, *, rngs: nnx.Rngs):
    self.logits = nnx.Param(jax.random.normal(rngs.params(), (vocab, vocab)))

  def __call__(self, inputs, *, rngs=None):
    ids = inputs["input_ids"]  # [N, T]
    table = jax.nn.log_softmax(self.logits[...][ids[:, 0]])  # [N, V]
    token_logps = jnp.take_along_axis(table, ids, axis=1)  # [N, T]
    mask = inputs["loss_mask"].astype(jnp.float32)
    return PolicyOutput(
      logps=(token_logps * mask).sum(-1), num_tokens=mask.sum(-1)
    )


def _sequence_batch(seed, batch_size=32, length=6, vocab=7):
  rng = np.random.default_rng(seed)
  prompts = rng.integers(0, vocab, batch_size)
  responses = rng.integers(0, vocab, (batch_size, length - 1))
  lengths = rng.integers(1, length, batch_size)

  def rows(prompt, response, lens):
    ids = np.concatenate([prompt[:, None], response], 1).astype(np.int32)
    mask = (np.arange(length) >= 1) & (np.arange(length) <= lens[:, None])
    return ids, mask.astype(np.int32)

  ids, mask = rows(prompts, responses, lengths)
  kl_ids, kl_mask = rows(prompts, np.roll(responses, 1, 0), np.roll(lengths, 1))
  return {
    "completion_input_ids": ids,
    "completion_loss_mask": mask,
    "kl_input_ids": kl_ids,
    "kl_loss_mask": kl_mask,
    # Desirable rows are few in the first shards, many in the last: the
    # per-shard z₀ and label mix differ from the global ones.
    "label": (np.arange(batch_size) % 8 < np.arange(batch_size) // 4).astype(
      np.int32
    ),
    "weight": rng.uniform(0.5, 2.0, batch_size).astype(np.float32),
  }


def _sequence_state(optimizer):
  graphdef, state = TrainState.create(
    TokenPolicy(7, rngs=nnx.Rngs(0)), optimizer, rng=jax.random.PRNGKey(0)
  )
  ref = jax.tree.map(
    lambda x: (
      x + 0.5 * jnp.sin(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape)
    ),
    state.params,
  )
  return graphdef, state.replace(ref_params=ref)


def _run(step_fn, mesh, state, batch):
  state_sharding = sharding.state_shardings(mesh, state)
  jitted = sharding.jit_train_step(step_fn, mesh, state_sharding)
  state = jax.device_put(jax.tree.map(jnp.copy, state), state_sharding)
  state, metrics = jitted(state, sharding.global_batch(mesh, batch))
  return jax.device_get(state), jax.device_get(metrics)


def test_reference_point_is_a_global_batch_mean_eight_devices_equal_one():
  assert jax.device_count() == 8
  optimizer = optax.adam(0.1)
  graphdef, state = _sequence_state(optimizer)
  config = kto.KTOConfig(tau=0.5, undesirable_weight=1.5)
  objective = kto.make_objective(graphdef, config)
  step = make_train_step(graphdef, None, optimizer, objective=objective)
  batch = _sequence_batch(0)

  state_1, metrics_1 = _run(
    step, sharding.make_mesh(jax.devices()[:1]), state, batch
  )
  state_8, metrics_8 = _run(step, sharding.make_mesh(), state, batch)
  assert_close = lambda a, b: jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-6, atol=2e-6), a, b
  )
  assert_close(state_8.params, state_1.params)
  assert_close(metrics_8, metrics_1)
  assert not np.allclose(state_8.params["logits"], state.params["logits"])

  # z₀ is the weighted mean over all 32 rows; the per-device means (4 rows
  # each) differ from it, so a per-device estimate would fail the check.
  score = lambda params, side: (
    TokenPolicy.__call__(
      nnx.merge(graphdef, params),
      {
        "input_ids": batch[f"{side}_input_ids"],
        "loss_mask": batch[f"{side}_loss_mask"],
      },
    ).logps
  )
  log_ratio = np.asarray(
    score(state.params, "kl") - score(state.ref_params, "kl")
  )
  w = batch["weight"]
  z0 = max(0.0, np.sum(w * log_ratio) / np.sum(w))
  assert z0 > 0.05  # Not at the clamp: the estimate itself is compared.
  np.testing.assert_allclose(metrics_8["kl"], z0, rtol=1e-5)
  per_device = np.maximum(
    0.0,
    (w * log_ratio).reshape(8, 4).sum(1) / w.reshape(8, 4).sum(1),
  )
  assert np.ptp(per_device) > 0.1 and np.abs(per_device - z0).max() > 0.05


def test_micro_batches_share_the_global_reference_point():
  optimizer = optax.sgd(0.5)
  graphdef, state = _sequence_state(optimizer)
  objective = kto.make_objective(graphdef, kto.KTOConfig(tau=0.5))
  batch = _sequence_batch(1)
  mesh = sharding.make_mesh()
  whole, whole_metrics = _run(
    make_train_step(graphdef, None, optimizer, objective=objective),
    mesh,
    state,
    batch,
  )
  accumulated, accumulated_metrics = _run(
    make_train_step(
      graphdef, None, optimizer, objective=objective, micro_batches=4
    ),
    mesh,
    state,
    batch,
  )
  np.testing.assert_allclose(
    accumulated.params["logits"], whole.params["logits"], rtol=2e-6, atol=2e-6
  )
  for key in ("loss", "kl", "rewards/desirable", "rewards/undesirable"):
    np.testing.assert_allclose(
      accumulated_metrics[key], whole_metrics[key], rtol=2e-6, atol=2e-6
    )


def test_eval_step_and_missing_label_or_kl_rows_are_named():
  optimizer = optax.sgd(0.5)
  graphdef, state = _sequence_state(optimizer)
  objective = kto.make_objective(graphdef, kto.KTOConfig(tau=0.5))
  batch = _sequence_batch(2)
  metrics = make_eval_step(graphdef, None, objective=objective)(state, batch)
  assert np.isfinite(metrics["loss"]) and float(metrics["weight_sum"]) > 0
  step = make_train_step(graphdef, None, optimizer, objective=objective)
  with pytest.raises(ValueError, match="'label'"):
    step(state, {k: v for k, v in batch.items() if k != "label"})
  with pytest.raises(ValueError, match="'kl'"):
    step(state, {k: v for k, v in batch.items() if not k.startswith("kl_")})
