"""Sequence packing: several preference pairs per row of `max_length` tokens.

With `input.packing=True` a batch still holds exactly `input.batch_size`
pairs (so the loss, a mean over pairs, and the learning rate mean what they
mean without packing), but their 2B sequences (prompt + chosen, prompt +
rejected) share rows instead of each being padded to T = `max_length`:

  packed_input_ids     [R, T] int32  tokens, `pad_id` after a row's last
  packed_loss_mask     [R, T] int32  1 on scored response tokens
  packed_segment_ids   [R, T] int32  1, 2, ... per sequence in its row; 0 pad
  packed_positions     [R, T] int32  position within the sequence (from 0)
  packed_sequence_ids  [R, T] int32  which response a token belongs to, in
                                     the train step's stacked order: i for
                                     the chosen side of global pair i, B + i
                                     for its rejected side; -1 on padding
  chosen_packed_row    [B] int32     global row of each pair's chosen side
  rejected_packed_row  [B] int32     ... and of its rejected side

The model sums token log-probs per `packed_sequence_ids` into the same [2B]
per-response log-probs the padded layout gives (`logprobs.sums_by_sequence`);
the train step does not see the difference. Per-pair fields (`weight`,
`margin`, `ref_*_logps`, `id`) stay [B] as without packing.

Placement (`place_pairs`, first-fit decreasing): pairs are taken longest
first; a pair goes to the first open row with room for both of its
sequences (chosen then rejected, side by side); else to the first two
ADJACENT rows with room for one side each, the second of which may be a new
row; else to a new row (two for a pair longer than a row). So the chosen and
rejected sides of a pair are always in the same row or in adjacent rows.
Within a row, sequences keep their order of placement, segment ids counting
from 1.

Several processes: process p packs only its own pairs (the pipeline's
`BatchPlan` slice) into its own rows, but all processes must agree on the
row count R, so each one places every process's pairs from their cached
token lengths (`truncated_lengths`: no tokenisation) and all take the largest
count, rounded up to `row_multiple` (the batch shards data × fsdp, so the
rows split evenly over devices) and to at least `min_rows` (`input.
packed_rows`, to keep one shape: every new R compiles the step once more).
Process p's pairs are global pairs [p·B/P, (p+1)·B/P) and its rows global
rows [p·R/P, (p+1)·R/P): the layout `sharding.global_batch` assembles.

Packing efficiency = real tokens / token slots (R · T); the padded layout's
is real tokens / (2B · T).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid

import numpy as np

from psipo_jax.data import encoding
from psipo_jax.data import token_stats

# Batch keys of the packed layout (module docstring).
ROW_KEYS = (
  "packed_input_ids",
  "packed_loss_mask",
  "packed_segment_ids",
  "packed_positions",
  "packed_sequence_ids",
)
PAIR_KEYS = ("chosen_packed_row", "rejected_packed_row")


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where each side of each pair goes: [n] arrays and the row count.

  `chosen_row[i]`, `chosen_start[i]`: row and first position of pair i's
  chosen sequence; likewise for rejected. `num_rows`: rows used.
  """

  chosen_row: np.ndarray
  chosen_start: np.ndarray
  rejected_row: np.ndarray
  rejected_start: np.ndarray
  num_rows: int


