"""An in-memory stand-in for a gs:// bucket, reached through etils.epath.

`etils.epath.Path("gs://...")` goes to epath's fsspec back-end (when
TensorFlow is absent), which asks fsspec for the "gcs" file system: gcsfs in
production. `install(monkeypatch)` registers this class under "gs" and
"gcs" instead, so the code under test runs its real epath calls while the
objects live in memory, with an object store's rules rather than a disk's:

* no append: opening for "a" raises, as gcsfs does;
* an object appears whole when its writer closes (nothing is visible while
  it is written), and a reader gets a snapshot of it;
* directories are prefixes: `mkdir`/`makedirs` create nothing, and a
  "directory" exists only while an object lies under it.

A local path never reaches it, and `os`-level calls on a "gs://" string
(the bugs this is for) fail or create a local `gs:` directory, which the
tests check for.
"""

from __future__ import annotations

import datetime
import io
import sys

import fsspec
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations import memory

_REGISTRY = sys.modules["fsspec.registry"]._registry  # pylint: disable=protected-access


class _Upload(io.BytesIO):
  """A write in progress; the object is stored at close."""

  def __init__(self, fs: "FakeGcs", path: str):
    super().__init__()
    self._fs, self._path = fs, path

  def close(self):
    if not self.closed:
      self._fs.store[self._path] = memory.MemoryFile(
        self._fs, self._path, self.getvalue()
      )
      self._fs.mtimes[self._path] = datetime.datetime.now(datetime.UTC)
    super().close()


class FakeGcs(memory.MemoryFileSystem):
  """gs:// objects in memory (see the module docstring)."""

  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]
  mtimes: dict = {}

  def __init__(self, *args, finalize_on_close=False, **kwargs):
    del finalize_on_close  # gcsfs's option; uploads here finish at close.
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    path = path.strip("/")
    return "/" + path if path else ""

  def unstrip_protocol(self, name):
    return "gs://" + name.lstrip("/")

  def mkdir(self, path, create_parents=True, **kwargs):
    del path, create_parents, kwargs  # A prefix needs no creating.

  def makedirs(self, path, exist_ok=False):
    del path, exist_ok

  def info(self, path, **kwargs):
    info = super().info(path, **kwargs)
    stripped = self._strip_protocol(path)
    if info["type"] == "file":
      info["mtime"] = self.mtimes.get(stripped)
    return info

  def _open(self, path, mode="rb", **kwargs):
    path = self._strip_protocol(path)
    if "a" in mode or "+" in mode:
      raise NotImplementedError(
        f"gs://{path.lstrip('/')}: an object store cannot append ({mode!r})"
      )
    if "w" in mode or "x" in mode:
      if "x" in mode and path in self.store:
        raise FileExistsError(path)
      return _Upload(self, path)
    if path not in self.store:
      raise FileNotFoundError(f"gs://{path.lstrip('/')}")
    return io.BytesIO(self.store[path].getvalue())  # a snapshot

  def objects(self) -> dict[str, bytes]:
    """{"gs://bucket/key": bytes} of every stored object."""
    return {
      "gs://" + k.lstrip("/"): v.getvalue() for k, v in self.store.items()
    }


def install(monkeypatch) -> FakeGcs:
  """Routes epath's gs:// to a fresh, empty FakeGcs until `uninstall()` and
  the end of the test (use from a fixture)."""
  if epath.Path("gs://b/x")._backend is not epath_backend.fsspec_backend:  # pylint: disable=protected-access
    import pytest  # pylint: disable=g-import-not-at-top

    pytest.skip("epath sends gs:// to TensorFlow's gfile here, not fsspec")
  monkeypatch.setattr(FakeGcs, "store", {})
  monkeypatch.setattr(FakeGcs, "pseudo_dirs", [""])
  monkeypatch.setattr(FakeGcs, "mtimes", {})
  for protocol in ("gs", "gcs"):
    # fsspec.register_implementation has no undo; the registry dict has.
    monkeypatch.setitem(_REGISTRY, protocol, FakeGcs)
  uninstall()
  return fsspec.filesystem("gcs")


def uninstall() -> None:
  """Forgets the cached file-system instances (epath caches them too)."""
  FakeGcs.clear_instance_cache()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
