"""Tests for psipo_jax.testing: broken losses are caught, correct ones pass.

Every broken loss below is DPO-like and wrong in one way only; each test
asserts that check_pairwise_loss names the property that the bug breaks.
(That all 19 built-in losses pass is tested in tests/losses_test.py.)
"""

import functools
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psipo_jax import losses, psi, testing


def _h(pc, pr, rc, rr):
  # As a correct user loss starts: validated, float32 log-ratios.
  d_c, d_r = losses.log_ratios(pc, pr, rc, rr)
  return d_c - d_r


def loss_of_h(f):
  """A loss with the registered signature whose value is ``f(h, tau)``."""

  def loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    tau,
  ):
    return f(
      _h(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
      ),
      tau,
    )

  loss.__name__ = loss.__qualname__ = f.__name__
  return loss


def _dpo_dloss_dh(h, *, tau):
  return -tau * (1 - np.tanh(tau * h / 2)) / 2  # −τ σ(−τh)


def expect_failure(prop, fn, *, match=None, **kwargs):
  with pytest.raises(testing.LossPropertyError, match=match) as info:
    testing.check_pairwise_loss(fn, **kwargs)
  assert info.value.property == prop, str(info.value)
  assert f"property {prop!r} failed" in str(info.value)
  return str(info.value)


# ---------------------------------------------------------------------------
# The bugs the issue lists.


@loss_of_h
def nan_gradient_at_tie(h, tau):
  # |h| written as sqrt(h²): the right value, a 0/0 gradient at h = 0.
  return jax.nn.softplus(-tau * h) + 0.01 * jnp.sqrt(jnp.square(h))


def test_nan_gradient_at_a_tie_is_caught():
  message = expect_failure("finite_at_extremes", nan_gradient_at_tie)
  assert "d loss / d policy_chosen_logps is nan" in message
  assert "h=0.0" in message and "tau=0.001" in message


@loss_of_h
def tau_applied_twice(h, tau):
  return -jax.nn.log_sigmoid(tau * (tau * h))  # τ²·h: a peer's bug


def test_tau_applied_twice_is_caught_by_the_derivative_in_h():
  # Every structural property holds; only the closed form tells.
  testing.check_pairwise_loss(
    tau_applied_twice, skip=("dloss_dh",), dloss_dh=_dpo_dloss_dh
  )
  message = expect_failure(
    "dloss_dh", tau_applied_twice, dloss_dh=_dpo_dloss_dh
  )
  assert "d loss / d policy_chosen_logps vs dloss_dh(h)" in message
  assert "pair 0 [policy_chosen_logps=" in message


@loss_of_h
def reduced_to_scalar(h, tau):
  return jnp.mean(jax.nn.softplus(-tau * h))


def test_reduction_to_a_scalar_is_caught():
  message = expect_failure("shape", reduced_to_scalar)
  assert "returned shape ()" in message and "unreduced" in message


