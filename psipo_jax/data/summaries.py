"""Summaries of what data preparation kept, dropped and truncated.

They are JSON files written beside the prepared dataset (in the TFDS version
directory) and logged, so that nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
from typing import Any

PREPARE_SUMMARY = "prepare_summary.json"


def write_json(path: str, value: Any) -> None:
  """Writes atomically: a concurrent reader (another host) never sees half a file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def read_prepare_summary(dataset_dir: str) -> dict[str, Any]:
  """The preparation summary of a prepared dataset (its TFDS `data_dir`)."""
  return read_json(os.path.join(dataset_dir, PREPARE_SUMMARY))
