"""A loss defined outside psipo_jax trains by name on every path.

The loss is README's "Add your own loss" example: its module, its test file,
its bandit-runner snippet and its command line are kept here as strings
(README_*), written to a temporary directory (never inside psipo_jax/) and
run there: the module on PYTHONPATH of every subprocess, named by
`loss.module`, so the trainer (`python -m psipo_jax.main`), the sweep
launcher's workers and both processes of a multi-host run import it before
they validate the config.

Golden values: with τ = 0.1 the target 1/(2τ) = 5 is far beyond the margins
h < 1 of a short run from π_ref, so every pair is in Huber's linear part and
the mean loss is exactly δ(5 − mean h − δ/2) = 4.5 − mean h (δ = 1): a
number the metrics must satisfy, that IPO (a mean of squares) would not.
"""

import json
import math
import os
import pathlib
import re
import shlex
import socket
import subprocess
import sys

import numpy as np
import pytest

import xla_flags  # tests/xla_flags.py

REPO = pathlib.Path(__file__).resolve().parents[1]

# --- README "Add your own loss": the four pieces, verbatim. ---------------

README_MODULE = '''\
"""my_losses.py: IPO's regression target under a Huber loss."""
import jax.numpy as jnp

from psipo_jax import losses


@losses.register("huber_ipo")
def huber_ipo(policy_chosen_logps, policy_rejected_logps,
              ref_chosen_logps, ref_rejected_logps, *, tau, delta=1.0):
  """Huber loss of IPO's residual h − 1/(2τ): quadratic inside δ, linear out."""
  d_c, d_r = losses.log_ratios(policy_chosen_logps, policy_rejected_logps,
                               ref_chosen_logps, ref_rejected_logps)
  r = jnp.abs(d_c - d_r - 0.5 / tau)
  return jnp.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta))
'''

README_TEST = '''\
"""test_my_losses.py: `PYTHONPATH=. python -m pytest test_my_losses.py`."""
import numpy as np

from psipo_jax import losses, testing
import my_losses  # noqa: F401  (registers "huber_ipo")


def test_huber_ipo_has_the_properties_of_a_loss():
  testing.check_pairwise_loss(
      "huber_ipo", options={"delta": 0.5},
      shift_invariance=testing.SHIFT_KINDS,
      dloss_dh=lambda h, *, tau, delta: np.clip(h - 1 / (2 * tau), -delta,
                                                delta))


def test_huber_ipo_golden_values():
  pc, pr, rc, rr = testing.random_logps(seed=0)
  r = np.abs((pc - rc) - (pr - rr) - 1 / (2 * 0.1))
  want = np.where(r <= 0.5, 0.5 * r**2, 0.5 * (r - 0.25))
  got = losses.get_loss("huber_ipo")(pc, pr, rc, rr, tau=0.1, delta=0.5)
  np.testing.assert_allclose(got, want, rtol=1e-5)
'''

README_BANDIT = """\
import numpy as np

from psipo_jax import bandit, losses, testing
from psipo_jax.bandit import analysis

losses.import_loss_module("my_losses")  # registers "huber_ipo"
d1 = bandit.Dataset("D1", 3, np.full(3, 1 / 3),
                    pairs=[(0, 1), (1, 2), (0, 2)])  # a ≻ b, b ≻ c, a ≻ c
specs = [bandit.LossSpec("ipo"), bandit.LossSpec("dpo"),
         bandit.LossSpec("huber_ipo", (("delta", 0.5),))]
result = bandit.run_sweep(
    [d1], specs, taus=[0.5], seeds=[0, 1, 2],
    total_steps=2000, batch_size=9, record_every=100,
    optimizer=bandit.OptimizerSpec("adam", (("learning_rate", 0.01),)))
for spec in specs:
  trained = result.probs[result.select(loss=spec.label), -1].mean(axis=0)
  print(spec.label, trained.round(3), analysis.closed_form(d1, spec, 0.5).note)
# The exact minimiser of the same sampled loss on D1, against training:
print(testing.bandit_optimum("huber_ipo", d1.pairs, d1.pi_ref, 0.5,
                             options={"delta": 0.5}, seeds=[0, 1, 2]).diagnosis)
"""

README_CLI = """\
PYTHONPATH=. python -m psipo_jax.main \\
    --config=experiments/bandit_train.py:loss=ipo --workdir=/tmp/huber \\
    --config.loss.module=my_losses --config.loss.name=huber_ipo \\
    --config.loss.tau=0.1
"""

# ---------------------------------------------------------------------------

