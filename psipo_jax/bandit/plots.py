"""Learning-curve figures of bandit sweeps, laid out like the paper's.

One figure per dataset: a row per loss, a column per τ; in each panel the
probability of every action against the training step, the mean over seeds
with its 95% confidence band, and the closed-form limit as a dashed line
where one exists (Azar et al., arXiv:2310.12036, Figures 1–2).
"""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # Files only; never needs a display.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from psipo_jax.bandit import analysis as bandit_analysis
from psipo_jax.bandit.runner import LossSpec, SweepResult
from psipo_jax.finite_actions import Dataset


def plot_dataset(
  result: SweepResult,
  dataset: Dataset,
  loss_specs: Sequence[LossSpec],
  *,
  title: str,
  path_stem: str,
  formats: Sequence[str] = ("png", "pdf"),
  dpi: int = 80,
) -> list[str]:
  """Draws one dataset's curves; returns the written file paths."""
  taus = sorted({r.tau for r in result.runs if r.dataset == dataset.name})
  labels = [s.label for s in loss_specs]
  fig, axes = plt.subplots(
    len(labels),
    len(taus),
    figsize=(2.3 * len(taus), 2.0 * len(labels)),
    sharex=True,
    sharey=True,
    squeeze=False,
  )
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  specs = {s.label: s for s in loss_specs}
  for row, label in enumerate(labels):
    for col, tau in enumerate(taus):
      ax = axes[row, col]
      idx = result.select(loss=label, dataset=dataset.name, tau=tau)
      if idx.size == 0:
        ax.set_visible(False)
        continue
      closed = bandit_analysis.closed_form(dataset, specs[label], tau)
      for action in range(dataset.num_actions):
        curves = result.probs[idx, :, action]  # [S, M+1]
        mean, ci = bandit_analysis.mean_and_ci(curves)
        color = colors[action % len(colors)]
        name = bandit_analysis.action_name(action)
        ax.plot(result.steps, mean, color=color, lw=1.2, label=f"π(y_{name})")
        ax.fill_between(
          result.steps, mean - ci, mean + ci, color=color, alpha=0.25, lw=0
        )
        if closed.policy is not None:
          ax.axhline(closed.policy[action], color=color, ls="--", lw=0.8)
      ax.set_ylim(-0.02, 1.02)
      if row == 0:
        ax.set_title(f"τ = {tau:g}", fontsize=9)
      if col == 0:
        ax.set_ylabel(f"{label}\nprobability", fontsize=9)
      if row == len(labels) - 1:
        ax.set_xlabel("step", fontsize=8)
      ax.tick_params(labelsize=7)
  handles, names = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, names, loc="upper right", fontsize=8, ncol=len(names))
  fig.suptitle(title, fontsize=10, x=0.02, ha="left")
  # Fixed margins: tight_layout measured every tick label and took as long as
  # drawing the figure.
  fig.subplots_adjust(
    left=0.07,
    right=0.99,
    bottom=0.12 / len(labels) + 0.04,
    top=1 - 0.25 / len(labels) - 0.02,
    wspace=0.08,
    hspace=0.12,
  )
  os.makedirs(os.path.dirname(path_stem) or ".", exist_ok=True)
  paths = []
  for fmt in formats:
    path = f"{path_stem}.{fmt}"
    fig.savefig(path, dpi=dpi)
    paths.append(path)
  plt.close(fig)
  return paths
