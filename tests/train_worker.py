"""A training run in its own process, for the interruption and multi-host tests.

  python tests/train_worker.py WORKDIR TOTAL_STEPS [--die_at=N --signal=KILL|TERM]
      [--out=PARAMS.npy] [--num_processes=P --process_id=I --port=PORT]

Trains the bandit config of experiments/bandit_train.py (`make_config`). With
--die_at the process sends itself the signal when the loop asks for the
batch of step N+1 (N steps done): a real SIGKILL or SIGTERM mid-run, while
an async checkpoint may still be in flight. --out saves the final policy
logits (process 0). With --num_processes, each process gets 4 CPU devices
and joins a jax.distributed run on 127.0.0.1:PORT.
"""

import argparse
import importlib.util
import os
import pathlib
import signal
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(arg: str | None = None):
  spec = importlib.util.spec_from_file_location(
    "bandit_train", REPO / "experiments" / "bandit_train.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def make_config(total_steps: int, *, ckpt_every: int = 10):
  """The bandit config, small: 8 pairs per step, checkpoints every 10 steps."""
  config = load_config("runlocal")
  config.total_steps = total_steps
  config.input.batch_size = 16
  config.ckpt_every = ckpt_every
  config.log_every = 10
  config.eval_every = 1000
  config.keep_checkpoints = 3
  return config


class _DieAt:
  """Wraps a data iterator; signals the process before yielding batch `step`.

  It first waits (up to a minute) for `wait_for`, the newest checkpoint due by
  then, to be committed by Orbax's background thread, so that the signal
  lands after a checkpoint as in a real preemption long after the save.
  """

  def __init__(
    self, iterator, step: int, signum: int, wait_for: pathlib.Path | None
  ):
    self._iterator, self._step, self._signum = iterator, step, signum
    self._wait_for = wait_for

  def __next__(self):
    state = (
      self._iterator.get_state()
    )  # pairs sampler: "step"; Grain: "next_batch"
    if state.get("step", state.get("next_batch")) == self._step:
      deadline = time.monotonic() + 60
      while (
        self._wait_for
        and not self._wait_for.exists()
        and time.monotonic() < deadline
      ):
        time.sleep(0.01)
      os.kill(os.getpid(), self._signum)
    return next(self._iterator)

  def get_state(self):
    return self._iterator.get_state()

  def set_state(self, state):
    self._iterator.set_state(state)


def check_lm_kill_9_resume(tmp_path: pathlib.Path, *flags: str) -> pathlib.Path:
  """For the tests: a 12-step tiny-LM run of this worker (`--lm`, plus
  `flags`) whole, and again SIGKILLed after its step-4 checkpoint (step 6)
  then rerun; asserts the rerun resumed from step 4 and ends with the whole
  run's parameters bit for bit. Returns the whole run's workdir."""
  import subprocess  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top

  from psipo_jax.data import text_task  # pylint: disable=g-import-not-at-top

  worker = pathlib.Path(__file__)
  env = dict(
    os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(worker.parent)])
  )
  text_task.cached_files(
    num_train=64, num_test=20, cache_dir=str(tmp_path / "cache")
  )

  def run(workdir, *extra):
    return subprocess.run(
      [sys.executable, str(worker), str(workdir), "12", "--lm", *flags, *extra],
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )

  whole = run(tmp_path / "whole", f"--out={tmp_path / 'whole.npz'}")
  assert whole.returncode == 0, whole.stderr[-3000:]
  killed = run(tmp_path / "killed", "--die_at=6")
  assert killed.returncode == -9, killed.stderr[-3000:]
  resumed = run(tmp_path / "killed", f"--out={tmp_path / 'resumed.npz'}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from step 4" in resumed.stderr
  want, got = np.load(tmp_path / "whole.npz"), np.load(tmp_path / "resumed.npz")
  assert len(want.files) == len(got.files) > 0
  for name in want.files:
    np.testing.assert_array_equal(got[name], want[name])
  return tmp_path / "whole"


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("total_steps", type=int)
  parser.add_argument("--die_at", type=int)
  parser.add_argument("--signal", choices=("KILL", "TERM"), default="KILL")
  parser.add_argument("--out")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  parser.add_argument("--port", type=int)
  parser.add_argument(
    "--lm",
    action="store_true",
    help="the tiny language model of tests/train_lm_test.py instead",
  )
  parser.add_argument(
    "--packed", action="store_true", help="with --lm: input.packing=True"
  )
  args = parser.parse_args()

  if args.num_processes:
    import xla_flags  # pylint: disable=g-import-not-at-top  # tests/

    os.environ["XLA_FLAGS"] = xla_flags.xla_flags()  # not the suite's 8 devices
    os.environ["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{args.port}"
    os.environ["JAX_NUM_PROCESSES"] = str(args.num_processes)
    os.environ["JAX_PROCESS_ID"] = str(args.process_id)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.INFO)  # the tests read the resume messages

  sys.path.insert(0, str(REPO))
  from psipo_jax import inputs, sharding, train  # pylint: disable=g-import-not-at-top

  if args.num_processes:
    jax.config.update("jax_num_cpu_devices", 8 // args.num_processes)
  sharding.initialize_distributed()

  if args.lm:
    from train_lm_test import _tiny_lm_config  # pylint: disable=g-import-not-at-top

    cache = pathlib.Path(args.workdir).parent
    config = _tiny_lm_config(cache, total_steps=args.total_steps)
    config.ckpt_every = 4
    config.input.packing = args.packed
  else:
    config = make_config(args.total_steps)
  if args.die_at is not None:
    build_input = inputs.build
    signum = getattr(signal, "SIG" + args.signal)
    last_checkpoint = args.die_at // config.ckpt_every * config.ckpt_every
    wait_for = (
      pathlib.Path(args.workdir, "checkpoints", str(last_checkpoint))
      if last_checkpoint
      else None
    )

    def dying_input(*a, **k):
      iterator, eval_batch = build_input(*a, **k)
      return _DieAt(iterator, args.die_at, signum, wait_for), eval_batch

    inputs.build = dying_input

  state = train.train_and_evaluate(config, args.workdir)
  if args.out and jax.process_index() == 0:
    # Replicated: this process's first shard is the whole array.
    if args.lm:
      leaves = jax.tree.leaves(state.params)
      np.savez(args.out, *[np.asarray(x.addressable_data(0)) for x in leaves])
    else:
      np.save(args.out, np.asarray(state.params["logits"].addressable_data(0)))


if __name__ == "__main__":
  main()
