"""Tests of the bandit sweep runner (psipo_jax.bandit: runner, analysis, CLI).

The paper-protocol assertions share ONE sweep (D1, printed D3 and the
two-action example; DPO and IPO; 6 τ; 10 seeds; 18,000 steps), which compiles
once and trains 360 runs in a few seconds.
"""

import importlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from psipo_jax import bandit
from psipo_jax import psi
from psipo_jax.bandit import analysis as bandit_analysis
from psipo_jax.bandit import experiment
from psipo_jax.bandit import runner

TAUS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
SEEDS = tuple(range(10))
A, B, C = 0, 1, 2


def _uniform(k):
  return np.full(k, 1.0 / k)


D1 = bandit.Dataset(
  "D1", 3, _uniform(3), pairs=np.array([[A, B], [B, C], [A, C]])
)
D3 = bandit.Dataset("D3", 3, _uniform(3), pairs=np.array([[A, B], [B, A]]))
TWO_ACTION = bandit.Dataset("two", 2, _uniform(2), pairs=np.array([[0, 1]]))
DPO, IPO = bandit.LossSpec("dpo"), bandit.LossSpec("ipo")
ADAM = bandit.OptimizerSpec("adam", (("learning_rate", 0.01),))
# The paper's protocol (experiments/common.py), spelled out: the runner has
# no defaults of its own.
PROTOCOL = dict(
  total_steps=18_000, batch_size=9, record_every=100, optimizer=ADAM
)


@pytest.fixture(scope="module")
def paper_sweep():
  return bandit.run_sweep(
    [D1, D3, TWO_ACTION], [DPO, IPO], TAUS, SEEDS, **PROTOCOL
  )


def _final(result, **where):
  idx = result.select(**where)
  assert idx.size, where
  return result.probs[idx, -1]  # [S, K_max]


# ---------------------------------------------------------------------------
# The paper's protocol.


@pytest.mark.parametrize("tau", [t for t in TAUS if t >= 0.1])
def test_ipo_on_d1_matches_closed_form(paper_sweep, tau):
  # Hand-derived: the least squares h_ab = h_bc = h_ac = 1/(2τ) on the three
  # pairs gives θ ∝ (2, 1, 0)/(3τ).
  expected = np.array([math.exp(2 / (3 * tau)), math.exp(1 / (3 * tau)), 1.0])
  expected /= expected.sum()
  final = _final(paper_sweep, loss="ipo", dataset="D1", tau=tau)
  np.testing.assert_allclose(final.mean(axis=0), expected, atol=0.005)
  np.testing.assert_allclose(
    final, np.broadcast_to(expected, final.shape), atol=0.02
  )
  closed = bandit_analysis.closed_form(D1, IPO, tau)
  np.testing.assert_allclose(closed.policy, expected, rtol=1e-5)


@pytest.mark.parametrize("tau", [t for t in TAUS if t >= 0.1])
def test_ipo_on_two_actions_matches_closed_form(paper_sweep, tau):
  expected = 1.0 / (1.0 + math.exp(-1.0 / (2 * tau)))  # σ(1/(2τ)), §5.3.1
  final = _final(paper_sweep, loss="ipo", dataset="two", tau=tau)
  # One pair only: every mini-batch is the same, no noise across seeds.
  np.testing.assert_allclose(final[:, 0], expected, atol=0.01)
  assert np.all(np.isnan(final[:, 2]))  # K = 2 padded to K_max = 3.


def test_dpo_on_d1_goes_greedy_for_every_tau(paper_sweep):
  for tau in TAUS:
    final = _final(paper_sweep, loss="dpo", dataset="D1", tau=tau)
    assert np.all(final[:, 0] > 0.99), (tau, final[:, 0].min())
  note = bandit_analysis.closed_form(D1, DPO, 1.0)
  assert note.policy is None
  assert "no finite minimiser" in note.note and "never loses: a" in note.note


