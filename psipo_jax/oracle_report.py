r"""The known-oracle grid's table and figures, from its evaluations.

    python -m psipo_jax.oracle_report --workdir=ROOT [--out=DIR] \
        [--prefix=oracle_] [--title=...] [--runs=GLOB ...]

Reads what `python -m psipo_jax.oracle_experiment --stage=evaluate
--all_steps` wrote in ROOT/eval: one `<run>.json` per run (its newest
checkpoint) and `<run>/<step>.json` per checkpoint (with `--runs=GLOB`,
repeatable, only the runs whose names match one). Runs are grouped by
(method, τ) (the loss, or its online variant, e.g. "ipo online K=1"); over
each group's seeds every number is the mean with the half-width of its 95%
Student-t interval (`psipo_jax.stats`). Writes:

  ROOT/report/summary.md   the table: per method and τ, the seeds, win rate
                           against the reference, KL(π‖π_ref), implicit-
                           reward accuracy on held-out pairs, and the
                           training pairs' median h and fraction of h above
                           IPO's target 1/(2τ)
  ROOT/report/summary.json the same rows
  DIR/<prefix>frontier.png win rate against KL, a line per method across τ,
                           with both intervals as error bars
  DIR/<prefix>curves.png   win rate, KL and median h on the training pairs
                           against the step, a row per method, a line per τ
                           (needs the per-step files)
  DIR/<prefix>h_hist.png   histograms of h on the training pairs at the
                           end, IPO against DPO, a panel per τ, with
                           IPO's target 1/(2τ) (all seeds pooled)

DIR defaults to ROOT/report. The functions below take the loaded
evaluation dicts, so other drivers (tests, notebooks) reuse them.
"""

from __future__ import annotations

import collections
import fnmatch
import glob
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from psipo_jax import cli
from psipo_jax import stats

# (result key, table heading); every one gets a mean and a 95% interval.
TABLE_KEYS = (
  ("win_rate", "win rate"),
  ("kl", "KL (nats)"),
  ("reward_accuracy", "reward acc."),
  ("h_median", "median h (train)"),
  ("h_above_target", "h > 1/(2τ) (train)"),
)
DPI = 80  # small PNGs (the committed figures stay well under 200 KB)


