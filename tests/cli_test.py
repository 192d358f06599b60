"""Every entry point reports a user's mistake as a plain message, exit 2.

A mistyped config key, a bad value, an unwritable or missing path: one or
two lines on stderr starting with `error:`, naming the key or the path, no
traceback, nothing trained or written. (Issue 16, item 8.)
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")


def _run(*argv):
  return subprocess.run(
    [sys.executable, *argv],
    cwd=REPO,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=120,
  )


def _assert_user_error(result, *expected):
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert lines and lines[0].startswith("error: "), result.stderr[-2000:]
  assert len(lines) <= 2, result.stderr[-2000:]
  for text in expected:
    assert text in result.stderr, result.stderr[-2000:]


MAIN = ["-m", "psipo_jax.main", "--config=experiments/bandit_train.py"]
BANDIT = [
  "-m",
  "psipo_jax.bandit",
  "--config=experiments/paper_figures.py:runlocal",
]


@pytest.mark.parametrize(
  "argv, expected",
  [
    (
      MAIN + ["--workdir=/tmp/unused", "--config.tauu=0.1"],
      ["--config.tauu=0.1", "unknown config key tauu"],
    ),
    (
      MAIN + ["--workdir=/tmp/unused", "--config.loss.tauu=0.1"],
      ["unknown config key loss.tauu (did you mean loss.tau?)"],
    ),
    (
      MAIN + ["--workdir=/tmp/unused", "--config.loss.tau=abc"],
      ["--config.loss.tau=abc"],
    ),
    (
      MAIN + ["--workdir=/proc/forbidden"],
      ["workdir='/proc/forbidden' is not a writable directory"],
    ),
    (
      [
        "-m",
        "psipo_jax.main",
        "--config=experiments/nope.py",
        "--workdir=/tmp/unused",
      ],
      ["config file 'experiments/nope.py' does not exist"],
    ),
    (
      BANDIT + ["--workdir=/tmp/unused", "--config.tauu=0.1"],
      ["unknown config key tauu (did you mean taus?)"],
    ),
    (
      BANDIT + ["--workdir=/proc/forbidden"],
      ["--workdir='/proc/forbidden' is not a writable"],
    ),
    (
      [
        "-m",
        "psipo_jax.bandit",
        "--config=experiments/paper_figures.py:fast",
        "--workdir=/tmp/unused",
      ],
      ["unknown key fast", "printed", "runlocal"],
    ),
  ],
)
def test_trainer_and_bandit_runner(argv, expected):
  _assert_user_error(_run(*argv), *expected)


def test_the_bandit_runner_checks_the_workdir_before_training():
  result = _run(*BANDIT, "--workdir=/proc/forbidden")
  _assert_user_error(result)
  assert "Training" not in result.stdout  # Nothing was compiled or trained.


def test_a_command_without_a_config_flag_names_its_missing_flag():
  # The sampler has no --config: the report must not ask for one.
  result = _run("-m", "psipo_jax.sample", "--prompt=abc")
  _assert_user_error(result, "--workdir")
  assert "--config" not in result.stderr, result.stderr


def test_data_inspect(tmp_path):
  config = tmp_path / "data_config.py"
  config.write_text(
    "from psipo_jax.data.testing import experiment_config\n"
    "def get_config():\n"
    f"  return experiment_config(data_dir={str(tmp_path / 'tfds')!r},"
    f" files={str(tmp_path / 'missing.jsonl')!r})\n"
  )
  inspect = ["-m", "psipo_jax.data.inspect", f"--config={config}"]
  _assert_user_error(
    _run(*inspect, "--config.input.max_lenght=64"),
    "unknown config key input.max_lenght (did you mean input.max_length?)",
  )
  _assert_user_error(
    _run(*inspect, "--config.input.data_dir=/proc/forbidden"),
    "input.data_dir='/proc/forbidden' is not a writable directory",
  )
  _assert_user_error(_run(*inspect), "missing.jsonl")


def test_sweep_launcher(tmp_path):
  sweep = ["launch/sweep.py", "--config=experiments/sweep_demo.py:tiny"]
  _assert_user_error(
    _run(
      *sweep, f"--root={tmp_path}", "--dry-run", "--", "--config.loss.tauu=1"
    ),
    "unknown config key loss.tauu (did you mean loss.tau?)",
  )
  _assert_user_error(
    _run(*sweep, "--root=/proc/forbidden"),
    "--root=",
    "not a writable directory",
  )
  _assert_user_error(
    _run(
      "launch/sweep.py", "--config=experiments/nope.py", f"--root={tmp_path}"
    ),
    "config file 'experiments/nope.py' does not exist",
  )


def test_collector(tmp_path):
  _assert_user_error(
    _run("launch/collect.py", f"--root={tmp_path}/nowhere"),
    f"{tmp_path}/nowhere/sweep.json not found",
  )
