"""Config validation shared by every block and entry point.

One rule for every config block (top level, `input`, `model`, `loss`,
`optimizer`, bandit experiment blocks): each key is either read or refused
with an error that names it and the nearest valid key. Value checks name the
key too. All errors are `ValueError`s; entry points report them as user
errors (`psipo_jax.cli`).
"""

from __future__ import annotations

import difflib
import numbers
import os
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from psipo_jax import storage


class UserError(ValueError):
  """A mistake in the user's config found only once work has started (e.g.
  a checkpoint named by a key does not fit the model); entry points report
  it like a validation error, with no traceback."""


def unknown_key_message(
  key: str, valid: Iterable[str], *, prefix: str = ""
) -> str:
  """'unknown config key loss.tauu (did you mean loss.tau?); valid keys: [...]'."""
  valid = sorted(valid)
  close = nearest(key, valid)
  hint = f" (did you mean {prefix}{close}?)" if close else ""
  return f"unknown config key {prefix}{key}{hint}; valid keys: {valid}"


def nearest(key: str, valid: Iterable[str]) -> str | None:
  """The valid key `key` most likely misspells: a close spelling, else one
  it abbreviates (`pi` → `pi_ref`), else None."""
  valid = list(valid)
  close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
  if close:
    return close[0]
  extending = [v for v in valid if v.startswith(key)]
  return min(extending, key=len) if key and extending else None


def check_keys(block: Any, valid: Iterable[str], *, prefix: str = "") -> None:
  """Raises ValueError for the first key of `block` not in `valid`."""
  valid = tuple(valid)
  for key in _keys(block):
    if key not in valid:
      raise ValueError(unknown_key_message(key, valid, prefix=prefix))


def _keys(block: Any) -> list[str]:
  if isinstance(block, Mapping):
    return list(block)
  if hasattr(block, "keys"):  # ml_collections.ConfigDict
    return list(block.keys())
  raise ValueError(f"expected a config block (a mapping), got {block!r}")


def integer(
  block: Any,
  key: str,
  *,
  minimum: int | None = None,
  prefix: str = "",
  optional: bool = False,
) -> int | None:
  """`block[key]` as an int (not a bool), at least `minimum`, or ValueError."""
  value = block.get(key)
  if value is None and optional:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{prefix}{key} must be an integer, got {value!r}")
  if minimum is not None and value < minimum:
    raise ValueError(f"{prefix}{key}={value} must be >= {minimum}")
  return int(value)


def number(
  block: Any, key: str, *, positive: bool = False, prefix: str = ""
) -> float:
  """`block[key]` as a finite float (> 0 if `positive`), or ValueError."""
  value = block.get(key)
  if (
    isinstance(value, bool)
    or not isinstance(value, numbers.Real)
    or not (float("-inf") < value < float("inf"))
  ):
    raise ValueError(f"{prefix}{key} must be a finite number, got {value!r}")
  if positive and not value > 0:
    raise ValueError(f"{prefix}{key} must be > 0, got {value!r}")
  return float(value)


def writable_directory(path: str, *, name: str = "--workdir") -> str:
  """Creates `path` if needed and checks that files can be written there.

  A gs:// or s3:// URL (`psipo_jax.storage`) is checked by writing and
  deleting a small probe object, so missing credentials or permissions show
  here rather than at the first checkpoint.

  Returns:
    The absolute path (a URL as given, without a trailing "/").
  Raises:
    ValueError: naming `name` and the path, with the OS's reason.
  """
  if storage.is_remote(path):
    return _writable_remote(storage.resolve(path), name)
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise ValueError(
      f"{name}={path!r} is not a writable directory: {e.strerror or e}"
    ) from None
  return path


def _writable_remote(url: str, name: str) -> str:
  probe = storage.as_path(url) / f".write_probe-{uuid.uuid4().hex}"
  try:
    probe.write_text("")
    probe.unlink()
  except ImportError as e:  # gs:// needs gcsfs (or TensorFlow), s3:// s3fs.
    raise ValueError(f"{name}={url!r} cannot be opened here: {e}") from None
  except Exception as e:  # pylint: disable=broad-except
    # fsspec back-ends raise their own types for denied or missing buckets.
    raise ValueError(
      f"{name}={url!r} is not writable: {type(e).__name__}: {e}"
    ) from None
  return url
