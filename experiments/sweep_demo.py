r"""Sweep: losses × τ × seeds on the finite-action (bandit) experiment.

The worked example of launch/README.md. The base config is
experiments/bandit_train.py (three actions, observed preferences forming the
total order y0 ≻ y1 ≻ y2, tabular policy); this file shortens the run and
declares the sweep next to it:

  launch/sweep.py --config=experiments/sweep_demo.py --root=/tmp/sweeps --parallel=2
  launch/collect.py --root=/tmp/sweeps/sweep_demo --metrics=eval/h,eval/loss

30 runs (ipo, dpo × τ ∈ {0.03, 0.1, 0.3, 1, 3} × 3 seeds) of 600 steps, about
8 s each on a laptop CPU (mostly start-up and compilation): 3 minutes with
--parallel=2 on 2 cores. Expected result (measured, launch/README.md): IPO's
mean margin on the three observed pairs, eval/h, settles at the least-squares
solution of its regression targets 1/(2τ) (Azar et al. Eq. 17) over the pairs
(0,1), (1,2), (0,2), which is 4/(9τ): 1.48, 0.44, 0.15 for τ = 0.3, 1, 3
(smaller τ have not converged in 600 steps). DPO's margin is larger at every
τ and still growing (3.6 at τ = 1, step 600), its optimum being deterministic
(§5.3.1). `:tiny` declares 4 points (ipo, dpo × τ ∈ {0.1, 1}) for the tests.
"""

from experiments import bandit_train
from psipo_jax import sweeps


def get_config(arg=None):
  del arg  # The sweep's argument selects points, not the base config.
  config = bandit_train.get_config()
  config.total_steps = 600
  config.log_every = 50
  config.eval_every = 100
  config.ckpt_every = 100
  return config


def get_sweep(arg=None):
  if arg == "tiny":
    return sweeps.product(
      sweeps.sweep("loss.name", ["ipo", "dpo"]),
      sweeps.sweep("loss.tau", [0.1, 1.0]),
    )
  return sweeps.product(
    sweeps.sweep("loss.name", ["ipo", "dpo"]),
    sweeps.sweep("loss.tau", [0.03, 0.1, 0.3, 1.0, 3.0]),
    sweeps.sweep("seed", range(3)),
  )
