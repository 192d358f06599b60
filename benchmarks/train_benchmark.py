r"""Benchmarks of the training system on CPU (not a test; prints ratios).

  PYTHONPATH=. python benchmarks/train_benchmark.py [--steps=2000] [--repeats=3]

1. Checkpointing overhead: the bandit config (experiments/bandit_train.py)
   through `train_and_evaluate`, saving every `ckpt_every` steps (the
   default interval) versus only at the end. Time per step is taken from the
   loop's own `steps_per_sec` windows, the first window (compilation)
   excluded; the overhead is (t_ckpt − t_none) / t_none. A warm-up run
   first pays Orbax's one-off start-up; then runs alternate and the medians
   are compared, since the machine's cores are shared.
2. Data parallelism: steps/s of the jitted train step on a mesh of 8 fake CPU
   devices versus 1 device, same global batch, in one process.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # pylint: disable=g-import-not-at-top,g-bad-import-order
import importlib.util
import json
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from psipo_jax import sharding
from psipo_jax import train
from psipo_jax.models import TabularPolicy
from psipo_jax.train_state import TrainState
from psipo_jax.loss_config import LossConfig
from psipo_jax.train_step import make_train_step

REPO = pathlib.Path(__file__).resolve().parents[1]


def _bandit_config():
  spec = importlib.util.spec_from_file_location(
    "bandit_train", REPO / "experiments" / "bandit_train.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _seconds_per_step(workdir: str) -> float:
  """Mean wall time per step over the logged windows after the first."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    windows = [w for w in map(json.loads, f) if w["split"] == "train"]
  steps = np.diff([w["step"] for w in windows])  # steps in windows 2, 3, ...
  seconds = sum(n / w["steps_per_sec"] for n, w in zip(steps, windows[1:]))
  return seconds / sum(steps)


def checkpoint_overhead(steps: int, repeats: int) -> None:
  config = _bandit_config()
  interval = config.ckpt_every
  # Warm-up: the first save in a process costs ~0.5 s more (Orbax start-up),
  # once per run, not per interval; keep it out of the comparison.
  config.total_steps = 2 * interval
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
  config.total_steps = steps
  timings = {"every": [], "end only": []}
  for _ in range(repeats):
    for name, ckpt_every in (("every", interval), ("end only", steps)):
      config.ckpt_every = ckpt_every
      with tempfile.TemporaryDirectory() as workdir:
        train.train_and_evaluate(config, workdir)
        timings[name].append(_seconds_per_step(workdir))
  with_ckpt, without = (
    statistics.median(timings[k]) for k in ("every", "end only")
  )
  print(
    f"\n[checkpointing] bandit config, {steps} steps, ckpt_every={interval}, {jax.device_count()} devices"
  )
  print(
    f"  time/step, checkpoint every {interval}: {with_ckpt * 1e3:.3f} ms (runs: "
    + ", ".join(f"{t * 1e3:.3f}" for t in timings["every"])
    + ")"
  )
  print(
    f"  time/step, checkpoint at the end only: {without * 1e3:.3f} ms (runs: "
    + ", ".join(f"{t * 1e3:.3f}" for t in timings["end only"])
    + ")"
  )
  print(f"  overhead: {(with_ckpt - without) / without:+.1%} of step time")


def _steps_per_sec(mesh, batch_size: int, steps: int) -> float:
  optimizer = optax.adam(0.01)
  graphdef, state = TrainState.create(
    TabularPolicy(jnp.log(jnp.full(3, 1 / 3))),
    optimizer,
    rng=jax.random.PRNGKey(0),
  )
  step = make_train_step(graphdef, LossConfig("ipo", tau=0.1), optimizer)
  state_sharding = sharding.state_shardings(mesh, state)
  jitted = sharding.jit_train_step(step, mesh, state_sharding)
  state = jax.device_put(state, state_sharding)
  rng = np.random.default_rng(0)
  batches = [
    sharding.global_batch(
      mesh,
      {
        "chosen": rng.integers(0, 3, batch_size),
        "rejected": rng.integers(0, 3, batch_size),
      },
    )
    for _ in range(8)
  ]
  state, metrics = jitted(state, batches[0])  # compile
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = jitted(state, batches[i % len(batches)])
    jax.device_get(metrics)  # the loop fetches metrics every step
  return steps / (time.perf_counter() - start)


def data_parallel_throughput(steps: int, repeats: int) -> None:
  meshes = {
    "1 device": sharding.make_mesh(jax.devices()[:1]),
    "8 devices": sharding.make_mesh(),
  }
  print(
    f"\n[data parallelism] jitted train step (tabular IPO), {steps} steps, metrics fetched each step"
  )
  for batch_size in (64, 8192):
    rates = {
      name: statistics.median(
        _steps_per_sec(mesh, batch_size, steps) for _ in range(repeats)
      )
      for name, mesh in meshes.items()
    }
    print(
      f"  global batch {batch_size:5d}: 1 device {rates['1 device']:8.1f} steps/s,"
      f" 8 devices {rates['8 devices']:8.1f} steps/s, ratio 8/1 = {rates['8 devices'] / rates['1 device']:.2f}"
    )


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  print(
    f"jax {jax.__version__}, {os.cpu_count()} CPU cores, {jax.device_count()} fake CPU devices"
  )
  checkpoint_overhead(args.steps, args.repeats)
  data_parallel_throughput(args.steps, args.repeats)


if __name__ == "__main__":
  main()