def python_branch_on_tau(
  policy_chosen_logps,
  policy_rejected_logps,
  ref_chosen_logps,
  ref_rejected_logps,
  *,
  tau,
):
  h = _h(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  if float(tau) > 1.0:  # A Python branch: one program per value of τ.
    return jax.nn.softplus(-h) * tau
  return jax.nn.softplus(-tau * h)


@functools.partial(jax.jit, static_argnames="tau")
def _static_tau_dpo(
  policy_chosen_logps,
  policy_rejected_logps,
  ref_chosen_logps,
  ref_rejected_logps,
  tau,
):
  h = _h(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  return jax.nn.softplus(-tau * h)


def static_tau(
  policy_chosen_logps,
  policy_rejected_logps,
  ref_chosen_logps,
  ref_rejected_logps,
  *,
  tau,
):
  # Compiles once per τ value eagerly; cannot take a traced τ at all.
  return _static_tau_dpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau=tau,
  )


@pytest.mark.parametrize("fn", [python_branch_on_tau, static_tau])
def test_loss_that_retraces_per_tau_is_caught(fn):
  message = expect_failure("traced_tau_and_options", fn)
  assert "traced arrays" in message and "recompiles" in message
  # Everything else about it is fine (a few τ: each one compiles).
  testing.check_pairwise_loss(
    fn, skip=("traced_tau_and_options",), taus=(0.1, 1.0, 10.0)
  )


@loss_of_h
def float16_intermediate(h, tau):
  z = (tau * h).astype(jnp.float16)  # Cast back below: the dtype looks fine.
  return jax.nn.softplus(-z).astype(jnp.float32)


def test_float16_intermediate_is_caught():
  message = expect_failure("float32_maths", float16_intermediate)
  assert "half precision" in message and "float16" in message


# ---------------------------------------------------------------------------
# The other properties, one bug each.


@loss_of_h
def batch_coupled_by_mistake(h, tau):
  return jax.nn.softplus(-tau * jnp.sort(h))  # rank order, as aot


def test_loss_coupling_the_batch_is_caught_unless_declared():
  message = expect_failure("unreduced", batch_coupled_by_mistake)
  assert "alone but" in message and "batch_coupled=True" in message
  testing.check_pairwise_loss(batch_coupled_by_mistake, batch_coupled=True)


@loss_of_h
def bfloat16_output(h, tau):
  return jax.nn.softplus(-tau * h).astype(jnp.bfloat16)


def test_half_precision_output_is_caught():
  expect_failure("float32_maths", bfloat16_output, match="bfloat16 output")


@jax.custom_jvp
def _softplus_wrong_jvp(x):
  return jax.nn.softplus(x)


@_softplus_wrong_jvp.defjvp
def _softplus_wrong_jvp_rule(primals, tangents):
  (x,), (t,) = primals, tangents
  return jax.nn.softplus(x), 0.9 * jax.nn.sigmoid(x) * t  # 10% off


@loss_of_h
def wrong_gradient(h, tau):
  return _softplus_wrong_jvp(-tau * h)


def test_gradient_disagreeing_with_finite_differences_is_caught():
  expect_failure("check_grads", wrong_gradient, match="order 2, float64")


def chosen_logp_only(
  policy_chosen_logps,
  policy_rejected_logps,
  ref_chosen_logps,
  ref_rejected_logps,
  *,
  tau,
):
  # An SFT-like term: not a function of the log-ratios.
  d_c, _ = losses.log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  return -tau * (d_c + ref_chosen_logps)


def test_missing_shift_invariance_is_caught():
  message = expect_failure("shift_invariance", chosen_logp_only)
  assert "'log_ratio': adding -3.7 to policy_chosen_logps," in message
  testing.check_pairwise_loss(chosen_logp_only, shift_invariance=())


def test_claimed_pair_invariance_of_a_log_ratio_loss_is_checked():
  # BCO depends on d_c and d_r separately, not on h alone.
  expect_failure(
    "shift_invariance",
    "bco_pair",
    shift_invariance=("pair",),
    match="'pair': adding",
  )
  testing.check_pairwise_loss("bco_pair", shift_invariance=("all", "log_ratio"))


def uses_reference_when_given(
  policy_chosen_logps,
  policy_rejected_logps,
  ref_chosen_logps=None,
  ref_rejected_logps=None,
  *,
  tau,
):
  zero = jnp.zeros(jnp.shape(policy_chosen_logps), jnp.float32)
  h = _h(policy_chosen_logps, policy_rejected_logps, zero, zero)
  if ref_chosen_logps is not None:  # Wrong: a reference-free loss ignores it.
    h += _h(
      policy_chosen_logps,
      policy_rejected_logps,
      ref_chosen_logps,
      ref_rejected_logps,
    )
  return jax.nn.softplus(-tau * h)


def test_reference_free_claim_is_checked():
  expect_failure(
    "reference_free",
    uses_reference_when_given,
    reference_free=True,
    match="reference log-probs None change the loss",
  )


def test_reference_free_signature_is_checked():
  # Claimed reference-free, but the reference arguments have no default.
  expect_failure(
    "signature", "dpo", reference_free=True, match="must default to None"
  )


def test_unknown_option_is_named():
  expect_failure(
    "signature",
    "cdpo",
    options={"label_smoothin": 0.1},
    match=r"options \['label_smoothin'\] are not options",
  )


# ---------------------------------------------------------------------------
# A correct user loss, registered like a built-in.


def user_softplus_margin(
  policy_chosen_logps,
  policy_rejected_logps,
  ref_chosen_logps,
  ref_rejected_logps,
  *,
  tau,
  gamma=0.0,
):
  """softplus(γ − τh): DPO with a target margin γ."""
  h = _h(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  return jax.nn.softplus(gamma - tau * h)


def _user_dloss_dh(h, *, tau, gamma):
  return -tau * (1 - np.tanh((tau * h - gamma) / 2)) / 2  # −τ σ(γ − τh)


def _registered(fn):
  """Registers `fn` under its name for one test (a fixture's body)."""
  losses.register(fn.__name__)(fn)
  yield fn.__name__
  losses.unregister(fn.__name__)


@pytest.fixture
def registered_user_loss():
  yield from _registered(user_softplus_margin)


def test_correct_registered_user_loss_passes(registered_user_loss):
  testing.check_pairwise_loss(
    registered_user_loss,
    options={"gamma": 0.3},
    dloss_dh=_user_dloss_dh,
    shift_invariance=testing.SHIFT_KINDS,
  )
  # The same function passes unregistered, and with an explicit grid.
  testing.check_pairwise_loss(
    user_softplus_margin,
    dloss_dh=_user_dloss_dh,
    option_grid={"gamma": [0.0, 1.0, -2.0]},
    taus=(0.1, 1.0, 10.0),
  )


def test_messages_name_a_registered_loss_by_name(registered_user_loss):
  message = expect_failure(
    "dloss_dh",
    registered_user_loss,
    dloss_dh=lambda h, *, tau, gamma: _user_dloss_dh(h, tau=tau, gamma=0.0),
    options={"gamma": 0.3},
  )
  assert message.startswith("check_pairwise_loss('user_softplus_margin')")


# ---------------------------------------------------------------------------
# The harness's own arguments and error type.


def test_bad_arguments_of_the_check_are_value_errors():
  with pytest.raises(ValueError, match="skip: unknown properties"):
    testing.check_pairwise_loss("dpo", skip=("shapes",))
  with pytest.raises(ValueError, match="shift_invariance: unknown kinds"):
    testing.check_pairwise_loss("dpo", shift_invariance=("everything",))
  with pytest.raises(ValueError, match=r"option_grid\['label_smoothing'\]"):
    testing.check_pairwise_loss("cdpo", option_grid={"label_smoothing": [0.1]})
  with pytest.raises(ValueError, match="Unknown loss 'nope'"):
    testing.check_pairwise_loss("nope")


def test_error_is_an_assertion_error_that_pickles():
  with pytest.raises(AssertionError) as info:
    testing.check_pairwise_loss(reduced_to_scalar)
  copy = pickle.loads(pickle.dumps(info.value))
  assert isinstance(copy, testing.LossPropertyError)
  assert copy.property == "shape" and str(copy) == str(info.value)


def test_input_sets_are_valid_log_probs():
  for args in (testing.random_logps(0), testing.extreme_logps()):
    assert len(args) == 4 and len({a.shape for a in args}) == 1
    assert all(np.all(a < 0) for a in args)
  pc, pr, rc, rr = testing.extreme_logps()
  h = (pc - rc) - (pr - rr)
  assert np.any(h == 0) and np.max(np.abs(h)) == 3e4


# ---------------------------------------------------------------------------
# bandit_optimum: where a loss's optimum sits on a finite pair set.

A, B, C = 0, 1, 2
D1 = [(A, B), (B, C), (A, C)]
UNIFORM3 = [1 / 3, 1 / 3, 1 / 3]
SEEDS = (0, 1, 2)


def _ipo_d1_policy(tau):
  # Hand-derived: least squares h_ab = h_bc = h_ac = 1/(2τ) on the three
  # pairs gives θ ∝ (2, 1, 0)/(3τ).
  p = np.exp(np.array([2.0, 1.0, 0.0]) / (3 * tau))
  return p / p.sum()


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_bandit_optimum_reproduces_ipo_closed_form_on_d1(tau):
  result = testing.bandit_optimum("ipo", D1, UNIFORM3, tau, seeds=SEEDS)
  assert result.finite and result.status == "converged", result.diagnosis
  np.testing.assert_allclose(
    result.exact_policy, _ipo_d1_policy(tau), atol=1e-6
  )
  np.testing.assert_allclose(
    result.trained_policy, _ipo_d1_policy(tau), atol=0.01
  )
  assert result.gap < 0.01 and result.trained_policies.shape == (3, 3)
  assert not result.nonfinite_steps.any()
  # The exact minimiser has the lower mean loss; training comes close.
  assert np.all(result.exact_loss <= result.trained_loss + 1e-12)
  assert np.all(result.trained_loss - result.exact_loss < 5e-3)


def test_bandit_optimum_flags_dpo_on_d1_as_having_no_finite_optimum():
  result = testing.bandit_optimum("dpo", D1, UNIFORM3, 1.0, seeds=SEEDS)
  assert not result.finite and result.status == "diverges"
  assert result.exact_policy is None and np.isnan(result.gap)
  assert "no finite optimum" in result.diagnosis
  assert "y0 > y1 > y2" in result.diagnosis, result.diagnosis
  # The exact iterate heads where DPO's collapse goes (psi's graph test says
  # every D1 edge diverges), and so does training: a wins.
  assert psi.dpo_divergent_pairs(D1, 3) == sorted(D1)
  theta = result.last_logits
  assert theta[A] - theta[C] > 100 and theta[A] - theta[B] > 30, theta
  assert np.all(result.trained_policies[:, A] > 0.95)


def test_bandit_optimum_finds_dpo_finite_on_a_cycle():
  # Every edge on a directed cycle: DPO's sampled loss has a finite minimiser,
  # by symmetry the uniform policy (θ₀ already is).
  cycle = [(A, B), (B, C), (C, A)]
  assert psi.dpo_divergent_pairs(cycle, 3) == []
  result = testing.bandit_optimum("dpo", cycle, UNIFORM3, 0.5, seeds=SEEDS)
  assert result.finite, result.diagnosis
  np.testing.assert_allclose(result.exact_policy, UNIFORM3, atol=1e-9)
  assert result.gap < 0.05


def test_bandit_optimum_reports_an_optimum_beyond_the_logit_bound():
  # IPO's optimum at τ = 1/300 has θ_a − θ_c = 2/(3τ) = 200 > 100: not a
  # divergence, and flagged as "raise max_logit_gap", not as DPO's collapse.
  tau = 1 / 300
  result = testing.bandit_optimum("ipo", D1, UNIFORM3, tau, total_steps=100)
  assert result.status == "gap_exceeded" and not result.finite
  assert "raise max_logit_gap" in result.diagnosis
  wide = testing.bandit_optimum(
    "ipo", D1, UNIFORM3, tau, total_steps=100, max_logit_gap=300.0
  )
  assert wide.finite, wide.diagnosis
  theta = wide.last_logits
  np.testing.assert_allclose(np.diff(theta), -1 / (3 * tau), rtol=1e-9)


def user_huber_ipo(
  policy_chosen_logps,
  policy_rejected_logps,
  ref_chosen_logps,
  ref_rejected_logps,
  *,
  tau,
  delta=1.0,
):
  """Huber loss of IPO's residual h − 1/(2τ)."""
  r = jnp.abs(
    _h(
      policy_chosen_logps,
      policy_rejected_logps,
      ref_chosen_logps,
      ref_rejected_logps,
    )
    - 0.5 / tau
  )
  return jnp.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta))


