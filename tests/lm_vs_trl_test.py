"""benchmarks/lm_vs_trl.py's batch handling (not its timings, not TRL).

The benchmark's claims that both sides train on the same tokens and that
padding to the longest row changes nothing but the work rest on two helpers,
checked here on psipo_jax's own batch layout.
"""

import argparse
import importlib.util
import pathlib

import ml_collections
import numpy as np
import pytest
from flax import nnx

from psipo_jax import models
from psipo_jax.train_step import pair_inputs

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
_SPEC = importlib.util.spec_from_file_location(
  "lm_vs_trl", _PATH / "lm_vs_trl.py"
)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def _batch(lengths, width):
  """Right-padded pairs: (prompt, chosen, rejected) lengths per pair."""
  rng = np.random.default_rng(0)
  n = len(lengths)
  batch = {}
  prompts = [rng.integers(3, 250, p) for p, _, _ in lengths]
  for side, col in (("chosen", 1), ("rejected", 2)):
    ids = np.zeros((n, width), np.int32)
    loss = np.zeros((n, width), np.int32)
    attention = np.zeros((n, width), np.int32)
    for i, pair in enumerate(lengths):
      p, r = pair[0], pair[col]
      ids[i, :p] = prompts[i]
      ids[i, p : p + r] = rng.integers(3, 250, r)
      loss[i, p : p + r] = 1
      attention[i, : p + r] = 1
    batch[f"{side}_input_ids"] = ids
    batch[f"{side}_loss_mask"] = loss
    batch[f"{side}_attention_mask"] = attention
  return batch


def _assert_same_log_probs(got_batch, want_batch):
  """A tiny transformer scores both batches' pairs alike (float32)."""
  model = models.build_model(
    ml_collections.ConfigDict({"name": "transformer", "preset": "tiny"}),
    rngs=nnx.Rngs(0),
  )
  got, want = (model(pair_inputs(b)) for b in (got_batch, want_batch))
  np.testing.assert_allclose(got.logps, want.logps, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got.num_tokens, want.num_tokens)


def test_trl_pairs_are_the_batch_rows_tokens():
  batch = _batch([(3, 2, 4), (5, 1, 1)], 16)
  pairs = bench._trl_pairs_of(batch)  # pylint: disable=protected-access
  assert [len(p["prompt_ids"]) for p in pairs] == [3, 5]
  assert [(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs] == [
    (2, 4),
    (1, 1),
  ]
  row = batch["chosen_input_ids"][0]
  assert pairs[0]["prompt_ids"] + pairs[0]["chosen_ids"] == row[:5].tolist()
  batch["rejected_input_ids"][1, 0] += 1  # the two rows' prompts now differ
  with pytest.raises(AssertionError, match="differ in prompt"):
    bench._trl_pairs_of(batch)  # pylint: disable=protected-access


def test_padding_to_the_longest_row_leaves_the_log_probs_unchanged():
  batch = _batch([(30, 20, 7), (9, 3, 41), (50, 2, 2)], bench.MAX_LENGTH)
  trimmed = bench._trim_to_longest(batch)  # pylint: disable=protected-access
  assert trimmed["chosen_input_ids"].shape == (3, 52)  # the longest: 50 + 2
  assert trimmed["chosen_loss_mask"].sum() == batch["chosen_loss_mask"].sum()
  _assert_same_log_probs(trimmed, batch)


@pytest.mark.parametrize("share_prompts", [False, True])
def test_the_fixed_work_packed_leaves_the_log_probs_unchanged(share_prompts):
  batch = _batch([(6, 5, 5), (6, 5, 5), (4, 7, 3)], 16)
  args = argparse.Namespace(packed_row_length=40, share_prompts=share_prompts)
  packed = bench._packed(batch, args)  # pylint: disable=protected-access
  assert packed["packed_input_ids"].shape[1] == 40
  # Shared: each pair one stretch of p + c + 1 + r tokens (the prompt's
  # last token repeated where the rejected side branches off); else its
  # two sequences, p + c and p + r.
  real = int(np.sum(packed["packed_segment_ids"] != 0))
  assert real == (17 + 17 + 15 if share_prompts else 22 + 22 + 18)
  _assert_same_log_probs(packed, batch)
