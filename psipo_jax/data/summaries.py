"""Summaries of what data preparation kept, dropped and truncated.

They are JSON files written beside the prepared dataset (in the TFDS version
directory) and logged, so that nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
from typing import Any

from psipo_jax import storage

PREPARE_SUMMARY = "prepare_summary.json"


def write_json(path: str, value: Any) -> None:
  """Writes `value` as JSON atomically (see `write_atomically`)."""
  write_atomically(path, json.dumps(value, indent=1).encode("utf-8"))


def write_atomically(path: str, data: bytes) -> None:
  """Writes atomically: a concurrent reader (another host) never sees half a file.

  Several hosts may write the same file on shared storage at once (each
  computes a summary when it finds none), and process ids repeat across hosts
  and containers; so on a disk each writer has its own temporary file (host,
  pid and a random part in its name), renamed over `path` in one step. The
  last rename wins; each candidate is a whole file. On an object store
  (gs://) an upload appears whole or not at all (`storage.write_atomically`).
  """
  storage.write_atomically(path, data)


def read_json(path: str) -> Any:
  return json.loads(storage.read_text(path))


def read_prepare_summary(dataset_dir: str) -> dict[str, Any]:
  """The preparation summary of a prepared dataset (its TFDS `data_dir`)."""
  return read_json(os.path.join(dataset_dir, PREPARE_SUMMARY))
