"""Tests of the bandit sweep runner (psipo_jax.bandit, bandit_analysis).

The paper-protocol assertions share ONE sweep (D1, printed D3 and the
two-action example; DPO and IPO; 6 τ; 10 seeds; 18,000 steps), which compiles
once and trains 360 runs in a few seconds.
"""

import importlib.util
import math
import os
import subprocess
import sys

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np
import pytest

from psipo_jax import bandit
from psipo_jax import bandit_analysis

TAUS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
SEEDS = tuple(range(10))
A, B, C = 0, 1, 2


def _uniform(k):
  return np.full(k, 1.0 / k)


D1 = bandit.Dataset("D1", 3, _uniform(3), pairs=np.array([[A, B], [B, C],
                                                           [A, C]]))
D3 = bandit.Dataset("D3", 3, _uniform(3), pairs=np.array([[A, B], [B, A]]))
TWO_ACTION = bandit.Dataset("two", 2, _uniform(2), pairs=np.array([[0, 1]]))
DPO, IPO = bandit.LossSpec("dpo"), bandit.LossSpec("ipo")
# Eager calls would compile every primitive anew for each call.
indices = jax.jit(bandit.minibatch_indices, static_argnames="batch_size")


@pytest.fixture(scope="module")
def paper_sweep():
  return bandit.run_sweep(
      [D1, D3, TWO_ACTION], [DPO, IPO], TAUS, SEEDS,
      total_steps=18_000, batch_size=9, record_every=100,
  )


def _final(result, **where):
  idx = result.select(**where)
  assert idx.size, where
  return result.probs[idx, -1]  # [S, K_max]


# ---------------------------------------------------------------------------
# The data-order contract.


def test_threefry_block_matches_known_answer_and_jax():
  # Random123's known-answer vector for Threefry-2x32, 20 rounds.
  threefry = jax.jit(bandit.threefry2x32)
  out = threefry(
      jnp.uint32(0x13198A2E), jnp.uint32(0x03707344),
      jnp.uint32(0x243F6A88), jnp.uint32(0x85A308D3),
  )
  assert [int(x) for x in out] == [0xC4923A9C, 0x483DF7A0]
  # And jax's own block function on random inputs.
  words = jax.random.bits(jax.random.key(1), (4, 1000), jnp.uint32)
  np.testing.assert_array_equal(
      jnp.stack(threefry(*words)),
      jnp.stack(jex_random.threefry2x32_p.bind(*words)))


def test_data_key_is_the_training_systems_data_key():
  # psipo_jax/train.py: init_key, state_key, data_key = split(PRNGKey(seed), 3).
  for seed in (0, 7, 2**31 - 1):
    np.testing.assert_array_equal(
        jax.random.key_data(bandit.data_key(seed)),
        jax.random.split(jax.random.PRNGKey(seed), 3)[2])


def test_mul_high_is_exact():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 2**32, size=10_000, dtype=np.uint64)
  b = rng.integers(0, 2**32, size=10_000, dtype=np.uint64)
  b[:4] = [1, 3, 2**16, 2**32 - 1]
  a[:4] = 2**32 - 1
  got = bandit._mul_high_u32(
      jnp.asarray(a, jnp.uint32), jnp.asarray(b, jnp.uint32))
  np.testing.assert_array_equal(np.asarray(got), (a * b) >> np.uint64(32))


def test_minibatch_indices_do_not_depend_on_chunking_or_vmap():
  key = bandit.data_key(7)
  chunk = indices(
      key, jnp.arange(40, 60), batch_size=9, dataset_size=5)
  assert chunk.shape == (20, 9) and chunk.dtype == jnp.int32
  for i, step in enumerate(range(40, 60)):
    alone = indices(key, step, batch_size=9, dataset_size=5)
    np.testing.assert_array_equal(chunk[i], alone)
  # Raw key data and a typed key give the same stream.
  np.testing.assert_array_equal(
      chunk, indices(
          jax.random.key_data(key), jnp.arange(40, 60), batch_size=9,
          dataset_size=5))
  # Inside vmap over keys and sizes, each run sees its own stream.
  keys = jax.random.key_data(jax.vmap(bandit.data_key)(jnp.arange(4)))
  sizes = jnp.array([5, 3, 5, 2], jnp.uint32)
  batched = jax.jit(jax.vmap(
      lambda k, n: bandit.minibatch_indices(
          k, jnp.arange(40, 60), batch_size=9, dataset_size=n)))(keys, sizes)
  for seed in range(4):
    np.testing.assert_array_equal(
        batched[seed], indices(
            bandit.data_key(seed), jnp.arange(40, 60), batch_size=9,
            dataset_size=int(sizes[seed])))
  # A batch of 8 is the first 8 of a batch of 9.
  np.testing.assert_array_equal(
      indices(key, 3, batch_size=8, dataset_size=5),
      indices(key, 3, batch_size=9, dataset_size=5)[:8])


