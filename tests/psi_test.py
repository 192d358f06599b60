"""Tests for psipo_jax.psi: exact ΨPO on a finite action space.

Every test runs in float64 (module-local `jax.enable_x64` fixture, so the
setting does not leak into other test modules). Optimisation-based checks
minimise the losses with optax L-BFGS inside one jitted function per loss and
K, so each compiles once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from psipo_jax import psi

TAUS = (0.05, 0.1, 0.5, 1.0)


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


# ---------------------------------------------------------------------------
# Helpers.


def _lbfgs(fun, init, *, max_iter=1000, tol=1e-13):
  """Minimises `fun` from `init` with optax L-BFGS (zoom line search)."""
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(
      grad, state, params, value=value, grad=grad, value_fn=fun
    )
    return optax.apply_updates(params, updates), state

  def keep_going(carry):
    _, state = carry
    count = optax.tree.get(state, "count")
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

  return jax.lax.while_loop(keep_going, step, (init, opt.init(init)))[0]


@functools.partial(jax.jit, static_argnames="loss_fn")
def _minimise_population_loss(loss_fn, pref, pi_ref, mu, tau):
  """argmin over logits of loss_fn(logits, pref, pi_ref, mu, tau), from 0."""
  return _lbfgs(
    lambda logits: loss_fn(logits, pref, pi_ref, mu, tau),
    jnp.zeros_like(pi_ref),
  )


_logit_regression_loss = functools.partial(psi.psi_regression_loss, psi="logit")


def _dataset_ipo_loss(logits, pairs, weights, pi_ref, tau):
  """Σ_k w_k (h_π(w_k, l_k) − 1/(2τ))², written directly from Eq. 17."""
  log_ratio = jax.nn.log_softmax(logits) - jnp.log(pi_ref)
  h = log_ratio[pairs[:, 0]] - log_ratio[pairs[:, 1]]
  return jnp.sum(weights * jnp.square(h - 1.0 / (2.0 * tau)))


@jax.jit
def _minimise_dataset_loss(pairs, weights, pi_ref, tau, init):
  return _lbfgs(
    lambda t: _dataset_ipo_loss(t, pairs, weights, pi_ref, tau), init
  )


def _random_preference(rng, num_actions):
  """A random matrix with P + Pᵀ = 1 and arbitrary values in [0, 1]."""
  upper = np.triu(rng.uniform(size=(num_actions, num_actions)), 1)
  return upper + np.tril(1.0 - upper.T, -1) + 0.5 * np.eye(num_actions)


def _preference_cases(rng):
  """(name, pref) pairs: strict order, RPS, Bradley–Terry, random; K=2,3,5."""
  cases = []
  for k in (2, 3, 5):
    cases.append((f"order{k}", psi.preference_from_ranking(rng.permutation(k))))
    cases.append(
      (f"bt{k}", psi.preference_from_bradley_terry(rng.normal(size=k)))
    )
    cases.append((f"random{k}", _random_preference(rng, k)))
  cases.append(("rps", psi.rock_paper_scissors()))
  cases.append(("rps_soft", psi.rock_paper_scissors(win_prob=0.8)))
  return cases


def _dirichlet(rng, k):
  return rng.dirichlet(np.ones(k))


# ---------------------------------------------------------------------------
# The closed-form optimum.


def test_optimal_policy_is_the_lbfgs_minimiser_of_ipo_population_loss():
  rng = np.random.default_rng(0)
  for name, pref in _preference_cases(rng):
    k = pref.shape[0]
    pi_ref, mu = _dirichlet(rng, k), _dirichlet(rng, k)
    for tau in TAUS:
      expected = psi.optimal_policy(pref, pi_ref, mu, tau)
      logits = _minimise_population_loss(
        psi.ipo_population_loss, pref, pi_ref, mu, tau
      )
      np.testing.assert_allclose(
        jax.nn.softmax(logits),
        expected,
        rtol=0,
        atol=1e-6,
        err_msg=f"{name}, tau={tau}",
      )
      # Eq. 11: the optimum is an exact root of the regression loss.
      assert (
        psi.ipo_population_loss(jnp.log(expected), pref, pi_ref, mu, tau)
        < 1e-20
      ), (name, tau)


@pytest.mark.parametrize("tau", (0.05, 0.1, 0.5, 1.0, 5.0))
def test_two_action_deterministic_ipo_optimum_is_sigmoid(tau):
  # Paper §5.3.1: p(y1 ≻ y2) = 1, uniform π_ref and μ → π*(y1) = σ(1/(2τ)).
  pref = jnp.array([[0.5, 1.0], [0.0, 0.5]])
  uniform = jnp.full(2, 0.5)
  expected = 1.0 / (1.0 + np.exp(-1.0 / (2.0 * tau)))
  policy = psi.optimal_policy(pref, uniform, uniform, tau)
  np.testing.assert_allclose(policy, [expected, 1 - expected], rtol=1e-12)
  # The one-pair dataset {(y1, y2)} gives the same policy (Eq. 17).
  dataset = psi.ipo_dataset_optimum([(0, 1)], 2, uniform, tau)
  np.testing.assert_allclose(
    dataset.policy, [expected, 1 - expected], rtol=1e-12
  )


@pytest.mark.parametrize("psi_name", ("identity", "logit"))
def test_optimal_policy_maximises_the_psipo_objective(psi_name):
  rng = np.random.default_rng(1)
  k, tau = 4, 0.3
  pref = psi.preference_from_bradley_terry(rng.normal(size=k))
  pi_ref, mu = _dirichlet(rng, k), _dirichlet(rng, k)
  best = psi.optimal_policy(pref, pi_ref, mu, tau, psi_name)
  g = psi.psi_expectation(pref, mu, psi_name)
  # Gibbs variational principle: max = τ log Σ π_ref exp(g/τ).
  maximum = tau * jax.scipy.special.logsumexp(jnp.log(pi_ref) + g / tau)
  np.testing.assert_allclose(
    psi.psipo_objective(best, pref, pi_ref, mu, tau, psi_name),
    maximum,
    rtol=1e-12,
  )
  for _ in range(20):
    other = _dirichlet(rng, k)
    assert psi.psipo_objective(other, pref, pi_ref, mu, tau, psi_name) < maximum


def test_preference_against_and_psi_expectation_by_hand():
  pref = jnp.array([[0.9, 0.8, 0.3], [0.2, 0.1, 0.6], [0.7, 0.4, 0.0]])
  mu = jnp.array([0.5, 0.25, 0.25])
  # The diagonal (0.9, 0.1, 0.0 above) is read as 1/2.
  expected = [
    0.5 * 0.5 + 0.25 * 0.8 + 0.25 * 0.3,
    0.5 * 0.2 + 0.25 * 0.5 + 0.25 * 0.6,
    0.5 * 0.7 + 0.25 * 0.4 + 0.25 * 0.5,
  ]
  np.testing.assert_allclose(
    psi.preference_against(pref, mu), expected, rtol=1e-14
  )
  np.testing.assert_allclose(
    psi.psi_expectation(pref, mu, "identity"), expected, rtol=1e-14
  )
  logit = lambda q: np.log(q / (1 - q))
  np.testing.assert_allclose(
    psi.psi_expectation(pref, mu, "logit"),
    [
      0.25 * logit(0.8) + 0.25 * logit(0.3),
      0.5 * logit(0.2) + 0.25 * logit(0.6),
      0.5 * logit(0.7) + 0.25 * logit(0.4),
    ],
    rtol=1e-12,
  )
  # A callable Ψ works too.
  np.testing.assert_allclose(
    psi.psi_expectation(pref, mu, jnp.square),
    [
      0.5 * 0.25 + 0.25 * 0.64 + 0.25 * 0.09,
      0.5 * 0.04 + 0.25 * 0.25 + 0.25 * 0.36,
      0.5 * 0.49 + 0.25 * 0.16 + 0.25 * 0.25,
    ],
    rtol=1e-14,
  )


def test_logit_psi_with_a_deterministic_preference_is_not_attained():
  pref = psi.preference_from_ranking([0, 1, 2])
  uniform = jnp.full(3, 1 / 3)
  with pytest.raises(ValueError, match="not attained"):
    psi.optimal_policy(pref, uniform, uniform, 0.5, "logit")
  with pytest.raises(ValueError, match="infinite"):
    psi.psi_regression_loss(jnp.zeros(3), pref, uniform, uniform, 0.5, "logit")
  # Under jit the check cannot run: the failure shows as NaN, not a number.
  traced = jax.jit(
    lambda p: psi.optimal_policy(p, uniform, uniform, 0.5, "logit")
  )
  assert np.isnan(traced(pref)).all()


def test_optimum_is_zero_where_g_is_minus_infinity():
  # y1 loses surely to y0, which μ plays but π_ref excludes: g(y1) = −∞ is
  # harmless, the optimum just puts no mass on y1.
  pref = jnp.array([[0.5, 1.0, 0.6], [0.0, 0.5, 0.3], [0.4, 0.7, 0.5]])
  pi_ref = jnp.array([0.0, 0.5, 0.5])
  mu = jnp.full(3, 1 / 3)
  np.testing.assert_array_equal(
    psi.optimal_policy(pref, pi_ref, mu, 0.5, "logit"), [0.0, 0.0, 1.0]
  )


def test_infinite_psi_against_actions_mu_never_plays_is_skipped():
  # y1 ≻ y2 surely, but μ only plays y0: g stays finite, no 0·∞ = NaN.
  pref = jnp.array([[0.5, 0.3, 0.8], [0.7, 0.5, 1.0], [0.2, 0.0, 0.5]])
  pi_ref, mu, tau = jnp.array([0.2, 0.3, 0.5]), jnp.array([1.0, 0.0, 0.0]), 0.5
  g = np.log(np.array([0.5, 0.7, 0.2]) / np.array([0.5, 0.3, 0.8]))
  np.testing.assert_allclose(
    psi.psi_expectation(pref, mu, "logit"), g, rtol=1e-14
  )
  expected = pi_ref * np.exp(g / tau)
  np.testing.assert_allclose(
    psi.optimal_policy(pref, pi_ref, mu, tau, "logit"),
    expected / expected.sum(),
    rtol=1e-12,
  )
  grad = jax.grad(
    lambda p: psi.psi_regression_loss(jnp.zeros(3), p, pi_ref, mu, tau, "logit")
  )(pref)
  assert np.isfinite(grad).all()


# ---------------------------------------------------------------------------
# Population losses.


def test_sampled_ipo_loss_minus_population_loss_is_constant_in_policy():
  rng = np.random.default_rng(2)
  k, tau = 4, 0.2
  pref = _random_preference(rng, k)
  # A garbage diagonal must be ignored: the identity needs p(y ≻ y) = 1/2.
  pref[np.diag_indices(k)] = rng.uniform(size=k)
  pi_ref = _dirichlet(rng, k)
  for mu in (_dirichlet(rng, k), np.array([0.5, 0.0, 0.3, 0.2])):
    gaps = [
      psi.ipo_sampled_population_loss(logits, pref, pi_ref, mu, tau)
      - psi.ipo_population_loss(logits, pref, pi_ref, mu, tau)
      for logits in rng.normal(scale=3.0, size=(50, k))
    ]
    np.testing.assert_allclose(gaps, gaps[0], rtol=0, atol=1e-10)
    # The sampled loss varies a lot over these logits, so the check bites.
    assert (
      np.ptp(
        [
          psi.ipo_sampled_population_loss(logits, pref, pi_ref, mu, tau)
          for logits in rng.normal(scale=3.0, size=(5, k))
        ]
      )
      > 1.0
    )


def test_diagonal_of_pref_is_ignored_everywhere():
  rng = np.random.default_rng(3)
  k = 3
  pref = _random_preference(rng, k)
  garbage = pref.copy()
  garbage[np.diag_indices(k)] = [0.0, 1.0, 0.9]
  pi_ref, mu, logits = (
    _dirichlet(rng, k),
    _dirichlet(rng, k),
    rng.normal(size=k),
  )
  for loss in (
    psi.ipo_population_loss,
    psi.ipo_sampled_population_loss,
    psi.dpo_population_loss,
    psi.psi_regression_loss,
  ):
    assert loss(logits, garbage, pi_ref, mu, 0.5) == loss(
      logits, pref, pi_ref, mu, 0.5
    ), loss.__name__
  np.testing.assert_array_equal(
    psi.optimal_policy(garbage, pi_ref, mu, 0.5, "logit"),
    psi.optimal_policy(pref, pi_ref, mu, 0.5, "logit"),
  )


def test_psi_regression_with_identity_is_ipo_population_loss():
  rng = np.random.default_rng(4)
  for _, pref in _preference_cases(rng):
    k = pref.shape[0]
    pi_ref, mu, logits = (
      _dirichlet(rng, k),
      _dirichlet(rng, k),
      rng.normal(size=k),
    )
    np.testing.assert_allclose(
      psi.psi_regression_loss(logits, pref, pi_ref, mu, 0.1, "identity"),
      psi.ipo_population_loss(logits, pref, pi_ref, mu, 0.1),
      rtol=1e-13,
    )


def test_logit_psi_regression_on_bradley_terry_recovers_rlhf_optimum():
  # For BT, logit(p(y ≻ y')) = r(y) − r(y') so g(y) = r(y) − E_μ r and
  # π* ∝ π_ref exp(r/τ) whatever μ (uniform μ = π_ref included).
  rng = np.random.default_rng(5)
  k = 4
  rewards = rng.normal(size=k)
  pref = psi.preference_from_bradley_terry(rewards)
  uniform = np.full(k, 1 / k)
  for pi_ref, mu in (
    (uniform, uniform),
    (_dirichlet(rng, k), _dirichlet(rng, k)),
  ):
    for tau in (0.1, 1.0):
      rlhf = jax.nn.softmax(np.log(pi_ref) + rewards / tau)
      np.testing.assert_allclose(
        psi.optimal_policy(pref, pi_ref, mu, tau, "logit"),
        rlhf,
        rtol=0,
        atol=1e-12,
      )
      logits = _minimise_population_loss(
        _logit_regression_loss, pref, pi_ref, mu, tau
      )
      np.testing.assert_allclose(
        jax.nn.softmax(logits), rlhf, rtol=0, atol=1e-6
      )


def test_dpo_population_loss_has_no_minimiser_for_a_deterministic_preference():
  k, tau = 4, 0.1
  pref = psi.preference_from_ranking(range(k))  # action 0 best
  rng = np.random.default_rng(6)
  pi_ref, mu = _dirichlet(rng, k), _dirichlet(rng, k)
  ray = np.arange(k - 1, -1, -1.0)  # widens every winner's gap
  scales = np.geomspace(0.1, 30.0, 40) / tau
  values = np.array(
    [psi.dpo_population_loss(s * ray, pref, pi_ref, mu, tau) for s in scales]
  )
  # Only the diagonal terms μ(y)² · ½ log 2 cannot be driven to 0.
  infimum = 0.5 * np.log(2.0) * np.sum(mu**2)
  assert np.isfinite(values).all()
  assert (np.diff(values) < 0).all()
  assert (values > infimum).all()
  assert values[-1] - infimum < 1e-10
  # Along this ray the policy tends to (1, 0, ..., 0) (paper §5.3.1).
  np.testing.assert_allclose(
    jax.nn.softmax(scales[-1] * ray), np.eye(k)[0], atol=1e-100
  )


def test_dpo_population_loss_minimiser_for_bradley_terry_is_rlhf_optimum():
  rng = np.random.default_rng(7)
  k = 3
  rewards = rng.normal(size=k)
  pref = psi.preference_from_bradley_terry(rewards)
  pi_ref, mu = _dirichlet(rng, k), _dirichlet(rng, k)
  for tau in (0.1, 1.0):
    logits = _minimise_population_loss(
      psi.dpo_population_loss, pref, pi_ref, mu, tau
    )
    np.testing.assert_allclose(
      jax.nn.softmax(logits),
      jax.nn.softmax(np.log(pi_ref) + rewards / tau),
      rtol=0,
      atol=1e-6,
    )


def test_zero_probabilities_give_finite_losses_and_gradients():
  rng = np.random.default_rng(8)
  k, tau = 4, 0.1
  pref = _random_preference(rng, k)
  pi_ref = np.array([0.4, 0.0, 0.35, 0.25])
  mu = np.array([0.3, 0.3, 0.0, 0.4])  # mass on y1, which π_ref excludes
  logits = rng.normal(size=k)
  for loss in (
    psi.ipo_population_loss,
    psi.ipo_sampled_population_loss,
    psi.dpo_population_loss,
    psi.psi_regression_loss,
  ):
    value, grad = jax.value_and_grad(loss)(logits, pref, pi_ref, mu, tau)
    assert np.isfinite(value) and np.isfinite(grad).all(), loss.__name__
  best = psi.optimal_policy(pref, pi_ref, mu, tau)
  assert best[1] == 0.0 and (np.delete(best, 1) > 0).all()
  # The optimum is still an exact root of the regression loss (y1 dropped).
  assert psi.ipo_population_loss(jnp.log(best), pref, pi_ref, mu, tau) < 1e-20


def test_jit_and_vmap_accept_traced_tau_without_retracing():
  rng = np.random.default_rng(9)
  k = 3
  pref = _random_preference(rng, k)
  pi_ref, mu = _dirichlet(rng, k), _dirichlet(rng, k)
  logits = rng.normal(size=k)
  traces = []

  @jax.jit
  def policy_and_loss(tau):
    traces.append(tau)
    return (
      psi.optimal_policy(pref, pi_ref, mu, tau),
      psi.ipo_population_loss(logits, pref, pi_ref, mu, tau),
    )

  for tau in TAUS:
    jitted = policy_and_loss(tau)
    np.testing.assert_allclose(
      jitted[0], psi.optimal_policy(pref, pi_ref, mu, tau), rtol=1e-12
    )
    np.testing.assert_allclose(
      jitted[1],
      psi.ipo_population_loss(logits, pref, pi_ref, mu, tau),
      rtol=1e-12,
    )
  assert len(traces) == 1
  batched = jax.vmap(lambda t: psi.optimal_policy(pref, pi_ref, mu, t))(
    jnp.array(TAUS)
  )
  for tau, row in zip(TAUS, batched):
    np.testing.assert_allclose(
      row, psi.optimal_policy(pref, pi_ref, mu, tau), rtol=1e-12
    )


def test_float64_under_x64_and_float32_without():
  pref = np.float32(psi.preference_from_bradley_terry([0.0, 1.0, 2.0]))
  dist = np.full(3, 1 / 3, dtype=np.float32)
  logits = np.zeros(3, np.float32)
  assert psi.optimal_policy(pref, dist, dist, 0.5).dtype == jnp.float64
  assert (
    psi.ipo_population_loss(logits, pref, dist, dist, 0.5).dtype == jnp.float64
  )
  with jax.enable_x64(False):
    assert psi.optimal_policy(pref, dist, dist, 0.5).dtype == jnp.float32
    loss = psi.dpo_population_loss(logits, pref, dist, dist, 0.5)
    assert loss.dtype == jnp.float32


# ---------------------------------------------------------------------------
# Finite datasets.

D1 = [(0, 1), (1, 2), (0, 2)]  # a ≻ b, b ≻ c, a ≻ c


@pytest.mark.parametrize("tau", (0.1, 1.0))
def test_ipo_dataset_optimum_on_d1_closed_form(tau):
  # Normal equations of (x − t)² + (y − t)² + (x + y − t)², t = 1/(2τ),
  # x = θa − θb, y = θb − θc: x = y = 2t/3 = 1/(3τ).
  result = psi.ipo_dataset_optimum(D1, 3, np.full(3, 1 / 3), tau)
  expected = np.exp(np.array([2.0, 1.0, 0.0]) / (3.0 * tau))
  np.testing.assert_allclose(
    result.policy, expected / expected.sum(), rtol=1e-12
  )
  np.testing.assert_array_equal(result.component, [0, 0, 0])


def test_ipo_dataset_optimum_matches_lbfgs():
  rng = np.random.default_rng(10)
  k = 5
  order = rng.permutation(k)
  spanning = np.stack([order[:-1], order[1:]], axis=1)  # connects all actions
  extra = np.array([rng.choice(k, size=2, replace=False) for _ in range(10)])
  datasets = [
    (np.array(D1), np.ones(3), 3),
    (np.concatenate([spanning, extra]), rng.uniform(0.2, 2.0, size=14), k),
  ]
  for pairs, weights, num_actions in datasets:
    pi_ref = _dirichlet(rng, num_actions)
    for tau in (0.1, 1.0):
      result = psi.ipo_dataset_optimum(
        pairs, num_actions, pi_ref, tau, weights=weights
      )
      init = jnp.log(pi_ref)
      logits = _minimise_dataset_loss(pairs, weights, pi_ref, tau, init)
      np.testing.assert_allclose(
        result.policy, jax.nn.softmax(logits), atol=1e-6
      )
      # L-BFGS steps stay in range(Bᵀ): it lands on the same logits.
      np.testing.assert_allclose(result.logits, logits, atol=1e-6)
      grad = jax.grad(_dataset_ipo_loss)(
        result.logits, pairs, weights, pi_ref, tau
      )
      np.testing.assert_allclose(grad, 0.0, atol=1e-9)


def test_ipo_dataset_optimum_disconnected_keeps_init_offsets():
  rng = np.random.default_rng(11)
  k, tau = 6, 0.5
  # Components {0, 1, 2} and {3, 4}; action 5 never compared.
  pairs = np.array([(0, 1), (1, 2), (2, 0), (0, 1), (3, 4)])
  weights = np.ones(len(pairs))
  pi_ref = _dirichlet(rng, k)
  init = rng.normal(size=k)
  result = psi.ipo_dataset_optimum(pairs, k, pi_ref, tau, init_logits=init)
  np.testing.assert_array_equal(result.component, [0, 0, 0, 1, 1, 2])
  logits = np.asarray(result.logits)
  assert logits[5] == init[5]
  np.testing.assert_allclose(logits[:3].sum(), init[:3].sum(), rtol=1e-12)
  np.testing.assert_allclose(logits[3:5].sum(), init[3:5].sum(), rtol=1e-12)
  grad = jax.grad(_dataset_ipo_loss)(result.logits, pairs, weights, pi_ref, tau)
  np.testing.assert_allclose(grad, 0.0, atol=1e-10)

  # Plain gradient descent from init converges to exactly this minimiser.
  loss_grad = jax.grad(_dataset_ipo_loss)

  @jax.jit
  def descend(theta):
    return jax.lax.fori_loop(
      0,
      2000,
      lambda _, t: t - 0.05 * loss_grad(t, pairs, weights, pi_ref, tau),
      theta,
    )

  np.testing.assert_allclose(descend(init), logits, rtol=0, atol=1e-9)
  # A different init moves the undetermined offsets with it.
  other = psi.ipo_dataset_optimum(pairs, k, pi_ref, tau, init_logits=init + 1.0)
  np.testing.assert_allclose(other.logits, logits + 1.0, atol=1e-12)


def test_ipo_dataset_optimum_default_init_keeps_zero_reference_actions_at_zero():
  pi_ref = np.array([0.5, 0.3, 0.0, 0.2])
  result = psi.ipo_dataset_optimum([(0, 1), (1, 3)], 4, pi_ref, 1.0)
  assert result.policy[2] == 0.0
  with pytest.raises(ValueError, match=r"pairs\[1\] = \(2, 3\).*pi_ref = 0"):
    psi.ipo_dataset_optimum([(0, 1), (2, 3)], 4, pi_ref, 1.0)


def test_dpo_divergent_pairs():
  # Every edge of D1 lies on no cycle: DPO pushes each loser to 0.
  assert psi.dpo_divergent_pairs(D1, 3) == [(0, 1), (0, 2), (1, 2)]
  assert not psi.dataset_has_finite_dpo_optimum(D1, 3)
  assert psi.dataset_has_finite_dpo_optimum([(0, 1), (1, 2), (2, 0)], 3)
  assert psi.dataset_has_finite_dpo_optimum([(0, 1), (1, 0)], 2)
  # Every action wins and loses, yet the bridge 0 → 3 is on no cycle.
  bridged = [(0, 1), (1, 2), (2, 0), (3, 4), (4, 5), (5, 3), (0, 3)]
  assert psi.dpo_divergent_pairs(bridged, 6) == [(0, 3)]
  # A zero weight removes the bridge.
  assert psi.dataset_has_finite_dpo_optimum(
    bridged, 6, weights=[1, 1, 1, 1, 1, 1, 0]
  )

  # Numerically: the DPO sampled loss strictly decreases along the
  # direction d = indicator{actions that reach 0} = (1, 1, 1, 0, 0, 0).
  pairs = np.array(bridged)

  def dpo_loss(theta, tau=0.5):
    h = theta[pairs[:, 0]] - theta[pairs[:, 1]]
    return jnp.sum(-jax.nn.log_sigmoid(tau * h))

  direction = np.array([1.0, 1, 1, 0, 0, 0])
  values = [dpo_loss(s * direction) for s in np.linspace(0, 60, 30)]
  assert (np.diff(values) < 0).all()


# ---------------------------------------------------------------------------
# Preference constructors.


def test_preference_constructors():
  rewards = np.array([0.3, -1.0, 2.0])
  bt = psi.preference_from_bradley_terry(rewards)
  np.testing.assert_allclose(
    bt, 1 / (1 + np.exp(-(rewards[:, None] - rewards[None, :]))), rtol=1e-14
  )
  psi.validate_preference(bt)

  ranking = psi.preference_from_ranking([2, 0, 1])  # 2 ≻ 0 ≻ 1
  np.testing.assert_array_equal(
    ranking, [[0.5, 1, 0], [0, 0.5, 0], [1, 1, 0.5]]
  )
  with pytest.raises(ValueError, match="permutation"):
    psi.preference_from_ranking([0, 0, 1])

  rps = psi.rock_paper_scissors()
  assert rps[1, 0] == 1 and rps[2, 1] == 1 and rps[0, 2] == 1  # cyclic
  psi.validate_preference(rps)
  np.testing.assert_allclose(psi.rock_paper_scissors(win_prob=0.8)[1, 0], 0.8)
  # With uniform μ every action wins half the time: the IPO optimum is π_ref.
  pi_ref = np.array([0.2, 0.3, 0.5])
  np.testing.assert_allclose(
    psi.optimal_policy(rps, pi_ref, np.full(3, 1 / 3), 0.1),
    pi_ref,
    rtol=1e-12,
  )


def test_preference_from_pairs():
  pairs = [(0, 1), (0, 1), (1, 0), (2, 1)]
  empirical = psi.preference_from_pairs(pairs, 4)
  expected = np.array(
    [
      [0.5, 2 / 3, 0.5, 0.5],
      [1 / 3, 0.5, 0.0, 0.5],
      [0.5, 1.0, 0.5, 0.5],
      [0.5, 0.5, 0.5, 0.5],
    ]
  )
  np.testing.assert_allclose(empirical.pref, expected, rtol=1e-14)
  np.testing.assert_array_equal(
    empirical.observed,
    [[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]],
  )
  np.testing.assert_array_equal(empirical.wins[0, 1], 2)
  psi.validate_preference(empirical.pref)
  weighted = psi.preference_from_pairs(pairs, 4, weights=[1, 1, 2, 1])
  assert weighted.pref[0, 1] == 0.5


@pytest.mark.parametrize(
  "pairs, weights, match",
  [
    ([(0, 3)], None, r"pairs\[0\] = \(0, 3\).*outside \[0, 3\)"),
    ([(0, 1), (2, 2)], None, r"pairs\[1\] = \(2, 2\).*itself"),
    ([(0, 1, 2)], None, r"shape \[N, 2\]"),
    ([(0.0, 1.0)], None, "integer"),
    ([(0, 1)], [-1.0], r"weights\[0\]"),
    ([(0, 1)], [1.0, 1.0], "weights must have shape"),
  ],
)
def test_bad_pairs_are_named(pairs, weights, match):
  with pytest.raises(ValueError, match=match):
    psi.preference_from_pairs(pairs, 3, weights=weights)


# ---------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
  "pref, match",
  [
    (np.full((2, 3), 0.5), r"square.*\(2, 3\)"),
    (np.full((2, 2, 2), 0.5), "square"),
    ([[0.5, 1.2], [-0.2, 0.5]], r"pref\[0, 1\] = 1.2"),
    ([[0.5, np.nan], [0.5, 0.5]], r"pref\[0, 1\] = nan"),
    (
      [[0.5, 0.6, 0.5], [0.4, 0.5, 0.7], [0.5, 0.4, 0.5]],
      r"pref\[1, 2\] \+ pref\[2, 1\]",
    ),
  ],
)
def test_validate_preference_names_the_culprit(pref, match):
  with pytest.raises(ValueError, match=match):
    psi.validate_preference(pref)
  # The same check guards the public functions.
  k = np.shape(pref)[0]
  with pytest.raises(ValueError, match=match):
    psi.optimal_policy(pref, np.full(k, 1 / k), np.full(k, 1 / k), 1.0)


def test_validate_preference_ignores_the_diagonal():
  psi.validate_preference([[0.0, 0.3], [0.7, 7.0]])


def test_bad_distributions_are_named():
  pref = psi.rock_paper_scissors()
  uniform = np.full(3, 1 / 3)
  with pytest.raises(ValueError, match=r"pi_ref must have shape \(3,\)"):
    psi.optimal_policy(pref, np.full(2, 0.5), uniform, 1.0)
  with pytest.raises(ValueError, match=r"mu\[1\] = -0.1"):
    psi.optimal_policy(pref, uniform, [0.6, -0.1, 0.5], 1.0)
  with pytest.raises(ValueError, match="mu must sum to 1"):
    psi.ipo_population_loss(np.zeros(3), pref, uniform, [0.5, 0.5, 0.5], 1.0)
  with pytest.raises(ValueError, match=r"logits must have shape \(3,\)"):
    psi.ipo_population_loss(np.zeros(4), pref, uniform, uniform, 1.0)


def test_get_psi():
  assert psi.get_psi("identity") is psi.identity
  assert psi.get_psi("logit") is psi.logit
  assert psi.get_psi(jnp.tanh) is jnp.tanh
  with pytest.raises(ValueError, match=r"'ipo'.*\['identity', 'logit'\]"):
    psi.get_psi("ipo")
  np.testing.assert_allclose(
    psi.logit(np.array([0.5, 0.75])), [0.0, np.log(3.0)]
  )
  assert psi.logit(1.0) == np.inf and psi.logit(0.0) == -np.inf


@pytest.mark.parametrize("tau", (0.0, -1.0, np.nan))
def test_nonpositive_tau_is_named(tau):
  pref = psi.rock_paper_scissors(win_prob=0.7)
  uniform = np.full(3, 1 / 3)
  logits = np.zeros(3)
  calls = [
    lambda: psi.optimal_policy(pref, uniform, uniform, tau),
    lambda: psi.psipo_objective(uniform, pref, uniform, uniform, tau),
    lambda: psi.ipo_population_loss(logits, pref, uniform, uniform, tau),
    lambda: psi.ipo_sampled_population_loss(
      logits, pref, uniform, uniform, tau
    ),
    lambda: psi.dpo_population_loss(logits, pref, uniform, uniform, tau),
    lambda: psi.psi_regression_loss(logits, pref, uniform, uniform, tau),
    lambda: psi.ipo_dataset_optimum(D1, 3, uniform, tau),
  ]
  for call in calls:
    with pytest.raises(ValueError, match="tau must be > 0"):
      call()
