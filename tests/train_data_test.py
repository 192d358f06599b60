"""train_and_evaluate on a TFDS dataset read through the Grain pipeline.

The config is experiments/bandit_tfds_train.py: the paper's dataset D1 (or a
sampled one) as a `bandit_preferences` dataset prepared in <workdir>/tfds.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import xla_flags  # tests/xla_flags.py

from psipo_jax import checkpointing
from psipo_jax import data
from psipo_jax import psi
from experiments import bandit_tfds_train as _EXPERIMENT
from psipo_jax import inputs
from psipo_jax import train
from train_test import _checkpoint_steps, _final_logits, _finish, _free_port

REPO = pathlib.Path(__file__).resolve().parents[1]

# p*(y_i ≻ y_j) of the sampled dataset (train and test splits) of the eval test.
_PREF = ((0.5, 0.8, 0.9), (0.2, 0.5, 0.7), (0.1, 0.3, 0.5))


def make_config(total_steps: int, **input_overrides):
  config = _EXPERIMENT.get_config("runlocal")
  config.total_steps = total_steps
  config.log_every = 10
  config.eval_every = 1000
  config.ckpt_every = 10
  for key, value in input_overrides.items():
    config.input[key] = value
  return config


def test_ipo_on_d1_reaches_the_closed_form_optimum(tmp_path):
  config = make_config(200)
  config.loss.tau = 1.0
  config.optimizer.learning_rate = 0.05
  state = train.train_and_evaluate(config, tmp_path)

  # A batch of 24 is 8 passes over D1's 3 pairs: full-batch Adam, which
  # settles at the minimiser of Eq. 17 on D1.
  target = psi.ipo_dataset_optimum(
    _EXPERIMENT.D1, 3, np.full(3, 1 / 3), config.loss.tau
  )
  np.testing.assert_allclose(
    jax.nn.softmax(_final_logits(state)), target.policy, atol=2e-3
  )
  # The loss reaches its minimum over D1, Σ_k (h_k − 1/(2τ))² / 3 at the optimum.
  pairs = np.asarray(_EXPERIMENT.D1)
  h_opt = target.logits[pairs[:, 0]] - target.logits[pairs[:, 1]]
  min_loss = np.mean((h_opt - 1 / (2 * config.loss.tau)) ** 2)
  lines = [
    json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
  ]
  train_losses = [l["loss"] for l in lines if l["split"] == "train"]
  assert train_losses[0] > min_loss + 1e-3
  np.testing.assert_allclose(train_losses[-1], min_loss, rtol=1e-4)
  assert list(
    (tmp_path / "tfds" / "bandit_preferences").iterdir()
  )  # prepared in the workdir
  assert config.input.data_dir is None  # the caller's config is left alone


# Steps of the runs compared below; batches of 8 from D1's 3 pairs differ
# from step to step, so a resume at the wrong data position changes the result.
_STEPS = 30


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
  """Final logits of _STEPS uninterrupted steps on D1, batches of 8."""
  state = train.train_and_evaluate(
    make_config(_STEPS, batch_size=8), tmp_path_factory.mktemp("whole")
  )
  return _final_logits(state)


def test_resume_from_a_checkpoint_continues_bit_identically(
  uninterrupted_run, tmp_path, caplog
):
  """20 steps, stop, resume to 30 == 30 steps in one go; the Grain position
  saved in the checkpoint is exactly the iterator's."""
  train.train_and_evaluate(make_config(20, batch_size=8), tmp_path)
  assert _checkpoint_steps(tmp_path) == [10, 20]
  config = make_config(_STEPS, batch_size=8)
  with caplog.at_level("INFO", logger="absl"):
    resumed = train.train_and_evaluate(config, tmp_path)
  assert any("Resumed from step 20" in r.getMessage() for r in caplog.records)
  np.testing.assert_array_equal(_final_logits(resumed), uninterrupted_run)

  # The data state in the checkpoint equals that of a fresh iterator that
  # has yielded _STEPS batches: the JSON round trip is exact.
  iterator = data.make_preference_iterator(
    inputs.dataset_section(config, str(tmp_path)), "train"
  )
  for _ in range(_STEPS):
    next(iterator)
  ckpt = checkpointing.Checkpointer(tmp_path, max_to_keep=3, read_only=True)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    resumed,
  )
  _, data_state = ckpt.restore(abstract)
  ckpt.close()
  assert (
    data_state == iterator.get_state() and data_state["next_batch"] == _STEPS
  )


