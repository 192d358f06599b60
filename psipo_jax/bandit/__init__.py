"""Finite-action ("bandit") ΨPO experiments: a whole sweep as one program.

    from psipo_jax import bandit
    result = bandit.run_sweep(datasets, loss_specs, taus, seeds,
                              total_steps=..., batch_size=..., record_every=...,
                              optimizer=bandit.OptimizerSpec(...))

Modules: `runner` (the compiled program; re-exported here), `analysis`
(closed forms and summary tables), `plots` (figures), `experiment` (reading
an experiment config, writing results) and `__main__` (the command line,
`python -m psipo_jax.bandit --config=experiments/paper_figures.py
--workdir=DIR`). The datasets are `psipo_jax.finite_actions.Dataset`s; the
data order is `psipo_jax.data_order`.
"""

from psipo_jax.bandit.runner import LossSpec
from psipo_jax.bandit.runner import OptimizerSpec
from psipo_jax.bandit.runner import POPULATION_LOSSES
from psipo_jax.bandit.runner import Run
from psipo_jax.bandit.runner import run_stepwise
from psipo_jax.bandit.runner import run_sweep
from psipo_jax.bandit.runner import SweepResult
from psipo_jax.finite_actions import Dataset

__all__ = [
  "Dataset",
  "LossSpec",
  "OptimizerSpec",
  "POPULATION_LOSSES",
  "Run",
  "SweepResult",
  "run_stepwise",
  "run_sweep",
]
