"""Precomputed reference log-probabilities, joined to examples by id.

File format: JSON Lines, one object per example,
    {"id": "...", "ref_chosen_logps": -12.5, "ref_rejected_logps": -20.1}
with the summed (or averaged, as the run's `loss.normalize`) log-probability
of each response under π_ref, computed with the same tokenizer and
truncation settings as the run. Every value must be finite and <= 0; every
id at most once. Extra ids (e.g. of other splits) are allowed.
"""

from __future__ import annotations

import math
import numbers

from psipo_jax.data import readers

KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def load(path: str) -> dict[str, tuple[float, float]]:
  """{id: (ref_chosen_logps, ref_rejected_logps)}; bad input names file and line."""
  table: dict[str, tuple[float, float]] = {}
  lines: dict[str, int] = {}
  for item in readers.iter_records(path, "jsonl"):
    where = str(item.location)
    if isinstance(item, readers.MalformedRecord):
      raise readers.DataError(f"{where}: {item.reason}")
    record = item.value
    if not isinstance(record, dict) or "id" not in record:
      raise readers.DataError(f"{where}: a record must be an object with an 'id'")
    record_id = str(record["id"])
    values = []
    for key in KEYS:
      x = record.get(key)
      if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise readers.DataError(f"{where}: {key} must be a number, got {x!r}")
      if not math.isfinite(x) or x > 0:
        raise readers.DataError(
            f"{where}: {key}={x!r} for id {record_id!r} is not a finite log-probability (<= 0)"
        )
      values.append(float(x))
    if record_id in table:
      raise readers.DataError(
          f"{where}: id {record_id!r} already appears at line {lines[record_id]}"
      )
    table[record_id] = (values[0], values[1])
    lines[record_id] = item.location.line
  return table


def check_covers(table: dict, ids, *, path: str, split: str) -> None:
  """Raises naming the first id of `split` that `table` lacks, and how many."""
  missing = [i for i in ids if i not in table]
  if missing:
    raise readers.DataError(
        f"{path} has no reference log-probs for {len(missing)} example(s) of split"
        f" {split!r}, the first being id {missing[0]!r}"
    )
