"""A run's config on disk, and what a resumed run may change.

A run's workdir holds `config.json`, the config it was started with (and,
after an accepted change, the one it continues under), and
`config_history.jsonl`, one record per accepted change. When a run resumes,
the new config is compared with `config.json` key by key:

* keys that only say how long to train or how often to log, evaluate and
  checkpoint (:data:`FREE_KEYS`) may change; the change is logged and
  recorded;
* any other difference changes the computation (loss, τ, learning rate,
  data, model, seed, ...) and is an error naming every differing key with
  both values — unless the new config sets `allow_config_change=True`, in
  which case the change is logged, recorded and accepted.

`launch/sweep.py` applies the same comparison before it skips or resumes a
point, so a point relaunched with other flags is reported, not silently
skipped or resumed.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Any

from absl import logging
import ml_collections

from psipo_jax import config_checks
from psipo_jax import storage

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
# Keys whose change leaves every step's computation as it was.
FREE_KEYS = frozenset(
  {
    "total_steps",
    "log_every",
    "eval_every",
    "ckpt_every",
    "keep_checkpoints",
    "allow_config_change",
    "input.prefetch_threads",
  }
)
_MISSING = "<absent>"


class ConfigChangeError(config_checks.UserError):
  """A resumed run's config changes what it computes."""


def to_plain(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict:
  """The config as JSON would store it (tuples become lists, and so on)."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=repr))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"loss": {"tau": 0.1}} -> {"loss.tau": 0.1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and value:
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def differences(
  old: Mapping[str, Any], new: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
  """[(dotted key, old value, new value)] where two plain configs differ."""
  old_flat, new_flat = flatten(old), flatten(new)
  # An absent key reads as None: a key added later at its default is no change.
  return [
    (key, old_flat.get(key, _MISSING), new_flat.get(key, _MISSING))
    for key in sorted(set(old_flat) | set(new_flat))
    if old_flat.get(key) != new_flat.get(key)
  ]


def computational(
  changes: list[tuple[str, Any, Any]],
) -> list[tuple[str, Any, Any]]:
  """The changes that alter what the run computes (not in FREE_KEYS)."""
  return [c for c in changes if c[0] not in FREE_KEYS]


def describe(changes: list[tuple[str, Any, Any]]) -> str:
  return "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)


def read(workdir: str) -> dict | None:
  """The plain config recorded in `workdir` (local or gs://), or None for a
  new run."""
  path = storage.as_path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{path} is not valid JSON ({e}); it records the run's config"
    ) from None


def write_new(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records the config of a new run (process 0 only)."""
  storage.write_atomically(
    storage.join(workdir, CONFIG_FILE),
    config.to_json_best_effort(indent=2).encode("utf-8"),
  )


def check_resume(
  workdir: str,
  config: ml_collections.ConfigDict,
  *,
  step: int,
  write: bool = True,
) -> list[tuple[str, Any, Any]]:
  """Compares a resuming run's config with the recorded one.

  Args:
    workdir: the run's workdir.
    config: the config it is resumed with.
    step: the step it resumes from (recorded with an accepted change).
    write: record accepted changes (process 0 only; others just check).

  Returns:
    The accepted changes (empty if none).
  Raises:
    ConfigChangeError: a change of the computation without
      `allow_config_change=True`, naming every differing key.
  """
  recorded = read(workdir)
  if recorded is None:
    return []
  changes = differences(recorded, to_plain(config))
  if not changes:
    return []
  blocking = computational(changes)
  if blocking and not config.get("allow_config_change", False):
    raise ConfigChangeError(
      f"{workdir} holds a run started with another config, and resuming it"
      f" under this one would change what it computes: {describe(blocking)}."
      " Use a new workdir, or set allow_config_change=True to continue"
      " under the new config (the change is recorded in"
      f" {HISTORY_FILE})."
    )
  level = logging.WARNING if blocking else logging.INFO
  logging.log(
    level,
    "Resuming at step %d with a changed config: %s",
    step,
    describe(changes),
  )
  schedule = flatten(recorded).get("optimizer.schedule")
  if "total_steps" in {c[0] for c in changes} and schedule not in (
    None,
    "constant",
  ):
    logging.warning(
      "total_steps changed under optimizer.schedule=%r: the schedule is"
      " stretched to the new total from step %d on.",
      schedule,
      step,
    )
  if write:
    record = {
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "step": step,
      "changes": [{"key": k, "old": o, "new": n} for k, o, n in changes],
      "previous": recorded,
    }
    storage.append_text(
      storage.join(workdir, HISTORY_FILE), json.dumps(record) + "\n"
    )
    write_new(workdir, config)
  return changes
