r"""The oracle LM grid as one vmapped program against one process per run.

    python benchmarks/lm_grid_speed.py [--root=ROOT] [--sequential=K] \
        [--steps=N] [--tiny] [--out=DIR]

Both sides train the points of `experiments/lm_oracle.py:root=ROOT`'s
`get_sweep()` (ipo, dpo × τ ∈ {0.05, 0.1, 0.25, 0.5, 1} × seeds 0–2: 30
runs; `--tiny`: its 4-point sweep) from the SFT run ROOT/sft on the pairs
ROOT/pairs, and each is timed in one invocation, wall clock, process start,
imports and compilation included:

  grid        ONE fresh process: `python -m psipo_jax.lm_grid --config=...
              --root=OUT/grid` (every point in one jitted vmapped program);
  sequential  the commands `launch/sweep.py --config=... --root=OUT/sweep
              --dry-run` prints, i.e. exactly what the launcher runs, one
              `python -m psipo_jax.main` process per point, one after the
              other (`launch/sweep.py --parallel=1`). With `--sequential=K`
              below the number of points only the first K run and the total
              is K's mean × the number of points (said so in the output).

It prints both times and their ratio, and, for the points both sides ran,
the largest difference of the final eval loss (the grid's point equals its
run alone, tests/lm_grid_test.py). Without `--root` the prerequisites
(prompts, SFT run, labelled pairs) are built first, at small sizes, with
`psipo_jax.oracle_experiment`'s stages (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)


def _env() -> dict[str, str]:
  path = os.environ.get("PYTHONPATH", "")
  return {
    **os.environ,
    "PYTHONPATH": _REPO + (os.pathsep + path if path else ""),
  }


def build_prerequisites(root: str) -> None:
  """Prompts, the SFT run and the labelled pairs of a small experiment."""
  from psipo_jax import oracle_experiment

  settings = oracle_experiment.Settings(
    workdir=root,
    num_train_prompts=64,
    num_test_prompts=16,
    sft_responses_per_prompt=4,
    pairs_per_prompt=4,
    sft_steps=150,
  )
  for stage in ("data", "sft", "pairs"):
    print(f"building the prerequisites: --stage={stage}", flush=True)
    oracle_experiment.run(stage, settings)


def _children_cpu() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def _timed(argv: list[str], log: str) -> float:
  """Wall seconds of `argv` (its CPU seconds are printed too: on a shared
  machine they show how much of the wall time was the run's own work)."""
  start, cpu = time.perf_counter(), _children_cpu()
  with open(log, "a") as f:
    f.write(f"$ {shlex.join(argv)}\n")
    f.flush()
    done = subprocess.run(
      argv, cwd=_REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT
    )
  seconds = time.perf_counter() - start
  print(f"    ({_children_cpu() - cpu:.1f} CPU s)", flush=True)
  if done.returncode:
    raise SystemExit(
      f"{shlex.join(argv)} failed ({done.returncode}); see {log}"
    )
  return seconds


def _final_eval_loss(workdir: str) -> float:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return [l for l in lines if l["split"] == "eval"][-1]["loss"]


def _uptime() -> str:
  return subprocess.run(
    ["uptime"], capture_output=True, text=True
  ).stdout.strip()


def main(argv) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--root", help="an oracle experiment's workdir")
  parser.add_argument("--out", help="where both sides' runs go (default: temp)")
  parser.add_argument(
    "--sequential", type=int, help="one-process runs to launch (default: all)"
  )
  parser.add_argument("--steps", type=int, help="--config.total_steps")
  parser.add_argument("--tiny", action="store_true", help="the 4-point sweep")
  args = parser.parse_args(argv)

  root = args.root or tempfile.mkdtemp(prefix="lm_grid_bench_")
  if not args.root:
    build_prerequisites(root)
  out = args.out or tempfile.mkdtemp(prefix="lm_grid_out_")
  os.makedirs(out, exist_ok=True)
  spec = f"experiments/lm_oracle.py:root={os.path.abspath(root)}"
  if args.tiny:
    spec += ",tiny"
  extra = [] if args.steps is None else [f"--config.total_steps={args.steps}"]
  log = os.path.join(out, "benchmark.log")
  print(f"config {spec} {' '.join(extra)}; logs in {log}", flush=True)

  planned = subprocess.run(
    [
      sys.executable,
      "launch/sweep.py",
      f"--config={spec}",
      f"--root={out}/sweep",
      "--dry-run",
      *(["--", *extra] if extra else []),
    ],
    cwd=_REPO,
    env=_env(),
    capture_output=True,
    text=True,
    check=True,
  )
  commands = [shlex.split(line) for line in planned.stdout.splitlines()]
  n = len(commands)
  k = min(args.sequential or n, n)

  print(f"uptime before: {_uptime()}", flush=True)
  grid_s = _timed(
    [
      sys.executable,
      "-m",
      "psipo_jax.lm_grid",
      f"--config={spec}",
      f"--root={out}/grid",
      *(["--", *extra] if extra else []),
    ],
    log,
  )
  print(f"grid: {n} runs in one process: {grid_s:.1f} s", flush=True)
  per_run = []
  for command in commands[:k]:
    per_run.append(_timed(command, log))
    print(f"  one process: {per_run[-1]:.1f} s", flush=True)
  print(f"uptime after: {_uptime()}", flush=True)
  sequential_s = sum(per_run) * n / k
  scaled = (
    ""
    if k == n
    else f" (measured {k} of {n} runs, {sum(per_run):.1f} s; scaled by {n}/{k})"
  )
  print(f"one process per run: {n} runs: {sequential_s:.1f} s{scaled}")
  print(f"ratio (one process per run / grid): {sequential_s / grid_s:.2f}x")

  diffs = []
  for command in commands[:k]:
    workdir = next(a for a in command if a.startswith("--workdir="))
    workdir = workdir.split("=", 1)[1]
    grid_dir = os.path.join(
      f"{out}/grid", *os.path.normpath(workdir).split(os.sep)[-2:]
    )
    diffs.append(abs(_final_eval_loss(grid_dir) - _final_eval_loss(workdir)))
  print(f"max |final eval loss, grid - alone| over {k} runs: {max(diffs):.2e}")


if __name__ == "__main__":
  main(sys.argv[1:])
