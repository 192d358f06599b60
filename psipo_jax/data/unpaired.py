"""Single responses: (prompt, completion, label) examples for KTO and SFT.

`input.name = "unpaired"` (`objective="kto"` or `"sft"`). Files are JSON
Lines or JSON (gzipped or not, as `readers.py` reads them), one record per
example:

    {"prompt": str, "completion": str, "label": bool}
    optional: "weight" (finite number >= 0), "id" (str)

For `objective="sft"` the label is optional (TRL's prompt-completion
format, {"prompt": ..., "completion": ...}, is an SFT file as it is): SFT
trains on every example not labelled false; examples labelled false are
dropped and counted (logged), never trained towards.

A record holding "chosen" and "rejected" instead of "completion" and
"label" is a preference pair (the `prompt_response` layout, e.g. the
built-in text task's files) and becomes TWO unpaired examples:
(prompt, chosen, label True) then (prompt, rejected, label False), each with
the pair's weight — what TRL's `maybe_unpair_preference_dataset` does. The
two halves keep the pair's information only in that one is labelled good
and the other bad: KTO never compares them, and after shuffling they
usually land in different batches.

Bad records raise `DataError` naming the file, the line (record index for
JSON) and the field: a missing or non-boolean `label` (0/1 and "true" are
refused: a label is JSON true or false), a missing or empty completion, a
non-string prompt, a bad weight. Examples whose completion truncation
would leave no token are dropped and counted (logged).

Batches (this process's rows of each global batch of `input.batch_size`
examples; B rows, T = `input.max_length`; SFT batches have no `kl_*`):

    completion_input_ids, completion_loss_mask, completion_attention_mask
                                    [B, T] int32: prompt_i + completion_i
    kl_input_ids, kl_loss_mask, kl_attention_mask
                                    [B, T] int32: prompt_i + completion_{i−1},
                                    the mismatched pair of row i: i − 1 is
                                    the row before it in the GLOBAL batch
                                    (cyclically), so batches do not depend
                                    on the process count (TRL's
                                    `_get_kl_dataset` shifts each device's
                                    rows by one)
    label                           [B] int32, 1 desirable, 0 undesirable
    weight                          [B] float32 (1 when the files give none)

Tokenisation and truncation are those of preference pairs
(`encoding.PairEncoder`), each row truncated on its own. The examples are
held in memory; the order is `pipeline.BatchPlan`'s (shuffled per epoch by
(input.seed, epoch), process p taking the positions congruent to p), and
the iterator's `get_state()` / `set_state()` resume exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from psipo_jax import config_checks
from psipo_jax.data import encoding
from psipo_jax.data import pipeline
from psipo_jax.data import readers
from psipo_jax.data import reference_logps
from psipo_jax.data import tokenizers

NAME = "unpaired"
KEYS = (
  "name",
  "files",
  "batch_size",
  "seed",
  "shuffle",
  "num_epochs",
  *reference_logps.TOKEN_KEYS,
)
SIDES = ("completion", "kl")


def get_input_config() -> ml_collections.ConfigDict:
  """The `input` block of `input.name="unpaired"`, with its defaults."""
  c = ml_collections.ConfigDict()
  c.name = NAME
  c.files = ml_collections.config_dict.placeholder(dict)  # {split: paths}
  c.batch_size = 32
  c.seed = 0
  c.shuffle = True
  c.num_epochs = ml_collections.config_dict.placeholder(int)  # None: repeat
  c.tokenizer = "byte"
  c.bos_token = ml_collections.config_dict.placeholder(str)
  c.eos_token = ml_collections.config_dict.placeholder(str)
  c.pad_token = ml_collections.config_dict.placeholder(str)
  c.add_bos = True
  c.append_eos = True
  c.max_length = 512
  c.max_prompt_length = 256
  return c


@dataclasses.dataclass(frozen=True)
class Example:
  """One labelled response."""

  id: str
  prompt: str
  completion: str
  desirable: bool
  weight: float = 1.0


# ---------------------------------------------------------------------------
# Reading and validating records.


def _field_error(location: readers.Location, field: str, reason: str):
  return readers.DataError(f"{location}: field {field!r} {reason}")


def _text(value: dict, field: str, location, *, non_empty: bool) -> str:
  if field not in value:
    raise _field_error(location, field, "is missing")
  text = value[field]
  if not isinstance(text, str):
    raise _field_error(
      location, field, f"must be a string, got {type(text).__name__}"
    )
  if non_empty and not text.strip():
    raise _field_error(location, field, "is empty")
  return text


def _weight(value: dict, location) -> float:
  weight = value.get("weight", 1.0)
  if (
    isinstance(weight, bool)
    or not isinstance(weight, (int, float))
    or not math.isfinite(weight)
    or weight < 0
  ):
    raise _field_error(
      location, "weight", f"must be a finite number >= 0, got {weight!r}"
    )
  return float(weight)


def parse_record(
  value: Any,
  location: readers.Location,
  *,
  default_id: str,
  require_label: bool = True,
) -> list[Example]:
  """The examples of one record (one, or two for a preference pair).

  Without `require_label` (SFT), a record with no "label" is desirable.
  """
  if not isinstance(value, dict):
    raise readers.DataError(
      f"{location}: a record must be a JSON object, got {type(value).__name__}"
    )
  record_id = value.get("id", default_id)
  if not isinstance(record_id, str):
    raise _field_error(location, "id", "must be a string")
  prompt = _text(value, "prompt", location, non_empty=False)
  weight = _weight(value, location)
  is_pair = "completion" not in value and "label" not in value
  if is_pair and ("chosen" in value or "rejected" in value):
    return [
      Example(
        f"{record_id}/{side}",
        prompt,
        _text(value, side, location, non_empty=True),
        desirable=side == "chosen",
        weight=weight,
      )
      for side in ("chosen", "rejected")
    ]
  completion = _text(value, "completion", location, non_empty=True)
  if "label" not in value and not require_label:
    return [Example(record_id, prompt, completion, True, weight)]
  if "label" not in value:
    raise _field_error(
      location, "label", "is missing (true: desirable, false: undesirable)"
    )
  label = value["label"]
  if not isinstance(label, bool):
    raise _field_error(
      location, "label", f"must be true or false, got {label!r}"
    )
  return [Example(record_id, prompt, completion, label, weight)]


def read_examples(
  paths: Sequence[str], *, require_label: bool = True
) -> list[Example]:
  """Every example of `paths`, in file order; the first bad record raises.

  `require_label`: as for `parse_record`.
  """
  examples, seen = [], {}
  root = readers.id_root(paths)
  for path in paths:
    fmt = readers.file_format(path, "auto")
    if fmt == "parquet":
      raise readers.DataError(
        f"{path}: input.name='unpaired' reads JSON Lines or JSON files"
      )
    for item in readers.iter_records(path, fmt):
      if isinstance(item, readers.MalformedRecord):
        raise readers.DataError(f"{item.location}: {item.reason}")
      default_id = item.location.default_id(root)
      for example in parse_record(
        item.value,
        item.location,
        default_id=default_id,
        require_label=require_label,
      ):
        if example.id in seen:
          raise _field_error(
            item.location,
            "id",
            f"{example.id!r} is already used at {seen[example.id]}",
          )
        seen[example.id] = item.location
        examples.append(example)
  if not examples:
    raise readers.DataError(f"no examples in {list(paths)}")
  return examples


# ---------------------------------------------------------------------------
# Encoding.


def make_encoder(section: ml_collections.ConfigDict) -> encoding.PairEncoder:
  tokenizer = tokenizers.make_tokenizer(
    section.tokenizer,
    bos_token=section.get("bos_token"),
    eos_token=section.get("eos_token"),
    pad_token=section.get("pad_token"),
  )
  return encoding.PairEncoder(
    tokenizer,
    max_length=section.max_length,
    max_prompt_length=section.max_prompt_length,
    add_bos=section.add_bos,
    append_eos=section.append_eos,
  )


def _truncate(encoder: encoding.PairEncoder, prompt: str, completion: str):
  """(prompt ids, response ids, scored response tokens) of one row."""
  kept = encoder.truncate(prompt, completion, completion)
  scored = len(kept.chosen) - (1 if len(kept.prompt) == 0 else 0)
  return kept.prompt, kept.chosen, scored


def encode_rows(
  encoder: encoding.PairEncoder,
  examples: Sequence[Example],
  kl_completions: Sequence[str] | None,
) -> dict[str, np.ndarray]:
  """The batch of `examples`, row i's mismatched pair being its prompt with
  `kl_completions[i]` (see the module docstring for the keys);
  `kl_completions=None` (SFT): no mismatched pairs."""
  out = {}
  sides = [("completion", [e.completion for e in examples])]
  if kl_completions is not None:
    sides.append(("kl", list(kl_completions)))
  for side, completions in sides:
    rows = [
      _truncate(encoder, e.prompt, c) for e, c in zip(examples, completions)
    ]
    for i, (_, _, scored) in enumerate(rows):
      if scored <= 0:
        raise ValueError(
          f"{side} row of example {examples[i].id!r} keeps no response token"
          " after truncation; raise input.max_length or lower"
          " input.max_prompt_length"
        )
    ids, loss_mask, attention_mask = encoding.pack(
      [r[0] for r in rows],
      [r[1] for r in rows],
      max_length=encoder.max_length,
      pad_id=encoder.tokenizer.pad_id,
    )
    out[f"{side}_input_ids"] = ids
    out[f"{side}_loss_mask"] = loss_mask
    out[f"{side}_attention_mask"] = attention_mask
  out["label"] = np.asarray([e.desirable for e in examples], np.int32)
  out["weight"] = np.asarray([e.weight for e in examples], np.float32)
  return out


def kept_after_truncation(
  encoder: encoding.PairEncoder, examples: Sequence[Example], split: str
) -> list[Example]:
  """The examples whose completion keeps a token; the others are counted."""
  kept = [e for e in examples if _truncate(encoder, e.prompt, e.completion)[2]]
  dropped = len(examples) - len(kept)
  if dropped:
    logging.warning(
      "unpaired split %s: %d of %d examples dropped (no completion token"
      " left after truncation)",
      split,
      dropped,
      len(examples),
    )
  if not kept:
    raise ValueError(
      f"no example of split {split!r} survives truncation; raise"
      " input.max_length or lower input.max_prompt_length"
    )
  return kept


def _digest(examples: Sequence[Example], encoder: encoding.PairEncoder) -> str:
  h = hashlib.sha256(encoder.fingerprint.encode())
  for e in examples:
    h.update(repr(dataclasses.astuple(e)).encode())
  return h.hexdigest()[:16]


# ---------------------------------------------------------------------------
# The train iterator and the evaluation batches.


class UnpairedIterator:
  """Batches of one split, with a checkpointable position."""

  def __init__(
    self,
    examples: Sequence[Example],
    encoder: encoding.PairEncoder,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    process_index: int,
    process_count: int,
    split: str,
    mismatched: bool = True,
  ):
    """`mismatched`: build KTO's `kl_*` rows (False for SFT)."""
    if batch_size % process_count:
      raise ValueError(
        f"input.batch_size={batch_size} is not divisible by the"
        f" {process_count} processes"
      )
    self._examples = list(examples)
    self._encoder = encoder
    self._mismatched = mismatched
    self._plan = pipeline.BatchPlan(
      np.arange(len(self._examples)),
      seed=seed,
      shuffle=shuffle,
      batch_size=batch_size,
      process_index=process_index,
      process_count=process_count,
    )
    if num_epochs is None:
      self.num_batches = None
      self._limit = sys.maxsize
    else:
      self.num_batches = len(self._examples) * num_epochs // batch_size
      self._limit = self.num_batches
    if self._limit == 0:
      raise ValueError(
        f"input.batch_size={batch_size} exceeds the {len(self._examples)}"
        f" examples x {num_epochs} epoch(s) of split {split!r}"
      )
    self._identity = dict(
      dataset=NAME,
      split=split,
      examples=_digest(self._examples, encoder),
      seed=seed,
      shuffle=shuffle,
      num_epochs=num_epochs,
      batch_size=batch_size,
    )
    self._next_batch = 0

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._next_batch >= self._limit:
      raise StopIteration
    batch = self._next_batch
    self._next_batch += 1
    rows = [self._examples[i] for i in self._plan(batch)]  # this process's
    kl_completions = None
    if self._mismatched:
      # A row's mismatched pair takes the completion of the row before it
      # in the GLOBAL batch (every process holds every example), so the
      # batch does not depend on the process count.
      kl_completions = [
        self._examples[i].completion
        for i in self._plan.previous_in_batch(batch)
      ]
    return encode_rows(self._encoder, rows, kl_completions)

  def get_state(self) -> dict[str, Any]:
    return {"next_batch": self._next_batch, **self._identity}

  def set_state(self, state: dict[str, Any]) -> None:
    for key, value in self._identity.items():
      if state.get(key) != value:
        raise ValueError(
          f"iterator state does not match this input: it has {key}="
          f"{state.get(key)!r} but this input has {value!r}"
        )
    next_batch = state["next_batch"]
    if not isinstance(next_batch, int) or next_batch < 0:
      raise ValueError(
        f"iterator state has an invalid next_batch={next_batch!r}"
      )
    self._next_batch = next_batch


