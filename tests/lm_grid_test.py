"""The vmapped LM grid (psipo_jax.lm_grid): a point inside the grid equals
the same run alone, seeds matter, a non-finite point is named, and sweeps
whose points differ in the program are refused."""

import json
import os
import shutil
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import lm_ipo_tiny
from experiments import lm_oracle
from psipo_jax import checkpointing
from psipo_jax import lm_grid
from psipo_jax import models
from psipo_jax import run_config
from psipo_jax import sweeps
from psipo_jax import train
from psipo_jax.data import text_task

STEPS = 3


def _config(files, init=""):
  config = lm_ipo_tiny.get_config("runlocal,init=")
  config.model.num_layers = 2  # the `tiny` preset's depth: a quicker test
  config.input.files = files
  # One prepared copy of the dataset for every run (default: per workdir).
  config.input.data_dir = os.path.join(os.path.dirname(files["train"]), "tfds")
  config.input.batch_size = 8
  config.total_steps = STEPS
  config.optimizer.warmup_steps = 0
  config.optimizer.learning_rate = 3e-3
  config.log_every = 1
  config.eval_every = config.ckpt_every = STEPS
  config.init_checkpoint = init or None
  return config


def _point(config, workdir, **overrides):
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  config.input.seed = config.seed
  name = sweeps.run_name(overrides)
  loss = train.validate_config(config, os.path.join(workdir, name))
  return lm_grid.Point(name, os.path.join(workdir, name), config, loss)


def _params(config, workdir):
  abstract = nnx.eval_shape(
    lambda: models.build_model(config.model, rngs=nnx.Rngs(0))
  )
  params = nnx.to_pure_dict(nnx.split(abstract, nnx.Param, ...)[1])
  single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = checkpointing.abstract_with_shardings(
    params, jax.tree.map(lambda _: single, params)
  )
  return jax.tree.map(np.asarray, train.load_params("test", workdir, params))


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  for line in lines:
    line.pop("steps_per_sec", None)
  return lines


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return text_task.cached_files(
    num_train=48,
    num_test=12,
    cache_dir=str(tmp_path_factory.mktemp("task")),
  )


@pytest.mark.slow
def test_a_grid_point_equals_its_run_alone(files, tmp_path):
  # The initial policy (and shared reference) of every point: another run.
  init = str(tmp_path / "init")
  start = _config(files)
  start.total_steps = 1
  train.train_and_evaluate(start, init)
  base = _config(files, init=init)
  grid = str(tmp_path / "grid")
  points = [
    _point(base, grid, **{"loss.name": name, "loss.tau": tau, "seed": seed})
    for name, tau, seed in [
      ("ipo", 0.25, 0),
      ("ipo", 0.25, 1),
      ("dpo", 1.0, 1),
      ("dpo", 0.1, 1),
      ("ipo", 1e-30, 0),  # (h - 1/(2τ))² overflows: this point goes inf
    ]
  ]
  with pytest.raises(lm_grid.NonFiniteError) as error:
    lm_grid.train_grid(points)
  bad = points[-1]
  assert f"1 of 5 grid points" in str(error.value)
  assert f"{bad.name}: step 1: loss is inf" in str(error.value)
  assert not sweeps.is_finished(bad.workdir)
  for point in points[:-1]:
    assert sweeps.is_finished(point.workdir, STEPS), point.name

  # The same point alone, through the trainer.
  point = points[2]
  alone = str(tmp_path / "alone")
  state = train.train_and_evaluate(point.config, alone)
  got = _params(point.config, point.workdir)
  want = jax.tree.map(np.asarray, state.params)
  # Adam divides each gradient by its own running RMS, so where a gradient
  # is nearly zero, float32 rounding in another reduction order (the trainer
  # splits the batch over 8 devices, the grid vmaps on one) moves that
  # element by a fraction of the learning rate (2 of 8192 elements of one
  # kernel by 6e-6 here); every element agrees to lr/100.
  atol = base.optimizer.learning_rate / 100
  jax.tree.map(
    lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-5, atol=atol),
    got,
    want,
  )
  assert run_config.read(point.workdir) == run_config.read(alone)
  got_lines, want_lines = _metrics(point.workdir), _metrics(alone)
  assert [(l["step"], l["split"]) for l in got_lines] == [
    (l["step"], l["split"]) for l in want_lines
  ]
  for g, w in zip(got_lines, want_lines):
    assert set(g) == set(w)
    for key in set(w) - {"step", "split"}:
      np.testing.assert_allclose(g[key], w[key], rtol=1e-4, atol=1e-5)
  assert set(os.listdir(point.workdir)) >= set(os.listdir(alone)) - {
    "tensorboard"
  }

  # A different seed (same loss and τ) trains on other batches.
  other = _params(point.config, points[3].workdir)
  seed0 = _params(point.config, points[0].workdir)
  seed1 = _params(point.config, points[1].workdir)
  assert (
    max(
      float(np.max(np.abs(a - b)))
      for a, b in zip(jax.tree.leaves(seed0), jax.tree.leaves(seed1))
    )
    > 1e-4
  )
  assert (
    max(
      float(np.max(np.abs(a - b)))
      for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(got))
    )
    > 1e-4
  )


