r"""Packing efficiency on real preference lengths: packed rows vs padding.

    PYTHONPATH=. python benchmarks/packing_efficiency.py \
        [--max_length=1024] [--max_prompt_length=512] [--batch_sizes=8,32,64]

Reads the prompt/chosen/rejected lengths of the 2,312 Anthropic HH-RLHF
harmless-base test pairs (../shared/data/hh_harmless_test_lengths.json, in
bytes = byte-tokenizer tokens), applies the pipeline's tokens (BOS before the
prompt, EOS after each response) and truncation policy
(`encoding.truncate_pair`), drops the pairs the pipeline drops (an empty
response), shuffles them with a fixed seed and cuts one epoch into global
batches of B pairs. For each B it prints the efficiency, real tokens / token
slots, of three layouts of the same batches, all measured in this run:

  padded to max_length   2B rows of T tokens (the pipeline without packing)
  padded to the longest  2B rows as long as the batch's longest sequence
                         (dynamic padding, as a PyTorch collator does; one
                         shape per batch)
  packed                 `packing.place_pairs` rows of T tokens (the
                         pipeline with input.packing=True), the row count
                         rounded up to a multiple of --row_multiple
  shared                 the same with input.share_prompts=True (each
                         pair's prompt once in its row: `packing.py`,
                         "Shared prompts"), reported as its slots / packed
                         slots (its real tokens are fewer than the others')
  bucketed               (not a pipeline option: the alternative it was
                         weighed against) pairs sorted by length within
                         windows of --bucket_window batches, then padded to
                         the batch's longest sequence rounded up to a
                         multiple of --bucket_round (under jit every length
                         is a shape and a compilation: T / bucket_round
                         shapes at most)

and the ratio of slots (padded / packed), i.e. how many times fewer token
positions the model computes over. Costs only NumPy; a few seconds.
"""

import numpy as np
from absl import app
from absl import flags

from benchmarks import hh_lengths
from psipo_jax.data import packing

_MAX_LENGTH = flags.DEFINE_integer("max_length", 1024, "T.")
_MAX_PROMPT_LENGTH = flags.DEFINE_integer(
  "max_prompt_length", 512, "input.max_prompt_length."
)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["8", "32", "64"], "B values.")
_ROW_MULTIPLE = flags.DEFINE_integer(
  "row_multiple", 8, "Packed rows per batch are a multiple of this (shards)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Shuffle seed.")
_BUCKET_WINDOW = flags.DEFINE_integer(
  "bucket_window", 16, "Batches per length-sorting window (bucketed)."
)
_BUCKET_ROUND = flags.DEFINE_integer(
  "bucket_round", 128, "Bucketed batch lengths are a multiple of this."
)


def layouts(lengths, batch_size, *, max_length, row_multiple):
  """Token slots of each layout over the whole-batch part of an epoch."""
  real = padded = longest = packed = shared = 0
  rows = []
  for start in range(0, len(lengths) - batch_size + 1, batch_size):
    batch = lengths[start : start + batch_size]
    chosen, rejected = packing.sequence_lengths(batch)
    real += int(chosen.sum() + rejected.sum())
    padded += 2 * batch_size * max_length
    longest += 2 * batch_size * int(max(chosen.max(), rejected.max()))
    r = packing.local_rows(
      batch,
      max_length=max_length,
      process_count=1,
      row_multiple=row_multiple,
      min_rows=1,
    )
    rows.append(r)
    packed += r * max_length
    shared += max_length * packing.local_rows(
      batch,
      max_length=max_length,
      process_count=1,
      row_multiple=row_multiple,
      min_rows=1,
      share_prompts=True,
    )
  return real, padded, longest, packed, rows, shared


def bucketed_slots(lengths, batch_size, *, window, round_to):
  """Slots of length-bucketed batches padded to their longest sequence:
  pairs sorted by their longer sequence within windows of `window` batches
  (the usual bucketing sampler), cut into batches of `batch_size`."""
  n = len(lengths) // batch_size * batch_size
  chosen, rejected = packing.sequence_lengths(lengths[:n])
  longer = np.maximum(chosen, rejected)
  slots = 0
  span = window * batch_size
  for start in range(0, n, span):
    part = np.sort(longer[start : start + span])
    for b in range(0, len(part), batch_size):
      longest = int(part[b : b + batch_size].max())
      slots += 2 * batch_size * (-(-longest // round_to) * round_to)
  return slots


def main(argv):
  del argv
  all_pairs = hh_lengths.pairs()
  T = _MAX_LENGTH.value
  lengths = hh_lengths.kept_lengths(
    all_pairs, max_length=T, max_prompt_length=_MAX_PROMPT_LENGTH.value
  )
  rng = np.random.default_rng(_SEED.value)
  lengths = lengths[rng.permutation(len(lengths))]
  print(
    f"{len(lengths)} HH pairs (of {len(all_pairs)}), max_length={T},"
    f" max_prompt_length={_MAX_PROMPT_LENGTH.value}, packed rows a multiple"
    f" of {_ROW_MULTIPLE.value}; bucketed: windows of"
    f" {_BUCKET_WINDOW.value} batches, lengths a multiple of"
    f" {_BUCKET_ROUND.value}"
  )
  header = (
    "B   padded-to-T  padded-to-longest  bucketed  packed  rows/batch"
    " (padded 2B)  slots padded/packed  bucketed/packed  shared/packed"
  )
  print(header)
  for b in map(int, _BATCH_SIZES.value):
    real, padded, longest, packed, rows, shared = layouts(
      lengths, b, max_length=T, row_multiple=_ROW_MULTIPLE.value
    )
    bucketed = bucketed_slots(
      lengths, b, window=_BUCKET_WINDOW.value, round_to=_BUCKET_ROUND.value
    )
    print(
      f"{b:<3} {real / padded:>11.1%}  {real / longest:>17.1%}"
      f"  {real / bucketed:>8.1%}  {real / packed:>6.1%}"
      f"  {np.mean(rows):>5.1f} ({2 * b}), {min(rows)}-{max(rows)}"
      f"  {padded / packed:>18.2f}x  {bucketed / packed:>14.2f}x"
      f"  {shared / packed:>12.2f}x"
    )


if __name__ == "__main__":
  app.run(main)