def eval_batches(
  examples: Sequence[Example],
  encoder: encoding.PairEncoder,
  batch_size: int,
  *,
  mismatched: bool = True,
) -> list[dict[str, np.ndarray]]:
  """Every example once, in global batches of `batch_size`, in file order.

  The last batch is filled with copies of its first example at weight 0
  (one shape, exact means); mismatched pairs (unless `mismatched=False`)
  shift over the real rows of each batch only.
  """
  batches = []
  for start in range(0, len(examples), batch_size):
    rows = list(examples[start : start + batch_size])
    real = len(rows)
    rows += [rows[0]] * (batch_size - real)
    partner = np.arange(batch_size)
    partner[:real] = np.roll(np.arange(real), 1)
    kl_completions = [rows[j].completion for j in partner]
    batch = encode_rows(encoder, rows, kl_completions if mismatched else None)
    batch["weight"][real:] = 0.0
    batches.append(batch)
  return batches


def desirable_only(examples: Sequence[Example], split: str) -> list[Example]:
  """The examples SFT trains on: those not labelled false (the others are
  counted and logged)."""
  kept = [e for e in examples if e.desirable]
  if len(kept) < len(examples):
    logging.info(
      "unpaired split %s: SFT skips the %d of %d examples labelled false",
      split,
      len(examples) - len(kept),
      len(examples),
    )
  if not kept:
    raise ValueError(
      f"split {split!r} has no example SFT can train on: every one is"
      " labelled false"
    )
  return kept