def test_printed_d3_cannot_move_pi_c(paper_sweep):
  # θ_c gets no gradient and Adam keeps θ_a + θ_b, so π(y_c) = 1/3 exactly
  # would need θ_a = θ_b; it can only fall as far as θ_a − θ_b spreads.
  for loss in ("dpo", "ipo"):
    final = _final(paper_sweep, loss=loss, dataset="D3", tau=0.05)
    assert np.all(final[:, 2] > 0.3), (loss, final[:, 2].min())
  idx = paper_sweep.select(dataset="D3")
  assert not paper_sweep.nonfinite_steps[idx].any()


def test_run_inside_sweep_equals_run_alone(paper_sweep):
  for dataset, loss, tau, seed in [(D1, DPO, 0.25, 3), (D3, IPO, 0.1, 7)]:
    alone = bandit.run_stepwise(dataset, loss, tau, seed, **PROTOCOL)
    idx = paper_sweep.select(
      loss=loss.label, dataset=dataset.name, tau=tau, seed=seed
    )
    np.testing.assert_allclose(
      paper_sweep.probs[idx[0], :, :3], alone, atol=2e-5, rtol=0
    )


def test_sweep_compiles_once_when_values_change():
  traces = []
  original = runner._sampled_objective

  def counting(spec):
    traces.append(spec.name)
    return original(spec)

  runner._sampled_objective = counting
  try:
    kwargs = dict(
      total_steps=200, batch_size=9, record_every=100, optimizer=ADAM
    )
    first = bandit.run_sweep([D1], [IPO], (0.1, 0.2), (0, 1), **kwargs)
    other = bandit.Dataset(
      "D1",
      3,
      np.array([0.5, 0.3, 0.2]),
      pairs=np.array([[C, B], [B, A], [C, A]]),
    )
    second = bandit.run_sweep([other], [IPO], (0.7, 3.0), (5, 9), **kwargs)
  finally:
    runner._sampled_objective = original
  assert traces == ["ipo"]  # Traced once; new τ, seeds, data: no retrace.
  assert not np.allclose(first.probs, second.probs)
  np.testing.assert_allclose(
    second.probs[:, 0], np.tile([0.5, 0.3, 0.2], (4, 1)), rtol=1e-6
  )


# ---------------------------------------------------------------------------
# Population losses and closed forms.


def test_population_losses_reach_psipo_optima():
  win = 0.8
  rps = [[0.5, 1 - win, win], [win, 0.5, 1 - win], [1 - win, win, 0.5]]
  mu = np.array([0.5, 0.3, 0.2])
  rewards = np.array([1.0, 0.0, -1.0])
  bt = 1.0 / (1.0 + np.exp(-(rewards[:, None] - rewards[None, :])))
  datasets = [
    bandit.Dataset("rps", 3, _uniform(3), preference=np.array(rps), mu=mu),
    bandit.Dataset("bt", 3, _uniform(3), preference=bt),
  ]
  specs = [bandit.LossSpec("ipo_population"), bandit.LossSpec("dpo_population")]
  result = bandit.run_sweep(
    datasets,
    specs,
    (0.5, 1.0),
    (0, 1, 2),
    total_steps=4000,
    batch_size=9,
    record_every=1000,
    optimizer=ADAM,
  )
  assert len(result.runs) == 8  # Deterministic: one seed per (loss, data, τ).
  for tau in (0.5, 1.0):
    # Eq. 7 by hand: π ∝ exp(g/τ), g(y) = E_{y'~μ} Ψ(p(y ≻ y')).
    g_rps = np.array(rps) @ mu  # The diagonal holds p(y ≻ y) = 1/2.
    ipo_expected = np.exp(g_rps / tau) / np.exp(g_rps / tau).sum()
    got = _final(result, loss="ipo_population", dataset="rps", tau=tau)[0]
    np.testing.assert_allclose(got, ipo_expected, atol=1e-3)
    # Bradley–Terry: DPO's optimum is π ∝ exp(E_μ[r(y) − r(y')]/τ).
    dpo_expected = np.exp(rewards / tau) / np.exp(rewards / tau).sum()
    got = _final(result, loss="dpo_population", dataset="bt", tau=tau)[0]
    np.testing.assert_allclose(got, dpo_expected, atol=2e-3)
  # On the cycle DPO's population minimiser is NOT the logit-Ψ optimum.
  got = _final(result, loss="dpo_population", dataset="rps", tau=0.5)[0]
  closed = bandit_analysis.closed_form(datasets[0], specs[1], 0.5)
  assert np.abs(got - closed.policy).max() > 0.01