def test_minibatch_indices_are_uniform():
  idx = np.asarray(indices(
      bandit.data_key(0), jnp.arange(20_000), batch_size=9, dataset_size=3))
  assert idx.min() == 0 and idx.max() == 2
  freq = np.bincount(idx.ravel(), minlength=3) / idx.size
  # 180,000 draws: the standard error of each frequency is 0.0011.
  np.testing.assert_allclose(freq, 1 / 3, atol=0.005)
  # Steps and slots are not correlated: slot 0 of step s vs slot 0 of s+1.
  same = np.mean(idx[1:, 0] == idx[:-1, 0])
  assert abs(same - 1 / 3) < 0.02


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
  np.testing.assert_allclose(final, np.broadcast_to(expected, final.shape),
                             atol=0.02)
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
    alone = bandit.run_stepwise(
        dataset, loss, tau, seed, total_steps=18_000, record_every=100)
    idx = paper_sweep.select(
        loss=loss.label, dataset=dataset.name, tau=tau, seed=seed)
    np.testing.assert_allclose(
        paper_sweep.probs[idx[0], :, :3], alone, atol=2e-5, rtol=0)


def test_sweep_compiles_once_when_values_change():
  traces = []
  original = bandit._sampled_objective

  def counting(spec):
    traces.append(spec.name)
    return original(spec)

  bandit._sampled_objective = counting
  try:
    kwargs = dict(total_steps=200, record_every=100)
    first = bandit.run_sweep([D1], [IPO], (0.1, 0.2), (0, 1), **kwargs)
    other = bandit.Dataset("D1", 3, np.array([0.5, 0.3, 0.2]),
                           pairs=np.array([[C, B], [B, A], [C, A]]))
    second = bandit.run_sweep([other], [IPO], (0.7, 3.0), (5, 9), **kwargs)
  finally:
    bandit._sampled_objective = original
  assert traces == ["ipo"]  # Traced once; new τ, seeds, data: no retrace.
  assert not np.allclose(first.probs, second.probs)
  np.testing.assert_allclose(second.probs[:, 0], np.tile([0.5, 0.3, 0.2],
                                                         (4, 1)), rtol=1e-6)


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
  result = bandit.run_sweep(datasets, specs, (0.5, 1.0), (0, 1, 2),
                            total_steps=4000, record_every=1000)
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


def test_sample_pairs_follows_preference_and_mu():
  pref = np.array([[0.5, 0.9, 0.2], [0.1, 0.5, 0.6], [0.8, 0.4, 0.5]])
  mu = np.array([0.5, 0.3, 0.2])
  pairs = bandit.sample_pairs(pref, mu, num_pairs=40_000, seed=1)
  assert pairs.shape == (40_000, 2) and np.all(pairs[:, 0] != pairs[:, 1])
  wins = np.zeros((3, 3))
  np.add.at(wins, (pairs[:, 0], pairs[:, 1]), 1)
  compared = wins + wins.T
  weight = np.outer(mu, mu)
  np.fill_diagonal(weight, 0)
  np.testing.assert_allclose(compared / compared.sum(),
                             weight / weight.sum(), atol=0.01)
  off = ~np.eye(3, dtype=bool)
  np.testing.assert_allclose(wins[off] / compared[off], pref[off], atol=0.02)


def test_mean_and_ci_uses_student_t():
  values = np.array([[1.0], [2.0], [3.0]])
  mean, ci = bandit_analysis.mean_and_ci(values)
  # t_{0.975, 2} = 4.3027; standard error 1/√3.
  np.testing.assert_allclose(mean, [2.0])
  np.testing.assert_allclose(ci, [4.302653 / math.sqrt(3)], rtol=1e-5)


