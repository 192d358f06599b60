r"""Command line of the bandit runner: a config's sweep, tables, files, figures.

    python -m psipo_jax.bandit --config=experiments/paper_figures.py \
        --workdir=runs/paper_figures [--copy_figures_to=experiments/figures]

The config and both directories are checked before anything is compiled; a
mistake is reported as one line naming the key or path, exit status 2.
"""

import os
import shutil
import time

from absl import flags
from ml_collections import config_flags
import numpy as np

from psipo_jax import cli
from psipo_jax import config_checks
from psipo_jax.bandit import analysis
from psipo_jax.bandit import experiment
from psipo_jax.bandit import plots
from psipo_jax.bandit import runner

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Bandit experiment config file (experiments/*.py).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where results and figures go.")
_COPY_FIGURES_TO = flags.DEFINE_string(
  "copy_figures_to",
  None,
  "If set, also copy the PNG figures there (e.g. experiments/figures).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  """Runs a bandit config: sweep, table beside closed forms, files, figures."""
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  start = time.perf_counter()
  with cli.user_errors():
    datasets, loss_specs, kwargs = experiment.sweep_from_config(config)
    workdir = config_checks.writable_directory(_WORKDIR.value)
    copy_to = _COPY_FIGURES_TO.value
    if copy_to:
      copy_to = config_checks.writable_directory(
        copy_to, name="--copy_figures_to"
      )
  by_name = {d.name: d for d in datasets}
  num_runs = sum(
    len(kwargs["taus"])
    * len(datasets)
    * (1 if s.is_population else len(kwargs["seeds"]))
    for s in loss_specs
  )
  print(
    f"Training {num_runs} runs × {kwargs['total_steps']} steps as one"
    " compiled program ...",
    flush=True,
  )
  with cli.user_errors():  # Values only the sweep itself can check.
    result = runner.run_sweep(datasets, loss_specs, **kwargs)
  trained = time.perf_counter()
  print(f"  done in {trained - start:.1f} s (compilation included).")
  bad = np.flatnonzero(result.nonfinite_steps)
  if bad.size:
    print(f"WARNING: {bad.size} runs hit a non-finite loss or gradient:")
    for i in bad[:10]:
      r = result.runs[i]
      print(
        f"  {r.loss} on {r.dataset}, τ={r.tau}, seed {r.seed}:"
        f" {result.nonfinite_steps[i]} steps"
      )
  rows = analysis.summarize(result, datasets, loss_specs)
  print(analysis.format_table(rows, datasets))
  written = experiment.save_results(workdir, result, rows, config)
  tabulated = time.perf_counter()
  figures = []
  for fig_name, fig_cfg in config.figures.items():
    figures += plots.plot_dataset(
      result,
      by_name[fig_cfg.dataset],
      loss_specs,
      title=fig_cfg.title,
      path_stem=os.path.join(workdir, "figures", fig_name),
    )
  if copy_to:
    for path in figures:
      if path.endswith(".png"):
        shutil.copy(path, copy_to)
  print("\nResults: " + ", ".join(written))
  print("Figures: " + ", ".join(figures))
  if copy_to:
    print(f"PNG copies in {copy_to}/")
  done = time.perf_counter()
  print(
    f"Wall time after imports: {done - start:.1f} s (sweep"
    f" {trained - start:.1f} s, tables and files {tabulated - trained:.1f}"
    f" s, figures {done - tabulated:.1f} s)."
  )


if __name__ == "__main__":
  cli.run(main)