@pytest.mark.parametrize("psi_map", ["logit", "identity", lambda q: q**3])
def test_psi_regression_reaches_the_optimum_of_its_own_psi(psi_map):
  # Eq. 11 with any Ψ: the runner used to crash converting Ψ to a float.
  rewards = np.array([0.5, 0.0, -0.5])
  bt = 1.0 / (1.0 + np.exp(-(rewards[:, None] - rewards[None, :])))
  data = bandit.Dataset(
    "bt",
    3,
    np.array([0.5, 0.3, 0.2]),
    preference=bt,
    mu=np.array([0.2, 0.3, 0.5]),
  )
  spec = bandit.LossSpec("psi_regression", options=(("psi", psi_map),))
  result = bandit.run_sweep(
    [data],
    [spec],
    (0.5, 2.0),
    (0,),
    total_steps=3000,
    batch_size=1,
    record_every=1000,
    optimizer=bandit.OptimizerSpec("adam", (("learning_rate", 0.05),)),
  )
  for tau in (0.5, 2.0):
    expected = psi.optimal_policy(bt, data.pi_ref, data.mu, tau, psi=psi_map)
    got = _final(result, loss="psi_regression", dataset="bt", tau=tau)[0]
    np.testing.assert_allclose(got, expected, atol=1e-3)
  if psi_map == "logit":
    # Under Bradley–Terry the logit-Ψ optimum is π_ref·exp(r/τ)/Z.
    want = data.pi_ref * np.exp(rewards / 0.5)
    np.testing.assert_allclose(
      _final(result, loss="psi_regression", dataset="bt", tau=0.5)[0],
      want / want.sum(),
      atol=1e-3,
    )


def test_psi_regression_refuses_an_infinite_target():
  # A logit Ψ on a deterministic preference has g = ∞: no finite minimiser.
  data = bandit.Dataset(
    "det", 2, _uniform(2), preference=np.array([[0.5, 1.0], [0.0, 0.5]])
  )
  spec = bandit.LossSpec("psi_regression", options=(("psi", "logit"),))
  with pytest.raises(ValueError, match="no finite minimiser"):
    bandit.run_sweep(
      [data],
      [spec],
      (1.0,),
      (0,),
      total_steps=10,
      batch_size=1,
      record_every=10,
      optimizer=ADAM,
    )


def test_mean_and_ci_uses_student_t():
  values = np.array([[1.0], [2.0], [3.0]])
  mean, ci = bandit_analysis.mean_and_ci(values)
  # t_{0.975, 2} = 4.3027; standard error 1/√3.
  np.testing.assert_allclose(mean, [2.0])
  np.testing.assert_allclose(ci, [4.302653 / math.sqrt(3)], rtol=1e-5)