def split_paths(section: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """{split: expanded paths} of `input.files`."""
  files = section.get("files")
  if not isinstance(files, (dict, ml_collections.ConfigDict)) or not files:
    raise ValueError(
      "input.files must map split names to files, e.g. {'train':"
      " 'train.jsonl', 'test': 'test.jsonl'}"
    )
  if "train" not in files:
    raise ValueError(f"input.files has no 'train' split: {sorted(files)}")
  out = {}
  for split, patterns in dict(files).items():
    if isinstance(patterns, str):
      patterns = (patterns,)
    out[split] = readers.expand_paths(
      tuple(patterns), key=f"input.files ({split})"
    )
  return out


def validate(section: ml_collections.ConfigDict) -> None:
  """Checks the keys and values of the `input` block (not the files)."""
  config_checks.check_keys(section, KEYS, prefix="input.")
  config_checks.integer(section, "batch_size", minimum=1, prefix="input.")
  config_checks.integer(section, "seed", minimum=0, prefix="input.")
  config_checks.integer(section, "max_length", minimum=2, prefix="input.")
  config_checks.integer(
    section, "max_prompt_length", minimum=1, prefix="input."
  )
  config_checks.integer(
    section, "num_epochs", minimum=1, optional=True, prefix="input."
  )
  split_paths(section)
  make_encoder(section)
