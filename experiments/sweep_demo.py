r"""Sweep: losses × τ × seeds on the finite-action (bandit) experiment.

The worked example of launch/README.md. The base config is
experiments/bandit_train.py (three actions, observed preferences forming the
total order y0 ≻ y1 ≻ y2, tabular policy); this file shortens the run and
declares the sweep next to it:

  launch/sweep.py --config=experiments/sweep_demo.py --root=/tmp/sweeps --parallel=2
  launch/collect.py --root=/tmp/sweeps/sweep_demo --metrics=eval/h,eval/loss

30 runs (ipo, dpo × τ ∈ {0.03, 0.1, 0.3, 1, 3} × 3 seeds) of 600 steps, about
10 s each on a laptop CPU (mostly start-up and compilation). Expected: IPO's
final margin eval/h = log-ratio difference of chosen over rejected shrinks as
τ grows, bounded by its regression target 1/(2τ) (Azar et al. Eq. 17);
DPO's keeps growing with the steps for every τ, its optimum being
deterministic (§5.3.1). `:tiny` declares 4 points (ipo, dpo × τ ∈ {0.1, 1})
for the tests.
"""

import os

from psipo_jax import sweeps

_BANDIT = sweeps.load_config_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "bandit_train.py"))


def get_config(arg=None):
  del arg  # The sweep's argument selects points, not the base config.
  config = _BANDIT.get_config()
  config.total_steps = 600
  config.log_every = 50
  config.eval_every = 100
  config.ckpt_every = 100
  return config


def get_sweep(arg=None):
  if arg == "tiny":
    return sweeps.product(sweeps.sweep("loss.name", ["ipo", "dpo"]),
                          sweeps.sweep("loss.tau", [0.1, 1.0]))
  return sweeps.product(
      sweeps.sweep("loss.name", ["ipo", "dpo"]),
      sweeps.sweep("loss.tau", [0.03, 0.1, 0.3, 1.0, 3.0]),
      sweeps.sweep("seed", range(3)),
  )