# ---------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: bandit.LossSpec("nope"), "Unknown loss 'nope'"),
    (
      lambda: bandit.LossSpec("ipo", options=(("label_smoothing", 0.1),)),
      "loss.label_smoothing is not an option of loss 'ipo'",
    ),
    (
      lambda: bandit.run_sweep(
        [D1],
        [bandit.LossSpec("ipo_population")],
        (1.0,),
        (0,),
        total_steps=10,
        batch_size=9,
        record_every=10,
        optimizer=ADAM,
      ),
      "needs a known preference matrix; dataset 'D1'",
    ),
    (
      lambda: bandit.run_sweep(
        [D1],
        [IPO],
        (1.0,),
        (0,),
        total_steps=150,
        batch_size=9,
        record_every=100,
        optimizer=ADAM,
      ),
      "multiple of record_every",
    ),
    (
      lambda: experiment.dataset_from_config(
        "D9", {"pairs": [[0, 1]], "pi": 1}
      ),
      r"unknown config key datasets.D9.pi \(did you mean datasets.D9.pi_ref\?\)",
    ),
    (
      lambda: bandit.LossSpec("psi_regression", options=(("psi", "logitt"),)),
      "Unknown psi 'logitt'",
    ),
  ],
)
def test_bad_input_names_the_culprit(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize(
  "name, arg",
  [
    ("paper_figures", None),
    ("paper_figures", "printed"),
    ("paper_figures", "runlocal"),
    ("bandit_d3_readings", None),
    ("bandit_population", None),
    ("bandit_population", "runlocal"),
    ("bandit_kto_rebel", None),
    ("bandit_kto_rebel", "runlocal"),
  ],
)
def test_experiment_configs_build(name, arg):
  config = importlib.import_module(f"experiments.{name}").get_config(arg)
  datasets, loss_specs, kwargs = experiment.sweep_from_config(config)
  names = {d.name for d in datasets}
  assert names and loss_specs and kwargs["taus"]
  for fig in config.figures.values():
    assert fig.dataset in names
  if name == "paper_figures":
    assert kwargs["total_steps"] == (2_000 if arg == "runlocal" else 18_000)
    pairs = {d.name: d.pairs.tolist() for d in datasets}
    assert pairs["D1"] == [[A, B], [B, C], [A, C]]
    assert pairs["D3"] == [[A, B], [B, A]]


@pytest.mark.slow
def test_command_line_writes_results_and_figures(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "psipo_jax.bandit",
      "--config=experiments/paper_figures.py:runlocal",
      f"--workdir={tmp_path}",
      "--config.total_steps=200",
      "--config.num_seeds=2",
      f"--copy_figures_to={tmp_path / 'copies'}",
    ],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=300,
    env={
      **os.environ,
      "PYTHONPATH": os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")])
      ),
    },
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "IPO least squares" in out.stdout and "Figures:" in out.stdout
  for name in (
    "results.npz",
    "final.csv",
    "summary.csv",
    "config.json",
    "figures/fig1_D1.png",
    "figures/fig1_D1.pdf",
    "copies/fig2_D3_printed.png",
  ):
    assert (tmp_path / name).exists(), name
  saved = np.load(tmp_path / "results.npz")
  assert saved["probs"].shape == (2 * 3 * 6 * 2, 3, 3)


def test_non_finite_steps_are_counted_and_their_updates_dropped():
  # e^{−τh} overflows once h < −88/τ. On the cycle a≻b≻c≻a a huge SGD step
  # that raises one pair's margin sinks the next one's there.
  cycle = bandit.Dataset(
    "D2", 3, _uniform(3), pairs=np.array([[A, B], [B, C], [C, A]])
  )
  result = bandit.run_sweep(
    [cycle],
    [bandit.LossSpec("exponential")],
    taus=(50.0,),
    seeds=(0,),
    total_steps=20,
    batch_size=3,
    record_every=10,
    optimizer=bandit.OptimizerSpec("sgd", (("learning_rate", 1e3),)),
  )
  assert result.nonfinite_steps[0] > 0
  assert np.all(np.isfinite(result.probs[0]))


def test_optimizer_block_is_the_training_systems():
  # Same keys and checks as psipo_jax.optimizers: a schedule works, a typo
  # fails before compiling, naming the key.
  bandit.run_sweep(
    [D1],
    [bandit.LossSpec("ipo")],
    taus=(1.0,),
    seeds=(0,),
    total_steps=20,
    batch_size=3,
    record_every=10,
    optimizer=bandit.OptimizerSpec(
      "adam", (("learning_rate", 0.1), ("schedule", "cosine"))
    ),
  )
  with pytest.raises(ValueError, match="optimizer.bta1 is not an option"):
    bandit.run_sweep(
      [D1],
      [bandit.LossSpec("ipo")],
      taus=(1.0,),
      seeds=(0,),
      total_steps=20,
      batch_size=3,
      record_every=10,
      optimizer=bandit.OptimizerSpec(
        "adam", (("learning_rate", 0.1), ("bta1", 0.9))
      ),
    )


