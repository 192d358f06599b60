r"""Beyond the paper: known preferences, exact population losses, intransitivity.

The asymptotic regime of §5.3 of Azar et al. (arXiv:2310.12036): instead of
a finite dataset, the preference matrix p*(y ≻ y') is known and the exact
population losses of ``psipo_jax.psi`` are optimised (no sampling) with the
paper's optimiser (Adam 0.01, 18,000 steps). For comparison the sampled IPO
and DPO losses train on 1,000 pairs drawn once from the same matrix
(y, y' ~ μ, y wins with probability p*(y ≻ y')), 10 seeds.

* two_action: p*(y_a ≻ y_b) = 1 (§5.3.1). IPO's optimum is
  π(y_a) = σ(1/(2τ)); DPO's is (1, 0) for every τ (the logit-Ψ optimum is not
  attained).
* bradley_terry: rewards (1, 0, −1). Both Ψ optima exist; DPO reaches the
  logit-Ψ one because the preferences ARE Bradley–Terry.
* rps / rps_soft: rock-paper-scissors (a = rock, b = paper, c = scissors),
  each win with probability 1 or 0.8, opponents μ = (0.5, 0.3, 0.2). No
  Bradley–Terry model represents a cycle. IPO still converges to the
  identity-Ψ optimum of Eq. 7; DPO's population minimiser is NOT the
  logit-Ψ optimum (which, for rps, does not even exist).

Command (repository root; about 30 s on a shared 2-core CPU, 4 figures):

  python -m psipo_jax.bandit --config=experiments/bandit_population.py \
      --workdir=runs/population --copy_figures_to=experiments/figures
"""

import jax
import numpy as np

from experiments import common
from psipo_jax import psi


def _matrix(make, *args, **kwargs) -> list[list[float]]:
  """A psi preference constructor's matrix in float64, as config lists."""
  with jax.enable_x64(True):
    return np.asarray(make(*args, **kwargs), np.float64).tolist()


def get_config(arg=None):
  """Returns the config; ``arg`` "runlocal" runs 2,000 steps, 3 seeds."""
  config = common.paper_protocol(
    runlocal=common.parse_arg(arg, runlocal=False).runlocal
  )
  # Population losses run once per (dataset, τ): they are deterministic.
  config.losses = ("ipo_population", "dpo_population", "ipo", "dpo")
  mu = [0.5, 0.3, 0.2]
  num_pairs = 1000
  config.datasets = {
    "two_action": {
      "preference": [[0.5, 1.0], [0.0, 0.5]],
      "num_pairs": num_pairs,
    },
    "bradley_terry": {
      "preference": _matrix(
        psi.preference_from_bradley_terry, np.array([1.0, 0.0, -1.0])
      ),
      "num_pairs": num_pairs,
    },
    "rps": {
      "preference": _matrix(psi.rock_paper_scissors, win_prob=1.0),
      "mu": mu,
      "num_pairs": num_pairs,
    },
    "rps_soft": {
      "preference": _matrix(psi.rock_paper_scissors, win_prob=0.8),
      "mu": mu,
      "num_pairs": num_pairs,
    },
  }
  config.figures = {
    "pop_two_action": {
      "dataset": "two_action",
      "title": "Two actions, p(a ≻ b) = 1 (§5.3.1)",
    },
    "pop_bradley_terry": {
      "dataset": "bradley_terry",
      "title": "Bradley–Terry, rewards (1, 0, −1)",
    },
    "pop_rps": {
      "dataset": "rps",
      "title": "Rock-paper-scissors, wins certain, μ = (0.5, 0.3, 0.2)",
    },
    "pop_rps_soft": {
      "dataset": "rps_soft",
      "title": "Rock-paper-scissors, wins w.p. 0.8, μ = (0.5, 0.3, 0.2)",
    },
  }
  return config
