"""Workdir and data paths that may be local or on object storage.

On Cloud TPU pods the workdir is a bucket (`gs://bucket/run`): host disks are
not shared. Every file a run, the reference job, the sweep launcher and the
collector read or write goes through `etils.epath` (`gs://` and `s3://` need
gcsfs / s3fs, or TensorFlow's gfile; local paths need nothing). Object stores
differ from a disk in ways the helpers here absorb:

* no append: an object is rewritten whole (`append_text`, `AppendLog`);
* a written object appears whole, at close: no temporary file and rename is
  needed for an atomic write (`write_atomically`);
* directories are prefixes: nothing needs creating before a write, and an
  empty "directory" does not exist (`make_dirs` is a no-op there).

Local paths keep the local behaviour (append, temp file + rename, absolute
paths), so runs on one machine write exactly what they wrote before.
"""

from __future__ import annotations

import os
import posixpath
import socket
import uuid

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """Whether `path` is a URL (`gs://`, `s3://`, ...) rather than a local path."""
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> str:
  """The canonical form of `path`: absolute for a local path (Orbax needs
  one), the URL itself without a trailing "/" for a remote one."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


def split_scheme(path: PathLike) -> tuple[str, str]:
  """("gs://", "bucket/dir/f") for a URL; ("", path) for a local path."""
  path = os.fspath(path)
  if not is_remote(path):
    return "", path
  scheme, rest = path.split("://", 1)
  return f"{scheme}://", rest


def as_path(path: PathLike) -> epath.Path:
  return epath.Path(resolve(path))


def join(path: PathLike, *parts: str) -> str:
  """`path/part/...` as a string; "//" after the scheme survives (unlike
  `os.path.normpath`)."""
  path = os.fspath(path)
  if is_remote(path):
    return posixpath.join(path, *parts)
  return os.path.join(path, *parts)


def make_dirs(path: PathLike) -> None:
  """Creates a local directory (and its parents); nothing for a remote one,
  where a directory is just the prefix of the objects written under it."""
  if not is_remote(path):
    os.makedirs(os.fspath(path), exist_ok=True)


def local_cache(*parts: str) -> str:
  """A host-local directory under `$PSIPO_JAX_CACHE` (default
  `~/.cache/psipo_jax`), for what must sit on a local disk even when the
  workdir is remote (prepared array_record datasets)."""
  root = os.environ.get(
    "PSIPO_JAX_CACHE",
    os.path.join(os.path.expanduser("~"), ".cache", "psipo_jax"),
  )
  return os.path.join(root, *parts)


def size_and_mtime(path: PathLike) -> tuple[int, int]:
  """(bytes, modification time in ns) of a file: what fingerprints it."""
  if not is_remote(path):
    st = os.stat(os.fspath(path))
    return st.st_size, st.st_mtime_ns
  st = as_path(path).stat()
  return int(st.length), int(st.mtime) * 10**9


def glob(pattern: str) -> list[str]:
  """The paths matching `pattern` (`*`, `?`, `[...]`), sorted; a remote
  pattern is listed from its longest prefix without wildcards."""
  import glob as glob_lib  # pylint: disable=g-import-not-at-top

  if not is_remote(pattern):
    return sorted(glob_lib.glob(os.path.expanduser(pattern)))
  scheme, rest = split_scheme(pattern)
  parts = rest.split("/")
  wild = [i for i, part in enumerate(parts) if glob_lib.has_magic(part)]
  if not wild:
    return [pattern] if epath.Path(pattern).exists() else []
  base = epath.Path(scheme + "/".join(parts[: wild[0]]))
  return sorted(str(p) for p in base.glob("/".join(parts[wild[0] :])))


def read_text(path: PathLike) -> str:
  return as_path(path).read_text(encoding="utf-8")


def write_atomically(path: PathLike, data: bytes) -> None:
  """Writes `data` so that a concurrent reader never sees half of it.

  Local (possibly shared) disk: each writer writes its own temporary file
  (host, pid and a random part in its name) and renames it over `path` in
  one step; the last rename wins and each candidate is whole. Object store:
  an object becomes visible only once its upload completes, whole, so it is
  written directly (a rename there would be a copy and a delete).
  """
  if is_remote(path):
    as_path(path).write_bytes(data)
    return
  path = os.fspath(path)
  tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def append_text(path: PathLike, text: str) -> None:
  """Appends `text` to the file at `path` (creating it). On an object store,
  which has no append, the object is read and rewritten whole: meant for
  small, rarely written files (a config history)."""
  if not is_remote(path):
    with open(os.fspath(path), "a", encoding="utf-8") as f:
      f.write(text)
    return
  target = as_path(path)
  old = target.read_text(encoding="utf-8") if target.exists() else ""
  target.write_text(old + text, encoding="utf-8")


class AppendLog:
  """A text file written by appending, e.g. `metrics.jsonl` (one writer).

  Local: an ordinary file opened for appending, flushed on every `write`.
  Remote: the content so far (read once at open) is kept in memory and the
  object is rewritten whole on every `write`, since an object store has no
  append; a log of a few thousand lines costs a few hundred kB per write.
  """

  def __init__(self, path: PathLike):
    self.path = resolve(path)
    if is_remote(self.path):
      self._object = epath.Path(self.path)
      self._text = (
        self._object.read_text(encoding="utf-8")
        if self._object.exists()
        else ""
      )
      self._file = None
    else:
      self._file = open(self.path, "a", encoding="utf-8")

  def write(self, text: str) -> None:
    if self._file is not None:
      self._file.write(text)
      self._file.flush()
    else:
      self._text += text
      self._object.write_text(self._text, encoding="utf-8")

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


class _RemoteRecordWriter:
  """A TensorBoard event file on an object store, through epath: the events
  are buffered and the object rewritten whole at each flush (no append)."""

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._buffer = bytearray()

  def write(self, data: bytes) -> None:
    self._buffer += data

  def flush(self) -> None:
    self._path.write_bytes(bytes(self._buffer))

  def close(self) -> None:
    self.flush()


class _RemoteRecordWriterFactory:
  def open(self, path: str) -> _RemoteRecordWriter:
    return _RemoteRecordWriter(path)

  def directory_check(self, path: str) -> None:
    del path  # A directory is a prefix: nothing to create.


def register_tensorboard_schemes() -> None:
  """Makes tensorboardX write `gs://` and `s3://` event files through epath
  (the same gcsfs / s3fs as every other file of the run) instead of its own
  google-cloud-storage / boto3 writers."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top

  for scheme in ("gs", "s3"):
    record_writer.register_writer_factory(scheme, _RemoteRecordWriterFactory())
