"""Tests for launch/: sweep.py (dry-run goldens, local runner), tpu_pod.sh,
local_multihost.sh and collect.py.

Fast tests drive the launcher with a stand-in trainer module (below) that
keeps the training system's contract: `--config/--workdir/--config.k=v`
flags, resume from its own checkpoint, `metrics.jsonl`, a clean exit after a
checkpoint on SIGTERM, and the FINISHED marker only at the end. The `slow`
tests run the real trainer (psipo_jax.main).
"""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import xla_flags  # tests/xla_flags.py

from psipo_jax import sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

CONFIG = textwrap.dedent("""
    import ml_collections
    from psipo_jax import sweeps

    def get_config(arg=None):
      config = ml_collections.ConfigDict()
      config.seed = 0
      config.total_steps = 6
      config.step_seconds = 0.0
      config.tag = "none"
      config.loss = ml_collections.ConfigDict({"name": "ipo", "tau": 0.1})
      return config

    def get_sweep(arg=None):
      names = ["ipo"] if arg is None else arg.split("+")
      return sweeps.product(sweeps.sweep("loss.name", names),
                            sweeps.sweep("loss.tau", [0.1, 1.0]),
                            sweeps.sweep("seed", [0, 1]))
""")

# Stand-in trainer: step s writes {"step": s, "split": "train", "loss": ...};
# its checkpoint is the last step written to `ckpt`. loss.name=crash fails.
FAKE_TRAINER = textwrap.dedent("""
    import json, os, signal, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    workdir = args["--workdir"[2:]]
    total = int(args.get("config.total_steps", 6))
    step_seconds = float(args.get("config.step_seconds", 0.0))
    tau, seed = float(args["config.loss.tau"]), int(args["config.seed"])
    if args["config.loss.name"] == "crash":
      print("building the model", flush=True)
      sys.exit("ValueError: loss.name='crash' is not a known loss")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    ckpt = os.path.join(workdir, "ckpt")
    start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
    print(f"resumed from step {start}" if start else "new run", flush=True)
    with open(os.path.join(workdir, "intervals"), "a") as f:
      f.write(f"{time.time()} ")
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as metrics:
      for step in range(start + 1, total + 1):
        time.sleep(step_seconds)
        metrics.write(json.dumps({"step": step, "split": "train",
                                  "loss": tau * seed + 1.0 / step}) + "\\n")
        metrics.flush()
        open(ckpt, "w").write(str(step))
        if stop:
          print(f"SIGTERM: checkpointed step {step}", flush=True)
          break
    with open(os.path.join(workdir, "intervals"), "a") as f:
      f.write(f"{time.time()}\\n")
    if not stop:
      open(os.path.join(workdir, "FINISHED"), "w").close()
""")


