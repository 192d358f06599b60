"""What every command line does with a user's mistake: a plain message, exit 2.

A user error — a mistyped config key, a bad value, an unwritable or missing
path, malformed data — is reported as one or two lines naming the key or the
path, with exit status 2 and no traceback. Anything else is a bug and keeps
its traceback. Entry points:

    def main(argv):
      with cli.user_errors():
        plan = check_everything(config, workdir)   # before any work
      run(plan)                                    # bugs show tracebacks

    if __name__ == "__main__":
      cli.run(main)   # absl's app.run, with config-flag errors made plain

`user_errors` turns `ValueError` (which includes `data.DataError`) and
`OSError` raised inside it into the plain report; `DataError` is reported
plainly wherever it is raised, as it always names a file and line.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

from absl import app
from absl import flags

from psipo_jax import config_checks
from psipo_jax import sweeps

EXIT_USER_ERROR = 2


def fail(message: str) -> NoReturn:
  """Prints `error: <message>` to stderr and exits with status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
  """Reports a ValueError or OSError raised inside as a user error."""
  try:
    yield
  except (ValueError, OSError) as e:
    fail(_one_line(e))


def _one_line(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  if isinstance(error, OSError) and error.filename and error.strerror:
    text = f"{error.filename}: {error.strerror}"
  return text


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def explain_config_flag_error(
  argv: Sequence[str], error: BaseException, *, config_flag: str = "config"
) -> str:
  """A plain sentence for a failed `--config=...` / `--config.k=v` parse.

  ml_collections reports a mistyped override as a bare `AttributeError`
  with an escaped "did you mean" deep in a traceback; here the override is
  replayed on the config without overrides to name the first unknown key
  and its nearest valid sibling.

  Raises:
    The original error if the config file itself is broken (a bug).
  """

  spec = _flag_value(argv, config_flag)
  if spec is None:
    return f"--{config_flag} is required"
  path, arg = sweeps.split_config_spec(spec)
  if not os.path.isfile(path):
    return f"--{config_flag}: config file {path!r} does not exist"
  module = sweeps.load_config_module(path)  # A broken file is a bug: traceback.
  try:
    base = module.get_config() if arg is None else module.get_config(arg)
  except ValueError as e:
    return f"--{config_flag}={spec}: {e}"
  prefix = f"--{config_flag}."
  overrides = [a for a in argv if a.startswith(prefix)]
  for override in overrides:
    key = override[len(prefix) :].split("=", 1)[0]
    block, walked = base, []
    for part in key.split("."):
      keys = list(block.keys()) if hasattr(block, "keys") else []
      if part not in keys:
        return f"{override}: " + config_checks.unknown_key_message(
          part, keys, prefix="".join(f"{w}." for w in walked)
        )
      block, walked = block[part], [*walked, part]
  if isinstance(error, flags.Error):
    return str(error)
  if overrides and isinstance(error, (TypeError, ValueError)):
    return f"{' '.join(overrides)}: {error}"
  raise error


def parse_flags(argv: list[str], *, config_flag: str = "config") -> list[str]:
  """absl flag parsing with config-flag mistakes reported as user errors.

  ml_collections defers some failures (a missing config file) to the first
  read of the flag's value, so the value is read here once.
  """
  try:
    remaining = flags.FLAGS(argv)
    if config_flag in flags.FLAGS and flags.FLAGS[config_flag].present:
      flags.FLAGS[config_flag].value.keys()  # Raises the deferred failure.
    return remaining
  except (
    flags.Error,
    AttributeError,
    KeyError,
    OSError,
    TypeError,
    ValueError,
  ) as e:
    if config_flag not in flags.FLAGS:  # A command without a config file.
      if isinstance(e, flags.Error):
        fail(str(e))
      raise
    fail(explain_config_flag_error(argv, e, config_flag=config_flag))


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)` with :func:`parse_flags`."""
  app.run(main, flags_parser=parse_flags)
