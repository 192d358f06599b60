"""Tests for psipo_jax.losses: golden values, gradients, stability, errors."""

import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psipo_jax import losses, testing

# Losses that read a batch field (losses.BATCH_FIELDS) cannot be called on
# log-probs alone; tests/rebel_test.py checks them with their field.
ALL = sorted(set(losses.LOSSES) - set(losses.BATCH_FIELDS))
REFERENCE_BASED = sorted(set(ALL) - losses.REFERENCE_FREE)
# Options that differ from the defaults, so that golden values exercise them.
OPTIONS = {
  "cdpo": {"label_smoothing": 0.2},
  "robust": {"label_smoothing": 0.2},
  "exo_pair": {"label_smoothing": 0.05},
  "discopop": {"discopop_tau": 0.3},
  "aot": {"label_smoothing": 0.1},
  "aot_unpaired": {"label_smoothing": 0.1},
  "simpo": {"gamma": 0.7},
}


# ---------------------------------------------------------------------------
# Hand-written NumPy references (float64), straight from the formulas.


def np_log_sigmoid(z):
  return -np.logaddexp(0.0, -z)


def np_sigmoid(z):
  return np.exp(np_log_sigmoid(z))


def np_cdpo(z, eps):
  return -(1 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z)


def np_log_odds(p):
  return p - np.log(1 - np.exp(p))


# The defaults the specification gives each option.
SPEC_DEFAULTS = {
  "exo_pair": {"label_smoothing": 1e-3},
  "discopop": {"discopop_tau": 0.05},
  "simpo": {"gamma": 0.5},
}


def np_reference(
  name, pc, pr, rc, rr, tau, label_smoothing=0.0, discopop_tau=0.05, gamma=0.5
):
  dc, dr = pc - rc, pr - rr
  h = dc - dr
  z = tau * h
  eps = label_smoothing
  if name == "ipo":
    return (h - 1 / (2 * tau)) ** 2
  if name == "dpo":
    return -np_log_sigmoid(z)
  if name == "cdpo":
    return np_cdpo(z, eps)
  if name == "robust":
    return (-(1 - eps) * np_log_sigmoid(z) + eps * np_log_sigmoid(-z)) / (
      1 - 2 * eps
    )
  if name == "hinge":
    return np.maximum(0.0, 1 - z)
  if name == "exo_pair":
    return np_sigmoid(z) * (np_log_sigmoid(z) - np.log(1 - eps)) + np_sigmoid(
      -z
    ) * (np_log_sigmoid(-z) - np.log(eps))
  if name == "nca_pair":
    return (
      -np_log_sigmoid(tau * dc)
      - 0.5 * np_log_sigmoid(-tau * dc)
      - 0.5 * np_log_sigmoid(-tau * dr)
    )
  if name == "bco_pair":
    return -np_log_sigmoid(tau * dc) - np_log_sigmoid(-tau * dr)
  if name == "sppo_hard":
    return (dc - 1 / (2 * tau)) ** 2 + (dr + 1 / (2 * tau)) ** 2
  if name == "apo_zero":
    return 1 - np_sigmoid(tau * dc) + np_sigmoid(tau * dr)
  if name == "apo_down":
    return np_sigmoid(tau * dc) + 1 - np_sigmoid(z)
  if name == "discopop":
    # The plain formula, in long double: e^{1e4} ≈ 1e4343 is representable
    # there, so m·e^{−z} needs no rewriting (unlike float64).
    zl = np.asarray(z, np.longdouble)
    with np.errstate(over="ignore"):  # e^{+huge} → inf → m = 0, correctly.
      m = 1 / (1 + np.exp(-zl / discopop_tau))
    value = (1 - m) * np.log1p(np.exp(-zl)) + m * np.exp(-zl)
    return value.astype(np.float64)
  if name == "aot":
    delta = np.sort(pc - pr) - np.sort(rc - rr)
    return np_cdpo(tau * delta, eps)
  if name == "aot_unpaired":
    return np_cdpo(tau * (np.sort(dc) - np.sort(dr)), eps)
  if name == "exponential":
    with np.errstate(over="ignore"):
      return np.exp(-z)
  if name == "truncated_quadratic":
    return np.maximum(0.0, 1 - z) ** 2
  if name == "savage":
    with np.errstate(over="ignore"):
      return 1 / (1 + np.exp(z)) ** 2
  if name == "simpo":
    return -np_log_sigmoid(tau * (pc - pr) - gamma)
  if name == "orpo":
    return -tau * np_log_sigmoid(np_log_odds(pc) - np_log_odds(pr))
  raise AssertionError(f"no NumPy reference for {name}")