def read_evaluations(
  eval_dir: str, runs: Sequence[str] = ("*",)
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
  """(the runs' newest-step results, {run name: its per-step results
  ordered by step}) from an evaluate stage's output directory, of the runs
  whose names match one of the globs `runs`."""
  chosen = lambda name: any(fnmatch.fnmatchcase(name, g) for g in runs)
  finals = []
  for path in sorted(glob.glob(os.path.join(eval_dir, "*.json"))):
    if chosen(os.path.basename(path)[: -len(".json")]):
      with open(path) as f:
        finals.append(json.load(f))
  if not finals:
    raise FileNotFoundError(
      f"{eval_dir} holds no evaluation of a run matching {list(runs)}: run"
      " oracle_experiment --stage=evaluate first"
    )
  curves = {}
  for run_dir in sorted(glob.glob(os.path.join(eval_dir, "*", ""))):
    if not chosen(os.path.basename(os.path.normpath(run_dir))):
      continue
    steps = []
    for path in glob.glob(os.path.join(run_dir, "*.json")):
      with open(path) as f:
        steps.append(json.load(f))
    if steps:
      name = os.path.basename(os.path.normpath(run_dir))
      curves[name] = sorted(steps, key=lambda r: r["step"])
  return finals, curves


def _value(result: dict[str, Any], key: str) -> float:
  if key == "h_median":
    return result["h_train"]["quantiles"]["0.5"]
  if key == "h_above_target":
    return result["h_train"]["above_target"]
  return result[key]


def method(result: dict[str, Any]) -> str:
  """What trained a run: its loss name for offline pairs; for online runs
  (the evaluate stage's `online` field) e.g. "ipo online K=1" (pairs from
  the policy every K steps) or "ipo-md β=0.5 K=1" (from its mixture with
  the reference)."""
  online = result.get("online")
  if not online:
    return result["loss"]
  if online["mixture"]:
    return f"{result['loss']}-md β={online['mixture']:g} K={online['every']}"
  return f"{result['loss']} online K={online['every']}"


def _display(name: str) -> str:
  """A method's label in the figures: the loss in capitals."""
  loss, _, rest = name.partition(" ")
  return " ".join([loss.upper(), rest]).strip()


def _groups(results: Sequence[dict[str, Any]]):
  """{(method, τ): results}, sorted by method then τ."""
  groups = collections.defaultdict(list)
  for r in results:
    groups[(method(r), float(r["tau"]))].append(r)
  return dict(sorted(groups.items()))


def aggregate(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (method, τ): loss, method (`method`: the loss, or its
  online variant), tau, seeds (sorted), and for every TABLE_KEYS key its
  mean over the seeds and `<key>_ci`, the half-width of the 95% interval
  (NaN for a single seed)."""
  rows = []
  for (name, tau), group in _groups(results).items():
    seeds = sorted(r["seed"] for r in group)
    if len(set(seeds)) != len(seeds):
      raise ValueError(f"{name} τ={tau:g}: seed repeated in {seeds}")
    row = dict(loss=group[0]["loss"], method=name, tau=tau, seeds=seeds)
    for key, _ in TABLE_KEYS:
      mean, ci = stats.mean_and_ci([_value(r, key) for r in group])
      row[key], row[f"{key}_ci"] = float(mean), float(ci)
    rows.append(row)
  return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """The rows of `aggregate` as a Markdown table, mean ± 95% half-width."""
  heads = ["loss", "τ", "seeds"] + [head for _, head in TABLE_KEYS]
  lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
  for row in rows:
    cells = [row["method"], f"{row['tau']:g}", str(len(row["seeds"]))]
    for key, _ in TABLE_KEYS:
      digits = 2 if key in ("kl", "h_median") else 3
      cells.append(f"{row[key]:.{digits}f} ± {row[key + '_ci']:.{digits}f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")  # Files only; never needs a display.
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=DPI)
  _pyplot().close(fig)
  return path


def plot_frontier(rows: Sequence[dict[str, Any]], path: str, title: str) -> str:
  """Win rate against KL, one line per method through its τ values (each
  point labelled with τ), error bars the 95% intervals over seeds."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.0, 3.6))
  by_method = collections.defaultdict(list)
  for row in rows:
    by_method[row["method"]].append(row)
  for i, (name, points) in enumerate(sorted(by_method.items())):
    points.sort(key=lambda r: r["kl"])
    ax.errorbar(
      [r["kl"] for r in points],
      [r["win_rate"] for r in points],
      xerr=[r["kl_ci"] for r in points],
      yerr=[r["win_rate_ci"] for r in points],
      marker="o",
      ms=4,
      lw=1.2,
      capsize=2,
      label=_display(name),
    )
    for r in points:
      ax.annotate(
        f"τ={r['tau']:g}",
        (r["kl"], r["win_rate"]),
        textcoords="offset points",
        xytext=(4, -9) if i % 2 else (-30, 4),  # the losses' apart
        fontsize=7,
      )
  ax.axhline(0.5, color="grey", ls=":", lw=0.8)
  ax.set_xlabel("KL(π ‖ π_ref) on the policy's samples (nats)", fontsize=9)
  ax.set_ylabel("win rate against π_ref (exact p*)", fontsize=9)
  ax.tick_params(labelsize=8)
  ax.legend(fontsize=8)
  ax.set_title(title, fontsize=9)
  fig.subplots_adjust(left=0.13, right=0.97, bottom=0.14, top=0.9)
  return _save(fig, path)


def plot_curves(
  curves: dict[str, list[dict[str, Any]]], path: str, title: str
) -> str:
  """A row per method; columns win rate, KL and median h on the training
  pairs against the step; a line per τ (mean over seeds, 95% band), and
  IPO's targets 1/(2τ) dashed in the h column."""
  plt = _pyplot()
  groups = collections.defaultdict(list)  # (method, τ) -> [runs' steps]
  for steps in curves.values():
    groups[(method(steps[0]), float(steps[0]["tau"]))].append(steps)
  methods = sorted({name for name, _ in groups})
  taus = sorted({tau for _, tau in groups})
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  columns = (("win_rate", "win rate"), ("kl", "KL (nats)"))
  columns += (("h_median", "median h (train pairs)"),)
  fig, axes = plt.subplots(
    len(methods),
    len(columns),
    figsize=(3.2 * len(columns), 2.3 * len(methods)),
    sharex=True,
    squeeze=False,
  )
  for row, name in enumerate(methods):
    for col, (key, label) in enumerate(columns):
      ax = axes[row, col]
      for i, tau in enumerate(taus):
        runs = groups.get((name, tau))
        if not runs:
          continue
        steps = [r["step"] for r in runs[0]]
        if any([r["step"] for r in run] != steps for run in runs):
          raise ValueError(f"{name} τ={tau:g}: the seeds' steps differ")
        values = [[_value(r, key) for r in run] for run in runs]
        mean, ci = stats.mean_and_ci(values)
        color = colors[i % len(colors)]
        ax.plot(
          steps, mean, color=color, marker=".", lw=1.2, label=f"τ={tau:g}"
        )
        ax.fill_between(steps, mean - ci, mean + ci, color=color, alpha=0.2)
        if key == "h_median":
          ax.axhline(1 / (2 * tau), color=color, ls="--", lw=0.7)
      ax.set_ylabel(f"{_display(name)}\n{label}", fontsize=8)
      ax.tick_params(labelsize=7)
      if row == len(methods) - 1:
        ax.set_xlabel("step", fontsize=8)
  axes[0, 0].legend(fontsize=7, ncol=2)
  fig.suptitle(title, fontsize=9, x=0.02, ha="left")
  fig.subplots_adjust(
    left=0.09, right=0.98, bottom=0.1, top=0.9, wspace=0.35, hspace=0.15
  )
  return _save(fig, path)


def plot_margins(
  results: Sequence[dict[str, Any]], path: str, title: str
) -> str:
  """Histograms of h on the training pairs (the runs' newest step, seeds
  pooled): a panel per τ, one histogram per method, IPO's target 1/(2τ) as
  a dashed line."""
  plt = _pyplot()
  groups = _groups(results)
  methods = sorted({name for name, _ in groups})
  taus = sorted({tau for _, tau in groups})
  width = 2.6 * len(taus) + 0.6  # inches; 0.6 for the y label
  fig, axes = plt.subplots(1, len(taus), figsize=(width, 2.6), squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for col, tau in enumerate(taus):
    ax = axes[0, col]
    pooled = {
      name: np.concatenate(
        [r["h_train_values"] for r in groups.get((name, tau), [])] or [[]]
      )
      for name in methods
    }
    values = np.concatenate(list(pooled.values()))
    bins = np.linspace(min(values.min(), 0.0), values.max(), 40)
    for i, name in enumerate(methods):
      if pooled[name].size:
        ax.hist(
          pooled[name],
          bins=bins,
          color=colors[i % len(colors)],
          alpha=0.55,
          label=_display(name),
        )
    ax.axvline(1 / (2 * tau), color="k", ls="--", lw=0.8)
    ax.set_title(f"τ = {tau:g} (1/(2τ) = {1 / (2 * tau):g})", fontsize=8)
    ax.set_xlabel("h on training pairs", fontsize=8)
    ax.tick_params(labelsize=7)
  axes[0, 0].set_ylabel("pairs", fontsize=8)
  axes[0, 0].legend(fontsize=7)
  fig.suptitle(title, fontsize=9, x=0.02, ha="left")
  fig.subplots_adjust(
    left=0.75 / width, right=0.99, bottom=0.17, top=0.8, wspace=0.25
  )
  return _save(fig, path)


def report(
  workdir: str,
  out: str | None = None,
  prefix: str = "oracle_",
  title: str = "",
  runs: Sequence[str] = ("*",),
) -> dict[str, Any]:
  """Writes the table and the figures of `workdir`'s evaluations of the
  runs matching `runs` (module docstring); returns {"rows": aggregate's
  rows, "table": Markdown, "figures": paths}."""
  workdir = os.path.abspath(workdir)
  finals, curves = read_evaluations(os.path.join(workdir, "eval"), runs)
  rows = aggregate(finals)
  table = markdown_table(rows)
  os.makedirs(os.path.join(workdir, "report"), exist_ok=True)
  with open(os.path.join(workdir, "report", "summary.md"), "w") as f:
    f.write(table)
  with open(os.path.join(workdir, "report", "summary.json"), "w") as f:
    json.dump(rows, f, indent=2)
  out = out or os.path.join(workdir, "report")
  figure = lambda name: os.path.join(out, f"{prefix}{name}.png")
  figures = [
    plot_frontier(rows, figure("frontier"), title),
    plot_margins(finals, figure("h_hist"), title),
  ]
  if curves:
    figures.append(plot_curves(curves, figure("curves"), title))
  return dict(rows=rows, table=table, figures=figures)


def _main(argv, workdir, out, prefix, title, runs):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  with cli.user_errors():
    done = report(
      workdir.value, out.value, prefix.value, title.value, runs.value
    )
  print(done["table"], end="")
  for path in done["figures"]:
    print(path)


if __name__ == "__main__":
  _workdir = flags.DEFINE_string("workdir", None, "The experiment's workdir.")
  _out = flags.DEFINE_string("out", None, "Figures' directory.")
  _prefix = flags.DEFINE_string("prefix", "oracle_", "Figures' name prefix.")
  _title = flags.DEFINE_string("title", "", "Figures' title.")
  _runs = flags.DEFINE_multi_string(
    "runs", ["*"], "A glob of the run names to report (repeatable)."
  )
  flags.mark_flags_as_required(["workdir"])
  cli.run(lambda argv: _main(argv, _workdir, _out, _prefix, _title, _runs))
