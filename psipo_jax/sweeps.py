"""Sweep declaration and expansion: a grid of config overrides, one run each.

A sweep is declared in the experiment's config file, next to its defaults
(big_vision style), as ``get_sweep(arg)`` returning a list of override dicts
keyed by dotted config paths::

    from psipo_jax import sweeps

    def get_sweep(arg=None):
      return sweeps.product(
          sweeps.sweep("loss.name", ["ipo", "dpo"]),
          sweeps.sweep("loss.tau", [0.1, 0.3, 1.0]),
          sweeps.sweep("seed", range(3)),
      )

``launch/sweep.py`` turns every point into one training command
(``--config.loss.tau=0.1 ...``) with its own workdir
``<root>/<sweep>/<run_name>``. The run name is a function of the point alone
(``loss.name=ipo,loss.tau=0.1,seed=0``), never of its index, so growing a
sweep keeps the workdirs of the points already there: those that finished are
skipped and the interrupted ones resume from their checkpoint.

Values keep their Python type (``1`` is an int, ``1.0`` a float) and are
written so that ml_collections' ``--config.x=y`` parsing gives them back;
`check_point` proves it for each point against the real config before anything
is launched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import re
import sys
import warnings
from typing import Any, Iterable, Mapping, Sequence

Overrides = dict[str, Any]

# Written by the training system (`mark_finished`) into a run's workdir when,
# and only when, the run has completed all its steps: what "finished" means to
# the launcher and to collect.py. It holds {"step": <last step>}.
FINISHED_MARKER = "FINISHED"
# Written by launch/sweep.py and psipo_jax.lm_grid (`write_manifest`) into
# `<root>/<sweep>/`: the config, the extra flags and every point's name and
# overrides, read back by launch/collect.py.
MANIFEST = "sweep.json"

_MAX_NAME_LEN = 160
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._+=,-]")


# ---------------------------------------------------------------------------
# Declaring a sweep: lists of override dicts and three ways to combine them.


def sweep(key: str, values: Iterable[Any]) -> list[Overrides]:
  """One config key over several values: ``[{key: v} for v in values]``."""
  _check_key(key)
  points = [{key: v} for v in values]
  if not points:
    raise ValueError(f"sweep({key!r}, ...) got no values")
  return points


def product(*sweeps: Sequence[Overrides]) -> list[Overrides]:
  """Cartesian product; the first sweep varies slowest.

  ``product(sweep("a", [1, 2]), sweep("b", [3, 4]))`` is
  ``[{a:1,b:3}, {a:1,b:4}, {a:2,b:3}, {a:2,b:4}]``.
  """
  return [_merge(combo, "product") for combo in itertools.product(*sweeps)]


def zipit(*sweeps: Sequence[Overrides]) -> list[Overrides]:
  """Element-wise merge of sweeps of equal length (like Python's ``zip``)."""
  lengths = [len(s) for s in sweeps]
  if len(set(lengths)) > 1:
    raise ValueError(
      f"zipit needs sweeps of equal length, got lengths {lengths}"
    )
  return [_merge(combo, "zipit") for combo in zip(*sweeps)]


def chain(*sweeps: Sequence[Overrides]) -> list[Overrides]:
  """Concatenation: the points of each sweep, one sweep after the other."""
  return [dict(point) for s in sweeps for point in s]


def _merge(points: Iterable[Mapping[str, Any]], combinator: str) -> Overrides:
  merged: Overrides = {}
  for point in points:
    for key, value in point.items():
      if key in merged:
        raise ValueError(
          f"{combinator}: key {key!r} set twice in one point "
          f"({merged[key]!r} and {value!r})"
        )
      merged[key] = value
  return merged


def _check_key(key: str) -> None:
  if (
    not isinstance(key, str)
    or key.startswith("config.")
    or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key)
  ):
    raise ValueError(
      f"sweep key {key!r} is not a dotted config path like 'loss.tau' "
      "(no 'config.' prefix)"
    )


# ---------------------------------------------------------------------------
# From an override dict to a name and to command-line flags.


