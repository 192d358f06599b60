"""Raw records from local JSON Lines, JSON and Parquet files, gzipped or not.

Every record carries its `Location` so that any later complaint names the file
and line (JSON Lines) or the file and record index (JSON, Parquet).

Files are read as they are published:
- gzip-compressed files (`.jsonl.gz`, `.json.gz`, or any file starting with
  the gzip magic bytes) are decompressed while streaming; the format comes
  from the extension under `.gz`;
- a UTF-8 byte-order mark at the start of a line is removed (the first line of
  a file saved by some editors, or that of a file concatenated after another);
- a Git LFS pointer in place of the data is named as such.

Two kinds of bad input are told apart:
- a file-level problem (bytes that are not UTF-8, a JSON file that does not
  parse, an unreadable Parquet file, a gzip stream cut short, a Git LFS
  pointer) raises `DataError` at once: nothing in the file can be trusted, so
  `skip_invalid` does not apply;
- a malformed JSON line is a record-level problem: it is yielded as a
  `MalformedRecord` (kind "malformed_json", or "truncated_record" for a last
  line without a newline that does not parse: a file cut short mid-record),
  and the caller raises or skips-and-counts it.

Default record ids (`Location.default_id`) are the path relative to a root
directory (`id_root`: the deepest directory holding every file of the
dataset) and the line or record index, e.g. "helpful-base/train.jsonl.gz:17":
unique across the files of every split even when their names repeat in
different directories, and the same on every machine and after the whole
directory tree moves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
import posixpath
import zlib
from collections.abc import Iterator, Sequence
from typing import IO, Any

from psipo_jax import storage

JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
GZIP_SUFFIX = ".gz"
GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
LFS_POINTER_MAX_BYTES = 1024  # the spec caps a pointer file at 1024 bytes

MALFORMED_JSON = "malformed_json"
TRUNCATED_RECORD = "truncated_record"

# What a damaged gzip stream raises while it is read.
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


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

  def default_id(self, root: str) -> str:
    """Id for a record without one: "<path relative to root>:<line or index>".

    Stable while the file is unchanged and the files keep their places
    relative to each other; "/" separates directories on every system.
    """
    number = self.line if self.line is not None else self.index
    if storage.is_remote(self.path):  # relpath would fold the "//".
      relative = posixpath.relpath(
        storage.split_scheme(self.path)[1], storage.split_scheme(root)[1]
      )
    else:
      relative = os.path.relpath(self.path, root).replace(os.sep, "/")
    return f"{relative}:{number}"


@dataclasses.dataclass(frozen=True)
class RawRecord:
  location: Location
  value: Any  # the decoded JSON value / Parquet row


@dataclasses.dataclass(frozen=True)
class MalformedRecord:
  location: Location
  reason: str
  kind: str = MALFORMED_JSON  # the counter it is tallied under


def expand_paths(patterns: tuple[str, ...], *, key: str) -> list[str]:
  """Expands globs in order; a pattern matching nothing raises naming `key`."""
  paths = []
  for pattern in patterns:
    matches = storage.glob(pattern)  # gs:// alike, through etils.epath
    if not matches:
      raise DataError(f"{key}: no file matches {pattern!r}")
    paths.extend(storage.resolve(m) for m in matches)
  return paths


def id_root(paths: Sequence[str]) -> str:
  """The directory default ids are relative to: the deepest one holding all `paths`.

  Pass every file of the dataset (all splits), so that ids are unique across
  splits too and one reference log-prob file can serve all of them.
  """
  if not paths:
    raise ValueError("id_root needs at least one path")
  schemes = {storage.split_scheme(p)[0] for p in paths}
  if schemes == {""}:
    return os.path.commonpath(
      [os.path.dirname(os.path.abspath(p)) for p in paths]
    )
  if len(schemes) > 1:
    raise DataError(
      f"input.files mixes {sorted(s or 'local' for s in schemes)} paths:"
      " keep every file of the dataset on one file system"
    )
  scheme = schemes.pop()
  return scheme + posixpath.commonpath(
    [posixpath.dirname(storage.split_scheme(p)[1]) for p in paths]
  )


def file_format(path: str, configured: str) -> str:
  """The format of `path`: `configured`, or guessed from its extension (under .gz)."""
  if configured != "auto":
    return configured
  lower = path.lower()
  if lower.endswith(GZIP_SUFFIX):
    lower = lower[: -len(GZIP_SUFFIX)]
  if lower.endswith(JSONL_SUFFIXES):
    return "jsonl"
  if lower.endswith(".json"):
    return "json"
  if lower.endswith(PARQUET_SUFFIXES):
    return "parquet"
  raise DataError(
    f"cannot tell the format of {path} from its extension (.jsonl, .json, .parquet,"
    " optionally followed by .gz); set input.file_format to 'jsonl', 'json' or 'parquet'"
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


def _check_not_lfs_pointer(path: str, head: bytes) -> None:
  if not head.startswith(LFS_POINTER_PREFIX):
    return
  size = next(
    (
      line.split()[1].decode()
      for line in head.splitlines()
      if line.startswith(b"size ")
    ),
    "?",
  )
  raise DataError(
    f"{path} is a Git LFS pointer, not the data (the real file has {size} bytes):"
    " run `git lfs pull` in its repository, or download the file itself"
  )


@contextlib.contextmanager
def _open_binary(path: str) -> Iterator[tuple[IO[bytes], bool]]:
  """(the file's decompressed bytes, whether it is gzipped), after sniffing it."""
  opened = (
    storage.as_path(path).open("rb")
    if storage.is_remote(path)
    else open(path, "rb")
  )
  with opened as raw:
    head = raw.read(LFS_POINTER_MAX_BYTES)
    raw.seek(0)
    _check_not_lfs_pointer(path, head)
    if head.startswith(GZIP_MAGIC):
      with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
        yield unzipped, True
    else:
      yield raw, False


def _gzip_error(path: str, error: Exception, where: str) -> DataError:
  return DataError(
    f"{path}: the gzip stream is damaged {where} ({error}); the file is truncated or"
    " corrupt: fetch it again"
  )


def _decode_utf8(data: bytes, path: str, first_line: int) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    if first_line == 1 and data.startswith(UTF16_BOMS):
      raise DataError(
        f"{path} is UTF-16 (it starts with a UTF-16 byte-order mark); re-encode the file"
        " as UTF-8"
      ) from None
    line = first_line + data.count(b"\n", 0, e.start)
    column = e.start - data.rfind(b"\n", 0, e.start)  # 1-based byte column
    raise DataError(
      f"{path}, line {line}: bytes {data[e.start : e.end]!r} at byte column"
      f" {column} are not UTF-8; re-encode the file as UTF-8"
    ) from None


def _iter_jsonl(path: str) -> Iterator[RawRecord | MalformedRecord]:
  with _open_binary(path) as (f, gzipped):
    line_number = 0
    lines = iter(f)
    while True:
      try:
        raw = next(lines, None)
      except _GZIP_ERRORS as e:
        raise _gzip_error(path, e, f"after line {line_number}") from None
      if raw is None:
        return
      line_number += 1
      if raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM) :]
      text = _decode_utf8(raw, path, line_number)
      if not text.strip():
        continue  # blank lines (e.g. a trailing newline) are not records
      location = Location(path, line=line_number)
      try:
        yield RawRecord(location, json.loads(text.rstrip("\r\n")))
      except json.JSONDecodeError as e:
        reason = f"malformed JSON: {e.msg} at column {e.colno}"
        if not raw.endswith(b"\n"):  # only the last line can lack one
          yield MalformedRecord(
            location,
            f"{reason}; it is the last line and has no newline: the file looks cut short"
            f" mid-record (an interrupted {'download' if gzipped else 'copy or write'}?)",
            kind=TRUNCATED_RECORD,
          )
        else:
          yield MalformedRecord(location, reason)


