"""Tokenisers behind one interface: built-in bytes, SentencePiece, Hugging Face.

`make_tokenizer(spec, ...)` with `spec` (the `input.tokenizer` key):
  "byte"                    built in, no files: one token per UTF-8 byte.
  "sentencepiece:PATH"      a SentencePiece .model file (needs `sentencepiece`).
  "huggingface:PATH"        a Hugging Face tokenizer.json (needs `tokenizers`),
                            or a model directory holding one;
  "hf:PATH"                 the same.

Every tokenizer encodes text WITHOUT special tokens (the pipeline places BOS
and EOS itself), decodes ids dropping special tokens, and exposes `bos_id`,
`eos_id` (None where the tokenizer has none) and `pad_id`.
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import json
import os
import posixpath
from collections.abc import Sequence

import numpy as np

from psipo_jax import storage


class Tokenizer(abc.ABC):
  """Text <-> int32 ids. Subclasses set the attributes in __init__."""

  vocab_size: int
  bos_id: int | None
  eos_id: int | None
  pad_id: int

  @abc.abstractmethod
  def encode(self, text: str) -> np.ndarray:
    """Ids of `text`, no special tokens added. Returns [n] int32."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, special tokens (BOS, EOS, PAD) dropped."""

  @property
  @abc.abstractmethod
  def fingerprint(self) -> str:
    """Identifies the tokenizer's behaviour (e.g. for caches keyed by it)."""

  @property
  def special_ids(self) -> frozenset[int]:
    return frozenset(
      i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None
    )


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes: id = byte + 3, after PAD = 0, BOS = 1, EOS = 2 (vocab 259).

  Needs no files and round-trips any text exactly. A sequence cut inside a
  multi-byte character decodes that character as U+FFFD.
  """

  PAD, BOS, EOS = 0, 1, 2
  OFFSET = 3

  def __init__(self):
    self.vocab_size = 256 + self.OFFSET
    self.bos_id, self.eos_id, self.pad_id = self.BOS, self.EOS, self.PAD

  def encode(self, text: str) -> np.ndarray:
    return (
      np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
      + self.OFFSET
    )

  def decode(self, ids: Sequence[int]) -> str:
    ids = np.asarray(ids, np.int64)
    ids = ids[ids >= self.OFFSET] - self.OFFSET
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  @property
  def fingerprint(self) -> str:
    return "byte-v1"


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model file. Special tokens: the model's own, or named."""

  def __init__(
    self, path: str, *, bos_token=None, eos_token=None, pad_token=None
  ):
    sentencepiece = _import_optional(
      "sentencepiece", f"a SentencePiece model ({path})"
    )
    _require_file(path)
    self.path = path
    # The bytes, not the path: the file may be on gs:// (`storage`).
    self._sp = sentencepiece.SentencePieceProcessor(
      model_proto=storage.as_path(path).read_bytes()
    )
    self.vocab_size = self._sp.vocab_size()
    own = lambda i: i if i >= 0 else None  # sentencepiece says -1 for "none"
    self.bos_id = (
      self._lookup(bos_token, "bos_token")
      if bos_token
      else own(self._sp.bos_id())
    )
    self.eos_id = (
      self._lookup(eos_token, "eos_token")
      if eos_token
      else own(self._sp.eos_id())
    )
    pad_id = (
      self._lookup(pad_token, "pad_token")
      if pad_token
      else own(self._sp.pad_id())
    )
    self.pad_id = _pad_or_eos(pad_id, self.eos_id, path)
    self._fingerprint = _file_fingerprint(
      "sentencepiece", path, (self.bos_id, self.eos_id, self.pad_id)
    )

  def _lookup(self, token: str, key: str) -> int:
    i = self._sp.piece_to_id(token)
    if self._sp.id_to_piece(i) != token:
      raise ValueError(f"input.{key}={token!r} is not a piece of {self.path}")
    return i

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    special = self.special_ids
    return self._sp.decode([int(i) for i in ids if int(i) not in special])

  @property
  def fingerprint(self) -> str:
    return self._fingerprint


class HuggingFaceTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json`.

  tokenizer.json does not say which token is BOS/EOS/PAD; they are read from a
  `tokenizer_config.json` beside it when there is one, and `bos_token` /
  `eos_token` / `pad_token` override them.
  """

  def __init__(
    self, path: str, *, bos_token=None, eos_token=None, pad_token=None
  ):
    tokenizers = _import_optional(
      "tokenizers", f"a Hugging Face tokenizer ({path})"
    )
    _require_file(path)
    self.path = path
    self._tok = tokenizers.Tokenizer.from_str(storage.read_text(path))
    self.vocab_size = self._tok.get_vocab_size()
    named = _tokenizer_config_specials(
      storage.join(posixpath.dirname(path), "tokenizer_config.json")
      if storage.is_remote(path)
      else os.path.join(os.path.dirname(path), "tokenizer_config.json")
    )
    bos_token = bos_token or named.get("bos_token")
    eos_token = eos_token or named.get("eos_token")
    pad_token = pad_token or named.get("pad_token")
    self.bos_id = self._lookup(bos_token, "bos_token") if bos_token else None
    self.eos_id = self._lookup(eos_token, "eos_token") if eos_token else None
    pad_id = self._lookup(pad_token, "pad_token") if pad_token else None
    self.pad_id = _pad_or_eos(pad_id, self.eos_id, path)
    self._fingerprint = _file_fingerprint(
      "huggingface", path, (self.bos_id, self.eos_id, self.pad_id)
    )

  def _lookup(self, token: str, key: str) -> int:
    i = self._tok.token_to_id(token)
    if i is None:
      raise ValueError(f"input.{key}={token!r} is not a token of {self.path}")
    return i

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(
      self._tok.encode(text, add_special_tokens=False).ids, np.int32
    )

  def decode(self, ids: Sequence[int]) -> str:
    special = self.special_ids
    return self._tok.decode([int(i) for i in ids if int(i) not in special])

  @property
  def fingerprint(self) -> str:
    return self._fingerprint


def make_tokenizer(
  spec: str,
  *,
  bos_token: str | None = None,
  eos_token: str | None = None,
  pad_token: str | None = None,
) -> Tokenizer:
  """Builds the tokenizer named by `spec` (the `input.tokenizer` key)."""
  kind, _, path = spec.partition(":")
  if kind == "byte" and not path:
    if bos_token or eos_token or pad_token:
      raise ValueError(
        "input.bos_token/eos_token/pad_token do not apply to the byte tokenizer"
      )
    return ByteTokenizer()
  specials = dict(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)
  if kind == "sentencepiece" and path:
    return SentencePieceTokenizer(path, **specials)
  if kind in ("huggingface", "hf") and path:
    if os.path.isdir(path):  # a model directory (model.init_from_hf's)
      path = os.path.join(path, "tokenizer.json")
    return HuggingFaceTokenizer(path, **specials)
  raise ValueError(
    f"input.tokenizer={spec!r} is not 'byte', 'sentencepiece:PATH' or 'huggingface:PATH'"
  )


def _import_optional(module: str, what: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ImportError(
      f"input.tokenizer names {what} but the `{module}` package is not"
      f" installed: pip install {module}"
    ) from None


def _require_file(path: str) -> None:
  if not storage.as_path(path).is_file():
    raise FileNotFoundError(f"input.tokenizer: no such file {path}")


def _pad_or_eos(pad_id: int | None, eos_id: int | None, path: str) -> int:
  # Padding is never attended to nor scored, so EOS serves when there is no PAD.
  if pad_id is not None:
    return pad_id
  if eos_id is not None:
    return eos_id
  raise ValueError(
    f"{path} has neither a pad nor an EOS token: set input.pad_token"
  )


def _file_fingerprint(kind: str, path: str, specials: tuple) -> str:
  digest = hashlib.sha256(storage.as_path(path).read_bytes()).hexdigest()[:16]
  return f"{kind}-{digest}-{specials}"


def _tokenizer_config_specials(path: str) -> dict[str, str]:
  """bos/eos/pad token strings from a Hugging Face tokenizer_config.json."""
  if not storage.as_path(path).is_file():
    return {}
  config = json.loads(storage.read_text(path))
  out = {}
  for key in ("bos_token", "eos_token", "pad_token"):
    token = config.get(key)
    if isinstance(token, dict):  # AddedToken serialised as {"content": ...}
      token = token.get("content")
    if isinstance(token, str) and token:
      out[key] = token
  return out