SHORT_RUN = ["--config.total_steps=20"]  # log_every/eval_every: runlocal's 20.


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
  """A directory outside the repository holding my_losses.py."""
  path = tmp_path_factory.mktemp("user_project")
  (path / "my_losses.py").write_text(README_MODULE)
  return path


def _env(user_dir, **extra):
  env = dict(os.environ)
  # The user's directory first; the repository for `experiments` (configs
  # import it as a package) and for this checkout's psipo_jax.
  env["PYTHONPATH"] = os.pathsep.join(
    [str(user_dir), str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p]
  )
  env.update(extra)
  return env


def _run(argv, user_dir, *, cwd=REPO, timeout=300, **env):
  return subprocess.run(
    argv,
    cwd=cwd,
    env=_env(user_dir, **env),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def _cli(workdir, *flags, module="my_losses"):
  return [
    sys.executable,
    "-m",
    "psipo_jax.main",
    "--config=experiments/bandit_train.py:runlocal",
    f"--workdir={workdir}",
    *([f"--config.loss.module={module}"] if module else []),
    "--config.loss.name=huber_ipo",
    *SHORT_RUN,
    *flags,
  ]


def _metrics(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def _assert_huber_metrics(workdir, *, tau=0.1, delta=1.0):
  rows = _metrics(workdir)
  assert {r["split"] for r in rows} == {"train", "eval"}, rows
  for row in rows:
    assert math.isfinite(row["loss"]), row
    # The linear part of Huber (docstring): not IPO's mean of squares.
    assert row["h"] < 1 / (2 * tau) - delta, row
    expected = delta * (1 / (2 * tau) - row["h"] - delta / 2)
    assert row["loss"] == pytest.approx(expected, rel=1e-5), row
  assert (pathlib.Path(workdir) / "FINISHED").exists()
  return rows


def test_user_loss_trains_by_name_through_the_cli(user_dir, tmp_path):
  result = _run(_cli(tmp_path / "run"), user_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = _assert_huber_metrics(tmp_path / "run")
  assert max(r["step"] for r in rows) == 20


def test_unknown_user_loss_name_lists_the_registered_ones(user_dir, tmp_path):
  result = _run(_cli(tmp_path / "run", "--config.loss.name=huber_ip"), user_dir)
  assert result.returncode == 2, result.stderr[-3000:]
  # The valid names listed include the one my_losses registered.
  assert re.search(r"loss\.name.*huber_ip\b.*huber_ipo", result.stderr), (
    result.stderr[-3000:]
  )
  # Without loss.module the name is unknown: the module is what registers it.
  result = _run(_cli(tmp_path / "run2", module=None), user_dir)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "loss.name" in result.stderr and "'huber_ipo'" in result.stderr
  # A module that is not on PYTHONPATH is named with its key.
  result = _run(_cli(tmp_path / "run3", module="not_my_losses"), user_dir)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "loss.module='not_my_losses'" in result.stderr, result.stderr[-3000:]


SWEEP_CONFIG = """\
from experiments import bandit_train
from psipo_jax import sweeps


def get_config(arg=None):
  del arg
  config = bandit_train.get_config("runlocal")
  config.total_steps = 20
  return config


def get_sweep(arg=None):
  del arg
  return sweeps.sweep("loss.tau", [0.1, 0.2])
"""


@pytest.mark.slow
def test_user_loss_trains_through_the_sweep_launcher(user_dir, tmp_path):
  config = tmp_path / "huber_sweep.py"
  config.write_text(SWEEP_CONFIG)
  result = _run(
    [
      sys.executable,
      "launch/sweep.py",
      f"--config={config}",
      f"--root={tmp_path / 'sweeps'}",
      "--parallel=2",
      "--",
      "--config.loss.module=my_losses",
      "--config.loss.name=huber_ipo",
    ],
    user_dir,
  )
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  assert "2 finished, 0 failed." in result.stdout, result.stdout
  sweep_dir = tmp_path / "sweeps" / "huber_sweep"
  for tau in (0.1, 0.2):
    workdir = sweep_dir / f"loss.tau={tau}"
    _assert_huber_metrics(workdir, tau=tau)
    config_json = json.loads((workdir / "config.json").read_text())
    assert json.dumps(config_json).count("huber_ipo") >= 1


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_user_loss_trains_in_a_two_process_run(user_dir, tmp_path):
  # Two processes of 4 CPU devices on 127.0.0.1, through the CLI: each
  # imports my_losses (loss.module) before validating, or it could not
  # build the step at all; the result is the one-process run's.
  port = _free_port()
  processes = [
    subprocess.Popen(
      _cli(tmp_path / "two"),
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=_env(
        user_dir,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_flags.xla_flags(num_cpu_devices=4),
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(i),
      ),
    )
    for i in range(2)
  ]
  outputs = []
  for process in processes:
    try:
      output, _ = process.communicate(timeout=300)
    finally:
      if process.poll() is None:
        process.kill()
    outputs.append((process.returncode, output))
  for i, (code, output) in enumerate(outputs):
    assert code == 0, output[-3000:]
    assert f"Process {i} of 2; 4 local of 8 devices" in output, output[-3000:]
    assert "step 20/20" in output
  two = _assert_huber_metrics(tmp_path / "two")
  one = _run(_cli(tmp_path / "one"), user_dir)
  assert one.returncode == 0, one.stderr[-3000:]
  for a, b in zip(_metrics(tmp_path / "one"), two):
    assert a["split"] == b["split"]
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-6)
    np.testing.assert_allclose(b["h"], a["h"], rtol=1e-6)


# --- README "Add your own loss", end to end. ------------------------------


def _floats(text):
  return np.array([float(x) for x in text.split()])


@pytest.mark.slow
def test_readme_add_your_own_loss_runs_end_to_end(user_dir, tmp_path):
  project = tmp_path / "project"
  project.mkdir()
  (project / "my_losses.py").write_text(README_MODULE)
  (project / "test_my_losses.py").write_text(README_TEST)
  (project / "bandit_example.py").write_text(README_BANDIT)

  # 1. Its test file, in a pytest of its own (outside our conftest).
  result = _run(
    [
      sys.executable,
      "-m",
      "pytest",
      "-q",
      "-p",
      "no:cacheprovider",
      "test_my_losses.py",
    ],
    project,
    cwd=project,
  )
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  assert "2 passed" in result.stdout, result.stdout

  # 2. The bandit snippet: Huber-IPO beside IPO and DPO on D1 at τ = 0.5.
  result = _run([sys.executable, "bandit_example.py"], project, cwd=project)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  trained = {}
  for line in lines[:3]:
    match = re.match(r"(\w+) \[([^\]]*)\] (.*)", line)
    assert match, line
    trained[match[1]] = _floats(match[2])
  ipo = np.exp(np.array([2.0, 1.0, 0.0]) / (3 * 0.5))  # θ ∝ (2, 1, 0)/(3τ)
  ipo /= ipo.sum()
  # IPO's residuals at its optimum are ±1/(6τ) = 1/3 < δ = 0.5, where Huber
  # is IPO/2: the same minimiser. DPO goes greedy.
  np.testing.assert_allclose(trained["ipo"], ipo, atol=0.01)
  np.testing.assert_allclose(trained["huber_ipo"], ipo, atol=0.01)
  assert trained["dpo"][0] > 0.95
  assert "IPO least squares" in lines[0] and "no finite minimiser" in lines[1]
  assert "finite optimum" in lines[3] and "huber_ipo at tau=0.5" in lines[3]

  # 3. The command line, from the repository root with the module on
  # PYTHONPATH, shortened to 20 steps.
  argv = shlex.split(README_CLI.replace("\\\n", " "))
  env = dict(a.split("=", 1) for a in argv if re.match(r"^[A-Z_]+=", a))
  argv = [a for a in argv if not re.match(r"^[A-Z_]+=", a)]
  assert env == {"PYTHONPATH": "."} and argv[:3] == [
    "python",
    "-m",
    "psipo_jax.main",
  ]
  argv = (
    [sys.executable]
    + [
      f"--workdir={tmp_path / 'huber'}" if a.startswith("--workdir=") else a
      for a in argv[1:]
    ]
    + SHORT_RUN
    + ["--config.log_every=10", "--config.eval_every=20"]
  )
  result = _run(argv, project)
  assert result.returncode == 0, result.stderr[-3000:]
  _assert_huber_metrics(tmp_path / "huber")


def test_readme_section_is_the_tested_example():
  """README's code blocks are the strings the test above runs, verbatim."""
  readme = (REPO / "README.md").read_text()
  if "## Add your own loss" not in readme:
    pytest.skip("README.md has no 'Add your own loss' section yet")
  section = readme.split("## Add your own loss", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```[a-z]*\n(.*?)```", section, flags=re.S)
  for name, text in [
    ("README_MODULE", README_MODULE),
    ("README_TEST", README_TEST),
    ("README_BANDIT", README_BANDIT),
    ("README_CLI", README_CLI),
  ]:
    assert text in blocks, f"README's section lacks {name} verbatim"
