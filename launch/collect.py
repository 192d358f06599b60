#!/usr/bin/env python3
r"""Collects the runs of a sweep into one table and standard plots.

  launch/collect.py --root=ROOT/<sweep> [--out=DIR] [--metrics=eval/loss,...]
      [--best=NAME:min|max ...] [--x=loss.tau] [--over=seed]

Reads `sweep.json` (written by launch/sweep.py) and every run's
`metrics.jsonl` (one JSON object per line: step, split, metrics; after a
resume some steps appear twice, and the last line written for a (split,
step) wins). Writes to DIR (default: the sweep directory):

  results.csv   one row per point: its overrides, status (finished /
                incomplete / not started), last step, then for every metric
                `final/<split>/<name>` (value at the split's last step) and,
                for metrics with a direction, `best/...` and `best_step/...`.
  results.md    the same rows with the selected --metrics only.
  summary.md    mean ± 95% CI (Student t) over --over (seeds) of the
                selected metrics, one row per other combination.
  plots/*.png   per selected metric: final value vs --x (default loss.tau),
                one line per value of the other keys (e.g. per loss), mean
                over --over with its 95% CI band.

ROOT may be a gs:// path (read with etils.epath; needs gcsfs), and so may DIR.

Metric directions: names ending in `loss` are minimised, names containing
`accurac` maximised, unless --best says otherwise; only metrics with a
direction get a best value. --metrics defaults to the eval metrics with a
direction (train ones if there are no eval metrics).
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import math
import os
import sys
from typing import Any, Iterable, Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from psipo_jax import cli  # pylint: disable=g-import-not-at-top
from psipo_jax import stats  # pylint: disable=g-import-not-at-top
from psipo_jax import sweeps  # pylint: disable=g-import-not-at-top

METRICS_FILE = "metrics.jsonl"
_NOT_METRICS = ("step", "split")


def _path(path):
  from etils import epath  # Local paths and gs:// alike.

  return epath.Path(path)


def read_metrics(path) -> dict[str, dict[int, float]]:
  """`{"<split>/<name>": {step: value}}`; a later line for a step wins.

  Raises ValueError naming file and line for a line that is not a JSON
  object with an integer step, except a truncated last line (a run killed
  mid-write), which is skipped with a warning.
  """
  series: dict[str, dict[int, float]] = collections.defaultdict(dict)
  lines = _path(path).read_text(encoding="utf-8").split("\n")
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      step = record["step"]
      if not isinstance(step, int):
        raise ValueError(f"step {step!r} is not an integer")
    except (ValueError, KeyError, TypeError) as e:
      if number == len(lines) or (number == len(lines) - 1 and not lines[-1]):
        print(
          f"warning: {path}:{number}: skipping a truncated last line",
          file=sys.stderr,
        )
        continue
      raise ValueError(
        f"{path}:{number}: not a metrics record ({e}): {line[:200]!r}"
      ) from None
    split = record.get("split", "train")
    for name, value in record.items():
      if name not in _NOT_METRICS and isinstance(value, (int, float)):
        series[f"{split}/{name}"][step] = float(value)
  return dict(series)


def direction(metric: str, overrides: dict[str, str]) -> str | None:
  """ "min", "max" or None for `<split>/<name>` (see the module docstring)."""
  name = metric.split("/", 1)[-1]
  for key in (metric, name):
    if key in overrides:
      return overrides[key]
  if name.endswith("loss"):
    return "min"
  if "accurac" in name:
    return "max"
  return None


def summarize_run(
  series: dict[str, dict[int, float]], directions: dict[str, str]
) -> dict[str, Any]:
  """Final and best values of every metric of one run."""
  row: dict[str, Any] = {}
  for metric, values in sorted(series.items()):
    last = max(values)
    row[f"final/{metric}"] = values[last]
    goal = direction(metric, directions)
    if goal is not None:
      finite = {s: v for s, v in values.items() if math.isfinite(v)}
      if finite:
        pick = min if goal == "min" else max
        best_step = pick(sorted(finite), key=lambda s: finite[s])
        row[f"best/{metric}"] = finite[best_step]
        row[f"best_step/{metric}"] = best_step
  return row


def collect(
  sweep_dir: str, directions: dict[str, str]
) -> tuple[list[dict[str, Any]], list[str]]:
  """One row per point of the manifest; returns (rows, override keys)."""
  manifest_path = _path(sweep_dir) / sweeps.MANIFEST
  if not manifest_path.is_file():
    raise FileNotFoundError(
      f"{manifest_path} not found: --root must be a sweep directory "
      "(ROOT/<sweep>, as printed by launch/sweep.py)"
    )
  manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
  keys: list[str] = []
  rows = []
  for point in manifest["points"]:
    keys += [k for k in point["overrides"] if k not in keys]
    workdir = _path(sweep_dir) / point["name"]
    metrics_path = workdir / METRICS_FILE
    series = read_metrics(metrics_path) if metrics_path.is_file() else {}
    if sweeps.is_finished(workdir):
      status = "finished"
    else:
      status = "incomplete" if workdir.is_dir() else "not started"
    steps = [s for values in series.values() for s in values]
    rows.append(
      {
        "run": point["name"],
        **point["overrides"],
        "status": status,
        "step": max(steps) if steps else None,
        **summarize_run(series, directions),
      }
    )
  known = {p["name"] for p in manifest["points"]}
  strays = sorted(
    d.name
    for d in _path(sweep_dir).iterdir()
    if d.is_dir() and d.name not in known | {"plots"}
  )
  if strays:
    print(
      f"warning: {len(strays)} run directories are not in {sweeps.MANIFEST} and are "
      f"left out: {', '.join(strays)}",
      file=sys.stderr,
    )
  return rows, keys


def default_metrics(rows: Sequence[dict[str, Any]]) -> list[str]:
  with_best = sorted(
    {c[len("best/") :] for row in rows for c in row if c.startswith("best/")}
  )
  evals = [m for m in with_best if m.startswith("eval/")]
  return evals or with_best


# ---------------------------------------------------------------------------
# Aggregation over seeds: mean and Student-t 95% confidence interval.


def mean_ci(values: Sequence[float]) -> tuple[float, float, int]:
  """(mean, half-width of the 95% t-interval, n); half-width nan for n < 2."""
  mean, half_width = stats.mean_and_ci(values)
  return float(mean), float(half_width), len(values)


def aggregate(rows, keys, over, metric):
  """{group (values of keys other than `over`): (mean, ci, n)} of final metric.

  Runs without the metric are left out (n counts the others); an unfinished
  run (its "final" value is from another step than its seeds') and a
  non-finite value are left out with a warning naming the run.
  """
  group_keys = [k for k in keys if k != over]
  groups: dict[tuple, list[float]] = collections.defaultdict(list)
  for row in rows:
    value = row.get(f"final/{metric}")
    if value is None:
      continue
    if row["status"] != "finished":
      print(
        f"warning: {row['run']} is {row['status']}: left out of the mean",
        file=sys.stderr,
      )
      continue
    if not math.isfinite(value):
      print(
        f"warning: final/{metric} = {value} in {row['run']}: left out of the mean",
        file=sys.stderr,
      )
      continue
    groups[tuple(row.get(k) for k in group_keys)].append(value)
  return group_keys, {g: mean_ci(v) for g, v in groups.items()}


# ---------------------------------------------------------------------------
# Output.


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.6g}"
  return str(value)


def _override_text(value: Any) -> str:
  """Override values as declared (τ = 1.0 stays "1.0", not "1")."""
  return "" if value is None else sweeps.format_value(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def write_results(out_dir, rows, keys, metrics) -> None:
  columns = ["run", *keys, "status", "step"]
  metric_columns = sorted({c for row in rows for c in row} - set(columns))
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=columns + metric_columns)
  writer.writeheader()
  writer.writerows(rows)
  (_path(out_dir) / "results.csv").write_text(text.getvalue())
  shown = [
    f"{kind}/{m}"
    for m in metrics
    for kind in ("final", "best")
    if any(f"{kind}/{m}" in row for row in rows)
  ]
  header = ["run", *keys, "status", "step", *shown]
  (_path(out_dir) / "results.md").write_text(
    markdown_table(
      header,
      (
        [
          _override_text(row.get(c)) if c in keys else row.get(c)
          for c in header
        ]
        for row in rows
      ),
    )
  )


def write_summary(out_dir, aggregates, over) -> None:
  """`aggregates`: {metric: aggregate(...)}."""
  sections = []
  for metric, (group_keys, stats) in aggregates.items():
    body = [
      [
        *map(_override_text, group),
        f"{m:.6g} ± {ci:.2g}" if math.isfinite(ci) else f"{m:.6g}",
        n,
      ]
      for group, (m, ci, n) in stats.items()
    ]
    sections.append(
      f"### final/{metric} (mean ± 95% CI over {over})\n\n"
      + markdown_table([*group_keys, f"final/{metric}", "n"], body)
    )
  (_path(out_dir) / "summary.md").write_text("\n".join(sections))


def plot(out_dir, aggregates, *, x, over) -> list[str]:
  """One PNG per metric of `aggregates` ({metric: aggregate(...)}): final
  value vs `x`, a line per combination of the other keys (but `over`), with
  the 95% CI over `over` as a band (`over` None: one run per point)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  plots_dir = _path(out_dir) / "plots"
  plots_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  for metric, (group_keys, stats) in aggregates.items():
    lines: dict[Any, list] = collections.defaultdict(list)
    for group, (m, ci, _) in stats.items():
      values = dict(zip(group_keys, group))
      if values[x] is None:  # A point of a chained sweep without this key.
        continue
      label = (
        ", ".join(f"{k}={values[k]}" for k in group_keys if k != x) or metric
      )
      lines[label].append((values[x], m, ci))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, points in sorted(lines.items(), key=lambda kv: str(kv[0])):
      points.sort()
      xs, ms, cis = zip(*points)
      (line,) = ax.plot(xs, ms, marker="o", label=label)
      lo = [m - c if math.isfinite(c) else m for m, c in zip(ms, cis)]
      hi = [m + c if math.isfinite(c) else m for m, c in zip(ms, cis)]
      ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    xs_all = [p[0] for pts in lines.values() for p in pts]
    numeric = xs_all and all(isinstance(v, (int, float)) for v in xs_all)
    if numeric and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
      ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"mean and 95% CI over {over}" if over else metric, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()  # savefig cannot write to gs:// itself.
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    path = plots_dir / (metric.replace("/", "_") + ".png")
    path.write_bytes(png.getvalue())
    paths.append(f"plots/{path.name}")
  return paths


def _numeric_key(rows, keys, exclude) -> str | None:
  for key in keys:
    if key not in exclude and all(
      isinstance(r.get(key), (int, float)) for r in rows
    ):
      return key
  return None


def parse_args(argv):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--root", required=True, help="the sweep directory ROOT/<sweep>"
  )
  parser.add_argument("--out", help="output directory (default: --root)")
  parser.add_argument(
    "--metrics", help="comma-separated <split>/<name> to tabulate and plot"
  )
  parser.add_argument(
    "--best",
    action="append",
    default=[],
    metavar="NAME:min|max",
    help="direction of a metric (repeatable)",
  )
  parser.add_argument("--x", default="loss.tau", help="x axis of the plots")
  parser.add_argument("--over", default="seed", help="aggregated over (CI)")
  parser.add_argument("--no-plots", action="store_true")
  args = parser.parse_args(argv)
  args.directions = {}
  for item in args.best:
    name, _, goal = item.rpartition(":")
    if goal not in ("min", "max") or not name:
      parser.error(f"--best={item}: expected NAME:min or NAME:max")
    args.directions[name] = goal
  return args


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  sweep_dir = args.root.rstrip("/")
  out_dir = args.out or sweep_dir
  with cli.user_errors():  # A missing sweep, a corrupt metrics line, --out.
    rows, keys = collect(sweep_dir, args.directions)
    metrics = args.metrics.split(",") if args.metrics else default_metrics(rows)
    logged = {
      c.split("/", 1)[1] for row in rows for c in row if c.startswith("final/")
    }
    missing = [m for m in metrics if m not in logged]
    if missing:
      raise ValueError(
        f"--metrics: no run logged {', '.join(missing)}; "
        f"logged: {', '.join(sorted(logged))}"
      )
    try:
      _path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise ValueError(
        f"--out={out_dir}: cannot create it ({e.strerror or e})"
      ) from None
  write_results(out_dir, rows, keys, metrics)
  written = ["results.csv", "results.md"]
  aggregates = {m: aggregate(rows, keys, args.over, m) for m in metrics}
  if args.over in keys:
    write_summary(out_dir, aggregates, args.over)
    written.append("summary.md")
  x = args.x if args.x in keys else _numeric_key(rows, keys, {args.over})
  finished = sum(r["status"] == "finished" for r in rows)
  if not args.no_plots and metrics and x is not None:
    written += plot(
      out_dir, aggregates, x=x, over=args.over if args.over in keys else None
    )
  print(
    f"{len(rows)} runs ({finished} finished) -> {out_dir}: {', '.join(written)}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
