"""Raw records from local JSON Lines, JSON and Parquet files.

Every record carries its `Location` so that any later complaint names the file
and line (JSON Lines) or the file and record index (JSON, Parquet).

Two kinds of bad input are told apart:
- a file-level problem (bytes that are not UTF-8, a JSON file that does not
  parse, an unreadable Parquet file) raises `DataError` at once: nothing in the
  file can be trusted, so `skip_invalid` does not apply;
- a malformed JSON line is a record-level problem: it is yielded as a
  `MalformedRecord`, and the caller raises or skips-and-counts it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterator
from typing import Any

JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


class DataError(ValueError):
  """Bad input data; the message names the file, line, record or field."""


@dataclasses.dataclass(frozen=True)
class Location:
  """Where a record came from: `line` (1-based) or `index` (0-based) in `path`."""

  path: str
  line: int | None = None
  index: int | None = None

  def __str__(self) -> str:
    if self.line is not None:
      return f"{self.path}, line {self.line}"
    return f"{self.path}, record {self.index}"

  @property
  def default_id(self) -> str:
    """Id for a record without one: stable while the file is unchanged."""
    number = self.line if self.line is not None else self.index
    return f"{os.path.basename(self.path)}:{number}"


@dataclasses.dataclass(frozen=True)
class RawRecord:
  location: Location
  value: Any  # the decoded JSON value / Parquet row


@dataclasses.dataclass(frozen=True)
class MalformedRecord:
  location: Location
  reason: str


def expand_paths(patterns: tuple[str, ...], *, key: str) -> list[str]:
  """Expands globs in order; a pattern matching nothing raises naming `key`."""
  paths = []
  for pattern in patterns:
    matches = sorted(glob.glob(os.path.expanduser(pattern)))
    if not matches:
      raise DataError(f"{key}: no file matches {pattern!r}")
    paths.extend(os.path.abspath(m) for m in matches)
  return paths


def file_format(path: str, configured: str) -> str:
  """The format of `path`: `configured`, or guessed from its extension."""
  if configured != "auto":
    return configured
  lower = path.lower()
  if lower.endswith(JSONL_SUFFIXES):
    return "jsonl"
  if lower.endswith(".json"):
    return "json"
  if lower.endswith(PARQUET_SUFFIXES):
    return "parquet"
  raise DataError(
      f"cannot tell the format of {path} from its extension; set input.file_format"
      " to 'jsonl', 'json' or 'parquet'"
  )


def iter_records(path: str, fmt: str) -> Iterator[RawRecord | MalformedRecord]:
  """Yields the records of one file in order."""
  if fmt == "jsonl":
    return _iter_jsonl(path)
  if fmt == "json":
    return _iter_json(path)
  if fmt == "parquet":
    return _iter_parquet(path)
  raise ValueError(f"unknown file format {fmt!r}")


def _decode_utf8(data: bytes, path: str, first_line: int) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = first_line + data.count(b"\n", 0, e.start)
    column = e.start - data.rfind(b"\n", 0, e.start)  # 1-based byte column
    raise DataError(
        f"{path}, line {line}: bytes {data[e.start:e.end]!r} at byte column"
        f" {column} are not UTF-8; re-encode the file as UTF-8"
    ) from None


def _iter_jsonl(path: str) -> Iterator[RawRecord | MalformedRecord]:
  with open(path, "rb") as f:
    for line_number, raw in enumerate(f, start=1):
      text = _decode_utf8(raw, path, line_number)
      if not text.strip():
        continue  # blank lines (e.g. a trailing newline) are not records
      location = Location(path, line=line_number)
      try:
        yield RawRecord(location, json.loads(text.rstrip("\r\n")))
      except json.JSONDecodeError as e:
        yield MalformedRecord(location, f"malformed JSON: {e.msg} at column {e.colno}")


def _iter_json(path: str) -> Iterator[RawRecord]:
  with open(path, "rb") as f:
    text = _decode_utf8(f.read(), path, 1)
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}, line {e.lineno}: malformed JSON: {e.msg} at column {e.colno}") from None
  if not isinstance(value, list):
    raise DataError(f"{path}: a JSON file must hold a list of records, got {type(value).__name__}")
  for index, record in enumerate(value):
    yield RawRecord(Location(path, index=index), record)


def _iter_parquet(path: str) -> Iterator[RawRecord]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
  try:
    parquet_file = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises several types for unreadable files
    raise DataError(f"{path}: not a readable Parquet file ({e})") from None
  index = 0
  for batch in parquet_file.iter_batches(batch_size=1024):
    for row in batch.to_pylist():
      yield RawRecord(Location(path, index=index), row)
      index += 1
