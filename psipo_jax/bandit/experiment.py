"""A bandit experiment config → the runner's arguments; results → files.

An experiment config (see experiments/paper_figures.py) describes a GRID with
list-valued keys, where a single-run config of `psipo_jax.train` has
`loss.name`, `loss.tau` and `seed`:

  seed, num_seeds     seeds seed, seed + 1, …, seed + num_seeds − 1
  total_steps         T, a multiple of record_every
  record_every        E, steps between recorded probabilities
  input.batch_size    B, pairs per step
  optimizer.*         as the training system's (`psipo_jax.optimizers`)
  losses              names of registered or population losses
  loss_options        {loss name: {option: value}}
  taus                the τ grid
  datasets            {name: dataset block} (:func:`dataset_from_config`)
  figures             {name: {dataset, title}}, one figure each
  loss_module         optional: a module (dotted name or .py path) imported
                      first, whose `losses.register`ed losses `losses` may name

Every key is checked before anything is compiled or written
(:func:`check_config`); an unknown key names the nearest valid one.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from psipo_jax import config_checks
from psipo_jax import finite_actions
from psipo_jax import losses
from psipo_jax.bandit.runner import LossSpec, OptimizerSpec, SweepResult
from psipo_jax.finite_actions import Dataset

CONFIG_KEYS = (
  "seed",
  "num_seeds",
  "total_steps",
  "record_every",
  "input",
  "optimizer",
  "losses",
  "loss_options",
  "taus",
  "datasets",
  "figures",
  "loss_module",
)
DATASET_KEYS = (
  "pairs",
  "preference",
  "num_actions",
  "pi_ref",
  "mu",
  "num_pairs",
  "data_seed",
)
FIGURE_KEYS = ("dataset", "title")


def dataset_from_config(name: str, cfg: Mapping[str, Any]) -> Dataset:
  """Builds a :class:`Dataset` from the config block `datasets.<name>`.

  Keys: `pairs` (list of [winner, loser]) and/or `preference` (K×K list);
  `num_actions` (default: from `preference`, else 1 + the largest action in
  `pairs`); `pi_ref` and `mu` (default uniform); with `preference` but no
  `pairs`, `num_pairs` > 0 draws a fixed dataset with
  `finite_actions.sample_pairs` (seed `data_seed`, default 0; the "train"
  split, the pairs the `bandit_preferences` TFDS builder draws for the same
  keys).
  """
  where = f"datasets.{name}"
  cfg = dict(cfg)
  config_checks.check_keys(cfg, DATASET_KEYS, prefix=where + ".")
  pairs, pref = cfg.get("pairs"), cfg.get("preference")
  if cfg.get("num_actions") is not None:
    k = int(cfg["num_actions"])
  elif pref is not None:
    k = len(pref)
  elif pairs:
    k = int(np.max(pairs)) + 1
  else:
    raise ValueError(f"{where}: give `pairs` or `preference`.")
  pi_ref = cfg.get("pi_ref")
  pi_ref = np.full(k, 1.0 / k) if pi_ref is None else np.asarray(pi_ref)
  num_pairs = cfg.get("num_pairs") or 0
  if num_pairs and pairs is not None:
    raise ValueError(
      f"{where}: `num_pairs` samples pairs from `preference`; it cannot be"
      " combined with explicit `pairs`."
    )
  dataset = Dataset(
    name=name,
    num_actions=k,
    pi_ref=pi_ref,
    pairs=None if pairs is None else np.asarray(pairs),
    preference=None if pref is None else np.asarray(pref),
    mu=None if cfg.get("mu") is None else np.asarray(cfg["mu"], np.float64),
  )
  if pairs is None and pref is not None and num_pairs > 0:
    dataset = Dataset(
      name=name,
      num_actions=k,
      pi_ref=dataset.pi_ref,
      pairs=finite_actions.sample_pairs(
        dataset.preference,
        dataset.mu,
        num_pairs=int(num_pairs),
        data_seed=int(cfg.get("data_seed") or 0),
      ),
      preference=dataset.preference,
      mu=dataset.mu,
    )
  return dataset


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key of anything wrong in `config`."""
  config_checks.check_keys(config, CONFIG_KEYS)
  config_checks.check_keys(config.input, ("batch_size",), prefix="input.")
  for name, figure in config.figures.items():
    config_checks.check_keys(figure, FIGURE_KEYS, prefix=f"figures.{name}.")
    if figure.dataset not in config.datasets:
      raise ValueError(
        f"figures.{name}.dataset = {figure.dataset!r} is not in datasets"
        f" {sorted(config.datasets)}."
      )


