r"""Entry point: python -m psipo_jax.main --config=FILE.py[:ARG] --workdir=DIR.

Overrides: --config.loss.tau=0.1 (any key of the config). A multi-process
run sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID in
each process's environment, or passes --multihost on a managed cluster
(Cloud TPU pod, SLURM, Open MPI, Kubernetes). A run started in a workdir that
holds a checkpoint resumes from it (a changed config is refused unless
--config.allow_config_change=True). A mistake in the config or the workdir
is reported before any work as one line naming the key or path, exit
status 2 (`psipo_jax.cli`).
"""

import logging as std_logging

from absl import flags
from absl import logging
from ml_collections import config_flags

from psipo_jax import cli
from psipo_jax import data
from psipo_jax import config_checks
from psipo_jax import sharding
from psipo_jax import train


def _define_flags() -> dict[str, flags.FlagHolder]:
  """The command line's flags, defined only when this module is the program
  (other command-line modules define --config and --workdir too, and tests
  import several of them into one process)."""
  holders = {
    "config": config_flags.DEFINE_config_file(
      "config", None, "Experiment config file.", lock_config=True
    ),
    "workdir": flags.DEFINE_string(
      "workdir", None, "Directory for checkpoints and metrics."
    ),
    "multihost": flags.DEFINE_bool(
      "multihost",
      False,
      "Call jax.distributed.initialize() with cluster auto-detection.",
    ),
  }
  flags.mark_flags_as_required(["config", "workdir"])
  return holders


def _drop_orbax_info(record: std_logging.LogRecord) -> bool:
  """Orbax logs every save phase at INFO; keep its warnings and errors only."""
  return (
    record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname
  )


def main(argv: list[str], holders: dict[str, flags.FlagHolder]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_drop_orbax_info)
  sharding.initialize_distributed(auto_detect=holders["multihost"].value)
  config, workdir = holders["config"].value, holders["workdir"].value
  with cli.user_errors():
    train.validate_config(config, workdir)
  try:
    train.train_and_evaluate(config, workdir)
  except (data.DataError, config_checks.UserError) as e:
    cli.fail(
      str(e)
    )  # The user's to fix: bad data, a checkpoint that does not fit.


if __name__ == "__main__":
  _holders = _define_flags()
  cli.run(lambda argv: main(argv, _holders))
