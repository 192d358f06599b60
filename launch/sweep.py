#!/usr/bin/env python3
r"""Expands the sweep of an experiment file and runs (or prints) its commands.

  launch/sweep.py --config=experiments/x.py[:arg] --root=DIR \
      [--dry-run] [--parallel=N] [--where=local|tpu|slurm] [-- EXTRA FLAGS]

Every point of the file's `get_sweep(arg)` becomes one training command with
its own workdir `DIR/<sweep>/<run_name>` (see psipo_jax/sweeps.py); EXTRA
FLAGS (e.g. `--config.total_steps=50`) are appended to every command. Points
whose workdir holds the FINISHED marker are skipped; the others start (or
resume from their checkpoint). A point whose workdir was started with
another config (`psipo_jax.run_config`: anything but the number of steps
and the logging, evaluation and checkpoint frequencies differs, e.g. after
new EXTRA FLAGS) is neither skipped nor resumed: the launcher names the
differing keys and stops before running anything (pass
`-- --config.allow_config_change=True` to continue them under the new
config). `--dry-run` prints the commands, one per line on stdout, and
touches nothing. Mistakes (a bad key, a missing file) are reported as one
line, exit status 2.

  --where=local  runs the points here, at most --parallel at a time, each
                 with its output in <workdir>/launch.log; prints progress
                 and, at the end, the failures with their log tails.
  --where=tpu    runs the points one after the other on every host of a
                 Cloud TPU VM / pod with launch/tpu_pod.sh (--tpu, --zone;
                 --queued for a multi-slice queued resource). DIR should be
                 a gs:// bucket path that every host can write.
  --where=slurm  submits one `sbatch launch/slurm.sbatch` job per point
                 (--sbatch-args for partition, nodes, time...); points with
                 a job of the same name in the queue are not resubmitted.

The finite-action grids of psipo_jax.bandit are not swept here: such a grid
is one vmapped program, run by `python -m psipo_jax.bandit --config=...`
(launch/README.md §6). launch/README.md has worked examples.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # Runs as a script from a checkout, installed or not.
  sys.path.insert(0, _REPO)

from psipo_jax import cli  # pylint: disable=g-import-not-at-top
from psipo_jax import config_checks  # pylint: disable=g-import-not-at-top
from psipo_jax import run_config  # pylint: disable=g-import-not-at-top
from psipo_jax import sweeps  # pylint: disable=g-import-not-at-top

LOG_NAME = "launch.log"
TAIL_LINES = 20
# How long interrupted local runs get to write their SIGTERM checkpoint.
_GRACE_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class Job:
  """One command: `argv` to execute, `line` to print (the same, as shell)."""

  name: str
  workdir: str
  argv: list[str]
  line: str
  total_steps: int | None = None  # What "finished" requires, when known.


def finished(workdir: str, total_steps: int | None) -> bool | None:
  """Whether the run in `workdir` finished; None if that cannot be checked
  here (a gs:// root without gcsfs): the point is then run again, which the
  trainer's resume makes a no-op for a finished run."""
  try:
    return sweeps.is_finished(workdir, total_steps)
  except ImportError as e:
    _warn_once(
      f"warning: cannot check {sweeps.FINISHED_MARKER} markers ({e}); "
      "finished points will not be skipped."
    )
    return None


@functools.cache
def _warn_once(message: str) -> None:
  log(message)


def _script(name: str) -> str:
  """Path of a launch/ script as the user would type it from here."""
  path = os.path.join(_REPO, "launch", name)
  rel = os.path.relpath(path)
  return rel if not rel.startswith("..") else path


def trainer_args(
  module: str, spec: str, workdir: str, overrides: dict, extra: Sequence[str]
) -> list[str]:
  """`module --config=... --workdir=... --config.k=v ... EXTRA`."""
  return [
    module,
    f"--config={spec}",
    f"--workdir={workdir}",
    *sweeps.override_flags(overrides),
    *extra,
  ]


def local_job(name, workdir, args, *, python=sys.executable) -> Job:
  argv = [python, "-m", *args]
  return Job(name, workdir, argv, shlex.join(argv))


def tpu_job(name, workdir, args, *, tpu, zone, queued, copy) -> Job:
  argv = [
    _script("tpu_pod.sh"),
    *([] if copy else ["--no-copy"]),
    *(["--queued"] if queued else []),
    tpu,
    zone,
    "--",
    *args,
  ]
  return Job(name, workdir, argv, shlex.join(argv))


def slurm_job(name, workdir, args, *, sweep, sbatch_args) -> Job:
  sbatch = [
    "sbatch",
    f"--job-name={slurm_job_name(sweep, name)}",
    f"--output={workdir}/slurm-%j.out",
    *sbatch_args,
    _script("slurm.sbatch"),
    *args,
  ]
  # SLURM does not create the directory of --output: a missing one fails the job.
  line = f"mkdir -p {shlex.quote(workdir)} && {shlex.join(sbatch)}"
  return Job(name, workdir, ["bash", "-c", line], line)


def slurm_job_name(sweep: str, name: str) -> str:
  return f"{sweep}/{name}"


def make_jobs(
  points,
  *,
  spec,
  sweep_dir,
  sweep,
  module,
  extra,
  where,
  total_steps=None,
  tpu=None,
  zone=None,
  queued=False,
  sbatch_args=(),
) -> list[Job]:
  """One job per point, in sweep order. Multi-host targets get --multihost,
  so that the trainer calls jax.distributed.initialize() with auto-detection.
  `total_steps` maps point names to what their run must reach to be finished."""
  jobs = []
  for point in points:
    workdir = f"{sweep_dir}/{point.name}"
    args = trainer_args(module, spec, workdir, point.overrides, extra)
    if where == "local":
      job = local_job(point.name, workdir, args)
    elif where == "tpu":
      job = tpu_job(
        point.name,
        workdir,
        [*args, "--multihost"],
        tpu=tpu,
        zone=zone,
        queued=queued,
        copy=not jobs,
      )
    elif where == "slurm":
      job = slurm_job(
        point.name,
        workdir,
        [*args, "--multihost"],
        sweep=sweep,
        sbatch_args=sbatch_args,
      )
    else:
      raise ValueError(f"--where={where!r}: choose local, tpu or slurm")
    jobs.append(
      dataclasses.replace(job, total_steps=(total_steps or {}).get(point.name))
    )
  return jobs


# ---------------------------------------------------------------------------
# Running locally: at most N at a time, progress, failures with log tails.


@dataclasses.dataclass
class _Running:
  job: Job
  process: subprocess.Popen
  log_offset: int
  started: float


def _tail(path: str, offset: int, lines: int = TAIL_LINES) -> str:
  with open(path, "rb") as f:
    f.seek(offset)
    text = f.read().decode("utf-8", errors="replace")
  return "\n".join(text.rstrip("\n").split("\n")[-lines:])


def _why_not_finished(job: Job, returncode: int) -> str | None:
  """None if the job's run finished, else what went wrong."""
  if returncode < 0:
    return f"killed by signal {-returncode}"
  if returncode > 0:
    return f"exit code {returncode}"
  try:
    if sweeps.is_finished(job.workdir, job.total_steps):
      return None
  except ValueError as e:  # A corrupt marker.
    return str(e)
  return f"exited 0 without writing {sweeps.FINISHED_MARKER} (stopped early; rerun resumes it)"


class LocalRunner:
  """Runs jobs as subprocesses, `parallel` at a time, and reports progress."""

  def __init__(self, jobs: Sequence[Job], *, parallel: int, out=sys.stdout):
    if parallel < 1:
      raise ValueError(f"--parallel must be at least 1, got {parallel}")
    self._pending = collections.deque(jobs)
    self._parallel = parallel
    self._running: list[_Running] = []
    self._done: list[str] = []
    self._failed: list[tuple[Job, str, str]] = []  # (job, why, log tail)
    self._out = out
    self._stopping = False

  def _print(self, message: str) -> None:
    counts = (
      f"[done {len(self._done)} | running {len(self._running)} | "
      f"failed {len(self._failed)} | remaining {len(self._pending)}]"
    )
    print(f"{counts} {message}", file=self._out, flush=True)

  def _start(self, job: Job) -> None:
    os.makedirs(job.workdir, exist_ok=True)
    log_path = os.path.join(job.workdir, LOG_NAME)
    with open(log_path, "a", encoding="utf-8") as log:
      log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {job.line}\n")
      offset = log.tell()
      # Own session: a signal to the launcher's terminal does not reach the
      # run directly; the launcher forwards SIGTERM and waits for checkpoints.
      process = subprocess.Popen(
        job.argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
      )
    self._running.append(_Running(job, process, offset, time.monotonic()))
    self._print(f"started  {job.name}")

  def _reap(self, run: _Running, returncode: int) -> None:
    self._running.remove(run)
    seconds = time.monotonic() - run.started
    why = _why_not_finished(run.job, returncode)
    if why is None:
      self._done.append(run.job.name)
      self._print(f"finished {run.job.name} in {seconds:.1f} s")
      return
    log_path = os.path.join(run.job.workdir, LOG_NAME)
    self._failed.append((run.job, why, _tail(log_path, run.log_offset)))
    self._print(f"FAILED   {run.job.name}: {why}; log: {log_path}")

  def _stop(self, signum, frame) -> None:
    del frame
    if self._stopping:  # Second signal: do not wait for checkpoints.
      for run in self._running:
        _signal_group(run.process, signal.SIGKILL)
      return
    self._stopping = True
    self._print(
      f"signal {signum}: stopping; runs get SIGTERM and up to "
      f"{_GRACE_SECONDS:.0f} s to checkpoint (again to kill now)"
    )
    self._pending.clear()
    for run in self._running:
      _signal_group(run.process, signal.SIGTERM)
    self._deadline = time.monotonic() + _GRACE_SECONDS

  def run(self) -> bool:
    """Runs everything; True if every job finished."""
    previous = {
      s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
      while self._pending or self._running:
        while self._pending and len(self._running) < self._parallel:
          self._start(self._pending.popleft())
        time.sleep(0.1)
        for run in list(self._running):
          returncode = run.process.poll()
          if returncode is not None:
            self._reap(run, returncode)
        if self._stopping and time.monotonic() > self._deadline:
          for run in self._running:
            _signal_group(run.process, signal.SIGKILL)
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
    self._report()
    return not self._failed and not self._stopping

  def _report(self) -> None:
    for job, why, tail in self._failed:
      print(
        f"\n--- FAILED {job.name}: {why}\n$ {job.line}\n{tail}", file=self._out
      )
    print(
      f"\n{len(self._done)} finished, {len(self._failed)} failed"
      + (", interrupted" if self._stopping else "")
      + ".",
      file=self._out,
      flush=True,
    )


def _signal_group(process: subprocess.Popen, signum: int) -> None:
  try:
    os.killpg(process.pid, signum)
  except ProcessLookupError:
    pass


# ---------------------------------------------------------------------------
# TPU (sequential, blocking) and SLURM (submit and return).


def run_sequentially(jobs: Sequence[Job]) -> bool:
  """Runs each job to completion; stops at the first that did not finish."""
  for index, job in enumerate(jobs):
    print(f"[{index + 1}/{len(jobs)}] {job.name}\n$ {job.line}", flush=True)
    returncode = subprocess.call(job.argv)
    if returncode != 0 or finished(job.workdir, job.total_steps) is False:
      print(
        f"{job.name} did not finish (exit code {returncode}); rerun the same "
        "command to resume it and run the rest.",
        flush=True,
      )
      return False
  return True


def queued_slurm_job_names() -> set[str]:
  """Names of this user's jobs in the SLURM queue (pending or running)."""
  result = subprocess.run(
    ["squeue", "--me", "--noheader", "--format=%j"],
    capture_output=True,
    text=True,
    check=True,
  )
  return set(result.stdout.split())


def submit(jobs: Sequence[Job]) -> bool:
  ok = True
  for job in jobs:
    returncode = subprocess.call(job.argv)
    print(
      f"submitted {job.name}"
      if returncode == 0
      else f"sbatch failed for {job.name} (exit code {returncode})",
      flush=True,
    )
    ok = ok and returncode == 0
  return ok


# ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  argv, extra = sweeps.split_extra_flags(argv)
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--config", required=True, help="experiments/<file>.py[:arg]"
  )
  parser.add_argument(
    "--root", required=True, help="runs go to ROOT/<sweep>/<run_name>"
  )
  parser.add_argument(
    "--name", help="sweep name (default: config file stem[-arg])"
  )
  parser.add_argument(
    "--where", default="local", choices=("local", "tpu", "slurm")
  )
  parser.add_argument(
    "--parallel", type=int, default=1, help="local: runs at a time"
  )
  parser.add_argument(
    "--dry-run", action="store_true", help="print the commands only"
  )
  parser.add_argument(
    "--module", default="psipo_jax.main", help="python -m MODULE per point"
  )
  parser.add_argument(
    "--tpu", help="tpu: TPU VM name (or queued resource with --queued)"
  )
  parser.add_argument("--zone", help="tpu: zone of the TPU VM")
  parser.add_argument(
    "--queued",
    action="store_true",
    help="tpu: --tpu names a (multi-slice) queued resource",
  )
  parser.add_argument(
    "--sbatch-args", default="", help="slurm: extra sbatch options"
  )
  args = parser.parse_args(argv)
  args.extra = extra
  if args.where == "tpu" and not (args.tpu and args.zone):
    parser.error("--where=tpu needs --tpu=NAME and --zone=ZONE")
  return args


def log(message: str) -> None:
  """Commentary goes to stderr: stdout of --dry-run is the commands alone."""
  print(message, file=sys.stderr, flush=True)


def changed_points(sweep_dir: str, configs: dict) -> list[tuple[str, str]]:
  """[(point name, differing keys)] of the points whose workdir was started
  with a config that computes something else than the one they would run now."""
  changed = []
  for name, config in configs.items():
    try:
      recorded = run_config.read(f"{sweep_dir}/{name}")
    except ImportError as e:
      _warn_once(
        f"warning: cannot read recorded configs ({e}); changed points "
        "will be refused by the trainer instead."
      )
      return []
    if recorded is None or config.get("allow_config_change", False):
      continue
    changes = run_config.computational(
      run_config.differences(recorded, run_config.to_plain(config))
    )
    if changes:
      changed.append((name, run_config.describe(changes)))
  return changed


def plan(args) -> tuple[str, str, list, dict]:
  """Checks the whole sweep before anything runs.

  Returns:
    (sweep name, sweep directory, points, {point name: its config}).
  Raises:
    ValueError or OSError: a user's mistake, named (reported by `main`).
  """
  if args.where == "local" and "://" in args.root:
    raise ValueError(f"--where=local needs a local --root, got {args.root}")
  if args.parallel < 1:
    raise ValueError(f"--parallel must be at least 1, got {args.parallel}")
  path, _ = sweeps.split_config_spec(args.config)
  if not os.path.isfile(path):
    raise ValueError(f"--config: config file {path!r} does not exist")
  sweep = args.name or sweeps.sweep_name(args.config)
  sweep_dir = f"{args.root.rstrip('/')}/{sweep}"
  config_flags = [f for f in args.extra if f.startswith("--config.")]
  try:
    sweeps.parse_config(args.config, config_flags)
  except ValueError:
    raise ValueError(
      cli.explain_config_flag_error(
        ["sweep.py", f"--config={args.config}", *config_flags],
        ValueError("the extra flags do not fit the config"),
      )
    ) from None
  points = sweeps.load_sweep(args.config)
  swept = {k for p in points for k in p.overrides}
  for flag in config_flags:
    key = flag[len("--config.") :].split("=", 1)[0]
    if key in swept:
      raise ValueError(
        f"extra flag {flag} would override the swept key {key} in every point"
      )
  configs = {
    p.name: sweeps.check_point(args.config, p, config_flags) for p in points
  }
  if "://" not in args.root and not args.dry_run:
    config_checks.writable_directory(sweep_dir, name="--root")
  changed = changed_points(sweep_dir, configs)
  if changed:
    listed = "\n  ".join(f"{name}: {what}" for name, what in changed)
    raise ValueError(
      f"{len(changed)} point(s) of {sweep_dir} were started with another config;"
      " they would neither be skipped nor resumed silently. Use another --root,"
      " or add -- --config.allow_config_change=True to continue them under"
      f" the new config:\n  {listed}"
    )
  return sweep, sweep_dir, points, configs


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  with cli.user_errors():
    sweep, sweep_dir, points, configs = plan(args)
  total_steps = {
    name: config.get("total_steps") for name, config in configs.items()
  }

  todo = [
    p
    for p in points
    if not finished(f"{sweep_dir}/{p.name}", total_steps[p.name])
  ]
  skipped = len(points) - len(todo)
  if args.where == "slurm" and todo and not args.dry_run:
    queued = queued_slurm_job_names()
    in_queue = [p for p in todo if slurm_job_name(sweep, p.name) in queued]
    todo = [p for p in todo if p not in in_queue]
    if in_queue:
      log(
        f"{len(in_queue)} point(s) already queued or running in SLURM: not resubmitted."
      )
  log(
    f"sweep {sweep}: {len(points)} points, {skipped} finished (skipped), "
    f"{len(todo)} to run, as one {args.module} process per point, on {args.where}; "
    f"workdirs in {sweep_dir}/"
  )
  jobs = make_jobs(
    todo,
    spec=args.config,
    sweep_dir=sweep_dir,
    sweep=sweep,
    module=args.module,
    extra=args.extra,
    where=args.where,
    total_steps=total_steps,
    tpu=args.tpu,
    zone=args.zone,
    queued=args.queued,
    sbatch_args=shlex.split(args.sbatch_args),
  )
  if args.dry_run:
    for job in jobs:
      print(job.line)
    return 0
  if args.where == "tpu" and not args.root.startswith("gs://"):
    log(
      f"warning: --root={args.root} is not a gs:// path; every TPU host must see it."
    )
  sweeps.write_manifest(
    sweep_dir,
    spec=args.config,
    module=args.module,
    where=args.where,
    extra=args.extra,
    points=points,
  )
  if args.where == "local":
    ok = LocalRunner(jobs, parallel=args.parallel).run()
  elif args.where == "tpu":
    ok = run_sequentially(jobs)
  else:
    ok = submit(jobs)
  log(f"collect with: {_script('collect.py')} --root={sweep_dir}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
