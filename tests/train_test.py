"""End-to-end tests of train_and_evaluate: resume, interruption, multi-host, errors."""

import json
import os
import pathlib
import random
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from psipo_jax import bandit
from psipo_jax import checkpointing
from psipo_jax import train
from checkpointing_test import truncate_data_file
from train_worker import make_config

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "train_worker.py"
TOTAL_STEPS = 60


def _final_logits(state) -> np.ndarray:
  return np.asarray(jax.device_get(state.params["logits"]))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted run of TOTAL_STEPS steps on the 8 devices: (workdir, logits)."""
  workdir = tmp_path_factory.mktemp("reference")
  state = train.train_and_evaluate(make_config(TOTAL_STEPS), workdir)
  return workdir, _final_logits(state)


def _worker(*args):
  # The worker processes share the suite's compilation cache (conftest.py):
  # the second and later launches skip XLA compilation.
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.Popen(
    [sys.executable, str(WORKER), *map(str, args)],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _finish(process, timeout=180):
  output, _ = process.communicate(timeout=timeout)
  return process.returncode, output


def _checkpoint_steps(workdir) -> list[int]:
  return sorted(
    int(p.name)
    for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
    if p.name.isdigit()
  )


def test_run_logs_metrics_tensorboard_and_checkpoints(reference_run):
  workdir, logits = reference_run
  lines = [
    json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()
  ]
  train_steps = [l["step"] for l in lines if l["split"] == "train"]
  assert train_steps == list(range(10, TOTAL_STEPS + 1, 10))
  eval_lines = [l for l in lines if l["split"] == "eval"]
  assert [l["step"] for l in eval_lines] == [TOTAL_STEPS]
  for key in (
    "loss",
    "grad_norm",
    "param_norm",
    "learning_rate",
    "rewards/accuracies",
    "h",
  ):
    assert np.isfinite(lines[0][key]), key
  # IPO on y0 ≻ y1 ≻ y2 from a uniform start: the loss falls.
  losses_logged = [l["loss"] for l in lines if l["split"] == "train"]
  assert losses_logged[-1] < losses_logged[0]
  assert _checkpoint_steps(workdir) == [40, 50, 60]  # keep_checkpoints=3
  assert (workdir / "reference").is_dir() and (
    workdir / "config.json"
  ).is_file()
  assert np.argmax(logits) == 0 and np.argmin(logits) == 2

  (event_file,) = (workdir / "tensorboard").glob("events.out.tfevents.*")
  tags = _tensorboard_tags(event_file)
  assert {"train/loss", "eval/loss", "train/rewards/margins"} <= tags


def _tensorboard_tags(path) -> set[str]:
  """Scalar tags in a TensorBoard event file (TFRecord framing of Event protos)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  data, tags, offset = path.read_bytes(), set(), 0
  while offset < len(data):
    length = int.from_bytes(data[offset : offset + 8], "little")
    event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
    tags.update(v.tag for v in event.summary.value)
    offset += 12 + length + 4
  return tags


def test_bandit_run_equals_the_vmapped_runner(reference_run):
  """The sharded training system and psipo_jax.bandit's vmapped runner train
  the same policy for the same seed: same data order, init and optimiser."""
  _, logits = reference_run
  config = make_config(TOTAL_STEPS)
  dataset = bandit.Dataset(
    "train_config",
    num_actions=config.model.num_actions,
    pi_ref=np.full(config.model.num_actions, 1 / config.model.num_actions),
    pairs=np.asarray(config.input.pairs),
  )
  result = bandit.run_sweep(
    [dataset],
    [bandit.LossSpec(config.loss.name)],
    taus=[config.loss.tau],
    seeds=[config.seed],
    total_steps=TOTAL_STEPS,
    batch_size=config.input.batch_size,
    record_every=TOTAL_STEPS,
    optimizer=bandit.OptimizerSpec(
      "adam", (("learning_rate", config.optimizer.learning_rate),)
    ),
  )
  np.testing.assert_allclose(
    jax.nn.softmax(logits), result.probs[0, -1], rtol=1e-5, atol=1e-6
  )


def test_reference_from_another_runs_checkpoint(reference_run, tmp_path):
  source, logits = reference_run
  config = make_config(5)
  config.reference_checkpoint = str(source)
  state = train.train_and_evaluate(config, tmp_path)
  np.testing.assert_array_equal(
    jax.device_get(state.ref_params["logits"]), logits
  )
  # The policy still starts from model.ref_probs (uniform), not from the source.
  assert not np.allclose(_final_logits(state), logits, atol=0.1)
  # Stored in this run, so that a resume does not need the source.
  ckpt = checkpointing.Checkpointer(tmp_path, max_to_keep=1)
  stored = ckpt.restore_reference(jax.eval_shape(lambda: state.ref_params))
  ckpt.close()
  np.testing.assert_array_equal(np.asarray(stored["logits"]), logits)


