"""Grain pipelines: prepared TFDS split -> fixed-shape batches, checkpointable.

`make_preference_iterator(config, split)` returns a `PreferenceIterator` of
dicts of NumPy arrays whose leading axis is this process's slice of the
global batch (`input.batch_size // process_count` rows).

Text pairs (`input.name = "preference_pairs"`), T = input.max_length:
  chosen_input_ids, rejected_input_ids             [B, T] int32, right-padded
  chosen_loss_mask, rejected_loss_mask             [B, T] int32, 1 on response
                                                   tokens (aligned with token
                                                   positions; see encoding.py)
  chosen_attention_mask, rejected_attention_mask   [B, T] int32, 1 on non-pad
  weight, margin                                   [B] float32, only when the
                                                   files gave them
  ref_chosen_logps, ref_rejected_logps             [B] float32 SUMMED log-probs,
                                                   only with input.ref_logps_file
                                                   (data/reference_logps.py)
  id                                               [B] str, only with
                                                   input.return_ids
With `input.packing=True` the [B, T] chosen_*/rejected_* arrays give way to
packed rows [R, T] (`packed_input_ids`, `packed_loss_mask`,
`packed_segment_ids`, `packed_positions`, `packed_sequence_ids`) and [B]
`chosen_packed_row` / `rejected_packed_row`, R varying with the lengths
(data/packing.py; with input.share_prompts also `packed_branch_ids`, and
T = input.packed_row_length when set); the [B] per-pair fields stay. The same pairs make each
batch, packed or not. `summary["packing"]` then holds the packing
efficiency (real tokens / slots) of the stream's first batches against
padding's, also logged.
Action pairs (`input.name = "bandit_preferences"`):
  chosen, rejected                                 [B] int32 action indices

Order of operations: the split's examples that survive truncation
(`token_stats.kept_indices`) are shuffled by a permutation seeded by (seed,
epoch), epoch after epoch; global batch b is positions [bB, (b+1)B) of that
stream, whatever the number of processes, and process p takes the positions
congruent to p modulo process_count: disjoint slices whose union is the global
batch (`BatchPlan`). Each batch's records are then read together, tokenised,
truncated and padded. The stream ends after the last whole global batch of
num_epochs epochs; batches run across epoch boundaries.

State: `get_state()` is a small JSON-serialisable dict (save it with Orbax,
e.g. `ocp.args.JsonSave`) counting the global batches consumed, plus what
identifies the stream; `set_state()` resumes with exactly the next batch,
even with another number of processes.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from typing import Any

from absl import logging
import grain
import jax
import numpy as np

from psipo_jax.data import config as config_lib
from psipo_jax.data import encoding
from psipo_jax.data import packing as packing_lib
from psipo_jax.data import readers
from psipo_jax.data import reference_logps
from psipo_jax.data import sources
from psipo_jax.data import token_stats
from psipo_jax.data import tokenizers

_FROM_CONFIG = object()
# Global batches whose packing efficiency the summary reports (the first ones
# of the stream: placing them costs no tokenisation, but is not free).
_SUMMARY_BATCHES = 64

# Iterator-state entries that must match on restore, and what sets each.
_IDENTITY_KEYS = {
  "dataset": "input.name",
  "split": "the split",
  "examples": "the split's content and what truncation keeps: input.files, input.max_length, ...",
  "seed": "input.seed",
  "shuffle": "input.shuffle",
  "num_epochs": "input.num_epochs",
  "batch_size": "input.batch_size",
  "packing": "input.packing and input.packed_rows",
}


class PreferenceIterator:
  """Iterator of batches with a checkpointable position (see module doc)."""

  def __init__(
    self,
    batches: grain.MapDataset,
    *,
    identity: dict[str, Any],
    prefetch_threads: int,
    summary: dict[str, Any],
  ):
    self._batches = batches
    self._identity = identity
    self._prefetch_threads = prefetch_threads
    self._next_batch = 0
    self._iterator = None
    self.summary = summary  # what preparation and truncation kept and dropped

  @property
  def num_batches(self) -> int | None:
    """Batches in the whole stream; None when it repeats forever."""
    return None if self._identity["num_epochs"] is None else len(self._batches)

  def __iter__(self) -> PreferenceIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      # Explicit options: iterating a MapDataset directly would prefetch
      # hundreds of batches on Grain's default 16 threads.
      threads = self._prefetch_threads
      options = grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=2 * threads
      )
      self._iterator = iter(
        self._batches[self._next_batch :].to_iter_dataset(options)
      )
    batch = next(self._iterator)
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: restoring it continues with the next batch."""
    return {"next_batch": self._next_batch, **self._identity}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes at `state` (from `get_state`), which must describe this stream."""
    for key, config_key in _IDENTITY_KEYS.items():
      if state.get(key) != self._identity.get(key):
        raise ValueError(
          f"iterator state does not match this pipeline: it has {key}="
          f"{state.get(key)!r} but this pipeline has {self._identity[key]!r}"
          f" ({config_key})"
        )
    next_batch = state["next_batch"]
    if not isinstance(next_batch, int) or next_batch < 0:
      raise ValueError(
        f"iterator state has an invalid next_batch={next_batch!r}"
      )
    self._next_batch = next_batch
    self._iterator = (
      None  # batches prefetched from the old position are dropped
    )


def make_preference_iterator(
  config,
  split: str,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
  shuffle: bool | None = None,
  num_epochs: Any = _FROM_CONFIG,
  packing: bool | None = None,
  row_multiple: int | None = None,
) -> PreferenceIterator:
  """Batches of `split` for this process.

  Args:
    config: the experiment ConfigDict (its `input` section is read; see
      config.py for every key) or the `input` section itself.
    split: e.g. "train".
    process_index: this process (default `jax.process_index()`).
    process_count: processes sharing each global batch (default
      `jax.process_count()`). Overridable to simulate hosts in one process.
    shuffle: overrides `input.shuffle` (e.g. False for evaluation).
    num_epochs: overrides `input.num_epochs` (e.g. 1 for evaluation; None
      repeats forever).
    packing: overrides `input.packing` (e.g. False for evaluation).
    row_multiple: with packing, the global row count is a multiple of this
      (the trainer passes its batch shards, data x fsdp); default the
      process count. It does not change which pairs make a batch, so it is
      not part of the iterator state's identity.

  Returns:
    A `PreferenceIterator` (see the module docstring for the batch layout).
  """
  cfg = config_lib.parse_input_config(config)
  process_index = (
    jax.process_index() if process_index is None else process_index
  )
  process_count = (
    jax.process_count() if process_count is None else process_count
  )
  if not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index={process_index} is not in [0, {process_count})"
    )
  if cfg.batch_size % process_count:
    raise ValueError(
      f"input.batch_size={cfg.batch_size} is not divisible by the {process_count} processes"
    )
  shuffle = cfg.shuffle if shuffle is None else shuffle
  num_epochs = cfg.num_epochs if num_epochs is _FROM_CONFIG else num_epochs
  packing = cfg.packing if packing is None else packing
  if packing and cfg.name != "preference_pairs":
    raise ValueError(
      f"input.packing=True packs token sequences; input.name={cfg.name!r}"
      " yields action pairs"
    )
  row_multiple = process_count if row_multiple is None else row_multiple
  if packing and (row_multiple < 1 or row_multiple % process_count):
    raise ValueError(
      f"row_multiple={row_multiple} must be a positive multiple of the"
      f" {process_count} processes"
    )

  builder = sources.prepare(cfg)
  source = sources.data_source(builder, split)
  summary = {"prepare": sources.prepare_summary(builder)}
  if cfg.name == "preference_pairs":
    encoder = make_encoder(cfg)
    kept, summary["tokenized"] = _kept_after_truncation(
      encoder, builder, split, source
    )
    make_batch = _TextPairBatch(
      cfg, encoder, split, source, kept, summary["prepare"]
    )
    if packing:
      lengths = packing_lib.truncated_lengths(
        str(builder.data_dir), split, source, encoder
      )
      make_batch = _PackedTextPairBatch(
        make_batch,
        lengths,
        max_length=cfg.packed_row_length or cfg.max_length,
        process_index=process_index,
        process_count=process_count,
        row_multiple=row_multiple,
        min_rows=cfg.packed_rows or 1,
        share_prompts=cfg.share_prompts,
      )
    # Content, not file names or times: a copy of the data on another host
    # restores an iterator state, an edited file does not.
    examples = summary["tokenized"]["digest"]
  else:
    kept = np.arange(len(source))
    make_batch = _ActionPairBatch(source)
    examples = (
      builder.builder_config.name
    )  # a hash of what the pairs are sampled from

  num_batches = _num_batches(len(kept), num_epochs, cfg.batch_size)
  if num_batches == 0:
    raise ValueError(
      f"input.batch_size={cfg.batch_size} exceeds the {len(kept)} examples x"
      f" {num_epochs} epoch(s) of split {split!r}"
    )
  plan = BatchPlan(
    kept,
    seed=cfg.seed,
    shuffle=shuffle,
    batch_size=cfg.batch_size,
    process_index=process_index,
    process_count=process_count,
  )
  if packing:
    # Every process places every process's pairs (to agree on the rows), so
    # it maps batch numbers to the GLOBAL batch's indices.
    plan = BatchPlan(
      kept,
      seed=cfg.seed,
      shuffle=shuffle,
      batch_size=cfg.batch_size,
      process_index=0,
      process_count=1,
    )
    summary["packing"] = make_batch.summary(
      plan(b) for b in range(min(num_batches, _SUMMARY_BATCHES))
    )
    logging.info("split %s, packed: %s", split, summary["packing"])
  # Grain handles whole batches: random access by batch number (so a restore
  # is a slice), mapping, and prefetching on threads.
  batches = grain.MapDataset.range(num_batches).map(plan).map(make_batch)
  identity = dict(
    dataset=cfg.name,
    split=split,
    examples=examples,
    num_examples=int(len(kept)),
    seed=cfg.seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    batch_size=cfg.batch_size,
    # None when off, so that states saved before packing existed restore.
    packing={"min_rows": cfg.packed_rows or 1} if packing else None,
  )
  return PreferenceIterator(
    batches,
    identity=identity,
    prefetch_threads=cfg.prefetch_threads,
    summary=summary,
  )


def make_encoder(cfg: config_lib.InputConfig) -> encoding.PairEncoder:
  tokenizer = tokenizers.make_tokenizer(
    cfg.tokenizer,
    bos_token=cfg.bos_token,
    eos_token=cfg.eos_token,
    pad_token=cfg.pad_token,
  )
  return encoding.PairEncoder(
    tokenizer,
    max_length=cfg.max_length,
    max_prompt_length=cfg.max_prompt_length,
    add_bos=cfg.add_bos,
    append_eos=cfg.append_eos,
  )


class BatchPlan:
  """Batch number -> the source indices of this process's rows of it.

  The stream of examples is the concatenation of epochs, epoch e being the
  kept indices in the order of a permutation seeded by (seed, e) (identity
  when not shuffling). Global batch b is stream positions [bB, (b+1)B);
  process p takes the positions congruent to p modulo the process count.
  """

  def __init__(
    self, kept, *, seed, shuffle, batch_size, process_index, process_count
  ):
    self._kept = np.asarray(kept)  # [N] source indices
    self._seed = seed
    self._shuffle = shuffle
    local = batch_size // process_count
    self._offsets = process_index + process_count * np.arange(local)  # [B / P]
    self._batch_size = batch_size
    self._orders = {}  # epoch -> permutation, for the two latest epochs asked for
    self._lock = threading.Lock()  # prefetch threads share the plan

  def __call__(self, batch: int) -> np.ndarray:
    return self._sources(batch * self._batch_size + self._offsets)

  def previous_in_batch(self, batch: int) -> np.ndarray:
    """[B / P] the source indices of the rows just before this process's
    rows in global batch `batch` (cyclically: the batch's last row for its
    first), the same whatever the process count."""
    previous = (self._offsets - 1) % self._batch_size
    return self._sources(batch * self._batch_size + previous)

  def _sources(self, positions: np.ndarray) -> np.ndarray:
    """[K] stream positions -> [K] source indices."""
    epochs, within = np.divmod(positions, len(self._kept))
    indices = np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs):
      rows = epochs == epoch
      indices[rows] = self._kept[self._order(int(epoch))[within[rows]]]
    return indices

  def _order(self, epoch: int) -> np.ndarray:
    with self._lock:
      order = self._orders.get(epoch)
      if order is None:
        n = len(self._kept)
        rng = np.random.default_rng([self._seed, epoch])
        order = rng.permutation(n) if self._shuffle else np.arange(n)
        self._orders[epoch] = order
        if len(self._orders) > 2:  # forget the oldest inserted, never this one
          del self._orders[next(iter(self._orders))]
      return order


def _num_batches(
  num_examples: int, num_epochs: int | None, batch_size: int
) -> int:
  if num_epochs is None:
    return sys.maxsize // batch_size  # as good as forever
  return num_examples * num_epochs // batch_size


def _kept_after_truncation(encoder, builder, split, source):
  kept, summary = token_stats.kept_indices(
    str(builder.data_dir), split, source, encoder
  )
  if not len(kept):
    raise ValueError(
      f"no example of split {split!r} survives truncation ({summary['dropped']});"
      " raise input.max_length or lower input.max_prompt_length"
    )
  return kept, summary


class _TextPairBatch:
  """Indices of one batch -> its arrays (a Grain map function)."""

  def __init__(self, cfg, encoder, split, source, kept, prepare_summary):
    self._source = source
    self._encoder = encoder
    self._optional = [
      f for f in ("weight", "margin") if f in prepare_summary["optional_fields"]
    ]
    if "margin" in self._optional:
      _check_margin_everywhere(prepare_summary)
    self._return_ids = cfg.return_ids
    self._ref = None
    ref_path = cfg.ref_logps_path(split)
    if ref_path is not None:
      self._ref = reference_logps.load(ref_path)
      reference_logps.check_settings(
        self._ref, reference_logps.settings_of(cfg)
      )
      ids = (r["id"].decode() for r in token_stats.iter_source(source, kept))
      reference_logps.check_covers(self._ref, ids, split=split)
      logging.info(
        "joined reference log-probs of split %s from %s", split, ref_path
      )

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    records = self.read(indices)
    out = self._encoder.encode_batch(
      [token_stats.read_texts(r) for r in records]
    )
    # Summed log-probs, valid only for the very tokens this run scores.
    chosen_tokens = out["chosen_loss_mask"].sum(axis=1)  # [B]
    rejected_tokens = out["rejected_loss_mask"].sum(axis=1)  # [B]
    return self.add_pair_fields(out, records, chosen_tokens, rejected_tokens)

  def read(self, indices: np.ndarray) -> list[dict[str, Any]]:
    return self._source.__getitems__(indices.tolist())

  @property
  def encoder(self) -> encoding.PairEncoder:
    return self._encoder

  def add_pair_fields(
    self, out, records, chosen_tokens, rejected_tokens
  ) -> dict[str, np.ndarray]:
    """`out` with the [B] per-pair fields: weight, margin, reference, ids."""
    for name in self._optional:
      out[name] = np.asarray([r[name] for r in records], np.float32)
    ids = [r["id"].decode() for r in records]
    if self._ref is not None:
      for i, record_id in enumerate(ids):
        reference_logps.check_token_counts(
          self._ref, record_id, int(chosen_tokens[i]), int(rejected_tokens[i])
        )
      ref = np.asarray(
        [self._ref.values[i][:2] for i in ids], np.float32
      )  # [B, 2]
      out["ref_chosen_logps"], out["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
    if self._return_ids:
      out["id"] = np.asarray(ids, np.str_)
    return out


def _check_margin_everywhere(prepare_summary: dict[str, Any]) -> None:
  """A margin given by only some records is refused: the others would read
  0.0 (the builder's default), a reward difference nobody gave."""
  for source, s in prepare_summary["sources"].items():
    given = s.get("records_with", {}).get("margin")
    if given is not None and given != s["kept"]:
      raise readers.DataError(
        f"field 'margin' is given by {given} of the {s['kept']} kept records"
        f" of {source!r} ({', '.join(s['files'])}), counting those that give"
        " chosen_reward and rejected_reward instead; give it in every record"
        " or in none (a missing margin would read as 0)"
      )


class _PackedTextPairBatch:
  """Indices of one GLOBAL batch -> this process's packed arrays (Grain map).

  See data/packing.py for the layout and why each process places every
  process's pairs (from cached lengths) before packing its own.
  """

  def __init__(
    self,
    pairs: _TextPairBatch,
    lengths: np.ndarray,
    *,
    max_length: int,
    process_index: int,
    process_count: int,
    row_multiple: int,
    min_rows: int,
    share_prompts: bool = False,
  ):
    self._pairs = pairs
    self._share_prompts = share_prompts
    self._lengths = lengths  # [N, 3] kept tokens per source index
    self._max_length = max_length
    self._process_index = process_index
    self._process_count = process_count
    self._row_multiple = row_multiple
    self._min_rows = min_rows

  def _local_rows(self, indices: np.ndarray) -> int:
    return packing_lib.local_rows(
      self._lengths[indices],
      max_length=self._max_length,
      process_count=self._process_count,
      row_multiple=self._row_multiple,
      min_rows=self._min_rows,
      share_prompts=self._share_prompts,
    )

  def summary(self, global_batches) -> dict[str, Any]:
    """Packing efficiency over some global batches
    (`packing.efficiency_summary`)."""
    return packing_lib.efficiency_summary(
      (self._lengths[indices] for indices in global_batches),
      max_length=self._max_length,
      process_count=self._process_count,
      row_multiple=self._row_multiple,
      min_rows=self._min_rows,
      share_prompts=self._share_prompts,
    )

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    p, count = self._process_index, self._process_count
    num_rows = self._local_rows(indices)
    mine = indices[p::count]  # this process's pairs (BatchPlan's offsets)
    records = self._pairs.read(mine)
    encoder = self._pairs.encoder
    truncated = [encoder.truncate(*token_stats.read_texts(r)) for r in records]
    for pair in truncated:
      if pair.drop_reason is not None:
        raise ValueError(
          f"pair dropped by truncation ({pair.drop_reason}) reached the packer"
        )
    out = packing_lib.pack_pairs(
      truncated,
      max_length=self._max_length,
      num_rows=num_rows,
      pad_id=encoder.tokenizer.pad_id,
      pair_offset=p * len(mine),
      row_offset=p * num_rows,
      total_pairs=len(indices),
      share_prompts=self._share_prompts,
    )
    tokens = np.asarray(
      [packing_lib.scored_tokens(pair) for pair in truncated]
    )  # [B / P, 2]
    return self._pairs.add_pair_fields(out, records, tokens[:, 0], tokens[:, 1])


@dataclasses.dataclass(frozen=True)
class _ActionPairBatch:
  source: Any

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    records = self.source.__getitems__(indices.tolist())
    return {
      side: np.asarray([r[side] for r in records], np.int32)
      for side in ("chosen", "rejected")
    }