# Four [batch] arrays of negative log-probs (valid for every loss).
random_logps = testing.random_logps


def extreme_logps():
  """Margins h of ±50, ±1e4 and exact ties, built from negative log-probs."""
  h = np.array([50.0, -50.0, 1e4, -1e4, 0.0, 0.0, 1e4, -1e4])
  pc = np.array([-1.0, -51.0, -0.5, -1e4, -3.0, -1e4, -1e-3, -2e4])
  rc = np.full_like(pc, -2.0)
  rr = np.full_like(pc, -2.0)
  pr = pc - h  # h = (pc − rc) − (pr − rr) since rc = rr.
  # Shift each pair's policy log-probs below zero; h does not change.
  shift = np.maximum(np.maximum(pc, pr), -0.5) + 0.5
  return pc - shift, pr - shift, rc, rr


def loss_of(name, tau=0.5, **extra):
  fn = losses.get_loss(name)
  opts = {**OPTIONS.get(name, {}), **extra}
  return lambda pc, pr, rc, rr: fn(pc, pr, rc, rr, tau=tau, **opts)


# ---------------------------------------------------------------------------
# Golden values.


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("tau", [0.05, 0.5, 2.0])
def test_golden_random_inputs_float64(name, tau):
  args = random_logps(seed=zlib.crc32(f"{name}{tau}".encode()))
  want = np_reference(name, *args, tau=tau, **OPTIONS.get(name, {}))
  with jax.enable_x64(True):
    got = loss_of(name, tau)(*map(jnp.asarray, args))
    assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_golden_random_inputs_float32(name):
  args = random_logps(seed=7)
  want = np_reference(name, *args, tau=0.3, **OPTIONS.get(name, {}))
  got = loss_of(name, 0.3)(*(jnp.asarray(a, jnp.float32) for a in args))
  assert got.dtype == jnp.float32 and got.shape == (16,)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_golden_extreme_inputs(name, tau):
  args = extreme_logps()
  if name == "orpo":
    # ORPO's log-odds need log-probs strictly below 0 and not so close to 0
    # that 1 − e^p underflows; the extreme margins stay.
    args = tuple(a - 1e-3 for a in args)
  want = np_reference(name, *args, tau=tau, **OPTIONS.get(name, {}))
  with jax.enable_x64(True):
    got = loss_of(name, tau)(*map(jnp.asarray, args))
  got32 = loss_of(name, tau)(*(jnp.asarray(a, jnp.float32) for a in args))
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(got32, want, rtol=1e-4, atol=1e-4)
  if name == "exponential":
    # e^{−τh} for τh = −1e3 is not representable: +inf, but never NaN.
    assert not np.any(np.isnan(got32))
    assert np.all(np.isfinite(got32) | (np.asarray(got32) == np.inf))
  else:
    assert np.all(np.isfinite(got32)), got32


@pytest.mark.parametrize("name", sorted(SPEC_DEFAULTS) + ["aot", "cdpo"])
def test_golden_with_default_options(name):
  args = random_logps(seed=21)
  want = np_reference(name, *args, tau=0.7, **SPEC_DEFAULTS.get(name, {}))
  with jax.enable_x64(True):
    got = losses.get_loss(name)(*map(jnp.asarray, args), tau=0.7)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_ipo_two_pair_example_by_hand():
  # h = (−1 − −1.5) − (−2 − −1.5) = 1; target 1/(2·0.5) = 1 → loss 0.
  # Second pair: h = −1 → (−1 − 1)² = 4.
  got = losses.ipo(
    jnp.array([-1.0, -2.0]),
    jnp.array([-2.0, -1.0]),
    jnp.array([-1.5, -1.5]),
    jnp.array([-1.5, -1.5]),
    tau=0.5,
  )
  np.testing.assert_allclose(got, [0.0, 4.0])


