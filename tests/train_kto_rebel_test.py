"""KTO and REBEL through the training system on the built-in text task."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from experiments import lm_ipo_tiny
from experiments import lm_kto_tiny
from experiments import lm_rebel_tiny
from psipo_jax import train
from psipo_jax.data import text_task


def _shrink(config, tmp_path, *, total_steps=4):
  files = text_task.cached_files(
    num_train=64, num_test=20, cache_dir=str(tmp_path / "cache")
  )
  config.input.batch_size = 16
  config.total_steps = total_steps
  config.optimizer.warmup_steps = 0
  config.optimizer.learning_rate = 3e-3
  config.log_every = 1
  config.eval_every = config.ckpt_every = total_steps
  return config, files


def _lines(workdir):
  return [
    json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()
  ]


def test_kto_tiny_run_logs_kto_metrics_and_keeps_the_reference(tmp_path):
  config, files = _shrink(lm_kto_tiny.get_config("runlocal,init="), tmp_path)
  config.input.files = files
  workdir = tmp_path / "kto"
  state = train.train_and_evaluate(config, str(workdir))
  lines = _lines(workdir)
  train_lines = [l for l in lines if l.get("split") == "train"]
  (eval_line,) = [l for l in lines if l.get("split") == "eval"]
  for key in ("loss", "kl", "rewards/desirable", "rewards/undesirable"):
    assert np.isfinite(eval_line[key]), (key, eval_line)
  assert eval_line["desirable_fraction"] == pytest.approx(0.5)  # 20 pairs
  assert all(l["kl"] >= 0 for l in train_lines)
  # Step 1: the policy is the reference, so r = 0 and z₀ = 0 for every
  # example and each loss is 1 − σ(0) = 1/2.
  assert train_lines[0]["loss"] == pytest.approx(0.5, abs=1e-6)
  assert train_lines[0]["kl"] == 0.0
  # Four steps later the held-out examples are separated, a little.
  assert eval_line["loss"] < 0.5 and eval_line["rewards/margins"] > 0
  # The frozen reference is the initial policy: still different from it.
  ref, params = jax.device_get((state.ref_params, state.params))
  assert any(
    not np.allclose(a, b)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params))
  )
  assert (workdir / "checkpoints").is_dir()


def test_kto_objective_and_input_must_go_together(tmp_path):
  config, files = _shrink(lm_kto_tiny.get_config("runlocal,init="), tmp_path)
  config.input.files = files
  config.objective = "psipo"
  config.loss = ml_collections.ConfigDict({"name": "ipo", "tau": 0.1})
  with pytest.raises(ValueError, match="only objective='kto'"):
    train.validate_config(config, str(tmp_path / "w"))
  ipo, files = _shrink(lm_ipo_tiny.get_config("runlocal,init="), tmp_path)
  ipo.input.files = files
  ipo.objective = "kto"
  del ipo.loss.module
  del ipo.loss.nll_weight
  ipo.loss.name = "kto"
  with pytest.raises(ValueError, match="input.name must be 'unpaired'"):
    train.validate_config(ipo, str(tmp_path / "w"))


def test_rebel_margins_from_the_known_reward():
  assert lm_rebel_tiny.reward_difference(" abcd", " abdc") == 0.5
  assert lm_rebel_tiny.reward_difference(" 3", " 4") == 1.0
  with pytest.raises(ValueError):
    lm_rebel_tiny.reward_difference(" ab", " abc")


def test_rebel_tiny_run_reads_margins_and_names_them_when_absent(tmp_path):
  config, files = _shrink(lm_rebel_tiny.get_config("runlocal,init="), tmp_path)
  config.input.files = lm_rebel_tiny.with_reward_margins(files)
  workdir = tmp_path / "rebel"
  train.train_and_evaluate(config, str(workdir))
  lines = _lines(workdir)
  train_lines = [l for l in lines if l.get("split") == "train"]
  (eval_line,) = [l for l in lines if l.get("split") == "eval"]
  assert np.isfinite(eval_line["loss"]) and "rewards/accuracies" in eval_line
  assert train_lines[-1]["loss"] < train_lines[0]["loss"]

  config.input.files = files  # the plain task: no margin in the data
  with pytest.raises(ValueError, match="batch field 'margin'"):
    train.train_and_evaluate(config, str(tmp_path / "no_margin"))


@pytest.mark.slow
def test_kto_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(
  tmp_path,
):
  import shutil

  config, files = _shrink(lm_kto_tiny.get_config("runlocal,init="), tmp_path)
  config.input.files = files
  config.ckpt_every = 2
  config.keep_checkpoints = 3
  whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
  cut = tmp_path / "cut"
  train.train_and_evaluate(config, str(cut))
  # Drop the last checkpoint: the rerun resumes at step 2, and must see the
  # batches (and so the mismatched rows) of steps 3 and 4 again.
  shutil.rmtree(cut / "checkpoints" / "4")
  resumed = train.train_and_evaluate(config, str(cut))
  assert int(resumed.step) == 4
  for a, b in zip(
    jax.tree.leaves(jax.device_get(whole.params)),
    jax.tree.leaves(jax.device_get(resumed.params)),
  ):
    np.testing.assert_array_equal(a, b)