def format_value(value: Any) -> str:
  """The ``--config.k=<text>`` text that ml_collections parses back to `value`.

  Floats use ``repr`` so that they round-trip exactly and stay floats
  (``1.0``, ``1e-05``); tuples and lists are written as Python literals.
  """
  if isinstance(value, (bool, int, str)):
    return str(value)
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (tuple, list)) and _is_literal(value):
    return repr(value)
  raise TypeError(
    f"sweep value {value!r} of type {type(value).__name__} is not supported: "
    "use bool, int, float, str or (nested) tuples/lists of those"
  )


def _is_literal(value: Any) -> bool:
  if isinstance(value, (tuple, list)):
    return all(_is_literal(v) for v in value)
  return type(value) in (bool, int, float, str)


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
  """``{"loss.tau": 0.1}`` -> ``["--config.loss.tau=0.1"]``, in point order."""
  return [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]


def run_name(overrides: Mapping[str, Any]) -> str:
  """A readable directory name that depends on this point only.

  ``{"loss.name": "ipo", "loss.tau": 0.1, "seed": 0}`` ->
  ``"loss.name=ipo,loss.tau=0.1,seed=0"``. Characters outside
  ``[A-Za-z0-9._+=,-]`` become ``_``; a name longer than 160 characters is cut
  and ends with a hash of the full name, so it stays unique and stable.
  """
  if not overrides:
    return "default"
  name = ",".join(f"{k}={_name_text(v)}" for k, v in overrides.items())
  name = _UNSAFE_CHARS.sub("_", name)
  if len(name) > _MAX_NAME_LEN:
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    name = f"{name[: _MAX_NAME_LEN - 11]}-{digest}"
  return name


def _name_text(value: Any) -> str:
  if isinstance(value, (tuple, list)):  # (3, 4) -> "3-4": no brackets in paths.
    return "-".join(_name_text(v) for v in value)
  return format_value(value)


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep: its directory name and its config overrides."""

  name: str
  overrides: Overrides


def expand(points: Sequence[Mapping[str, Any]]) -> list[Point]:
  """Names every point; rejects empty sweeps, bad keys/values, duplicates."""
  if isinstance(points, Mapping) or not isinstance(points, Sequence):
    raise TypeError(
      f"a sweep is a list of override dicts, got {type(points).__name__}"
    )
  if not points:
    raise ValueError("the sweep has no points")
  named: dict[str, Point] = {}
  for index, overrides in enumerate(points):
    if not isinstance(overrides, Mapping):
      raise TypeError(
        f"sweep point {index} is a {type(overrides).__name__}, not a dict"
      )
    for key, value in overrides.items():
      _check_key(key)
      format_value(value)  # Raises on unsupported types.
    point = Point(run_name(overrides), dict(overrides))
    if point.name in named:
      raise ValueError(
        f"sweep points {named[point.name].overrides} and {point.overrides} "
        f"(index {index}) get the same run name {point.name!r}"
      )
    named[point.name] = point
  return list(named.values())


# ---------------------------------------------------------------------------
# Reading an experiment file: `--config=path.py[:arg]`.


def split_config_spec(spec: str) -> tuple[str, str | None]:
  """``"experiments/x.py:a=1"`` -> ``("experiments/x.py", "a=1")`` (first colon)."""
  path, sep, arg = spec.partition(":")
  return path, (arg if sep else None)


def load_config_module(path: str):
  """Imports a config file by path (as ml_collections' config_flags does)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module_name = "psipo_sweep_config_" + re.sub(
    r"\W", "_", os.path.abspath(path)
  )
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module
  spec.loader.exec_module(module)
  return module


def sweep_name(spec: str) -> str:
  """``experiments/ipo_grid.py:small`` -> ``ipo_grid-small``."""
  path, arg = split_config_spec(spec)
  name = os.path.splitext(os.path.basename(path))[0]
  if arg:
    name += "-" + _UNSAFE_CHARS.sub("_", arg)
  return name


def load_sweep(spec: str) -> list[Point]:
  """Calls the config file's ``get_sweep(arg)`` and expands it."""
  path, arg = split_config_spec(spec)
  module = load_config_module(path)
  if not hasattr(module, "get_sweep"):
    raise AttributeError(
      f"{path} defines no get_sweep(arg): nothing to sweep over"
    )
  points = module.get_sweep(arg) if arg is not None else module.get_sweep()
  try:
    return expand(points)
  except (TypeError, ValueError) as e:
    raise type(e)(f"{path}: get_sweep: {e}") from None


