"""Precomputed reference log-probabilities, joined to examples by id.

One convention, recorded in the file and checked on every read: each value
is the SUMMED log-probability of a response under π_ref, stored with the
number of response tokens behind the sum; normalisation (`loss.normalize`)
is applied once, at use, by the train step, identically to policy and
reference.

File format: JSON Lines. The first line is a header,

    {"psipo_reference_logps": 1, "logps": "sum",
     "computed_with": {"tokenizer": "byte", "max_length": 512, ...}}

where `computed_with` holds every `input.*` setting that decides which
tokens are scored (:data:`TOKEN_KEYS`); every later line is one example,

    {"id": "...", "ref_chosen_logps": -12.5, "ref_rejected_logps": -20.1,
     "ref_chosen_tokens": 7, "ref_rejected_tokens": 9}

`python -m psipo_jax.precompute_reference` writes such files (`write`).
Reading refuses, naming the file and line: a missing or unknown header, a
file that says its values are not sums, settings that differ from the run's
(`check_settings`), non-finite or positive log-probs, token counts that are
not positive integers, a repeated id; joining refuses an example whose token
counts differ from the run's own (another tokenizer or truncation), and a
split with ids the file lacks. Extra ids (e.g. of other splits) are allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from psipo_jax.data import readers
from psipo_jax.data import summaries

FORMAT_KEY = "psipo_reference_logps"
FORMAT_VERSION = 1
LOGPS_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
TOKEN_COUNT_KEYS = ("ref_chosen_tokens", "ref_rejected_tokens")
# The `input.*` settings that decide the scored tokens of every response.
TOKEN_KEYS = (
  "tokenizer",
  "bos_token",
  "eos_token",
  "pad_token",
  "add_bos",
  "append_eos",
  "max_length",
  "max_prompt_length",
)


@dataclasses.dataclass(frozen=True)
class ReferenceTable:
  """A read reference file.

  Attributes:
    path: where it was read from.
    computed_with: the header's `computed_with` settings.
    values: {id: (chosen logp, rejected logp, chosen tokens, rejected tokens)}.
  """

  path: str
  computed_with: Mapping[str, Any]
  values: Mapping[str, tuple[float, float, int, int]]


def settings_of(cfg: Any) -> dict[str, Any]:
  """The `computed_with` settings of a validated `InputConfig`."""
  return {key: getattr(cfg, key) for key in TOKEN_KEYS}


def write(
  path: str,
  rows: Iterable[Mapping[str, Any]],
  *,
  computed_with: Mapping[str, Any],
  extra_header: Mapping[str, Any] | None = None,
) -> int:
  """Writes a reference file atomically; returns the number of rows.

  Args:
    path: the output file.
    rows: dicts with "id" and the four value keys.
    computed_with: `settings_of(the run's input config)`.
    extra_header: more header fields (e.g. the model and checkpoint used).
  """
  header = {
    FORMAT_KEY: FORMAT_VERSION,
    "logps": "sum",
    "computed_with": dict(computed_with),
    **(extra_header or {}),
  }
  lines = [json.dumps(header)]
  for row in rows:
    lines.append(
      json.dumps(
        {"id": row["id"], **{k: row[k] for k in LOGPS_KEYS + TOKEN_COUNT_KEYS}}
      )
    )
  summaries.write_atomically(path, ("\n".join(lines) + "\n").encode("utf-8"))
  return len(lines) - 1


def _check_header(item, path: str) -> dict:
  where = f"{path}, line 1"
  if isinstance(item, readers.MalformedRecord):
    raise readers.DataError(f"{where}: {item.reason}")
  header = item.value
  if not isinstance(header, dict) or FORMAT_KEY not in header:
    raise readers.DataError(
      f"{where}: a reference log-prob file starts with its header"
      f' {{"{FORMAT_KEY}": {FORMAT_VERSION}, "logps": "sum", "computed_with": {{...}}}}'
      " (python -m psipo_jax.precompute_reference writes one); this file has none"
    )
  if header[FORMAT_KEY] != FORMAT_VERSION:
    raise readers.DataError(
      f"{where}: format version {header[FORMAT_KEY]!r}; this psipo_jax reads {FORMAT_VERSION}"
    )
  if header.get("logps") != "sum":
    raise readers.DataError(
      f"{where}: the header says the log-probs are {header.get('logps')!r}; they must be"
      ' summed over each response\'s tokens ("sum"), with their token counts: loss.normalize'
      " is applied once, at use, to policy and reference alike"
    )
  if not isinstance(header.get("computed_with"), dict):
    raise readers.DataError(
      f"{where}: the header has no computed_with settings"
    )
  return header


def _number(record, key, where, record_id):
  x = record.get(key)
  if isinstance(x, bool) or not isinstance(x, numbers.Real):
    raise readers.DataError(f"{where}: {key} must be a number, got {x!r}")
  if not math.isfinite(x) or x > 0:
    raise readers.DataError(
      f"{where}: {key}={x!r} for id {record_id!r} is not a finite log-probability (<= 0)"
    )
  return float(x)


def _count(record, key, where, record_id):
  n = record.get(key)
  if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
    raise readers.DataError(
      f"{where}: {key}={n!r} for id {record_id!r} must be a positive integer (the"
      " number of response tokens behind the sum)"
    )
  return int(n)


def load(path: str) -> ReferenceTable:
  """Reads a reference file; bad input names file and line (module doc)."""
  values: dict[str, tuple[float, float, int, int]] = {}
  lines: dict[str, int] = {}
  header = None
  for item in readers.iter_records(path, "jsonl"):
    if header is None:
      header = _check_header(item, path)
      continue
    where = str(item.location)
    if isinstance(item, readers.MalformedRecord):
      raise readers.DataError(f"{where}: {item.reason}")
    record = item.value
    if not isinstance(record, dict) or "id" not in record:
      raise readers.DataError(
        f"{where}: a record must be an object with an 'id'"
      )
    record_id = str(record["id"])
    logps = [_number(record, k, where, record_id) for k in LOGPS_KEYS]
    counts = [_count(record, k, where, record_id) for k in TOKEN_COUNT_KEYS]
    if record_id in values:
      raise readers.DataError(
        f"{where}: id {record_id!r} already appears at line {lines[record_id]}"
      )
    values[record_id] = (logps[0], logps[1], counts[0], counts[1])
    lines[record_id] = item.location.line
  if header is None:
    raise readers.DataError(
      f"{path}: empty; a reference log-prob file starts with its header"
    )
  return ReferenceTable(
    path=path, computed_with=header["computed_with"], values=values
  )


def check_settings(table: ReferenceTable, settings: Mapping[str, Any]) -> None:
  """Refuses a file computed with other token settings than the run's."""
  differing = [
    f"input.{key}: file {table.computed_with.get(key)!r}, run {settings[key]!r}"
    for key in TOKEN_KEYS
    if table.computed_with.get(key) != settings[key]
  ]
  if differing:
    raise readers.DataError(
      f"{table.path} was computed with other token settings than this run's"
      f" ({'; '.join(differing)}): its log-probs score other tokens; recompute it"
      " (python -m psipo_jax.precompute_reference)"
    )


def check_covers(table: ReferenceTable, ids, *, split: str) -> None:
  """Raises naming the first id of `split` that `table` lacks, and how many."""
  missing = [i for i in ids if i not in table.values]
  if missing:
    raise readers.DataError(
      f"{table.path} has no reference log-probs for {len(missing)} example(s) of split"
      f" {split!r}, the first being id {missing[0]!r}"
    )


def check_token_counts(
  table: ReferenceTable,
  record_id: str,
  chosen_tokens: int,
  rejected_tokens: int,
) -> None:
  """Refuses an example whose response token counts differ from the file's."""
  _, _, file_chosen, file_rejected = table.values[record_id]
  if (file_chosen, file_rejected) != (chosen_tokens, rejected_tokens):
    raise readers.DataError(
      f"{table.path}: id {record_id!r} was scored on ({file_chosen}, {file_rejected})"
      f" (chosen, rejected) response tokens, this run's data has ({chosen_tokens},"
      f" {rejected_tokens}): the file was computed on other data or truncation"
    )
