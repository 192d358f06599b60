"""Summaries of what data preparation kept, dropped and truncated.

They are JSON files written beside the prepared dataset (in the TFDS version
directory) and logged, so that nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from typing import Any

PREPARE_SUMMARY = "prepare_summary.json"


def write_json(path: str, value: Any) -> None:
  """Writes `value` as JSON atomically (see `write_atomically`)."""
  write_atomically(path, json.dumps(value, indent=1).encode("utf-8"))


def write_atomically(path: str, data: bytes) -> None:
  """Writes atomically: a concurrent reader (another host) never sees half a file.

  Several hosts may write the same file on shared storage at once (each
  computes a summary when it finds none), and process ids repeat across hosts
  and containers; so each writer has its own temporary file (host, pid and a
  random part in its name), renamed over `path` in one step. The last rename
  wins; each candidate is a whole file.
  """
  tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def read_prepare_summary(dataset_dir: str) -> dict[str, Any]:
  """The preparation summary of a prepared dataset (its TFDS `data_dir`)."""
  return read_json(os.path.join(dataset_dir, PREPARE_SUMMARY))