def test_newest_checkpoint_corrupt_resumes_from_previous(
  reference_run, tmp_path, caplog
):
  _, logits = reference_run
  train.train_and_evaluate(make_config(40), tmp_path)
  assert _checkpoint_steps(tmp_path) == [20, 30, 40]
  truncate_data_file(tmp_path / "checkpoints" / "40")
  with caplog.at_level("INFO", logger="absl"):
    state = train.train_and_evaluate(make_config(TOTAL_STEPS), tmp_path)
  assert any(
    "step 40" in r.getMessage()
    for r in caplog.records
    if r.levelname == "WARNING"
  )
  assert any("Resumed from step 30" in r.getMessage() for r in caplog.records)
  np.testing.assert_array_equal(_final_logits(state), logits)


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_is_bitwise_exact(
  reference_run, tmp_path
):
  _, logits = reference_run
  kill_points = sorted(
    random.Random(0).sample(range(12, TOTAL_STEPS), 3)
  )  # after the first checkpoint
  for die_at in kill_points:
    code, output = _finish(
      _worker(
        tmp_path,
        TOTAL_STEPS,
        f"--die_at={die_at}",
        "--signal=KILL",
      )
    )
    assert code == -9, output[-3000:]
    assert max(_checkpoint_steps(tmp_path)) == die_at // 10 * 10
  out = tmp_path / "final.npy"
  code, output = _finish(_worker(tmp_path, TOTAL_STEPS, f"--out={out}"))
  assert code == 0, output[-3000:]
  assert f"Resumed from step {kill_points[-1] // 10 * 10}" in output
  np.testing.assert_array_equal(np.load(out), logits)


@pytest.mark.slow
def test_sigterm_checkpoints_current_step_and_exits_cleanly(
  reference_run, tmp_path
):
  _, logits = reference_run
  die_at = 23  # between the checkpoints of steps 20 and 30
  code, output = _finish(
    _worker(
      tmp_path,
      TOTAL_STEPS,
      f"--die_at={die_at}",
      "--signal=TERM",
    )
  )
  assert code == 0, output[-3000:]
  assert "SIGTERM received" in output
  # The signal arrives before step 24's batch; step 24 completes and is saved.
  assert max(_checkpoint_steps(tmp_path)) == die_at + 1
  out = tmp_path / "final.npy"
  code, output = _finish(_worker(tmp_path, TOTAL_STEPS, f"--out={out}"))
  assert code == 0, output[-3000:]
  assert f"Resumed from step {die_at + 1}" in output
  np.testing.assert_array_equal(np.load(out), logits)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_of_four_devices_equal_one_process_of_eight(
  reference_run, tmp_path
):
  _, logits = reference_run
  port, out = _free_port(), tmp_path / "final.npy"
  processes = [
    _worker(
      tmp_path / "run",
      TOTAL_STEPS,
      f"--out={out}",
      "--num_processes=2",
      f"--process_id={i}",
      f"--port={port}",
    )
    for i in range(2)
  ]
  results = [_finish(p) for p in processes]
  for code, output in results:
    assert code == 0, output[-3000:]
  assert "Process 0 of 2; 4 local of 8 devices" in results[0][1]
  np.testing.assert_array_equal(np.load(out), logits)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_checkpoints_both_at_one_step(tmp_path):
  """JAX's preemption service agrees on a step; every process saves it and exits."""
  port = _free_port()
  processes = [
    _worker(
      tmp_path / "run",
      TOTAL_STEPS,
      "--num_processes=2",
      f"--process_id={i}",
      f"--port={port}",
      *(["--die_at=23", "--signal=TERM"] if i == 0 else []),
    )
    for i in range(2)
  ]
  results = [_finish(p) for p in processes]
  saved_at = []
  for code, output in results:
    assert code == 0, output[-3000:]
    (line,) = [
      l
      for l in output.splitlines()
      if "Preempted: saved a checkpoint at step" in l
    ]
    saved_at.append(int(line.rsplit("step ", 1)[1].split(";")[0]))
  assert saved_at[0] == saved_at[1] and 23 < saved_at[0] < TOTAL_STEPS
  assert max(_checkpoint_steps(tmp_path / "run")) == saved_at[0]


def test_nonfinite_update_stops_the_run_naming_step_and_metric(tmp_path):
  config = make_config(5)
  config.optimizer.learning_rate = 1e38  # the first update overflows θ
  with pytest.raises(FloatingPointError, match=r"step 1: param_norm"):
    train.train_and_evaluate(config, tmp_path / "strict")
  assert _checkpoint_steps(tmp_path / "strict") == []

  config.skip_nonfinite = True
  state = train.train_and_evaluate(config, tmp_path / "skip")
  assert int(state.skipped_updates) == 5
  lines = [
    json.loads(l)
    for l in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()
  ]
  assert [l["skipped_updates"] for l in lines if l["split"] == "train"] == [5]
  # The checkpoint holds the (finite) initial policy, not the overflowed one.
  np.testing.assert_allclose(
    _final_logits(state), np.log(np.full(3, 1 / 3)), rtol=1e-6
  )
  assert _checkpoint_steps(tmp_path / "skip") == [5]


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("loss.name", "nope", "loss.name"),
    ("loss.tau", 0.0, "loss.tau"),
    ("loss.tau", -1.0, "loss.tau"),
    ("input.batch_size", 12, "input.batch_size"),
    ("micro_batches", 4, "input.batch_size"),
    ("optimizer.name", "adamax", "optimizer.name"),
    ("model.num_actions", 2, r"input.pairs\[1\]"),
  ],
)
def test_bad_config_fails_before_training(tmp_path, key, value, message):
  config = make_config(5)
  block, _, name = key.rpartition(".")
  (config[block] if block else config)[name] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_missing_reference_checkpoint_fails_before_training(tmp_path):
  config = make_config(5)
  config.reference_checkpoint = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="reference_checkpoint"):
    train.train_and_evaluate(config, tmp_path / "run")