def _iter_json(path: str) -> Iterator[RawRecord]:
  with _open_binary(path) as (f, _):
    try:
      data = f.read()
    except _GZIP_ERRORS as e:
      raise _gzip_error(path, e, "before its end") from None
  if data.startswith(UTF8_BOM):
    data = data[len(UTF8_BOM) :]
  text = _decode_utf8(data, path, 1)
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    # A list of records ends with "]": without it the file was likely cut short.
    hint = (
      ""
      if text.rstrip().endswith("]")
      else "; the file does not end with ']': is it truncated?"
    )
    raise DataError(
      f"{path}, line {e.lineno}: malformed JSON: {e.msg} at column {e.colno}{hint}"
    ) from None
  if not isinstance(value, list):
    raise DataError(
      f"{path}: a JSON file must hold a list of records, got {type(value).__name__}"
    )
  for index, record in enumerate(value):
    yield RawRecord(Location(path, index=index), record)


def _iter_parquet(path: str) -> Iterator[RawRecord]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
      f"reading {path} needs pyarrow: pip install pyarrow"
    ) from None
  with _open_binary(path) as (raw, gzipped):
    if gzipped:
      raise DataError(
        f"{path} is gzip-compressed Parquet; decompress it first (gunzip)"
      )
    # pyarrow opens local paths itself; a remote object is read through
    # the epath file object (seekable), kept open while rows are yielded.
    source = raw if storage.is_remote(path) else path
    try:
      parquet_file = pq.ParquetFile(source)
    except Exception as e:  # pyarrow raises several types for unreadable files
      raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    index = 0
    for batch in parquet_file.iter_batches(batch_size=1024):
      for row in batch.to_pylist():
        yield RawRecord(Location(path, index=index), row)
        index += 1