def place_pairs(
  chosen_lengths: np.ndarray, rejected_lengths: np.ndarray, *, max_length: int
) -> Placement:
  """First-fit-decreasing placement of pairs of sequences into rows.

  Args:
    chosen_lengths: [n] tokens of each pair's chosen sequence (prompt
      included), each in [1, max_length].
    rejected_lengths: [n] likewise for the rejected sequences.
    max_length: T, the row length.

  Returns:
    A `Placement` (see the module docstring for the rule).
  """
  a = np.asarray(chosen_lengths, np.int64)  # [n]
  b = np.asarray(rejected_lengths, np.int64)  # [n]
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(
      f"lengths must be two [n] arrays, got {a.shape}, {b.shape}"
    )
  if len(a) and (
    min(a.min(), b.min()) < 1 or max(a.max(), b.max()) > max_length
  ):
    raise ValueError(
      f"every sequence needs 1 to max_length={max_length} tokens, got"
      f" lengths in [{min(a.min(), b.min())}, {max(a.max(), b.max())}]"
    )
  n = len(a)
  rows = np.empty((n, 2), np.int64)
  starts = np.empty((n, 2), np.int64)
  free = np.zeros(0, np.int64)  # [rows so far] free slots per row
  # Longest pair first; ties in batch order (stable), so placement is a
  # function of the lengths alone.
  for i in np.argsort(-(a + b), kind="stable"):
    # Rows so far and two new ones, so that "the last row and a new one"
    # is a candidate like any two adjacent rows.
    room = np.append(free, [max_length, max_length])
    together = np.flatnonzero(room[:-2] >= a[i] + b[i])
    apart = np.flatnonzero(
      ((room[:-1] >= a[i]) & (room[1:] >= b[i]))
      | ((room[:-1] >= b[i]) & (room[1:] >= a[i]))
    )
    if len(together):  # an open row takes both sides
      spots = ((int(together[0]), a[i]), (int(together[0]), b[i]))
    elif apart[0] < len(free) or a[i] + b[i] > max_length:
      # Adjacent rows, at most one of them new, take one side each (two new
      # rows only when the pair fits nowhere else).
      row = int(apart[0])
      fits = room[row] >= a[i] and room[row + 1] >= b[i]
      spots = (row, a[i]), (row + 1, b[i])
      if not fits:
        spots = (row + 1, a[i]), (row, b[i])
    else:  # a new row takes both sides
      spots = ((len(free), a[i]), (len(free), b[i]))
    for side, (row, length) in enumerate(spots):
      if row >= len(free):
        free = np.append(free, [max_length] * (row + 1 - len(free)))
      rows[i, side] = row
      starts[i, side] = max_length - free[row]
      free[row] -= length
  return Placement(
    chosen_row=rows[:, 0],
    chosen_start=starts[:, 0],
    rejected_row=rows[:, 1],
    rejected_start=starts[:, 1],
    num_rows=len(free),
  )


