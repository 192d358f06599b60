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

Shared prompts (`input.share_prompts=True`, `share_prompts` below). A pair's
chosen and rejected sequences repeat its prompt, which is commonly most of
the tokens (HH: 363 of 740 kept tokens per sequence on average). A shared
pair takes one stretch of one row and holds its prompt once:

  [prompt] [chosen] [last prompt token again] [rejected]

one segment, with a fourth row array

  packed_branch_ids    [R, T] int32  0 on the prompt's first p - 1 tokens,
                                     1 on its last token and the chosen
                                     response, 2 on the repeated token and
                                     the rejected response; 0 on unshared
                                     sequences and padding

Attention allows (query i, key j) iff the segment and causality rules allow
it AND (branch(j) = 0 OR branch(j) = branch(i)) (DESIGN: the same rule with
every branch 0), so the chosen tokens see the prompt and themselves, the
rejected tokens the prompt's first p - 1 tokens, the repeated last token
(at position p - 1 again) and themselves: each side's context is exactly
its own sequence, and the repeated token predicts the rejected response's
first token as the prompt's last token does the chosen one's. A pair is
shared when it has a prompt and its p + c + 1 + r tokens fit in a row;
otherwise its two sequences are placed as without sharing. Sharing changes
the layout only: the same pairs, the same per-response log-probs.

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
BRANCH_KEY = "packed_branch_ids"  # with shared prompts only
# Branch ids of a shared pair's tokens (module docstring).
PROMPT_BRANCH, CHOSEN_BRANCH, REJECTED_BRANCH = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where each side of each pair goes: [n] arrays and the row count.

  `chosen_row[i]`, `chosen_start[i]`: row and first position of pair i's
  chosen sequence; likewise for rejected. `shared[i]`: pair i is one shared
  stretch (its rejected start is then that of the repeated prompt token,
  right after the chosen sequence, in the same row). `num_rows`: rows used.
  """

  chosen_row: np.ndarray
  chosen_start: np.ndarray
  rejected_row: np.ndarray
  rejected_start: np.ndarray
  num_rows: int
  shared: np.ndarray


def shared_lengths(lengths: np.ndarray, *, max_length: int) -> np.ndarray:
  """[n, 3] (prompt, chosen, rejected) -> [n] tokens of each pair's shared
  stretch (p + c + 1 + r), or 0 for a pair that is not shared (no prompt, or
  too long for a row of `max_length`)."""
  lengths = np.asarray(lengths, np.int64).reshape(-1, 3)
  p, c, r = lengths[:, 0], lengths[:, 1], lengths[:, 2]
  total = p + c + 1 + r
  return np.where((p >= 1) & (total <= max_length), total, 0)


def place_pairs(
  chosen_lengths: np.ndarray,
  rejected_lengths: np.ndarray,
  *,
  max_length: int,
  shared: np.ndarray | None = None,
) -> Placement:
  """First-fit-decreasing placement of pairs of sequences into rows.

  Args:
    chosen_lengths: [n] tokens of each pair's chosen sequence (prompt
      included), each in [1, max_length].
    rejected_lengths: [n] likewise for the rejected sequences.
    max_length: T, the row length.
    shared: optional [n] tokens of each pair's shared stretch
      (`shared_lengths`; 0: not shared). A shared pair is one item of that
      length: the first open row with room takes it, else a new row.

  Returns:
    A `Placement` (see the module docstring for the rule).
  """
  a = np.asarray(chosen_lengths, np.int64)  # [n]
  b = np.asarray(rejected_lengths, np.int64)  # [n]
  shared = np.zeros_like(a) if shared is None else np.asarray(shared, np.int64)
  if shared.shape != a.shape or shared.max(initial=0) > max_length:
    raise ValueError(
      f"shared lengths must be [n] = {a.shape} in [0, {max_length}], got"
      f" {shared.shape} up to {shared.max(initial=0)}"
    )
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
  need = np.where(shared > 0, shared, a + b)  # [n] tokens of each pair
  # Longest pair first; ties in batch order (stable), so placement is a
  # function of the lengths alone.
  for i in np.argsort(-need, kind="stable"):
    # Rows so far and two new ones, so that "the last row and a new one"
    # is a candidate like any two adjacent rows.
    room = np.append(free, [max_length, max_length])
    if shared[i]:  # one stretch: the rejected side right after the chosen
      row = int(np.flatnonzero(room[:-1] >= shared[i])[0])
      if row >= len(free):
        free = np.append(free, [max_length])
      rows[i] = row
      starts[i] = max_length - free[row] + np.array([0, a[i]])
      free[row] -= shared[i]
      continue
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
    shared=shared > 0,
  )


def local_rows(
  lengths: np.ndarray,
  *,
  max_length: int,
  process_count: int,
  row_multiple: int,
  min_rows: int,
  share_prompts: bool = False,
) -> int:
  """Rows of each process for one global batch (the same on every process).

  Args:
    lengths: [B, 3] (prompt, chosen, rejected) kept tokens of the global
      batch's pairs in stream order; process p holds pairs p, p + P, ...
    max_length: T.
    process_count: P; it divides `row_multiple`.
    row_multiple: the GLOBAL row count is a multiple of this.
    min_rows: ... and at least this.
    share_prompts: place pairs with shared prompts (module docstring).

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
    _placement(
      lengths[p::process_count], max_length=max_length, share=share_prompts
    ).num_rows
    for p in range(process_count)
  )
  rows = max(needed, -(-min_rows // process_count), 1)
  multiple = row_multiple // process_count
  return -(-rows // multiple) * multiple


def _placement(lengths: np.ndarray, *, max_length: int, share: bool):
  """`place_pairs` of [n, 3] (prompt, chosen, rejected) lengths."""
  return place_pairs(
    *sequence_lengths(lengths),
    max_length=max_length,
    shared=shared_lengths(lengths, max_length=max_length) if share else None,
  )


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
  share_prompts: bool = False,
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
    share_prompts: hold each pair's prompt once where it fits (module
      docstring); adds `BRANCH_KEY`.

  Returns:
    The `ROW_KEYS` arrays [num_rows, T] and `PAIR_KEYS` arrays [n] (and
    `BRANCH_KEY` [num_rows, T] with shared prompts).
  """
  prompts = [p.prompt for p in pairs]
  sides = ([p.chosen for p in pairs], [p.rejected for p in pairs])
  lengths = np.asarray(
    [(len(p.prompt), len(p.chosen), len(p.rejected)) for p in pairs], np.int64
  ).reshape(-1, 3)
  placement = _placement(lengths, max_length=max_length, share=share_prompts)
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
  if share_prompts:
    out[BRANCH_KEY] = np.zeros(shape, np.int32)
  # Segment ids in order of position within each row; a shared pair's
  # rejected side continues its chosen side's segment.
  n = len(pairs)
  starts = np.concatenate([placement.chosen_start, placement.rejected_start])
  rows = np.concatenate([placement.chosen_row, placement.rejected_row])
  continues = np.concatenate([np.zeros(n, bool), placement.shared])  # [2n]
  order = np.lexsort((starts, rows))  # [2n] by row, then start
  segment = np.empty(2 * n, np.int64)
  previous_row, count = -1, 0
  for k in order:
    if not continues[k]:
      count = count + 1 if rows[k] == previous_row else 1
      previous_row = rows[k]
    segment[k] = count
  for k in range(2 * n):
    i, side = k % n, k // n
    prompt, response = prompts[i], sides[side][i]
    row, start = rows[k], starts[k]
    shared = placement.shared[i]
    if shared and side == 1:  # the repeated last prompt token, then rejected
      prompt, first_position = prompt[-1:], len(prompts[i]) - 1
    else:
      first_position = 0
    end = start + len(prompt) + len(response)
    out["packed_input_ids"][row, start : start + len(prompt)] = prompt
    out["packed_input_ids"][row, start + len(prompt) : end] = response
    # As in `encoding.pack`: a sequence's first token is never scored
    # (nothing of its own precedes it).
    first_scored = start + max(len(prompt), 1)
    out["packed_loss_mask"][row, first_scored:end] = 1
    out["packed_segment_ids"][row, start:end] = segment[k]
    out["packed_positions"][row, start:end] = first_position + np.arange(
      end - start
    )
    out["packed_sequence_ids"][row, start:end] = (
      side * total_pairs + pair_offset + i
    )
    if shared:
      # The chosen side's branch starts at the prompt's last token, the
      # rejected side's at its repeat; the rest of the prompt is shared.
      branch_start = start + len(prompt) - 1
      out[BRANCH_KEY][row, branch_start:end] = (CHOSEN_BRANCH, REJECTED_BRANCH)[
        side
      ]
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
  share_prompts: bool = False,
) -> dict[str, float | int]:
  """Packing efficiency over some global batches, against padding.

  Args:
    batch_lengths: iterable of [B, 3] length arrays, one per global batch.
    max_length, process_count, row_multiple, min_rows, share_prompts: as the
      pipeline packs.

  Returns:
    {"batches", "efficiency" (real tokens / packed slots), "padded_efficiency"
    (real / (2B · T)), "rows_min", "rows_mean", "rows_max" (global rows)};
    with shared prompts "efficiency" counts the tokens in the rows (a shared
    prompt once) and "padded_efficiency" those of the sequences.
  """
  real = sequence_tokens = slots = padded = 0
  rows = []
  for lengths in batch_lengths:
    chosen, rejected = sequence_lengths(lengths)
    r = process_count * local_rows(
      lengths,
      max_length=max_length,
      process_count=process_count,
      row_multiple=row_multiple,
      min_rows=min_rows,
      share_prompts=share_prompts,
    )
    rows.append(r)
    sequences = int(chosen.sum() + rejected.sum())
    placed = sequences
    if share_prompts:
      stretch = shared_lengths(lengths, max_length=max_length)
      placed -= int(
        np.sum(np.where(stretch > 0, chosen + rejected - stretch, 0))
      )
    real += placed
    sequence_tokens += sequences
    slots += r * max_length
    padded += 2 * len(chosen) * max_length
  return {
    "batches": len(rows),
    "efficiency": real / max(slots, 1),
    "padded_efficiency": sequence_tokens / max(padded, 1),
    "rows_min": min(rows, default=0),
    "rows_mean": float(np.mean(rows)) if rows else 0.0,
    "rows_max": max(rows, default=0),
  }
