"""The lengths of the real Anthropic HH pairs, for the benchmarks.

`../shared/data/hh_harmless_test_lengths.json` holds the (prompt, chosen,
rejected) byte lengths of the 2,312 pairs of the `harmless-base` test file
(its README); with the byte tokenizer a byte is a token. The benchmark
scripts beside it import it as `benchmarks.hh_lengths` (they run with the
repository root on `PYTHONPATH`).
"""

import json
import pathlib

import numpy as np

PATH = (
  pathlib.Path(__file__).resolve().parents[2]
  / "shared"
  / "data"
  / "hh_harmless_test_lengths.json"
)


def pairs() -> list[list[int]]:
  """Every pair's [prompt, chosen, rejected] length, in the file's order."""
  return json.loads(PATH.read_text())["pairs"]


def kept_lengths(rows, *, max_length: int, max_prompt_length: int):
  """[n, 3] (prompt, chosen, rejected) tokens after the pipeline's truncation
  (`encoding.truncate_pair`), BOS before the prompt and EOS after each
  response counted; the pairs with an empty response (which the pipeline
  drops) left out."""
  from psipo_jax.data import encoding  # pylint: disable=g-import-not-at-top

  out = []
  for prompt, chosen, rejected in rows:
    if chosen == 0 or rejected == 0:
      continue
    kept = encoding.truncate_pair(
      np.zeros(prompt + 1, np.int32),
      np.zeros(chosen + 1, np.int32),
      np.zeros(rejected + 1, np.int32),
      max_length=max_length,
      max_prompt_length=max_prompt_length,
      keep_first=1,
    )
    out.append([len(x) for x in kept])
  return np.asarray(out, np.int64).reshape(-1, 3)