def sweep_from_config(
  config: ml_collections.ConfigDict,
) -> tuple[list[Dataset], list[LossSpec], dict[str, Any]]:
  """Reads and checks a bandit experiment config (module docstring).

  Returns:
    `(datasets, loss_specs, kwargs)` where `run_sweep(datasets,
    loss_specs, **kwargs)` runs the experiment.
  """
  check_config(config)
  if config.get("loss_module"):
    losses.import_loss_module(config.loss_module)
  datasets = [
    dataset_from_config(name, cfg) for name, cfg in config.datasets.items()
  ]
  if not datasets:
    raise ValueError("datasets is empty: nothing to train on.")
  options = config.get("loss_options") or {}
  unknown = set(options) - set(config.losses)
  if unknown:
    raise ValueError(
      f"loss_options names {sorted(unknown)}, which are not in losses"
      f" {list(config.losses)}."
    )
  loss_specs = []
  for name in config.losses:
    try:
      loss_specs.append(
        LossSpec(
          name, options=tuple(sorted(dict(options.get(name, {})).items()))
        )
      )
    except ValueError as e:
      raise ValueError(f"losses / loss_options.{name}: {e}") from None
  for key in ("seed", "num_seeds", "total_steps", "record_every"):
    config_checks.integer(config, key, minimum=0 if key == "seed" else 1)
  config_checks.integer(config.input, "batch_size", minimum=1, prefix="input.")
  optimizer = OptimizerSpec.from_config(config.optimizer)
  try:
    optimizer.build(config.total_steps)
  except ValueError as e:
    raise ValueError(f"optimizer: {e}") from None
  taus = config.taus
  if (
    isinstance(taus, str)
    or not isinstance(taus, (tuple, list))
    or not taus
    or any(
      isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0
      for t in taus
    )
  ):
    raise ValueError(
      f"taus must be a non-empty list of numbers > 0, got {taus!r}"
    )
  kwargs = dict(
    taus=tuple(float(t) for t in taus),
    seeds=tuple(range(config.seed, config.seed + config.num_seeds)),
    total_steps=config.total_steps,
    batch_size=config.input.batch_size,
    record_every=config.record_every,
    optimizer=optimizer,
  )
  return datasets, loss_specs, kwargs


def save_results(
  workdir: str, result: SweepResult, rows, config: ml_collections.ConfigDict
) -> list[str]:
  """Writes results.npz (curves), final.csv (per run), summary.csv, config.

  Returns:
    The written paths.
  """
  os.makedirs(workdir, exist_ok=True)
  paths = {
    name: os.path.join(workdir, name)
    for name in ("results.npz", "final.csv", "summary.csv", "config.json")
  }
  np.savez_compressed(
    paths["results.npz"],
    steps=result.steps,
    probs=result.probs,
    loss=result.loss,
    nonfinite_steps=result.nonfinite_steps,
    run_loss=np.array([r.loss for r in result.runs]),
    run_dataset=np.array([r.dataset for r in result.runs]),
    run_tau=np.array([r.tau for r in result.runs]),
    run_seed=np.array([r.seed for r in result.runs]),
  )
  k_max = result.probs.shape[-1]
  with open(paths["final.csv"], "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(
      ["loss", "dataset", "tau", "seed", "nonfinite_steps", "final_loss"]
      + [f"p{i}" for i in range(k_max)]
    )
    for i, r in enumerate(result.runs):
      writer.writerow(
        [
          r.loss,
          r.dataset,
          r.tau,
          r.seed,
          int(result.nonfinite_steps[i]),
          float(result.loss[i, -1]),
        ]
        + [float(x) for x in result.probs[i, -1]]
      )
  with open(paths["summary.csv"], "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(
      [
        "dataset",
        "loss",
        "tau",
        "num_seeds",
        "action",
        "mean",
        "ci95",
        "closed_form",
        "note",
      ]
    )
    for row in rows:
      for a, (m, c) in enumerate(zip(row.mean, row.ci)):
        closed = "" if row.closed.policy is None else row.closed.policy[a]
        writer.writerow(
          [
            row.dataset,
            row.loss,
            row.tau,
            row.num_seeds,
            a,
            m,
            c,
            closed,
            row.closed.note,
          ]
        )
  with open(paths["config.json"], "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return list(paths.values())