# ---------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("make, match", [
    (lambda: bandit.Dataset("x", 3, _uniform(3), pairs=np.array([[0, 3]])),
     r"pairs\[0\] = \(0, 3\) has an action index outside"),
    (lambda: bandit.Dataset("x", 3, _uniform(3), pairs=np.array([[0, 1], [2, 2]])),
     r"pairs\[1\] = \(2, 2\) compares an action with itself"),
    (lambda: bandit.Dataset("x", 3, np.array([0.5, 0.5, 0.0]),
                            pairs=np.array([[0, 1]])), "pi_ref"),
    (lambda: bandit.LossSpec("nope"), "Unknown loss 'nope'"),
    (lambda: bandit.LossSpec("ipo", options=(("label_smoothing", 0.1),)),
     "has no option"),
    (lambda: bandit.run_sweep([D1], [bandit.LossSpec("ipo_population")],
                              (1.0,), (0,), total_steps=10, record_every=10),
     "needs a known preference matrix; dataset 'D1'"),
    (lambda: bandit.run_sweep([D1], [IPO], (1.0,), (0,), total_steps=150,
                              record_every=100), "multiple of record_every"),
    (lambda: bandit.dataset_from_config("D9", {"pairs": [[0, 1]], "pi": 1}),
     r"datasets.D9: unknown keys \['pi'\]"),
])
def test_bad_input_names_the_culprit(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize("name, arg", [
    ("paper_figures", None), ("paper_figures", "printed"),
    ("paper_figures", "runlocal"), ("bandit_d3_readings", None),
    ("bandit_population", None), ("bandit_population", "runlocal"),
])
def test_experiment_configs_build(name, arg):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(root, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  datasets, loss_specs, kwargs = bandit.sweep_from_config(config)
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
      [sys.executable, "-m", "psipo_jax.bandit",
       "--config=experiments/paper_figures.py:runlocal",
       f"--workdir={tmp_path}", "--config.total_steps=200",
       "--config.num_seeds=2", f"--copy_figures_to={tmp_path / 'copies'}"],
      cwd=root, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": os.pathsep.join(
          filter(None, [root, os.environ.get("PYTHONPATH")]))},
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "IPO least squares" in out.stdout and "Figures:" in out.stdout
  for name in ("results.npz", "final.csv", "summary.csv", "config.json",
               "figures/fig1_D1.png", "figures/fig1_D1.pdf",
               "copies/fig2_D3_printed.png"):
    assert (tmp_path / name).exists(), name
  saved = np.load(tmp_path / "results.npz")
  assert saved["probs"].shape == (2 * 3 * 6 * 2, 3, 3)


def test_non_finite_steps_are_counted_and_their_updates_dropped():
  # e^{−τh} overflows once h < −88/τ. On the cycle a≻b≻c≻a a huge SGD step
  # that raises one pair's margin sinks the next one's there.
  cycle = bandit.Dataset("D2", 3, _uniform(3),
                         pairs=np.array([[A, B], [B, C], [C, A]]))
  result = bandit.run_sweep(
      [cycle], [bandit.LossSpec("exponential")], taus=(50.0,), seeds=(0,),
      total_steps=20, batch_size=3, record_every=10,
      optimizer=bandit.OptimizerSpec("sgd", (("learning_rate", 1e3),)))
  assert result.nonfinite_steps[0] > 0
  assert np.all(np.isfinite(result.probs[0]))


def test_optimizer_block_is_the_training_systems():
  # Same keys and checks as psipo_jax.optimizers: a schedule works, a typo
  # fails before compiling, naming the key.
  bandit.run_sweep([D1], [bandit.LossSpec("ipo")], taus=(1.0,), seeds=(0,),
                   total_steps=20, batch_size=3, record_every=10,
                   optimizer=bandit.OptimizerSpec(
                       "adam", (("learning_rate", 0.1), ("schedule", "cosine"))))
  with pytest.raises(ValueError, match="optimizer.bta1 is not an option"):
    bandit.run_sweep([D1], [bandit.LossSpec("ipo")], taus=(1.0,), seeds=(0,),
                     total_steps=20, batch_size=3, record_every=10,
                     optimizer=bandit.OptimizerSpec(
                         "adam", (("learning_rate", 0.1), ("bta1", 0.9))))