def test_points_that_change_the_program_are_refused(files, tmp_path):
  base = _config(files)
  ok = [
    _point(base, str(tmp_path), **{"loss.name": "ipo", "seed": 0}),
    _point(base, str(tmp_path), **{"loss.name": "dpo", "seed": 1}),
    _point(
      base, str(tmp_path), **{"loss.name": "cdpo", "loss.label_smoothing": 0.1}
    ),
  ]
  lm_grid.check_uniform(ok)  # seed, loss.name and numeric options may vary
  for key, value in [
    ("input.batch_size", 16),
    ("input.max_length", 30),
    ("total_steps", 5),
    ("loss.normalize", "mean"),
    ("optimizer.learning_rate", 1e-2),
  ]:
    bad = _point(base, str(tmp_path), **{key: value})
    with pytest.raises(ValueError, match=rf"^{key} is .* changes the program"):
      lm_grid.check_uniform([ok[0], bad])
  # Online IPO samples each point's pairs from its own policy: never
  # trained offline by the grid, even when every point asks for it.
  online = base.copy_and_resolve_references()
  online.online = lm_oracle.get_config(f"root={tmp_path},online").online
  online_points = [_point(online, str(tmp_path), seed=s) for s in (0, 1)]
  with pytest.raises(ValueError, match="^online.enabled: .* launch/sweep.py"):
    lm_grid.check_uniform(online_points)


def test_the_command_line_plans_the_config_files_sweep(files, tmp_path):
  path = tmp_path / "exp.py"
  path.write_text(
    textwrap.dedent(f"""
    from experiments import lm_ipo_tiny
    from psipo_jax import sweeps

    def get_config(arg=None):
      config = lm_ipo_tiny.get_config("runlocal,init=")
      config.input.files = {dict(files)!r}
      return config

    def get_sweep(arg=None):
      if arg == "bad":
        return sweeps.sweep("input.batch_size", [8, 16])
      return sweeps.product(
        sweeps.sweep("loss.name", ["ipo", "dpo"]), sweeps.sweep("seed", [0, 1])
      )
    """)
  )
  names = lm_grid.run(str(path), str(tmp_path / "runs"), dry_run=True)
  assert names == [
    sweeps.run_name({"loss.name": n, "seed": s})
    for n in ("ipo", "dpo")
    for s in (0, 1)
  ]
  with pytest.raises(ValueError, match="^input.batch_size is 8 in grid point"):
    lm_grid.run(f"{path}:bad", str(tmp_path / "runs"), dry_run=True)


class _StopAfter:
  """A train iterator that raises after `n` batches (an interrupted run)."""

  def __init__(self, it, n):
    self._it, self._left = it, n

  def __next__(self):
    if self._left == 0:
      raise KeyboardInterrupt("interrupted")
    self._left -= 1
    return next(self._it)

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


@pytest.mark.slow
def test_an_interrupted_grid_resumes_and_equals_the_uninterrupted_one(
  files, tmp_path, monkeypatch
):
  init = str(tmp_path / "init")
  start = _config(files)
  start.total_steps = 1
  train.train_and_evaluate(start, init)
  base = _config(files, init=init)
  base.ckpt_every = 1
  base.keep_checkpoints = STEPS

  def points(root, config=base):
    return [
      _point(config, str(tmp_path / root), **{"loss.name": n, "seed": s})
      for n, s in [("ipo", 0), ("dpo", 1)]
    ]

  lm_grid.train_grid(points("whole"))
  build = lm_grid.inputs.build

  def interrupted_build(*args, **kwargs):
    train_iter, eval_batches = build(*args, **kwargs)
    return _StopAfter(train_iter, STEPS - 1), eval_batches

  monkeypatch.setattr(lm_grid.inputs, "build", interrupted_build)
  with pytest.raises(KeyboardInterrupt):
    lm_grid.train_grid(points("resumed"))
  monkeypatch.setattr(lm_grid.inputs, "build", build)
  for point in points("resumed"):
    assert not sweeps.is_finished(point.workdir)

  # Points stopped at different steps (a grid killed while saving) are
  # refused, naming each point's newest step.
  shutil.copytree(tmp_path / "resumed", tmp_path / "uneven")
  ipo = points("uneven")[0]
  shutil.rmtree(os.path.join(ipo.workdir, "checkpoints", str(STEPS - 1)))
  with pytest.raises(ValueError, match=r"different steps \(\{'loss.name=ipo"):
    lm_grid.train_grid(points("uneven"))

  # A resumed grid checks its config as a resumed run does.
  changed = base.copy_and_resolve_references()
  changed.optimizer.learning_rate = 1e-2
  with pytest.raises(run_config.ConfigChangeError, match="learning_rate"):
    lm_grid.train_grid(points("resumed", changed))

  lm_grid.train_grid(points("resumed"))
  for whole, resumed in zip(points("whole"), points("resumed")):
    assert sweeps.is_finished(resumed.workdir, STEPS)
    jax.tree.map(
      np.testing.assert_array_equal,
      _params(base, resumed.workdir),
      _params(base, whole.workdir),
    )
    # Every step's metrics once more from the resumed step: the last line
    # per (split, step) is the uninterrupted run's.
    last = lambda lines: {(l["split"], l["step"]): l for l in lines}
    assert last(_metrics(resumed.workdir)) == last(_metrics(whole.workdir))