@pytest.mark.slow
def test_two_processes_of_four_devices_equal_one_process_of_eight(
  uninterrupted_run, tmp_path
):
  """Each process feeds its rows of every global batch from its own Grain
  iterator (process 0 prepares the dataset); the policy is the same."""
  port, workdir = _free_port(), tmp_path / "run"
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ("XLA_FLAGS", "JAX_PLATFORMS")
  }
  env.update(
    PYTHONPATH=str(REPO),
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=xla_flags.xla_flags(num_cpu_devices=4),
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
    JAX_NUM_PROCESSES="2",
  )
  command = [
    sys.executable,
    "-m",
    "psipo_jax.main",
    f"--workdir={workdir}",
    "--config=experiments/bandit_tfds_train.py:runlocal",
    f"--config.total_steps={_STEPS}",
    "--config.input.batch_size=8",
  ]
  processes = [
    subprocess.Popen(
      command,
      env=dict(env, JAX_PROCESS_ID=str(i)),
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  for code, output in [_finish(p) for p in processes]:
    assert code == 0, output[-3000:]
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=1, read_only=True)
  params = ckpt.restore_params(
    {"logits": jax.ShapeDtypeStruct((3,), np.float32)}
  )
  ckpt.close()
  # The global batch is the same rows in another order: equal up to rounding.
  np.testing.assert_allclose(params["logits"], uninterrupted_run, rtol=1e-6)


def test_eval_covers_the_whole_test_split(tmp_path):
  """eval/h is the mean logit margin over the test split's pairs, counted
  independently of the pipeline from the win counts written at preparation."""
  config = make_config(
    3,
    pairs=None,
    preference_matrix=_PREF,
    num_pairs={"train": 40, "test": 13},
    batch_size=8,
  )
  logits = _final_logits(train.train_and_evaluate(config, tmp_path)).astype(
    np.float64
  )
  (summary,) = (tmp_path / "tfds").glob(
    "bandit_preferences/*/*/prepare_summary.json"
  )
  wins = np.asarray(json.loads(summary.read_text())["wins"]["test"])  # [K, K]
  margins = logits[:, None] - logits[None, :]  # uniform π_ref: h = θ_w − θ_l
  expected_h = np.sum(wins * margins) / np.sum(wins)
  (eval_line,) = [
    json.loads(l)
    for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
    if json.loads(l)["split"] == "eval"
  ]
  np.testing.assert_allclose(eval_line["h"], expected_h, rtol=1e-5)


@pytest.mark.parametrize(
  "key, value, message",
  [
    (
      "shufle",
      False,
      r"unknown config key input.shufle \(did you mean input.shuffle\?\)",
    ),
    ("batch_size", 0, r"input.batch_size"),
    ("pairs", ((0, 3),), r"input.pairs\[0\]"),
    ("num_actions", 4, r"input.num_actions=4 differs from model.num_actions=3"),
    ("name", "mnist", r"input.name='mnist' is not a known input"),
    ("num_epochs", 16, r"input.num_epochs=16 gives 2 batches"),
  ],
)
def test_bad_input_key_fails_before_training_naming_it(
  tmp_path, key, value, message
):
  config = make_config(5)
  config.input[key] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_text_pairs_are_refused_until_a_sequence_model_exists(tmp_path):
  config = make_config(5)
  config.input = data.get_input_config("preference_pairs")
  config.input.files = os.fspath(tmp_path / "pairs.jsonl")
  with pytest.raises(
    ValueError, match=r"input.name='preference_pairs' yields token sequences"
  ):
    train.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "checkpoints").exists()