def parse_config(spec: str, flag_args: Sequence[str] = ()):
  """The config the trainer will see for ``--config=spec`` and `flag_args`
  (``--config.k=v``), parsed by ml_collections' config_flags itself."""
  from absl import (
    flags,
  )  # Imported here: the launcher runs without absl parsing.
  from ml_collections import config_flags

  argv = ["parse", f"--config={spec}", *flag_args]
  flag_values = flags.FlagValues()
  # The override flags are registered from `sys_argv` when --config is parsed.
  config_flags.DEFINE_config_file(
    "config", flag_values=flag_values, sys_argv=argv
  )
  try:
    with warnings.catch_warnings():
      # ml_collections loads the file with the deprecated load_module().
      warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
      flag_values(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # An unknown key surfaces as AttributeError, a bad value as flags.Error.
    raise ValueError(
      f"{' '.join(flag_args)} does not fit {spec}: {e}"
    ) from None
  return flag_values.config


def check_point(spec: str, point: Point, extra_flags: Sequence[str] = ()):
  """Parses the point's flags exactly as the trainer's ``--config`` flag will.

  Raises if a key does not exist in the config (the config is locked, so a
  typo cannot add a new field), or if a value would come back with another
  type or value than declared (an int into a float field is allowed: it
  widens exactly). `extra_flags` (``--config.k=v`` added to every point)
  are parsed after the point's own, as on the command line.

  Returns:
    The point's config, as the trainer will see it.
  """
  try:
    config = parse_config(
      spec, [*override_flags(point.overrides), *extra_flags]
    )
  except ValueError as e:
    raise ValueError(f"sweep point {point.name!r}: {e}") from None
  for key, declared in point.overrides.items():
    parsed = config
    for part in key.split("."):
      parsed = parsed[part]
    widened = (
      isinstance(declared, int)
      and not isinstance(declared, bool)
      and isinstance(parsed, float)
    )
    same_type = type(parsed) is type(declared) or widened
    if not same_type or parsed != declared:
      raise ValueError(
        f"sweep point {point.name!r}: {key}={declared!r} "
        f"({type(declared).__name__}) comes back from the flag as "
        f"{parsed!r} ({type(parsed).__name__})"
      )
  return config


def mark_finished(workdir: str, step: int) -> None:
  """Called by the training system, on one process, once the final
  checkpoint of `step` (the last step of the run) is written. Whether the
  finished run's config is the one a sweep would run now is the business of
  `psipo_jax.run_config` (launch/sweep.py checks it before skipping)."""
  from etils import epath  # Local paths and gs:// alike.

  (epath.Path(workdir) / FINISHED_MARKER).write_text(
    json.dumps({"step": step}) + "\n"
  )


def is_finished(workdir: str, total_steps: int | None = None) -> bool:
  """Whether the run in `workdir` completed, and reached `total_steps` if
  given (a finished run whose config now asks for more steps is not)."""
  from etils import epath  # Local paths and gs:// alike.

  marker = epath.Path(workdir) / FINISHED_MARKER
  if not marker.exists():
    return False
  text = marker.read_text().strip()
  if not text:  # A bare marker: finished, at no recorded step.
    return True
  try:
    record = json.loads(text)
    return total_steps is None or int(record["step"]) >= total_steps
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f"{marker}: not a finished marker ({e}): {text[:100]!r}"
    ) from None


def write_manifest(
  sweep_dir: str, *, spec: str, module: str, where: str, extra, points
) -> None:
  """Writes `sweep_dir`/sweep.json, which launch/collect.py reads: the config
  spec, the program and where it ran, the extra flags and every point's
  name and overrides (`points`: objects with `.name` and `.overrides`)."""
  from etils import epath  # pylint: disable=g-import-not-at-top  # gs:// too

  manifest = {
    "config": spec,
    "module": module,
    "where": where,
    "extra_flags": list(extra),
    "points": [{"name": p.name, "overrides": p.overrides} for p in points],
  }
  path = epath.Path(sweep_dir)
  path.mkdir(parents=True, exist_ok=True)
  (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def split_extra_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """`[own flags..., "--", extra flags...]` -> (own, extra): the flags after
  `--` go unchanged to every point's command."""
  argv = list(argv)
  if "--" not in argv:
    return argv, []
  return argv[: argv.index("--")], argv[argv.index("--") + 1 :]
