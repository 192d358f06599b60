"""The command line: python -m psipo_jax.main --config=... --workdir=..."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _main(*flags):
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "psipo_jax.main",
      "--config=experiments/bandit_train.py:loss=dpo,runlocal",
      *flags,
    ],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=str(REPO)),
    capture_output=True,
    text=True,
    timeout=180,
  )


@pytest.mark.slow
def test_cli_trains_with_overrides(tmp_path):
  result = _main(
    f"--workdir={tmp_path}",
    "--config.total_steps=30",
    "--config.ckpt_every=10",
    "--config.loss.tau=0.2",
    "--config.input.batch_size=16",
    "--config.optimizer.grad_clip_norm=1.0",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["loss"] == {
    "name": "dpo",
    "tau": 0.2,
    "normalize": "sum",
    "nll_weight": 0.0,
    "module": None,
  }
  assert config["optimizer"]["grad_clip_norm"] == 1.0
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
    "10",
    "20",
    "30",
  ]
  last_train = [
    json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
  ][-2]
  assert last_train["step"] == 30 and last_train["split"] == "train"
  assert "step 30/30: loss=" in result.stderr  # non-interactive: log lines
  assert (
    "Finished saving checkpoint" not in result.stderr
  )  # Orbax INFO filtered


def test_cli_bad_override_names_the_key(tmp_path):
  result = _main(f"--workdir={tmp_path}", "--config.loss.tau=-0.5")
  assert result.returncode == 2
  assert "loss.tau must be a number > 0" in result.stderr
  assert not (tmp_path / "checkpoints").exists()