@pytest.fixture
def registered_huber():
  yield from _registered(user_huber_ipo)


def test_bandit_optimum_of_a_registered_user_loss_by_name(registered_huber):
  # On D1 IPO's residuals at its optimum are ±1/(6τ) = ±1/3 at τ = 0.5:
  # inside δ = 1 the Huber loss is IPO/2, with the same minimiser.
  result = testing.bandit_optimum(
    registered_huber, D1, UNIFORM3, 0.5, options={"delta": 1.0}, seeds=SEEDS
  )
  assert result.finite and result.loss == "user_huber_ipo"
  np.testing.assert_allclose(
    result.exact_policy, _ipo_d1_policy(0.5), atol=1e-6
  )
  assert result.gap < 0.01, result.diagnosis
  # With δ below the residuals the optimum moves: Huber is an L1 fit there.
  narrow = testing.bandit_optimum(
    registered_huber, D1, UNIFORM3, 0.5, options={"delta": 0.01}, seeds=SEEDS
  )
  assert narrow.finite
  assert np.abs(narrow.exact_policy - _ipo_d1_policy(0.5)).max() > 0.01


def test_bandit_optimum_of_an_unregistered_function_leaves_no_trace():
  before = set(losses.LOSSES)
  result = testing.bandit_optimum(user_huber_ipo, D1, UNIFORM3, 0.5, seeds=(0,))
  assert set(losses.LOSSES) == before
  assert result.finite and result.loss == "user_huber_ipo"
  np.testing.assert_allclose(
    result.exact_policy, _ipo_d1_policy(0.5), atol=1e-6
  )


def test_bandit_optimum_bad_arguments_name_the_culprit():
  with pytest.raises(ValueError, match="max_logit_gap must be in"):
    testing.bandit_optimum("ipo", D1, UNIFORM3, 1.0, max_logit_gap=800.0)
  with pytest.raises(ValueError, match=r"pairs\[0\] = \(1, 1\)"):
    testing.bandit_optimum("ipo", [(1, 1)], UNIFORM3, 1.0)
  with pytest.raises(ValueError, match="Unknown loss 'nope'"):
    testing.bandit_optimum("nope", D1, UNIFORM3, 1.0)