# ---------------------------------------------------------------------------
# REBEL and KTO in the runner.


def _bradley_terry(rewards):
  r = np.asarray(rewards, np.float64)
  return 1.0 / (1.0 + np.exp(-(r[:, None] - r[None, :])))


def test_rebel_reaches_pi_ref_exp_r_over_tau():
  rewards = np.array([1.0, 0.0, -0.5])
  pi_ref = np.array([0.2, 0.5, 0.3])
  d1_bt = bandit.Dataset(
    "D1_bt",
    3,
    pi_ref,
    pairs=np.array([[A, B], [B, C], [A, C]]),
    preference=_bradley_terry(rewards),
  )
  rebel = bandit.LossSpec("rebel")
  taus = (0.5, 1.0, 2.0)
  result = bandit.run_sweep(
    [d1_bt], [rebel], taus, (0, 1), **{**PROTOCOL, "total_steps": 6_000}
  )
  for tau in taus:
    want = pi_ref * np.exp(rewards / tau)
    want /= want.sum()
    got = _final(result, loss="rebel", tau=tau)
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=0.01)
    closed = bandit_analysis.closed_form(d1_bt, rebel, tau)
    np.testing.assert_allclose(closed.policy, want, rtol=1e-12)
  assert not np.any(result.nonfinite_steps)


def test_rebel_needs_a_finite_reward_difference():
  with pytest.raises(ValueError, match="no preference matrix"):
    bandit.run_sweep([D1], [bandit.LossSpec("rebel")], (1.0,), (0,), **PROTOCOL)
  deterministic = bandit.Dataset(
    "two_det",
    2,
    _uniform(2),
    pairs=np.array([[0, 1]]),
    preference=np.array([[0.5, 1.0], [0.0, 0.5]]),
  )
  with pytest.raises(ValueError, match="two_det.*p\\*\\(0 ≻ 1\\) = 1.0"):
    bandit.run_sweep(
      [deterministic], [bandit.LossSpec("rebel")], (1.0,), (0,), **PROTOCOL
    )


def test_kto_run_matches_one_step_by_hand_and_options_are_checked():
  import jax
  import jax.numpy as jnp

  from psipo_jax import data_order
  from psipo_jax import kto

  spec = bandit.LossSpec("kto", options=(("undesirable_weight", 1.5),))
  sgd = bandit.OptimizerSpec("sgd", (("learning_rate", 0.5),))
  result = bandit.run_sweep(
    [D1],
    [spec],
    (0.5,),
    (3,),
    total_steps=1,
    batch_size=9,
    record_every=1,
    optimizer=sgd,
  )
  # One SGD step by hand: the 9 pairs of step 0 as 18 labelled actions
  # (winners desirable), z₀ from the same actions (one context), KTO.
  idx = np.asarray(
    data_order.minibatch_indices(
      data_order.data_key(3), 0, batch_size=9, dataset_size=3
    )
  )
  w, l = D1.pairs[idx, 0], D1.pairs[idx, 1]
  actions = np.concatenate([w, l])
  desirable = np.arange(18) < 9
  log_ref = np.log(_uniform(3))

  def loss(theta):
    logp = jax.nn.log_softmax(theta)
    policy, ref = logp[actions], jnp.asarray(log_ref)[actions]
    z0 = kto.reference_point(policy, ref)
    return jnp.mean(
      kto.kto_loss(policy, ref, desirable, z0, tau=0.5, undesirable_weight=1.5)
    )

  theta0 = jnp.asarray(log_ref, jnp.float32)
  theta1 = theta0 - 0.5 * jax.grad(loss)(theta0)
  np.testing.assert_allclose(
    result.probs[0, 1], jax.nn.softmax(theta1), rtol=1e-5
  )
  with pytest.raises(ValueError, match="no option"):
    bandit.LossSpec("kto", options=(("label_smoothing", 0.1),))
