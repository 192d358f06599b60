"""Tests for the REBEL loss and losses that read a per-pair batch field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from psipo_jax import losses, testing
from psipo_jax.loss_config import LossConfig, pair_loss


def np_rebel(pc, pr, rc, rr, tau, margin):
  """((1/η)·h − Δr)² with η = 1/τ, written from Gao et al. Eq. 2."""
  eta = 1.0 / tau
  h = (pc - rc) - (pr - rr)
  return (h / eta - margin) ** 2


def _args(seed, batch=16):
  pc, pr, rc, rr = testing.random_logps(seed, batch=batch)
  margin = np.random.default_rng(seed + 100).normal(0.0, 2.0, batch)
  return pc, pr, rc, rr, margin


@pytest.mark.parametrize("tau", [0.05, 0.5, 2.0])
def test_golden_float64(tau):
  pc, pr, rc, rr, margin = _args(int(tau * 100))
  with jax.enable_x64(True):
    got = losses.rebel(
      *map(jnp.asarray, (pc, pr, rc, rr)), tau=tau, margin=jnp.asarray(margin)
    )
    assert got.dtype == jnp.float64 and got.shape == (16,)
  np.testing.assert_allclose(
    got, np_rebel(pc, pr, rc, rr, tau, margin), rtol=1e-12, atol=1e-12
  )


def test_golden_float32_and_half_inputs_compute_in_float32():
  pc, pr, rc, rr, margin = _args(3)
  want = np_rebel(pc, pr, rc, rr, 0.3, margin)
  got = losses.rebel(
    *(jnp.asarray(a, jnp.float32) for a in (pc, pr, rc, rr)),
    tau=0.3,
    margin=jnp.asarray(margin, jnp.float32),
  )
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-4)
  half = losses.rebel(
    *(jnp.asarray(a, jnp.bfloat16) for a in (pc, pr, rc, rr)),
    tau=0.3,
    margin=jnp.asarray(margin, jnp.bfloat16),
  )
  assert half.dtype == jnp.float32


def test_closed_form_derivatives():
  # ℓ = (τh − Δr)²: dℓ/dh = 2τ(τh − Δr), dℓ/dΔr = −2(τh − Δr).
  tau = 0.7
  pc, pr, rc, rr, margin = _args(5)
  with jax.enable_x64(True):
    grads = jax.grad(
      lambda *a: losses.rebel(*a[:4], tau=tau, margin=a[4]).sum(),
      argnums=(0, 1, 2, 3, 4),
    )(*map(jnp.asarray, (pc, pr, rc, rr, margin)))
  residual = tau * ((pc - rc) - (pr - rr)) - margin
  dh = 2 * tau * residual
  for got, sign in zip(grads[:4], (1, -1, -1, 1)):
    np.testing.assert_allclose(got, sign * dh, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(grads[4], -2 * residual, rtol=1e-10, atol=1e-12)


def test_check_grads_order_2_float64():
  pc, pr, rc, rr, margin = _args(7, batch=5)
  with jax.enable_x64(True):
    fn = lambda pc, pr, rc, rr, m: losses.rebel(
      pc, pr, rc, rr, tau=0.4, margin=m
    )
    check_grads(fn, tuple(map(jnp.asarray, (pc, pr, rc, rr, margin))), order=2)


def test_jit_equals_eager_and_tau_traced_without_retracing():
  pc, pr, rc, rr, margin = map(jnp.asarray, _args(9))
  traces = []

  @jax.jit
  def f(tau, m):
    traces.append(None)
    return losses.rebel(pc, pr, rc, rr, tau=tau, margin=m)

  for tau in (0.1, 0.5, 3.0):
    np.testing.assert_allclose(
      f(tau, margin),
      losses.rebel(pc, pr, rc, rr, tau=tau, margin=margin),
      rtol=1e-6,
    )
  assert len(traces) == 1


def test_finite_at_extreme_inputs_float32():
  h = np.array([3e4, -3e4, 0.0, 1e4])
  pc = np.array([-1.0, -2e4, -1e4, -0.5])
  rc = rr = np.full(4, -2.0)
  pr = pc - h
  margin = np.array([50.0, -50.0, 0.0, 1e3])
  args = tuple(jnp.asarray(a, jnp.float32) for a in (pc, pr, rc, rr, margin))
  value, grads = jax.value_and_grad(
    lambda *a: losses.rebel(*a[:4], tau=0.1, margin=a[4]).sum(),
    argnums=(0, 1, 2, 3, 4),
  )(*args)
  assert np.isfinite(value)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_ipo_is_rebel_with_constant_reward_difference_half_times_tau_squared():
  pc, pr, rc, rr, _ = _args(11)
  for tau in (0.1, 1.0, 4.0):
    with jax.enable_x64(True):
      args = tuple(map(jnp.asarray, (pc, pr, rc, rr)))
      rebel = losses.rebel(*args, tau=tau, margin=jnp.full(16, 0.5))
      ipo = np.asarray(losses.ipo(*args, tau=tau))
    np.testing.assert_allclose(rebel, tau**2 * ipo, rtol=1e-12)


def test_missing_or_bad_margin_is_named():
  pc, pr, rc, rr, margin = _args(13)
  with pytest.raises(ValueError, match="batch field 'margin'"):
    losses.rebel(pc, pr, rc, rr, tau=0.1)
  with pytest.raises(ValueError, match="margin must have the log-probs' shape"):
    losses.rebel(pc, pr, rc, rr, tau=0.1, margin=margin[:-1])
  bad = margin.copy()
  bad[2] = np.nan
  with pytest.raises(ValueError, match="margin must be finite"):
    losses.rebel(pc, pr, rc, rr, tau=0.1, margin=bad)
  with pytest.raises(ValueError, match="tau"):
    losses.rebel(pc, pr, rc, rr, tau=0.0, margin=margin)


def test_margin_is_a_batch_field_not_an_option():
  assert losses.BATCH_FIELDS["rebel"] == ("margin",)
  assert losses.loss_option_names("rebel") == ()
  config = LossConfig(name="rebel", tau=0.5)
  assert config.batch_fields == ("margin",)
  with pytest.raises(ValueError, match="loss.margin is not an option"):
    LossConfig(name="rebel", tau=0.5, options={"margin": 1.0})


def test_pair_loss_without_the_field_names_it():
  pc, pr, rc, rr, margin = _args(15)
  with pytest.raises(
    ValueError, match="reads the per-pair batch field 'margin'"
  ):
    pair_loss("rebel", pc, pr, rc, rr, tau=0.5, options={}, fields={})
  got = LossConfig(name="rebel", tau=0.5)(pc, pr, rc, rr, {"margin": margin})
  np.testing.assert_allclose(
    got, np_rebel(pc, pr, rc, rr, 0.5, margin), rtol=2e-5, atol=1e-4
  )


def test_register_checks_declared_batch_fields():
  def no_param(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    tau,
  ):
    return policy_chosen_logps

  with pytest.raises(TypeError, match="keyword-only parameter reward=None"):
    losses.register("user_field_bad", batch_fields=("reward",))(no_param)
  with pytest.raises(TypeError, match="batch_fields must be a tuple"):
    losses.register("user_field_bad", batch_fields="reward")

  def with_field(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    tau,
    reward=None,
    scale=1.0,
  ):
    return scale * reward

  losses.register("user_field", batch_fields=("reward",))(with_field)
  try:
    assert losses.BATCH_FIELDS["user_field"] == ("reward",)
    assert losses.loss_option_names("user_field") == ("scale",)
  finally:
    losses.unregister("user_field")
  assert "user_field" not in losses.BATCH_FIELDS


def _tabular_step(loss_config):
  import optax

  from psipo_jax.models import TabularPolicy
  from psipo_jax.train_state import TrainState
  from psipo_jax.train_step import make_train_step

  theta = jnp.log(jnp.array([0.2, 0.3, 0.5]))
  graphdef, state = TrainState.create(
    TabularPolicy(theta),
    optax.sgd(0.1),
    rng=jax.random.PRNGKey(0),
    ref_params={"logits": jnp.zeros(3)},
  )
  return make_train_step(graphdef, loss_config, optax.sgd(0.1)), state, theta


def test_train_step_reads_margin_and_names_it_when_missing():
  step, state, theta = _tabular_step(LossConfig(name="rebel", tau=0.5))
  batch = {
    "chosen": jnp.array([0, 2, 1, 2], jnp.int32),
    "rejected": jnp.array([1, 0, 2, 1], jnp.int32),
  }
  with pytest.raises(ValueError, match="batch field 'margin'"):
    step(state, batch)
  margin = np.array([0.5, -1.0, 2.0, 0.25], np.float32)
  _, metrics = step(state, {**batch, "margin": jnp.asarray(margin)})
  logp = np.log(np.array([0.2, 0.3, 0.5]))
  log_ref = np.log(np.full(3, 1 / 3))
  c, r = np.asarray(batch["chosen"]), np.asarray(batch["rejected"])
  want = np_rebel(logp[c], logp[r], log_ref[c], log_ref[r], 0.5, margin)
  np.testing.assert_allclose(metrics["loss"], want.mean(), rtol=1e-5)


def test_margin_given_by_only_some_records_is_refused(tmp_path):
  from psipo_jax.data import DataError, make_preference_iterator
  from psipo_jax.data.testing import (
    experiment_config,
    synthetic_pairs,
    write_jsonl,
  )

  records = synthetic_pairs(4)
  records[0]["margin"], records[2]["margin"] = 0.5, 1.0
  files = write_jsonl(tmp_path / "pairs.jsonl", records)
  config = experiment_config(
    data_dir=tmp_path / "tfds",
    files=files,
    batch_size=2,
    max_length=160,
    max_prompt_length=64,
  )
  with pytest.raises(
    DataError, match="'margin' is given by 2 of the 4 kept records"
  ):
    make_preference_iterator(config, "train")
  for r in records:
    r["margin"] = 0.25
  files = write_jsonl(tmp_path / "all.jsonl", records)
  config.input.files = files
  batch = next(make_preference_iterator(config, "train"))
  np.testing.assert_array_equal(batch["margin"], [0.25, 0.25])


def test_per_response_rewards_become_the_batch_margin(tmp_path):
  """UltraFeedback-style records (a score per response, the field names
  mapped by input.fields) give REBEL the margin chosen - rejected."""
  from psipo_jax.data import make_preference_iterator
  from psipo_jax.data.testing import (
    experiment_config,
    synthetic_pairs,
    write_jsonl,
  )

  records = synthetic_pairs(4)
  for i, r in enumerate(records):
    r["score_chosen"], r["score_rejected"] = 8.5 - i, 3.0 + 0.25 * i
  config = experiment_config(
    data_dir=tmp_path / "tfds",
    files=write_jsonl(tmp_path / "pairs.jsonl", records),
    batch_size=4,
    max_length=160,
    max_prompt_length=64,
    return_ids=True,
  )
  config.input.fields.chosen_reward = "score_chosen"
  config.input.fields.rejected_reward = "score_rejected"
  batch = next(make_preference_iterator(config, "train", num_epochs=1))
  want = {r["id"]: r["score_chosen"] - r["score_rejected"] for r in records}
  np.testing.assert_array_equal(
    batch["margin"], np.float32([want[str(i)] for i in batch["id"]])
  )