def test_unwritable_workdir_fails_before_training(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(
    ValueError, match="workdir=.* is not a writable directory"
  ):
    train.train_and_evaluate(make_config(5), blocker / "run")


def test_batch_coupled_loss_refuses_micro_batches(tmp_path):
  config = make_config(5)
  config.loss.name, config.micro_batches = "aot", 2
  with pytest.raises(ValueError, match="micro_batches=2 with loss.name='aot'"):
    train.train_and_evaluate(config, tmp_path)


def test_relative_workdir_is_resolved(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  train.train_and_evaluate(make_config(3), "relative_run")
  assert (tmp_path / "relative_run" / "checkpoints" / "3").is_dir()


def test_resume_refuses_a_changed_config_naming_every_key(tmp_path):
  """Issue 14, bug 1: IPO τ=0.1 lr=0.01 to step 20, then DPO τ=5 lr=1.0 for
  30 steps in the same workdir used to print `resumed` and train on."""
  first = make_config(20)
  train.train_and_evaluate(first, tmp_path)
  recorded = (tmp_path / "config.json").read_text()

  changed = make_config(30)
  changed.loss.name, changed.loss.tau = "dpo", 5.0
  changed.optimizer.learning_rate = 1.0
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(changed, tmp_path)
  message = str(error.value)
  for part in (
    "loss.name: 'ipo' -> 'dpo'",
    "loss.tau: 0.1 -> 5.0",
    "optimizer.learning_rate: 0.01 -> 1.0",
    "allow_config_change=True",
  ):
    assert part in message, message
  assert (
    "total_steps" not in message
  )  # Extending a run is no change of the computation.
  assert _checkpoint_steps(tmp_path)[-1] == 20
  assert (tmp_path / "config.json").read_text() == recorded

  changed.allow_config_change = True
  state = train.train_and_evaluate(changed, tmp_path)
  assert int(state.step) == 30
  history = [
    json.loads(l)
    for l in (tmp_path / "config_history.jsonl").read_text().splitlines()
  ]
  assert len(history) == 1 and history[0]["step"] == 20
  keys = {c["key"] for c in history[0]["changes"]}
  assert {
    "loss.name",
    "loss.tau",
    "optimizer.learning_rate",
    "total_steps",
  } <= keys
  assert (
    json.loads((tmp_path / "config.json").read_text())["loss"]["name"] == "dpo"
  )
  logged = [
    json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
  ]
  assert [
    l["learning_rate"]
    for l in logged
    if l["split"] == "train" and l["step"] == 30
  ] == [1.0]


def test_extending_total_steps_and_log_frequencies_resume_freely(tmp_path):
  train.train_and_evaluate(make_config(10), tmp_path)
  longer = make_config(20)
  longer.log_every, longer.ckpt_every = 5, 5
  assert int(train.train_and_evaluate(longer, tmp_path).step) == 20
  (record,) = [
    json.loads(l)
    for l in (tmp_path / "config_history.jsonl").read_text().splitlines()
  ]
  assert {c["key"] for c in record["changes"]} == {
    "total_steps",
    "log_every",
    "ckpt_every",
  }


@pytest.mark.parametrize(
  "key, value, message",
  [
    (
      "eval_evry",
      5,
      r"unknown config key eval_evry \(did you mean eval_every\?\)",
    ),
    (
      "input.bacth_size",
      8,
      r"unknown config key input.bacth_size \(did you mean input.batch_size\?\)",
    ),
    (
      "input.seed",
      3,
      r"input.seed is not read by input.name='pairs'.*top-level `seed`",
    ),
    ("model.hidden_size", 64, r"unknown config key model.hidden_size"),
    (
      "loss.tauu",
      0.1,
      r"loss.tauu is not an option of loss 'ipo' \(did you mean loss.tau\?\)",
    ),
  ],
)
def test_a_misspelt_or_irrelevant_key_is_refused_with_the_nearest_name(
  tmp_path, key, value, message
):
  """Issue 14, bug 7: these were accepted silently."""
  config = make_config(5)
  block, _, name = key.rpartition(".")
  with (config[block] if block else config).unlocked():
    (config[block] if block else config)[name] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "checkpoints").exists()