def test_dpo_applies_tau_once():
  # A peer applied β twice; at h = 2, τ = 0.5 the loss is −log σ(1).
  got = losses.dpo(
    jnp.array([0.0]),
    jnp.array([-2.0]),
    jnp.array([0.0]),
    jnp.array([0.0]),
    tau=0.5,
  )
  np.testing.assert_allclose(got, [np.log1p(np.exp(-1.0))], rtol=1e-6)


def test_cdpo_with_zero_smoothing_is_dpo_and_robust_too():
  args = tuple(map(jnp.asarray, random_logps(3)))
  dpo = losses.dpo(*args, tau=0.4)
  np.testing.assert_allclose(losses.cdpo(*args, tau=0.4), dpo, rtol=1e-6)
  np.testing.assert_allclose(losses.robust(*args, tau=0.4), dpo, rtol=1e-6)


# ---------------------------------------------------------------------------
# Gradients.


def h_derivative(name, h, tau, opts):
  """Closed-form dℓ/dh for losses that are functions of h alone."""
  z = tau * h
  s, sm = np_sigmoid(z), np_sigmoid(-z)
  eps = opts.get("label_smoothing", 0.0)
  if name == "ipo":
    return 2 * (h - 1 / (2 * tau))
  if name == "dpo":
    return -tau * sm
  if name == "cdpo":
    return tau * (-(1 - eps) * sm + eps * s)
  if name == "robust":
    return tau * (-(1 - eps) * sm - eps * s) / (1 - 2 * eps)
  if name == "hinge":
    return -tau * (z < 1)
  if name == "exo_pair":
    return tau * s * sm * (z - np.log((1 - eps) / eps))
  if name == "discopop":
    t = opts["discopop_tau"]
    mt, mtm = np_sigmoid(z / t), np_sigmoid(-z / t)
    dm = mt * mtm / t
    return tau * (
      -dm * -np_log_sigmoid(z) + mtm * -sm + dm * np.exp(-z) - mt * np.exp(-z)
    )
  if name == "exponential":
    return -tau * np.exp(-z)
  if name == "truncated_quadratic":
    return -2 * tau * np.maximum(0.0, 1 - z)
  if name == "savage":
    return -2 * tau * sm**2 * s
  return None


def log_ratio_derivatives(name, dc, dr, tau):
  """Closed-form (dℓ/dd_c, dℓ/dd_r) for losses of d_c and d_r separately."""
  ds = lambda x: np_sigmoid(x) * np_sigmoid(-x)  # σ'
  if name == "nca_pair":
    return (
      -tau * np_sigmoid(-tau * dc) + 0.5 * tau * np_sigmoid(tau * dc),
      0.5 * tau * np_sigmoid(tau * dr),
    )
  if name == "bco_pair":
    return -tau * np_sigmoid(-tau * dc), tau * np_sigmoid(tau * dr)
  if name == "sppo_hard":
    return 2 * (dc - 1 / (2 * tau)), 2 * (dr + 1 / (2 * tau))
  if name == "apo_zero":
    return -tau * ds(tau * dc), tau * ds(tau * dr)
  if name == "apo_down":
    h = dc - dr
    return tau * ds(tau * dc) - tau * ds(tau * h), tau * ds(tau * h)
  return None


H_ONLY = [
  n
  for n in ALL
  if h_derivative(
    n, np.zeros(1), 1.0, {"label_smoothing": 0.1, "discopop_tau": 0.3}
  )
  is not None
]
SEPARATE = ["nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down"]


def test_derivative_tables_cover_all_reference_losses():
  # aot* are checked against their rank-paired derivative below.
  assert set(H_ONLY) | set(SEPARATE) | {"aot", "aot_unpaired"} == set(
    REFERENCE_BASED
  )


def _grads(name, args, tau):
  fn = loss_of(name, tau)
  return jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2, 3))(*args)


