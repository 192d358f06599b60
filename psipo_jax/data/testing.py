"""Small helpers for tests and benchmarks that need preference data on disk.

files = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(32))
config = experiment_config(data_dir=tmp_path / "tfds", files=files, batch_size=4)
batches = make_preference_iterator(config, "train")
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import ml_collections
import numpy as np

from psipo_jax.data import config as config_lib

_WORDS = (
  "the a preference model policy answer question reference token reward data"
  " pair human assistant quickly slowly clearly never always because why how"
).split()


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> str:
  """Writes one JSON value per line; returns the path as a string."""
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  return os.fspath(path)


def synthetic_pairs(
  num_pairs: int,
  *,
  seed: int = 0,
  prompt_words: int = 8,
  response_words: int = 6,
) -> list[dict[str, str]]:
  """Distinct {"id", "prompt", "chosen", "rejected"} records of random words."""
  rng = np.random.default_rng(seed)

  def text(n):
    return " ".join(rng.choice(_WORDS, size=n))

  return [
    {
      "id": f"pair-{i}",
      "prompt": f"Question {i}: {text(prompt_words)}?",
      "chosen": f" Good {i}: {text(response_words)}.",
      "rejected": f" Bad {i}: {text(response_words)}.",
    }
    for i in range(num_pairs)
  ]


def experiment_config(**input_overrides: Any) -> ml_collections.ConfigDict:
  """An experiment config whose `input` section has the given overrides."""
  config = ml_collections.ConfigDict()
  config.input = config_lib.get_input_config(
    input_overrides.get("name", "preference_pairs")
  )
  for key, value in input_overrides.items():
    config.input[key] = (
      os.fspath(value) if isinstance(value, os.PathLike) else value
    )
  return config