def local_rows(
  lengths: np.ndarray,
  *,
  max_length: int,
  process_count: int,
  row_multiple: int,
  min_rows: int,
) -> int:
  """Rows of each process for one global batch (the same on every process).

  Args:
    lengths: [B, 3] (prompt, chosen, rejected) kept tokens of the global
      batch's pairs in stream order; process p holds pairs p, p + P, ...
    max_length: T.
    process_count: P; it divides `row_multiple`.
    row_multiple: the GLOBAL row count is a multiple of this.
    min_rows: ... and at least this.

  Returns:
    R / P: the most rows any process's pairs need, raised to
    ceil(min_rows / P) and rounded up to a multiple of row_multiple / P.
  """
  if row_multiple % process_count:
    raise ValueError(
      f"the row multiple {row_multiple} (batch shards) is not divisible by"
      f" the {process_count} processes"
    )
  needed = max(
    place_pairs(
      *sequence_lengths(lengths[p::process_count]), max_length=max_length
    ).num_rows
    for p in range(process_count)
  )
  rows = max(needed, -(-min_rows // process_count), 1)
  multiple = row_multiple // process_count
  return -(-rows // multiple) * multiple


def sequence_lengths(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[n, 3] (prompt, chosen, rejected) -> ([n] chosen, [n] rejected) sequence
  lengths, the prompt counted in each."""
  lengths = np.asarray(lengths, np.int64).reshape(-1, 3)
  return lengths[:, 0] + lengths[:, 1], lengths[:, 0] + lengths[:, 2]


def pack_pairs(
  pairs: list[encoding.TruncatedPair],
  *,
  max_length: int,
  num_rows: int,
  pad_id: int,
  pair_offset: int,
  row_offset: int,
  total_pairs: int,
) -> dict[str, np.ndarray]:
  """The packed arrays of this process's pairs (module docstring).

  Args:
    pairs: the n truncated pairs of this process, in batch order.
    max_length: T.
    num_rows: R_local >= the rows `place_pairs` needs for them.
    pad_id: token id written on padding.
    pair_offset: global index of this process's first pair.
    row_offset: global index of this process's first row.
    total_pairs: B, pairs in the global batch (rejected ids start there).

  Returns:
    The `ROW_KEYS` arrays [num_rows, T] and `PAIR_KEYS` arrays [n].
  """
  prompts = [p.prompt for p in pairs]
  sides = ([p.chosen for p in pairs], [p.rejected for p in pairs])
  placement = place_pairs(
    *(
      np.asarray([len(q) + len(r) for q, r in zip(prompts, side)], np.int64)
      for side in sides
    ),
    max_length=max_length,
  )
  if placement.num_rows > num_rows:
    raise ValueError(
      f"{len(pairs)} pairs need {placement.num_rows} rows, more than {num_rows}"
    )
  shape = (num_rows, max_length)
  out = {
    "packed_input_ids": np.full(shape, pad_id, np.int32),
    "packed_loss_mask": np.zeros(shape, np.int32),
    "packed_segment_ids": np.zeros(shape, np.int32),
    "packed_positions": np.zeros(shape, np.int32),
    "packed_sequence_ids": np.full(shape, -1, np.int32),
  }
  # Segment ids in order of position within each row.
  starts = np.concatenate([placement.chosen_start, placement.rejected_start])
  rows = np.concatenate([placement.chosen_row, placement.rejected_row])
  order = np.lexsort((starts, rows))  # [2n] by row, then start
  segment = np.empty(2 * len(pairs), np.int64)
  previous_row, count = -1, 0
  for k in order:
    count = count + 1 if rows[k] == previous_row else 1
    previous_row = rows[k]
    segment[k] = count
  n = len(pairs)
  for k in range(2 * n):
    i, side = k % n, k // n
    prompt, response = prompts[i], sides[side][i]
    row, start = rows[k], starts[k]
    end = start + len(prompt) + len(response)
    out["packed_input_ids"][row, start : start + len(prompt)] = prompt
    out["packed_input_ids"][row, start + len(prompt) : end] = response
    # As in `encoding.pack`: a sequence's first token is never scored
    # (nothing of its own precedes it).
    first_scored = start + max(len(prompt), 1)
    out["packed_loss_mask"][row, first_scored:end] = 1
    out["packed_segment_ids"][row, start:end] = segment[k]
    out["packed_positions"][row, start:end] = np.arange(end - start)
    out["packed_sequence_ids"][row, start:end] = (
      side * total_pairs + pair_offset + i
    )
  out["chosen_packed_row"] = (placement.chosen_row + row_offset).astype(
    np.int32
  )
  out["rejected_packed_row"] = (placement.rejected_row + row_offset).astype(
    np.int32
  )
  return out


def scored_tokens(pair: encoding.TruncatedPair) -> tuple[int, int]:
  """Loss-mask tokens of (chosen, rejected): the response, less its first
  token when there is no prompt (as `encoding.pack` and `pack_pairs` mask)."""
  lost = 1 if len(pair.prompt) == 0 else 0
  return len(pair.chosen) - lost, len(pair.rejected) - lost


def truncated_lengths(
  dataset_dir: str, split: str, source, encoder: encoding.PairEncoder
) -> np.ndarray:
  """[N, 3] (prompt, chosen, rejected) tokens truncation keeps, per example.

  Every process needs the lengths of every pair of a global batch to agree
  on its row count; reading them from this array costs no tokenisation.
  Cached in `dataset_dir` under a name keyed by the split and the encoder's
  fingerprint, like `token_stats.kept_indices`.
  """
  key = hashlib.sha256(f"{split}|{encoder.fingerprint}".encode()).hexdigest()[
    :16
  ]
  path = os.path.join(dataset_dir, f"lengths_{split}_{key}.npy")
  if os.path.exists(path):
    lengths = np.load(path)
    if lengths.shape == (len(source), 3):
      return lengths
  lengths = np.zeros((len(source), 3), np.int32)
  for index, record in enumerate(token_stats.iter_source(source)):
    pair = encoder.truncate(*token_stats.read_texts(record))
    lengths[index] = len(pair.prompt), len(pair.chosen), len(pair.rejected)
  # Atomic: another host may be reading or writing the same file.
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex}.npy"
  np.save(tmp, lengths)
  os.replace(tmp, path)
  return lengths


def efficiency_summary(
  batch_lengths,
  *,
  max_length: int,
  process_count: int,
  row_multiple: int,
  min_rows: int,
) -> dict[str, float | int]:
  """Packing efficiency over some global batches, against padding.

  Args:
    batch_lengths: iterable of [B, 3] length arrays, one per global batch.
    max_length, process_count, row_multiple, min_rows: as the pipeline packs.

  Returns:
    {"batches", "efficiency" (real tokens / packed slots), "padded_efficiency"
    (real / (2B · T)), "rows_min", "rows_mean", "rows_max" (global rows)}.
  """
  real = slots = padded = 0
  rows = []
  for lengths in batch_lengths:
    chosen, rejected = sequence_lengths(lengths)
    r = process_count * local_rows(
      lengths,
      max_length=max_length,
      process_count=process_count,
      row_multiple=row_multiple,
      min_rows=min_rows,
    )
    rows.append(r)
    real += int(chosen.sum() + rejected.sum())
    slots += r * max_length
    padded += 2 * len(chosen) * max_length
  return {
    "batches": len(rows),
    "efficiency": real / max(slots, 1),
    "padded_efficiency": real / max(padded, 1),
    "rows_min": min(rows, default=0),
    "rows_mean": float(np.mean(rows)) if rows else 0.0,
    "rows_max": max(rows, default=0),
  }
