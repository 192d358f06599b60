"""Memory-mapped reading and writing of safetensors files, in NumPy.

The format (huggingface/safetensors): an 8-byte little-endian header length
n, then n bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin,
end]}, "__metadata__": {str: str}}, then the raw little-endian tensor bytes
(offsets relative to the end of the header). A model saved in several files
has `model.safetensors.index.json` {"metadata": {...}, "weight_map":
{name: file}}.

Reading maps each file into memory (`np.memmap`) and hands out views, so a
caller that slices a tensor copies only the slice: a host loading its shards
of a checkpoint larger than its memory reads only what it keeps.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
# Bounds the header read: a corrupt length must not allocate gigabytes.
_MAX_HEADER = 100 * 2**20


class SafetensorsFile:
  """One .safetensors file: its header, and tensors as memory-mapped views."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than 8 B)")
      (n,) = struct.unpack("<Q", head)
      if n > min(_MAX_HEADER, size - 8):
        raise ValueError(f"{path}: not a safetensors file (header size {n})")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable safetensors header: {e}") from e
    self.metadata = header.pop("__metadata__", None) or {}
    self.header = header
    self._data_start = 8 + n
    self._data_size = size - 8 - n
    self._mmap = None

  def keys(self) -> list[str]:
    return list(self.header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    """The tensor `name`, a read-only view of the mapped file (no copy)."""
    if name not in self.header:
      raise KeyError(f"{self.path} holds no tensor {name!r}")
    info = self.header[name]
    if info["dtype"] not in DTYPES:
      raise ValueError(
        f"{self.path}: tensor {name!r} has dtype {info['dtype']}, not one of"
        f" {sorted(DTYPES)}"
      )
    dtype = DTYPES[info["dtype"]]
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]
    if end - begin != dtype.itemsize * int(np.prod(shape)) or (
      end > self._data_size
    ):
      raise ValueError(
        f"{self.path}: tensor {name!r} offsets {begin}..{end} do not fit its"
        f" shape {shape} and dtype {info['dtype']} (or the file)"
      )
    if self._mmap is None:
      self._mmap = np.memmap(
        self.path, dtype=np.uint8, mode="r", offset=self._data_start
      )
    return self._mmap[begin:end].view(dtype).reshape(shape)


class SafetensorsDir:
  """The tensors of a model directory: one file, or an index and its shards."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
      with open(index) as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{index}: no readable weight_map ({e})") from e
    else:
      files = sorted(
        name for name in os.listdir(directory) if name.endswith(".safetensors")
      )
      if not files:
        raise FileNotFoundError(
          f"{directory} holds no *.safetensors file (nor {INDEX_FILE})"
        )
      weight_map = {}
      for name in files:
        for key in SafetensorsFile(os.path.join(directory, name)).keys():
          weight_map[key] = name
    self.weight_map: dict[str, str] = weight_map
    self._files: dict[str, SafetensorsFile] = {}

  def keys(self) -> list[str]:
    return list(self.weight_map)

  def _file(self, name: str) -> SafetensorsFile:
    if name not in self.weight_map:
      raise KeyError(f"{self.directory} holds no tensor {name!r}")
    file = self.weight_map[name]
    if file not in self._files:
      self._files[file] = SafetensorsFile(os.path.join(self.directory, file))
    return self._files[file]

  def shape(self, name: str) -> tuple[int, ...]:
    return self._file(name).shape(name)

  def get(self, name: str) -> np.ndarray:
    return self._file(name).get(name)

  def where(self, name: str) -> str:
    """The file holding `name` (for error messages)."""
    return os.path.join(self.directory, self.weight_map[name])


def write_file(
  path: str,
  tensors: Mapping[str, np.ndarray],
  metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes `tensors` (NumPy arrays, C order) as one safetensors file."""
  header: dict[str, object] = {}
  offset = 0
  for name, array in tensors.items():
    array = np.asarray(array)
    if array.dtype not in _NAMES:
      raise ValueError(f"tensor {name!r}: dtype {array.dtype} not writable")
    header[name] = {
      "dtype": _NAMES[array.dtype],
      "shape": list(array.shape),
      "data_offsets": [offset, offset + array.nbytes],
    }
    offset += array.nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  encoded = json.dumps(header, separators=(",", ":")).encode()
  # Pad the header with spaces so the data start 8-byte aligned, as the
  # reference writer does (aligned memory-mapped views).
  encoded += b" " * (-len(encoded) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for array in tensors.values():
      f.write(np.ascontiguousarray(array).tobytes())


def write_dir(
  directory: str,
  tensors: Iterable[tuple[str, np.ndarray]],
  *,
  max_shard_bytes: int,
  metadata: Mapping[str, str] | None = None,
) -> list[str]:
  """Writes (name, array) pairs as model.safetensors, or as numbered shards of
  at most `max_shard_bytes` each (a tensor larger than that alone in its own)
  with model.safetensors.index.json. Holds one shard in memory at a time.

  Returns:
    The file names written, in order.
  """
  os.makedirs(directory, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  sizes = [0]
  parts: list[str] = []
  weight_map: dict[str, int] = {}
  total = 0

  def flush() -> None:
    name = f"part-{len(parts):05d}.tmp"
    write_file(os.path.join(directory, name), shards[-1], metadata)
    parts.append(name)

  for name, array in tensors:
    array = np.asarray(array)
    if shards[-1] and sizes[-1] + array.nbytes > max_shard_bytes:
      flush()
      shards[-1], sizes[-1] = {}, 0
    shards[-1][name] = array
    sizes[-1] += array.nbytes
    weight_map[name] = len(parts)
    total += array.nbytes
  flush()
  shards.clear()
  if len(parts) == 1:
    names = [SINGLE_FILE]
  else:
    names = [
      f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
      for i in range(len(parts))
    ]
  for part, name in zip(parts, names):
    os.replace(os.path.join(directory, part), os.path.join(directory, name))
  if len(parts) > 1:
    index = {
      "metadata": {"total_size": total},
      "weight_map": {k: names[i] for k, i in weight_map.items()},
    }
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  return names