@pytest.mark.parametrize("name", SEPARATE)
def test_closed_form_derivative_wrt_log_ratios(name):
  tau = 0.6
  with jax.enable_x64(True):
    args = tuple(map(jnp.asarray, random_logps(6)))
    g_pc, g_pr, g_rc, g_rr = map(np.asarray, _grads(name, args, tau))
  pc, pr, rc, rr = map(np.asarray, args)
  want_c, want_r = log_ratio_derivatives(name, pc - rc, pr - rr, tau)
  np.testing.assert_allclose(g_pc, want_c, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(g_rc, -want_c, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(g_pr, want_r, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(g_rr, -want_r, rtol=1e-9, atol=1e-12)


def test_ipo_derivative_formula_from_the_issue():
  # dℓ/dh = 2(h − 1/(2τ)), at h = 3, τ = 0.25: 2(3 − 2) = 2.
  g = jax.grad(
    lambda pc: losses.ipo(
      pc, jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), tau=0.25
    ).sum()
  )(jnp.array([3.0]))
  np.testing.assert_allclose(g, [2.0])


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_aot_derivative_is_rank_paired_cdpo(name):
  tau, eps = 0.6, OPTIONS[name]["label_smoothing"]
  with jax.enable_x64(True):
    args = tuple(map(jnp.asarray, random_logps(8)))
    g_pc, g_pr, _, _ = map(np.asarray, _grads(name, args, tau))
  pc, pr, rc, rr = map(np.asarray, args)
  a, b = (pc - pr, rc - rr) if name == "aot" else (pc - rc, pr - rr)
  rank_a, rank_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  delta = np.sort(a) - np.sort(b)
  z = tau * delta
  dcdpo = tau * (-(1 - eps) * np_sigmoid(-z) + eps * np_sigmoid(z))  # dℓ/dδ
  if name == "aot":
    # a = pc − pr: pc_i and pr_i move a_i; b does not depend on the policy.
    np.testing.assert_allclose(g_pc, dcdpo[rank_a], rtol=1e-9)
    np.testing.assert_allclose(g_pr, -dcdpo[rank_a], rtol=1e-9)
  else:
    np.testing.assert_allclose(g_pc, dcdpo[rank_a], rtol=1e-9)
    np.testing.assert_allclose(g_pr, -dcdpo[rank_b], rtol=1e-9)


def test_simpo_and_orpo_derivatives():
  tau, gamma = 0.6, OPTIONS["simpo"]["gamma"]
  with jax.enable_x64(True):
    pc, pr, _, _ = map(jnp.asarray, random_logps(9))
    g_s = jax.grad(
      lambda a, b: losses.simpo(a, b, tau=tau, gamma=gamma).sum(),
      argnums=(0, 1),
    )(pc, pr)
    g_o = jax.grad(
      lambda a, b: losses.orpo(a, b, tau=tau).sum(), argnums=(0, 1)
    )(pc, pr)
  pc, pr = np.asarray(pc), np.asarray(pr)
  want = -tau * np_sigmoid(-(tau * (pc - pr) - gamma))
  np.testing.assert_allclose(g_s[0], want, rtol=1e-9)
  np.testing.assert_allclose(g_s[1], -want, rtol=1e-9)
  # d lo(p)/dp = 1/(1 − e^p).
  outer = -tau * np_sigmoid(-(np_log_odds(pc) - np_log_odds(pr)))
  np.testing.assert_allclose(g_o[0], outer / (1 - np.exp(pc)), rtol=1e-9)
  np.testing.assert_allclose(g_o[1], -outer / (1 - np.exp(pr)), rtol=1e-9)


# ---------------------------------------------------------------------------
# The properties every loss shares, checked by psipo_jax.testing: output
# shape [B] and unreduced; jit == eager; float32 maths for half-precision
# inputs (float64 under x64); τ and options traced under jit and vmap without
# retracing; finite values and gradients at extreme inputs, float32 and
# float64, τ from 1e-3 to 1e3; check_grads to order 2 in float64; shift
# invariance; reference-free losses ignore the reference; the closed-form
# derivative in h (H_ONLY). Each failure names the property and the inputs.

OPTION_GRID = {
  "label_smoothing": [0.01, 0.2, 0.3],
  "discopop_tau": [0.05, 0.3, 1.0],
  "gamma": [0.0, 0.5, 2.0],
}
# The shift invariances each loss has (testing.SHIFT_KINDS): functions of h
# alone have all three, functions of d_c and d_r all but "pair", SimPO is a
# function of π_c − π_r, ORPO of neither.
SHIFT_INVARIANCE = {
  **{n: ("all", "log_ratio", "pair") for n in H_ONLY + ["aot", "aot_unpaired"]},
  **{n: ("all", "log_ratio") for n in SEPARATE},
  "simpo": ("all", "pair"),
  "orpo": (),
}


def test_shift_invariance_table_covers_all_losses():
  assert sorted(SHIFT_INVARIANCE) == ALL


@pytest.mark.parametrize("name", ALL)
def test_shared_loss_properties(name):
  dloss_dh = None
  if name in H_ONLY:
    dloss_dh = lambda h, *, tau, **opts: h_derivative(name, h, tau, opts)
  testing.check_pairwise_loss(
    name,
    options=OPTIONS.get(name),
    option_grid={k: OPTION_GRID[k] for k in losses.loss_option_names(name)},
    dloss_dh=dloss_dh,
    shift_invariance=SHIFT_INVARIANCE[name],
    # e^{−τh} is not representable for τh below about −88 (float32).
    allow_inf=name == "exponential",
  )


def test_orpo_gradient_finite_at_zero_log_prob_under_jit():
  grad = jax.jit(
    jax.grad(lambda pc: losses.orpo(pc, jnp.array([-1.0]), tau=1.0).sum())
  )(jnp.array([0.0]))
  assert np.isfinite(grad[0])


# ---------------------------------------------------------------------------
# Errors.


def test_unknown_loss_lists_valid_names():
  with pytest.raises(ValueError, match="Unknown loss 'ipp'.*dpo.*ipo"):
    losses.get_loss("ipp")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_non_positive_tau_names_tau(name, tau):
  args = random_logps(1)
  with pytest.raises(ValueError, match="tau"):
    losses.get_loss(name)(*args, tau=tau)


@pytest.mark.parametrize(
  "name,eps",
  [
    ("cdpo", -0.1),
    ("cdpo", 1.5),
    ("robust", 0.5),
    ("robust", -0.01),
    ("exo_pair", 0.0),
    ("exo_pair", 1.0),
    ("aot", 2.0),
    ("aot_unpaired", -1.0),
  ],
)
def test_label_smoothing_out_of_range_names_it(name, eps):
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.get_loss(name)(*random_logps(1), tau=0.1, label_smoothing=eps)


@pytest.mark.parametrize("value", [None, "0.1", [0.1, 0.2], float("inf")])
def test_non_numeric_or_non_scalar_tau_is_named(value):
  with pytest.raises(ValueError, match="tau"):
    losses.dpo(*random_logps(1), tau=value)


@pytest.mark.parametrize(
  "name,option",
  [
    ("cdpo", "label_smoothing"),
    ("discopop", "discopop_tau"),
    ("simpo", "gamma"),
  ],
)
@pytest.mark.parametrize("value", [None, "x", float("nan")])
def test_non_numeric_option_is_named(name, option, value):
  with pytest.raises(ValueError, match=option):
    losses.get_loss(name)(*random_logps(1), tau=0.1, **{option: value})


def test_value_that_rounds_onto_a_bound_in_float32_is_rejected():
  # 0.4999999999 is 0.5 in float32, where robust divides by zero.
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.robust(*random_logps(1), tau=0.1, label_smoothing=0.4999999999)
  with pytest.raises(ValueError, match="tau"):
    losses.ipo(*random_logps(1), tau=1e-50)


@pytest.mark.parametrize("name", REFERENCE_BASED)
def test_missing_reference_is_named(name):
  pc, pr, rc, _ = random_logps(1)
  with pytest.raises(ValueError, match="ref_rejected_logps is None"):
    losses.get_loss(name)(pc, pr, rc, None, tau=0.1)


def test_discopop_tau_must_be_positive():
  with pytest.raises(ValueError, match="discopop_tau"):
    losses.discopop(*random_logps(1), tau=0.1, discopop_tau=0.0)


@pytest.mark.parametrize("name", ALL)
def test_mismatched_shapes_are_rejected(name):
  pc, pr, rc, rr = random_logps(2)
  with pytest.raises(ValueError, match="shape"):
    losses.get_loss(name)(pc, pr[:-1], rc, rr, tau=0.1)


@pytest.mark.parametrize("name", ALL)
def test_integer_input_names_the_argument(name):
  pc, pr, rc, rr = random_logps(2)
  with pytest.raises(ValueError, match="policy_rejected_logps.*floating"):
    losses.get_loss(name)(pc, pr.astype(np.int32), rc, rr, tau=0.1)


def test_two_dimensional_input_is_rejected():
  pc = np.zeros((2, 3), np.float32)
  with pytest.raises(
    ValueError, match=r"policy_chosen_logps must have shape \[B\]"
  ):
    losses.dpo(pc, pc, pc, pc, tau=0.1)


@pytest.mark.parametrize("bad", [0.0, 0.3])
def test_orpo_rejects_non_negative_log_probs(bad):
  pc, pr, _, _ = random_logps(2)
  pr = pr.copy()
  pr[3] = bad
  with pytest.raises(ValueError, match="policy_rejected_logps < 0"):
    losses.orpo(pc, pr, tau=0.1)


def test_unknown_option_is_a_type_error():
  with pytest.raises(TypeError, match="label_smoothing"):
    losses.ipo(*random_logps(1), tau=0.1, label_smoothing=0.1)


def test_loss_option_names():
  assert losses.loss_option_names("ipo") == ()
  assert losses.loss_option_names("cdpo") == ("label_smoothing",)
  assert losses.loss_option_names("discopop") == ("discopop_tau",)
  assert losses.loss_option_names("simpo") == ("gamma",)


# ---------------------------------------------------------------------------
# The registry: built-ins are plain functions; users register their own.


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_builtin_loss_is_defined_with_its_public_signature(name):
  fn = losses.get_loss(name)
  code = fn.__code__  # The def that runs, not a wrapper around another one.
  assert code.co_varnames[: code.co_argcount] == (
    "policy_chosen_logps",
    "policy_rejected_logps",
    "ref_chosen_logps",
    "ref_rejected_logps",
  )
  assert "tau" in code.co_varnames[code.co_argcount :][: code.co_kwonlyargcount]
  assert not hasattr(fn, "__wrapped__")
  assert fn.__name__ == name and fn.__module__ == "psipo_jax.losses"
  assert fn.__annotations__["tau"] == "ArrayLike"
  assert losses._check_signature(
    fn,
    reference_free=name in losses.REFERENCE_FREE,
    batch_fields=losses.BATCH_FIELDS.get(name, ()),
  ) == losses.loss_option_names(name)


@pytest.fixture
def clean_registry():
  """Undoes every registration a test makes."""
  before = (
    dict(losses.LOSSES),
    set(losses.REFERENCE_FREE),
    set(losses.BATCH_COUPLED),
    dict(losses.BATCH_FIELDS),
  )
  yield
  for name in set(losses.LOSSES) - set(before[0]):
    losses.unregister(name)
  assert (
    losses.LOSSES,
    losses.REFERENCE_FREE,
    losses.BATCH_COUPLED,
    losses.BATCH_FIELDS,
  ) == before


def _user_loss(
  policy_chosen_logps,
  policy_rejected_logps,
  ref_chosen_logps,
  ref_rejected_logps,
  *,
  tau,
  margin=0.25,
):
  h = (policy_chosen_logps - ref_chosen_logps) - (
    policy_rejected_logps - ref_rejected_logps
  )
  return jax.nn.softplus(margin - tau * h)


def test_registered_loss_is_usable_by_name(clean_registry):
  assert losses.register("user_softplus")(_user_loss) is _user_loss
  assert losses.get_loss("user_softplus") is _user_loss
  assert losses.LOSSES["user_softplus"] is _user_loss
  assert losses.loss_option_names("user_softplus") == ("margin",)
  assert "user_softplus" not in losses.REFERENCE_FREE | losses.BATCH_COUPLED
  with pytest.raises(ValueError, match="Unknown loss 'ipp'.*user_softplus"):
    losses.get_loss("ipp")
  pc, pr, rc, rr = random_logps(3)
  np.testing.assert_allclose(
    losses.get_loss("user_softplus")(pc, pr, rc, rr, tau=0.5, margin=0.1),
    np.logaddexp(0.0, 0.1 - 0.5 * ((pc - rc) - (pr - rr))),
    rtol=1e-6,
  )
  assert losses.unregister("user_softplus") is _user_loss
  with pytest.raises(ValueError, match="Unknown loss 'user_softplus'"):
    losses.get_loss("user_softplus")


def test_register_records_reference_free_and_batch_coupled(clean_registry):

  @losses.register("user_free", reference_free=True, batch_coupled=True)
  def user_free(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    tau,
  ):
    del ref_chosen_logps, ref_rejected_logps
    gap = tau * (policy_chosen_logps - policy_rejected_logps)
    return -jax.nn.log_sigmoid(jnp.sort(gap))

  assert "user_free" in losses.REFERENCE_FREE
  assert "user_free" in losses.BATCH_COUPLED
  losses.unregister("user_free")
  assert "user_free" not in losses.REFERENCE_FREE | losses.BATCH_COUPLED


@pytest.mark.parametrize(
  "name,kind", [("dpo", "built-in"), ("user_taken", "registered")]
)
def test_register_refuses_a_taken_name_naming_both(clean_registry, name, kind):
  losses.register("user_taken")(_user_loss)

  def another(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    tau,
  ):
    return _user_loss(
      policy_chosen_logps,
      policy_rejected_logps,
      ref_chosen_logps,
      ref_rejected_logps,
      tau=tau,
    )

  existing = losses.get_loss(name)
  with pytest.raises(
    ValueError,
    match=(
      rf"Cannot register .*another as loss '{name}': that name is taken by"
      rf" the {kind} loss .*{existing.__qualname__}"
    ),
  ):
    losses.register(name)(another)
  assert losses.get_loss(name) is existing


def test_registering_the_same_definition_again_replaces_it(clean_registry):
  # What a module reload does: a new function object, same module and name.
  def make():
    def reloaded(
      policy_chosen_logps,
      policy_rejected_logps,
      ref_chosen_logps,
      ref_rejected_logps,
      *,
      tau,
    ):
      del policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
      return tau * policy_chosen_logps

    return reloaded

  first, second = make(), make()
  losses.register("user_reloaded")(first)
  losses.register("user_reloaded")(second)
  assert losses.get_loss("user_reloaded") is second


_FOUR = (
  "policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,"
  " ref_rejected_logps"
)


@pytest.mark.parametrize(
  "params,reference_free,match",
  [
    (
      "chosen, rejected, ref_chosen, ref_rejected, *, tau",
      False,
      r"positional parameters \(chosen, rejected, ref_chosen, ref_rejected\)",
    ),
    (
      "policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, *, tau",
      False,
      "positional parameters",
    ),
    (
      "policy_rejected_logps, policy_chosen_logps, ref_chosen_logps,"
      " ref_rejected_logps, *, tau",
      False,
      "in that order",
    ),
    (_FOUR + ", tau", False, "positional parameters"),
    (_FOUR + ", *, beta", False, "no keyword-only parameter tau"),
    (_FOUR + ", *, tau=0.1", False, "tau must not have a default"),
    (_FOUR + ", *, tau, margin", False, "option margin needs a default"),
    (_FOUR + ", *, tau, **options", False, r"takes \*\*options"),
    ("*logps, tau", False, r"takes \*logps"),
    (
      _FOUR + ", *, tau, normalize=0.0",
      False,
      "option normalize clashes with the config key loss.normalize",
    ),
    (
      "policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,"
      " ref_rejected_logps=None, *, tau",
      False,
      "ref_chosen_logps has a default, but only a reference-free loss",
    ),
    (_FOUR + ", *, tau", True, "ref_chosen_logps must default to None"),
  ],
)
def test_register_rejects_a_bad_signature_naming_the_function(
  clean_registry, params, reference_free, match
):
  namespace = {}
  exec(f"def bad_loss({params}):\n  return 0.0", namespace)  # pylint: disable=exec-used
  with pytest.raises(TypeError, match=rf"Loss function .*bad_loss.*{match}"):
    losses.register("user_bad", reference_free=reference_free)(
      namespace["bad_loss"]
    )
  assert "user_bad" not in losses.LOSSES


def test_register_rejects_a_non_callable_and_bad_names(clean_registry):
  with pytest.raises(TypeError, match="is not callable"):
    losses.register("user_bad")(0.5)
  for name in ["my-loss", "", "1st", None]:
    with pytest.raises(ValueError, match="must be a Python identifier"):
      losses.register(name)
  with pytest.raises(TypeError, match="reference_free must be a bool"):
    losses.register("user_bad", reference_free="yes")


def test_unregister_refuses_builtins_and_unknown_names():
  with pytest.raises(ValueError, match="'ipo' is a built-in loss"):
    losses.unregister("ipo")
  with pytest.raises(ValueError, match="No registered loss 'nope'"):
    losses.unregister("nope")


# ---------------------------------------------------------------------------
# import_loss_module: the user's module that registers losses.

_MODULE_SOURCE = """
from psipo_jax import losses


@losses.register({name!r})
def loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
         ref_rejected_logps, *, tau, margin=0.0):
  h = ((policy_chosen_logps - ref_chosen_logps)
       - (policy_rejected_logps - ref_rejected_logps))
  return (tau * h - margin) ** 2
"""


@pytest.fixture
def user_module_dir(tmp_path, monkeypatch, clean_registry):
  """A directory on sys.path; modules imported from it are forgotten after."""
  monkeypatch.syspath_prepend(str(tmp_path))
  before = set(sys.modules)
  yield tmp_path
  for name in set(sys.modules) - before:
    if name.startswith("user_losses"):
      del sys.modules[name]


def test_import_loss_module_by_dotted_name(user_module_dir):
  package = user_module_dir / "user_losses_pkg"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "mine.py").write_text(_MODULE_SOURCE.format(name="user_dotted"))
  module = losses.import_loss_module("user_losses_pkg.mine")
  assert losses.get_loss("user_dotted") is module.loss
  assert losses.loss_option_names("user_dotted") == ("margin",)
  # A second import (another entry point in the same process) is a no-op.
  assert losses.import_loss_module("user_losses_pkg.mine") is module


def test_import_loss_module_by_file_path(user_module_dir):
  path = user_module_dir / "user_losses_file.py"
  path.write_text(_MODULE_SOURCE.format(name="user_file"))
  module = losses.import_loss_module(str(path))
  assert module.__name__ == "user_losses_file"
  assert losses.get_loss("user_file") is module.loss
  assert losses.import_loss_module(str(path)) is module
  other = user_module_dir / "elsewhere"
  other.mkdir()
  (other / "user_losses_file.py").write_text("")
  with pytest.raises(
    ValueError,
    match="a different module named 'user_losses_file' is already imported",
  ):
    losses.import_loss_module(str(other / "user_losses_file.py"))


@pytest.mark.parametrize(
  "module,match",
  [
    (
      "user_losses_missing",
      "no module named 'user_losses_missing'.*PYTHONPATH",
    ),
    ("user_losses_nopkg.sub", "no module named 'user_losses_nopkg'"),
    ("/nonexistent/user_losses.py", "no such file"),
    ("", "expected a module name"),
  ],
)
def test_import_loss_module_missing_names_the_config_key(
  user_module_dir, module, match
):
  with pytest.raises(ValueError, match=rf"loss\.module={module!r}: {match}"):
    losses.import_loss_module(module)


def test_import_loss_module_error_inside_the_module_propagates_with_a_note(
  user_module_dir,
):
  (user_module_dir / "user_losses_broken.py").write_text(
    "import user_losses_dependency_that_is_missing\n"
  )
  with pytest.raises(ModuleNotFoundError) as info:
    losses.import_loss_module("user_losses_broken")
  assert "loss.module='user_losses_broken'" in "".join(info.value.__notes__)
  # A bad registration inside the module: its TypeError, with the note.
  path = user_module_dir / "user_losses_badsig.py"
  path.write_text(
    "from psipo_jax import losses\n"
    "@losses.register('user_badsig')\n"
    "def f(a, b, c, d, *, tau):\n  return a\n"
  )
  with pytest.raises(
    TypeError, match="user_losses_badsig.f takes the positional parameters"
  ) as info:
    losses.import_loss_module(str(path))
  assert f"loss.module={str(path)!r}" in "".join(info.value.__notes__)
  assert "user_losses_badsig" not in sys.modules  # A retry runs it again.