@pytest.fixture
def exp(tmp_path):
  """(config path, env) for a sweep with the stand-in trainer."""
  (tmp_path / "exp.py").write_text(CONFIG)
  (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
  return str(tmp_path / "exp.py"), env


def sweep_py(*args, env=None, check=True, **kwargs):
  result = subprocess.run(
    [PYTHON, "launch/sweep.py", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    **kwargs,
  )
  if check and result.returncode != 0:
    raise AssertionError(f"sweep.py failed:\n{result.stdout}\n{result.stderr}")
  return result


# ---------------------------------------------------------------------------
# --dry-run: the exact commands (golden strings; the format is the spec).

NAMES = [
  "loss.name=ipo,loss.tau=0.1,seed=0",
  "loss.name=ipo,loss.tau=0.1,seed=1",
  "loss.name=ipo,loss.tau=1.0,seed=0",
  "loss.name=ipo,loss.tau=1.0,seed=1",
]


def test_dry_run_local(exp):
  config, env = exp
  result = sweep_py(f"--config={config}", "--root=/runs", "--dry-run", env=env)
  point = "--config.loss.name=ipo --config.loss.tau={} --config.seed={}"
  expected = "".join(
    f"{PYTHON} -m psipo_jax.main --config={config} --workdir=/runs/exp/{name} "
    f"{point.format(tau, seed)}\n"
    for name, (tau, seed) in zip(
      NAMES, [(0.1, 0), (0.1, 1), (1.0, 0), (1.0, 1)]
    )
  )
  assert result.stdout == expected
  assert "4 points, 0 finished (skipped), 4 to run" in result.stderr
  assert not os.path.exists("/runs")


def test_dry_run_tpu(exp):
  config, env = exp
  result = sweep_py(
    f"--config={config}:ipo+dpo",
    "--root=/bucket/runs",
    "--dry-run",
    "--where=tpu",
    "--tpu=my-pod",
    "--zone=us-central2-b",
    "--",
    "--config.total_steps=50",
    env=env,
  )
  lines = result.stdout.splitlines()
  assert len(lines) == 8
  assert lines[0] == (
    "launch/tpu_pod.sh my-pod us-central2-b -- psipo_jax.main "
    f"--config={config}:ipo+dpo "
    "--workdir=/bucket/runs/exp-ipo+dpo/loss.name=ipo,loss.tau=0.1,seed=0 "
    "--config.loss.name=ipo --config.loss.tau=0.1 --config.seed=0 "
    "--config.total_steps=50 --multihost"
  )
  # The code is copied to the hosts once, by the first point.
  assert lines[7] == (
    "launch/tpu_pod.sh --no-copy my-pod us-central2-b -- psipo_jax.main "
    f"--config={config}:ipo+dpo "
    "--workdir=/bucket/runs/exp-ipo+dpo/loss.name=dpo,loss.tau=1.0,seed=1 "
    "--config.loss.name=dpo --config.loss.tau=1.0 --config.seed=1 "
    "--config.total_steps=50 --multihost"
  )


def test_dry_run_tpu_queued_resource(exp):
  config, env = exp
  result = sweep_py(
    f"--config={config}",
    "--root=/r",
    "--dry-run",
    "--where=tpu",
    "--tpu=my-qr",
    "--zone=europe-west4-a",
    "--queued",
    env=env,
  )
  assert result.stdout.splitlines()[1] == (
    "launch/tpu_pod.sh --no-copy --queued my-qr europe-west4-a -- psipo_jax.main "
    f"--config={config} --workdir=/r/exp/loss.name=ipo,loss.tau=0.1,seed=1 "
    "--config.loss.name=ipo --config.loss.tau=0.1 --config.seed=1 --multihost"
  )


def test_dry_run_slurm(exp):
  config, env = exp
  result = sweep_py(
    f"--config={config}",
    "--root=/shared/runs",
    "--dry-run",
    "--where=slurm",
    "--sbatch-args=--partition=gpu --nodes=2",
    env=env,
  )
  workdir = "/shared/runs/exp/loss.name=ipo,loss.tau=1.0,seed=1"
  assert result.stdout.splitlines()[3] == (
    f"mkdir -p {workdir} && sbatch --job-name=exp/loss.name=ipo,loss.tau=1.0,seed=1 "
    f"--output={workdir}/slurm-%j.out --partition=gpu --nodes=2 "
    f"launch/slurm.sbatch psipo_jax.main --config={config} --workdir={workdir} "
    "--config.loss.name=ipo --config.loss.tau=1.0 --config.seed=1 --multihost"
  )


def test_dry_run_quotes_for_the_shell(exp, tmp_path):
  config, env = exp
  result = sweep_py(
    f"--config={config}",
    f"--root={tmp_path}/my runs",
    "--dry-run",
    "--",
    "--config.tag=a b",
    env=env,
  )
  line = result.stdout.splitlines()[0]
  assert (
    f"'--workdir={tmp_path}/my runs/exp/loss.name=ipo,loss.tau=0.1,seed=0'"
    in line
  )
  assert line.endswith(" '--config.tag=a b'")


def test_extra_flags_may_not_override_swept_keys(exp):
  config, env = exp
  result = sweep_py(
    f"--config={config}",
    "--root=/r",
    "--dry-run",
    "--",
    "--config.loss.tau=0.5",
    env=env,
    check=False,
  )
  assert result.returncode != 0
  assert (
    "--config.loss.tau=0.5 would override the swept key loss.tau"
    in result.stderr
  )


def test_dry_run_skips_finished_points(exp, tmp_path):
  config, env = exp
  finished = tmp_path / "runs" / "exp" / NAMES[2]
  finished.mkdir(parents=True)
  (finished / sweeps.FINISHED_MARKER).write_text("")
  (tmp_path / "runs" / "exp" / NAMES[1]).mkdir()  # Started, not finished.
  result = sweep_py(
    f"--config={config}", f"--root={tmp_path}/runs", "--dry-run", env=env
  )
  printed = [
    line.split("--workdir=")[1].split()[0]
    for line in result.stdout.splitlines()
  ]
  assert printed == [
    f"{tmp_path}/runs/exp/{n}" for n in (NAMES[0], NAMES[1], NAMES[3])
  ]
  assert "4 points, 1 finished (skipped), 3 to run" in result.stderr


def test_a_point_that_does_not_fit_the_config_stops_the_launch(exp, tmp_path):
  config, env = exp
  with open(config, "a") as f:
    f.write(
      "\ndef get_sweep(arg=None):\n  return [{'loss.temperature': 1.0}]\n"
    )
  result = sweep_py(
    f"--config={config}", f"--root={tmp_path}/runs", check=False, env=env
  )
  assert result.returncode != 0
  assert (
    "'loss.temperature=1.0': --config.loss.temperature=1.0 does not fit"
    in result.stderr
  )
  assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------
# Local runs with the stand-in trainer.


def _max_overlap(sweep_dir):
  events = []
  for name in os.listdir(sweep_dir):
    path = os.path.join(sweep_dir, name, "intervals")
    if os.path.exists(path):
      for line in open(path).read().splitlines():
        start, end = map(float, line.split())
        events += [(start, 1), (end, -1)]
  level = peak = 0
  for _, change in sorted(events):
    level += change
    peak = max(peak, level)
  return peak


def test_local_sweep_runs_two_at_a_time_then_skips_finished(exp, tmp_path):
  config, env = exp
  root = tmp_path / "runs"
  result = sweep_py(
    f"--config={config}",
    f"--root={root}",
    "--parallel=2",
    "--module=fake_trainer",
    "--",
    "--config.step_seconds=0.05",
    env=env,
  )
  sweep_dir = root / "exp"
  assert all((sweep_dir / n / sweeps.FINISHED_MARKER).exists() for n in NAMES)
  assert _max_overlap(sweep_dir) == 2
  assert result.stdout.splitlines()[0] == (
    f"[done 0 | running 1 | failed 0 | remaining 3] started  {NAMES[0]}"
  )
  assert (
    "[done 4 | running 0 | failed 0 | remaining 0] finished" in result.stdout
  )
  assert "4 finished, 0 failed." in result.stdout
  manifest = json.loads((sweep_dir / sweeps.MANIFEST).read_text())
  assert [p["name"] for p in manifest["points"]] == NAMES
  assert manifest["points"][2]["overrides"] == {
    "loss.name": "ipo",
    "loss.tau": 1.0,
    "seed": 0,
  }

  metrics_before = {
    n: (sweep_dir / n / "metrics.jsonl").read_text() for n in NAMES
  }
  again = sweep_py(
    f"--config={config}",
    f"--root={root}",
    "--parallel=2",
    "--module=fake_trainer",
    env=env,
  )
  assert "4 points, 4 finished (skipped), 0 to run" in again.stderr
  assert {
    n: (sweep_dir / n / "metrics.jsonl").read_text() for n in NAMES
  } == metrics_before


def test_local_failures_are_collected_with_their_log_tails(exp, tmp_path):
  config, env = exp
  root = tmp_path / "runs"
  result = sweep_py(
    f"--config={config}:ipo+crash",
    f"--root={root}",
    "--parallel=3",
    "--module=fake_trainer",
    check=False,
    env=env,
  )
  assert result.returncode == 1
  assert "4 finished, 4 failed." in result.stdout
  crashed = "loss.name=crash,loss.tau=0.1,seed=0"
  log = root / "exp-ipo+crash" / crashed / "launch.log"
  assert f"FAILED   {crashed}: exit code 1; log: {log}" in result.stdout
  report = result.stdout.split(f"--- FAILED {crashed}: exit code 1\n")[1]
  assert report.startswith(f"$ {PYTHON} -m fake_trainer")
  assert (
    "building the model\nValueError: loss.name='crash' is not a known loss"
    in report
  )


def test_interrupted_sweep_checkpoints_and_resumes(exp, tmp_path):
  """SIGINT to the launcher: runs get SIGTERM, checkpoint, exit; a rerun
  resumes them from their checkpoints and every step is logged."""
  config, env = exp
  root = tmp_path / "runs"
  args = [
    PYTHON,
    "launch/sweep.py",
    f"--config={config}",
    f"--root={root}",
    "--parallel=2",
    "--module=fake_trainer",
    "--",
    "--config.step_seconds=0.1",
    "--config.total_steps=40",
  ]
  launcher = subprocess.Popen(
    args, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
  )
  first = root / "exp" / NAMES[0] / "ckpt"
  deadline = time.monotonic() + 30
  while not (first.exists() and int(first.read_text() or 0) >= 3):
    assert time.monotonic() < deadline, "the first run never checkpointed"
    time.sleep(0.05)
  launcher.send_signal(signal.SIGINT)
  output = launcher.communicate(timeout=30)[0]
  assert launcher.returncode == 1
  assert "interrupted" in output
  interrupted = [n for n in NAMES if (root / "exp" / n / "ckpt").exists()]
  assert len(interrupted) == 2
  for name in interrupted:
    assert (
      "SIGTERM: checkpointed step"
      in (root / "exp" / name / "launch.log").read_text()
    )
    assert not (root / "exp" / name / sweeps.FINISHED_MARKER).exists()

  sweep_py(
    *args[2:-2], "--config.step_seconds=0", "--config.total_steps=40", env=env
  )
  for name in NAMES:
    workdir = root / "exp" / name
    assert (workdir / sweeps.FINISHED_MARKER).exists()
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    steps = {json.loads(line)["step"] for line in lines}
    assert steps == set(range(1, 41))
    log = (workdir / "launch.log").read_text()
    assert ("resumed from step" in log) == (name in interrupted)


# ---------------------------------------------------------------------------
# collect.py on a hand-written sweep directory.


def _write_run(sweep_dir, name, lines, finished):
  workdir = sweep_dir / name
  workdir.mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text(
    "".join(json.dumps(l) + "\n" for l in lines)
  )
  if finished:
    (workdir / sweeps.FINISHED_MARKER).write_text("")


def test_collect_table_values(tmp_path):
  sweep_dir = tmp_path / "exp"
  points = sweeps.expand(
    sweeps.product(
      sweeps.sweep("loss.name", ["ipo", "dpo"]),
      sweeps.sweep("loss.tau", [0.1, 1.0]),
      sweeps.sweep("seed", [0, 1]),
    )
  )
  sweep_dir.mkdir()
  (sweep_dir / sweeps.MANIFEST).write_text(
    json.dumps(
      {"points": [{"name": p.name, "overrides": p.overrides} for p in points]}
    )
  )
  # Eval loss of point i at steps 10, 20: (3 + i, 2 + i) but the run was
  # interrupted after step 10 and its resume rewrote step 20 as 1 + i.
  for i, point in enumerate(points[:-1]):
    _write_run(
      sweep_dir,
      point.name,
      [
        {
          "step": 10,
          "split": "train",
          "loss": 5.0 + i,
          "rewards/accuracies": 0.5,
        },
        {
          "step": 10,
          "split": "eval",
          "loss": 3.0 + i,
          "rewards/accuracies": 0.25,
        },
        {
          "step": 20,
          "split": "eval",
          "loss": 2.0 + i,
          "rewards/accuracies": 0.75,
        },
        {
          "step": 20,
          "split": "eval",
          "loss": 1.0 + i,
          "rewards/accuracies": 0.5,
        },
      ],
      finished=i != 0,
    )
  result = subprocess.run(
    [PYTHON, "launch/collect.py", f"--root={sweep_dir}"],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr
  with open(sweep_dir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == [p.name for p in points]
  for i, row in enumerate(rows[:-1]):
    assert row["status"] == ("incomplete" if i == 0 else "finished")
    assert (row["loss.name"], row["loss.tau"], row["seed"]) == tuple(
      str(v) for v in points[i].overrides.values()
    )
    assert row["step"] == "20"
    assert float(row["final/eval/loss"]) == 1.0 + i
    assert (
      float(row["best/eval/loss"]) == 1.0 + i
      and row["best_step/eval/loss"] == "20"
    )
    assert float(row["final/eval/rewards/accuracies"]) == 0.5
    assert (
      float(row["best/eval/rewards/accuracies"]) == 0.5
    )  # max; 0.75 was rewritten
    assert row["best_step/eval/rewards/accuracies"] == "20"
    assert float(row["final/train/loss"]) == 5.0 + i
  assert (
    rows[-1]["status"] == "not started" and rows[-1]["final/eval/loss"] == ""
  )

  table = (sweep_dir / "results.md").read_text().splitlines()
  assert table[0] == (
    "| run | loss.name | loss.tau | seed | status | step | final/eval/loss "
    "| best/eval/loss | final/eval/rewards/accuracies "
    "| best/eval/rewards/accuracies |"
  )
  assert (
    table[2]
    == f"| {points[0].name} | ipo | 0.1 | 0 | incomplete | 20 | 1 | 1 | 0.5 | 0.5 |"
  )
  assert len(table) == 2 + len(points)

  # Mean ± t-CI over seeds: ipo, τ=0.1 has losses 1 (seed 0, unfinished: left
  # out) and 2; ipo, τ=1.0 has 3 and 4.
  summary = (sweep_dir / "summary.md").read_text()
  assert "| ipo | 0.1 | 2 | 1 |" in summary
  assert (
    f"{points[0].name} is incomplete: left out of the mean" in result.stderr
  )
  assert "| ipo | 1.0 | 3.5 ± 6.4 | 2 |" in summary  # t(0.975, 1) · 0.5 = 6.35
  assert "| dpo | 1.0 | 7 | 1 |" in summary  # The seed-1 run never started.
  assert (sweep_dir / "plots" / "eval_loss.png").stat().st_size > 1000
  assert "8 runs (6 finished)" in result.stdout


def test_collect_rejects_a_corrupt_metrics_line(tmp_path):
  sweep_dir = tmp_path / "exp"
  sweep_dir.mkdir()
  (sweep_dir / sweeps.MANIFEST).write_text(
    json.dumps({"points": [{"name": "seed=0", "overrides": {"seed": 0}}]})
  )
  workdir = sweep_dir / "seed=0"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text(
    '{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n'
    '{"step": 3, "loss": 0.5}\n{"step": 4, "lo'
  )
  result = subprocess.run(
    [PYTHON, "launch/collect.py", f"--root={sweep_dir}"],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert result.returncode != 0
  assert f"{workdir}/metrics.jsonl:2: not a metrics record" in result.stderr


def test_collect_outside_a_sweep_directory(tmp_path):
  result = subprocess.run(
    [PYTHON, "launch/collect.py", f"--root={tmp_path}"],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert result.returncode != 0
  assert (
    "sweep.json not found: --root must be a sweep directory" in result.stderr
  )


# ---------------------------------------------------------------------------
# tpu_pod.sh against a recording stand-in for gcloud.

FAKE_GCLOUD = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Records its arguments; performs scp into $FAKE_HOST and the copy-side
    # ssh command there (the training command is only recorded).
    printf '%s\\0' "$@" >> "$GCLOUD_LOG"; printf '\\n' >> "$GCLOUD_LOG"
    if [[ $4 == scp ]]; then cp "$5" "$FAKE_HOST/${6#*:}"; fi
    for a in "$@"; do
      if [[ $a == --command=*tar* ]]; then
        (cd "$FAKE_HOST" && HOME=$FAKE_HOST bash -c "${a#--command=}")
      fi
    done
""")


def test_tpu_pod_copies_the_checkout_and_runs_on_all_workers(tmp_path):
  bin_dir, host = tmp_path / "bin", tmp_path / "host"
  bin_dir.mkdir()
  host.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  env = dict(
    os.environ,
    PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    GCLOUD_LOG=str(tmp_path / "calls"),
    FAKE_HOST=str(host),
    GCLOUD_FLAGS="--project=proj",
    TFDS_DATA_DIR="gs://b/tfds",
  )
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
    [
      "launch/tpu_pod.sh",
      "--queued",
      "my-qr",
      "us-east5-a",
      "--",
      "psipo_jax.main",
      "--config=experiments/x.py",
      "--workdir=gs://b/runs/a b",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr
  calls = [
    c.split("\0")[:-1]
    for c in (tmp_path / "calls").read_text().split("\n")
    if c
  ]
  target = ["--zone=us-east5-a", "--worker=all", "--node=all", "--project=proj"]
  assert calls[0][:4] == ["compute", "tpus", "queued-resources", "scp"]
  assert calls[0][5:] == ["my-qr:psipo_code.tgz", *target]
  assert calls[1] == [
    "compute",
    "tpus",
    "queued-resources",
    "ssh",
    "my-qr",
    "--command=rm -rf ~/psipo_jax && mkdir -p ~/psipo_jax && "
    "tar -xzf ~/psipo_code.tgz -C ~/psipo_jax",
    *target,
  ]
  assert calls[2] == [
    "compute",
    "tpus",
    "queued-resources",
    "ssh",
    "my-qr",
    "--command=cd ~/psipo_jax && TFDS_DATA_DIR=gs://b/tfds bash "
    "launch/run_tpu.sh psipo_jax.main --config=experiments/x.py "
    "--workdir=gs://b/runs/a\\ b",
    *target,
  ]
  # The hosts got this checkout's files, not its git-ignored ones.
  tracked = subprocess.run(
    ["git", "ls-files"], cwd=REPO, capture_output=True, text=True
  ).stdout.split()
  copied = host / "psipo_jax"
  assert all(
    (copied / f).exists()
    for f in tracked
    if os.path.exists(os.path.join(REPO, f))
  )
  assert (copied / "launch" / "tpu_pod.sh").exists()
  assert not (copied / ".git").exists()


def test_tpu_pod_set_up_only(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(
    '#!/usr/bin/env bash\necho "$@" >> "$GCLOUD_LOG"\n'
  )
  (bin_dir / "gcloud").chmod(0o755)
  env = dict(
    os.environ,
    PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    GCLOUD_LOG=str(tmp_path / "calls"),
  )
  for var in ("GCLOUD_FLAGS", "TFDS_DATA_DIR", "XLA_FLAGS", "LIBTPU_INIT_ARGS"):
    env.pop(var, None)
  subprocess.run(
    ["launch/tpu_pod.sh", "--no-copy", "my-tpu", "z", "--"],
    cwd=REPO,
    env=env,
    check=True,
    capture_output=True,
  )
  assert (tmp_path / "calls").read_text() == (
    "compute tpus tpu-vm ssh my-tpu --command=cd ~/psipo_jax && bash launch/run_tpu.sh "
    "--zone=z --worker=all\n"
  )


def test_tpu_pod_usage_errors():
  result = subprocess.run(
    ["launch/tpu_pod.sh", "my-tpu", "--", "psipo_jax.main"],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 2 and "usage:" in result.stderr
  result = subprocess.run(
    ["launch/tpu_pod.sh", "--no-cpy", "my-tpu", "z", "--"],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 2 and "usage:" in result.stderr


# ---------------------------------------------------------------------------
# local_multihost.sh with a probe module: 2 processes x 4 CPU devices.

PROBE = textwrap.dedent("""
    import json, os, sys
    env = os.environ
    if sys.argv[1:] == ["fail_early"] and env["JAX_PROCESS_ID"] == "1":
      sys.exit(3)  # Before connecting: process 0 would wait for it for minutes.
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    # The contract of psipo_jax.sharding.initialize_distributed.
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                               int(env["JAX_PROCESS_ID"]))
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    rows = np.arange(4, dtype=np.float32) + 4 * jax.process_index()
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), rows)
    total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
    # To a file: Gloo's C++ logging may interleave with our stdout.
    with open(f"{env['PROBE_OUT']}/{jax.process_index()}.json", "w") as f:
      json.dump([jax.process_count(), jax.device_count(), float(total)], f)
    print("probe done", flush=True)
""")


@pytest.fixture
def probe_env(tmp_path):
  (tmp_path / "probe.py").write_text(PROBE)
  return dict(
    os.environ,
    PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}",
    PYTHON=PYTHON,
    PROBE_OUT=str(tmp_path),
  )


def test_local_multihost_forms_one_global_mesh(probe_env, tmp_path):
  result = subprocess.run(
    ["launch/local_multihost.sh", "2", "4", "--", "probe"],
    cwd=REPO,
    env=probe_env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  for i in (
    0,
    1,
  ):  # 2 processes, 8 devices, sum(range(8)) = 28 over all of them.
    assert json.loads((tmp_path / f"{i}.json").read_text()) == [2, 8, 28.0]
    assert f"[{i}] probe done" in result.stdout


def test_local_multihost_stops_everyone_when_one_process_fails(probe_env):
  start = time.monotonic()
  result = subprocess.run(
    ["launch/local_multihost.sh", "2", "4", "--", "probe", "fail_early"],
    cwd=REPO,
    env=probe_env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 3
  assert "a process failed with exit code 3" in result.stderr
  assert (
    time.monotonic() - start < 60
  )  # JAX alone would wait 300 s for process 1.


# ---------------------------------------------------------------------------
# The real trainer (psipo_jax.main on the bandit experiment).


def _trainer_env():
  # One CPU device: these runs test launching, not sharding.
  return dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=xla_flags.xla_flags())


def _last(metrics_path, split):
  records = [json.loads(l) for l in open(metrics_path).read().splitlines()]
  return [r for r in records if r["split"] == split][-1]


@pytest.mark.slow
def test_real_sweep_parallel_kill_resume_skip_collect(tmp_path):
  """4 points with --parallel=2; one killed mid-run beforehand is resumed from
  its checkpoint; a rerun skips all; collect has one correct row per point."""
  env, root = _trainer_env(), tmp_path / "runs"
  sweep_args = [
    "--config=experiments/sweep_demo.py:tiny",
    f"--root={root}",
    "--parallel=2",
  ]
  dry = sweep_py(*sweep_args[:2], "--dry-run", env=env)
  commands = dry.stdout.splitlines()
  assert len(commands) == 4
  sweep_dir = root / "sweep_demo-tiny"
  killed = sweep_dir / "loss.name=ipo,loss.tau=0.1"

  # Kill the first point (SIGKILL: no last checkpoint) once it has one.
  killed.mkdir(parents=True)
  process = subprocess.Popen(
    shlex.split(commands[0]),
    cwd=REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + 90
  while not (killed / "checkpoints" / "100").is_dir():
    assert process.poll() is None and time.monotonic() < deadline, (
      "no checkpoint at step 100"
    )
    time.sleep(0.02)
  process.kill()
  process.wait()
  assert not (killed / sweeps.FINISHED_MARKER).exists()

  result = sweep_py(*sweep_args, env=env)
  assert "4 finished, 0 failed." in result.stdout
  log = (killed / "launch.log").read_text()
  resumed_at = int(log.split("Resumed from step ")[1].split()[0])
  assert resumed_at >= 100 and resumed_at % 100 == 0
  for name in os.listdir(sweep_dir):
    if (sweep_dir / name).is_dir():
      assert sweeps.is_finished(str(sweep_dir / name), total_steps=600)

  metrics = {
    n: (sweep_dir / n / "metrics.jsonl").read_text()
    for n in os.listdir(sweep_dir)
    if (sweep_dir / n).is_dir()
  }
  again = sweep_py(*sweep_args, env=env)
  assert "4 points, 4 finished (skipped), 0 to run" in again.stderr
  assert {
    n: (sweep_dir / n / "metrics.jsonl").read_text() for n in metrics
  } == metrics

  subprocess.run(
    [PYTHON, "launch/collect.py", f"--root={sweep_dir}"],
    cwd=REPO,
    check=True,
    capture_output=True,
  )
  with open(sweep_dir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == [
    c.split("--workdir=")[1].split()[0].rsplit("/", 1)[1] for c in commands
  ]
  for row in rows:
    last_eval = _last(sweep_dir / row["run"] / "metrics.jsonl", "eval")
    assert row["status"] == "finished" and row["step"] == "600"
    assert (
      float(row["final/eval/loss"]) == last_eval["loss"]
      and last_eval["step"] == 600
    )
    assert float(row["final/eval/h"]) == last_eval["h"]


@pytest.mark.slow
def test_local_multihost_2x4_equals_1x8(tmp_path):
  flags = [
    "--config=experiments/bandit_train.py",
    "--config.total_steps=40",
    "--config.log_every=10",
    "--config.eval_every=20",
    "--config.ckpt_every=20",
  ]
  env = _trainer_env()
  subprocess.run(
    [
      "launch/local_multihost.sh",
      "2",
      "4",
      "--",
      "psipo_jax.main",
      *flags,
      f"--workdir={tmp_path / 'two_hosts'}",
    ],
    cwd=REPO,
    check=True,
    env=dict(env, PYTHON=PYTHON),
    capture_output=True,
    timeout=300,
  )
  subprocess.run(
    [
      PYTHON,
      "-m",
      "psipo_jax.main",
      *flags,
      f"--workdir={tmp_path / 'one_host'}",
    ],
    cwd=REPO,
    check=True,
    env=dict(env, JAX_NUM_CPU_DEVICES="8"),
    capture_output=True,
    timeout=300,
  )
  runs = {}
  for name in ("two_hosts", "one_host"):
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    runs[name] = {(r["split"], r["step"]): r for r in map(json.loads, lines)}
  assert runs["two_hosts"].keys() == runs["one_host"].keys()
  assert ("eval", 40) in runs["one_host"]
  for key, one in runs["one_host"].items():
    two = runs["two_hosts"][key]
    for metric in one.keys() - {"split", "step", "steps_per_sec"}:
      assert two[metric] == pytest.approx(one[metric], rel=1e-5, abs=1e-6), (
        key,
        metric,
      )


def test_a_point_started_with_another_config_is_reported_not_skipped(
  exp, tmp_path
):
  """A point relaunched with other flags: neither skipped as finished nor
  resumed; the launcher names the point and the keys, exit status 2."""
  config, env = exp
  root = tmp_path / "runs"
  sweep_py(
    f"--config={config}", f"--root={root}", "--module=fake_trainer", env=env
  )
  # What the trainer records: the config each point was started with.
  for name in NAMES:
    started = sweeps.check_point(
      config,
      next(p for p in sweeps.load_sweep(config) if p.name == name),
      ["--config.tag=first"],
    )
    (root / "exp" / name / "config.json").write_text(
      started.to_json_best_effort()
    )
    sweeps.mark_finished(
      str(root / "exp" / name), 6
    )  # As the real trainer marks it.
  same = sweep_py(
    f"--config={config}",
    f"--root={root}",
    "--module=fake_trainer",
    "--",
    "--config.tag=first",
    "--config.total_steps=6",
    env=env,
  )
  assert "4 points, 4 finished (skipped), 0 to run" in same.stderr
  changed = sweep_py(
    f"--config={config}",
    f"--root={root}",
    "--module=fake_trainer",
    "--",
    "--config.tag=second",
    env=env,
    check=False,
  )
  assert changed.returncode == 2, changed.stderr
  assert "Traceback" not in changed.stderr
  assert (
    "4 point(s) of" in changed.stderr
    and "were started with another config" in changed.stderr
  )
  assert f"{NAMES[0]}: tag: 'first' -> 'second'" in changed.stderr
  assert "finished (skipped)" not in changed.stderr and changed.stdout == ""
  # More steps, or other logging frequencies, are no change of the computation.
  longer = sweep_py(
    f"--config={config}",
    f"--root={root}",
    "--module=fake_trainer",
    "--dry-run",
    "--",
    "--config.tag=first",
    "--config.total_steps=9",
    env=env,
  )
  assert "4 points, 0 finished (skipped), 4 to run" in longer.stderr


def test_collect_unknown_metric_and_non_finite_values(tmp_path):
  sweep_dir = tmp_path / "exp"
  points = sweeps.expand(
    sweeps.product(
      sweeps.sweep("loss.tau", [0.1]), sweeps.sweep("seed", [0, 1, 2])
    )
  )
  sweep_dir.mkdir()
  (sweep_dir / sweeps.MANIFEST).write_text(
    json.dumps(
      {"points": [{"name": p.name, "overrides": p.overrides} for p in points]}
    )
  )
  for point, loss in zip(points, [1.0, float("nan"), 3.0]):
    _write_run(
      sweep_dir, point.name, [{"step": 5, "split": "eval", "loss": loss}], True
    )
  collect_py = [PYTHON, "launch/collect.py", f"--root={sweep_dir}"]
  result = subprocess.run(
    [*collect_py, "--metrics=eval/los"],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert result.returncode != 0
  assert "--metrics: no run logged eval/los; logged: eval/loss" in result.stderr
  result = subprocess.run(collect_py, cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert (
    f"final/eval/loss = nan in {points[1].name}: left out of the mean"
    in result.stderr
  )
  assert (
    "| 0.1 | 2 ± 13 | 2 |" in (sweep_dir / "summary.md").read_text()
  )  # t(.975,1)·1 = 12.7
