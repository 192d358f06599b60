"""Sequence packing (data/packing.py): placement, the packed pipeline, its
state, and a packed batch's loss and gradients against the same pairs padded."""

import io
import json
import os
import pathlib
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from psipo_jax import models
from psipo_jax import sharding
from psipo_jax import train
from psipo_jax.data import config as config_lib
from psipo_jax.data import inspect as inspect_lib
from psipo_jax.data import make_preference_iterator
from psipo_jax.data import packing
from psipo_jax.data import reference_logps
from psipo_jax.data import text_task
from psipo_jax.data.testing import experiment_config, write_jsonl
from psipo_jax.loss_config import LossConfig
from psipo_jax.train_state import TrainState
from psipo_jax.train_step import make_train_step, psipo_objective

import train_worker  # tests/: the worker and its kill -9 check

MAX_LENGTH = 96
_WORDS = "a an the pair token model answer reply yes no maybe".split()


def _records(n, seed=0):
  """Pairs of very different lengths: several fit a row, some need two."""
  rng = np.random.default_rng(seed)

  def text(lo, hi):
    return " ".join(rng.choice(_WORDS, size=int(rng.integers(lo, hi))))

  return [
    {
      "id": f"p{i}",
      "prompt": f"Q{i} {text(1, 10)}?",
      "chosen": f" {text(1, 8)}.",
      "rejected": f" no {text(1, 8)}",
      "weight": float(rng.uniform(0.5, 2.0)),
    }
    for i in range(n)
  ]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("pairs")
  return write_jsonl(tmp / "pairs.jsonl", _records(64)), tmp / "tfds"


def _config(pairs_file, *, packing_on, batch_size=8, **overrides):
  files, data_dir = pairs_file
  return experiment_config(
    data_dir=data_dir,
    files=files,
    batch_size=batch_size,
    max_length=MAX_LENGTH,
    max_prompt_length=48,
    packing=packing_on,
    **overrides,
  )


def _packed_sequences(batch):
  """{sequence id: (tokens, loss mask)} of a packed batch."""
  out = {}
  ids = batch["packed_sequence_ids"]
  for s in np.unique(ids[ids >= 0]):
    where = ids == s
    rows = np.unique(np.nonzero(where)[0])
    assert len(rows) == 1, f"sequence {s} spans rows {rows}"
    out[int(s)] = (
      batch["packed_input_ids"][where],
      batch["packed_loss_mask"][where],
    )
  return out


def _padded_sequences(batch):
  """{sequence id: (tokens, loss mask)} of a padded batch, ids as packed."""
  b = len(batch["chosen_input_ids"])
  out = {}
  for side_index, side in enumerate(("chosen", "rejected")):
    for i in range(b):
      real = batch[f"{side}_attention_mask"][i] != 0
      out[side_index * b + i] = (
        batch[f"{side}_input_ids"][i][real],
        batch[f"{side}_loss_mask"][i][real],
      )
  return out


def _assert_same_sequences(packed, padded):
  assert sorted(packed) == sorted(padded)
  for s in padded:
    np.testing.assert_array_equal(packed[s][0], padded[s][0], err_msg=str(s))
    np.testing.assert_array_equal(packed[s][1], padded[s][1], err_msg=str(s))


# ------------------------------------------------------------- placement


def test_placement_fits_rows_and_keeps_each_pair_together():
  rng = np.random.default_rng(0)
  chosen = rng.integers(1, 200, 300)
  rejected = rng.integers(1, 200, 300)
  placement = packing.place_pairs(chosen, rejected, max_length=256)
  used = np.zeros((placement.num_rows, 256), int)
  for length, rows, starts in (
    (chosen, placement.chosen_row, placement.chosen_start),
    (rejected, placement.rejected_row, placement.rejected_start),
  ):
    for n, row, start in zip(length, rows, starts):
      assert 0 <= start and start + n <= 256
      used[row, start : start + n] += 1
  assert used.max() == 1  # no two sequences overlap
  gap = np.abs(placement.chosen_row - placement.rejected_row)
  assert gap.max() <= 1  # the same row or adjacent rows
  assert placement.num_rows < 2 * 300  # fewer than padding's rows


def test_first_fit_leaves_at_most_one_row_half_empty():
  """Pairs that each fit a row: were two rows at most half full, the later
  one's pairs (each at most half a row) would have gone to the earlier."""
  rng = np.random.default_rng(1)
  chosen, rejected = rng.integers(1, 120, (2, 500))
  placement = packing.place_pairs(chosen, rejected, max_length=256)
  used = np.bincount(
    np.concatenate([placement.chosen_row, placement.rejected_row]),
    weights=np.concatenate([chosen, rejected]),
    minlength=placement.num_rows,
  )
  assert np.sum(used <= 128) <= 1
  bound = int(np.ceil((chosen.sum() + rejected.sum()) / 256))
  assert bound <= placement.num_rows <= 2 * bound


def test_shared_pairs_take_one_stretch_of_one_row():
  rng = np.random.default_rng(2)
  lengths = rng.integers(1, 120, (200, 3))
  lengths[::10, 0] = 0  # no prompt: never shared
  chosen, rejected = packing.sequence_lengths(lengths)
  shared = packing.shared_lengths(lengths, max_length=256)
  assert 0 < np.sum(shared > 0) < len(shared)  # some shared, some not
  placement = packing.place_pairs(
    chosen, rejected, max_length=256, shared=shared
  )
  np.testing.assert_array_equal(placement.shared, shared > 0)
  used = np.zeros((placement.num_rows, 256), int)
  for i in range(len(chosen)):
    if shared[i]:
      assert placement.chosen_row[i] == placement.rejected_row[i]
      start = placement.chosen_start[i]
      assert placement.rejected_start[i] == start + chosen[i]
      spans = [(placement.chosen_row[i], start, shared[i])]
    else:
      spans = [
        (placement.chosen_row[i], placement.chosen_start[i], chosen[i]),
        (placement.rejected_row[i], placement.rejected_start[i], rejected[i]),
      ]
    for row, start, length in spans:
      assert start + length <= 256
      used[row, start : start + length] += 1
  assert used.max() == 1
  unshared = packing.place_pairs(chosen, rejected, max_length=256)
  assert placement.num_rows < unshared.num_rows


def test_placement_refuses_a_sequence_longer_than_a_row():
  with pytest.raises(ValueError, match="max_length=8"):
    packing.place_pairs(np.array([9]), np.array([1]), max_length=8)


# ------------------------------------------------------------ the pipeline


def test_packed_batches_hold_the_padded_batches_pairs(pairs_file):
  padded = make_preference_iterator(
    _config(pairs_file, packing_on=False), "train"
  )
  packed = make_preference_iterator(
    _config(pairs_file, packing_on=True), "train"
  )
  summary = packed.summary["packing"]
  print(summary)
  assert summary["efficiency"] > 1.3 * summary["padded_efficiency"], summary
  for _ in range(4):
    a, b = next(padded), next(packed)
    _assert_same_sequences(_packed_sequences(b), _padded_sequences(a))
    np.testing.assert_array_equal(a["weight"], b["weight"])
    # Positions restart in every segment; segment ids count within rows.
    seg, pos = b["packed_segment_ids"], b["packed_positions"]
    starts = (seg != 0) & (pos == 0)
    assert np.all(starts.sum(1) == seg.max(1))
    assert len(seg) < 2 * 8  # fewer rows than padding's 2B
    assert np.all(
      np.abs(b["chosen_packed_row"] - b["rejected_packed_row"]) <= 1
    )


def _shared_views(batch):
  """{sequence id: (tokens, loss mask, positions)} of what each sequence's
  tokens see in a packed batch with shared prompts: the tokens of its
  segment on branch 0 or on its own branch (the branch of its last token)."""
  out = {}
  ids, seg = batch["packed_sequence_ids"], batch["packed_segment_ids"]
  branch = batch[packing.BRANCH_KEY]
  for s in np.unique(ids[ids >= 0]):
    rows, cols = np.nonzero(ids == s)
    row, last = rows[0], cols.max()
    own = branch[row, last]
    view = (seg[row] == seg[row, last]) & (
      (branch[row] == 0) | (branch[row] == own)
    )
    view[last + 1 :] = False
    out[int(s)] = tuple(
      batch[key][row][view]
      for key in ("packed_input_ids", "packed_loss_mask", "packed_positions")
    )
  return out


def test_shared_prompts_hold_each_prompt_once_and_the_same_sequences(
  pairs_file,
):
  padded = make_preference_iterator(
    _config(pairs_file, packing_on=False), "train"
  )
  plain = make_preference_iterator(
    _config(pairs_file, packing_on=True), "train"
  )
  shared = make_preference_iterator(
    _config(pairs_file, packing_on=True, share_prompts=True), "train"
  )
  summary, plain_summary = shared.summary["packing"], plain.summary["packing"]
  assert summary["rows_mean"] < plain_summary["rows_mean"], summary
  for _ in range(3):
    a, b, c = next(padded), next(plain), next(shared)
    views = _shared_views(c)
    want = _padded_sequences(a)
    assert sorted(views) == sorted(want)
    for s, (tokens, loss_mask, positions) in views.items():
      np.testing.assert_array_equal(tokens, want[s][0], err_msg=str(s))
      np.testing.assert_array_equal(loss_mask, want[s][1], err_msg=str(s))
      np.testing.assert_array_equal(positions, np.arange(len(tokens)))
    # Each prompt is held once: fewer tokens than the plain packing's.
    assert np.sum(c["packed_segment_ids"] != 0) < np.sum(
      b["packed_segment_ids"] != 0
    )
    np.testing.assert_array_equal(a["weight"], c["weight"])
  with pytest.raises(ValueError, match="input.share_prompts=True"):
    make_preference_iterator(
      _config(pairs_file, packing_on=False, share_prompts=True), "train"
    )
  with pytest.raises(ValueError, match="input.packed_row_length=95 must be"):
    make_preference_iterator(
      _config(pairs_file, packing_on=True, packed_row_length=95), "train"
    )


def test_inspect_reports_the_packing_efficiency(pairs_file):
  config = _config(pairs_file, packing_on=True)
  out = io.StringIO()
  inspect_lib.report(config, num_examples=0, out=out)
  s = make_preference_iterator(config, "train").summary["packing"]
  assert (
    f"real tokens / slots {s['efficiency']:.1%} packed vs"
    f" {s['padded_efficiency']:.1%} padded"
  ) in out.getvalue()


def test_two_processes_assemble_the_global_layout(pairs_file):
  """Each process packs its own pairs; the rows agree, the sequence ids are
  global, and together they hold the one-process batch's pairs."""
  config = _config(pairs_file, packing_on=True)
  whole = make_preference_iterator(config, "train", row_multiple=2)
  parts = [
    make_preference_iterator(
      config, "train", process_index=p, process_count=2, row_multiple=2
    )
    for p in range(2)
  ]
  for _ in range(3):
    single = next(whole)
    local = [next(it) for it in parts]
    assert len(local[0]["packed_input_ids"]) == len(
      local[1]["packed_input_ids"]
    )
    glued = {k: np.concatenate([x[k] for x in local]) for k in local[0]}
    rows = len(glued["packed_input_ids"])
    assert glued["chosen_packed_row"].max() < rows
    got = _packed_sequences(glued)
    want = _packed_sequences(single)
    # Process p holds stream positions p, p + 2, ...: a permutation of pairs.
    b = 8
    stream = np.concatenate([np.arange(p, b, 2) for p in range(2)])
    for side in range(2):
      for i, position in enumerate(stream):
        np.testing.assert_array_equal(
          got[side * b + i][0], want[side * b + position][0]
        )


def test_packed_iterator_state_round_trips(pairs_file):
  config = _config(pairs_file, packing_on=True, num_epochs=None)
  config.input.prefetch_threads = 2
  it = make_preference_iterator(config, "train")
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(4)]
  restored = make_preference_iterator(config, "train")
  restored.set_state(state)
  for batch in want:
    got = next(restored)
    assert sorted(got) == sorted(batch)
    for key in batch:
      np.testing.assert_array_equal(got[key], batch[key], err_msg=key)
  padded = make_preference_iterator(
    _config(pairs_file, packing_on=False, num_epochs=None), "train"
  )
  with pytest.raises(ValueError, match=r"packing=.*input.packing"):
    padded.set_state(state)


def test_packed_batches_join_precomputed_reference_logps(pairs_file, tmp_path):
  """The packed path counts each response's scored tokens as the padded one
  does, so a reference file written from padded batches joins (its counts
  are checked per pair) and the [B] reference fields match."""
  whole = _config(pairs_file, packing_on=False, batch_size=1, return_ids=True)
  rows = []
  for batch in make_preference_iterator(
    whole, "train", shuffle=False, num_epochs=1
  ):
    counts = [
      int(batch[f"{s}_loss_mask"].sum()) for s in ("chosen", "rejected")
    ]
    rows.append(
      {
        "id": str(batch["id"][0]),
        "ref_chosen_logps": -0.5 * counts[0],
        "ref_rejected_logps": -0.25 * counts[1],
        "ref_chosen_tokens": counts[0],
        "ref_rejected_tokens": counts[1],
      }
    )
  path = str(tmp_path / "ref.jsonl")
  reference_logps.write(
    path,
    rows,
    computed_with=reference_logps.settings_of(
      config_lib.parse_input_config(whole)
    ),
  )
  padded = make_preference_iterator(
    _config(pairs_file, packing_on=False, ref_logps_file=path), "train"
  )
  packed = make_preference_iterator(
    _config(pairs_file, packing_on=True, ref_logps_file=path), "train"
  )
  for _ in range(3):
    a, b = next(padded), next(packed)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
      np.testing.assert_array_equal(b[key], a[key])
    np.testing.assert_array_equal(
      b["ref_chosen_logps"],
      -0.5
      * np.bincount(
        b["packed_sequence_ids"][b["packed_loss_mask"] != 0], minlength=16
      )[:8],
    )


def test_packed_rows_is_a_floor_and_needs_packing(pairs_file):
  it = make_preference_iterator(
    _config(pairs_file, packing_on=True, packed_rows=14), "train"
  )
  assert all(len(next(it)["packed_input_ids"]) >= 14 for _ in range(3))
  with pytest.raises(ValueError, match="input.packed_rows=14 is read only"):
    make_preference_iterator(
      _config(pairs_file, packing_on=False, packed_rows=14), "train"
    )


# ----------------------------------- loss and gradients, packed = padded


def _tiny_state(optimizer=None, attention="xla"):
  config = ml_collections.ConfigDict(
    {
      "name": "transformer",
      "preset": "tiny",
      "vocab_size": 259,
      "attention": attention,
    }
  )
  model = models.build_model(config, rngs=nnx.Rngs(0))
  optimizer = optimizer or optax.adam(1e-2)
  graphdef, state = TrainState.create(
    model, optimizer, rng=jax.random.PRNGKey(0)
  )
  # A reference unlike the policy, so that h != 0.
  ref = jax.tree.map(
    lambda x: (
      x + 0.02 * jnp.sin(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape)
    ),
    state.params,
  )
  return graphdef, state.replace(ref_params=ref), optimizer


def _batches(pairs_file, row_multiple=1, batch_size=8, **overrides):
  padded = next(
    make_preference_iterator(
      _config(pairs_file, packing_on=False, batch_size=batch_size), "train"
    )
  )
  packed = next(
    make_preference_iterator(
      _config(pairs_file, packing_on=True, batch_size=batch_size, **overrides),
      "train",
      row_multiple=row_multiple,
    )
  )
  return padded, packed


@pytest.mark.parametrize(
  "share_prompts,attention,row_length",
  [
    (False, "xla", None),
    (True, "xla", None),
    (True, "blocked", 2 * MAX_LENGTH),  # rows longer than a sequence
  ],
)
def test_packed_loss_and_gradients_equal_padded(
  pairs_file, share_prompts, attention, row_length
):
  normalize = "sum"  # "mean": the 8-device test below
  padded, packed = _batches(
    pairs_file, share_prompts=share_prompts, packed_row_length=row_length
  )
  assert len(packed["packed_input_ids"]) < 2 * len(padded["chosen_input_ids"])
  assert packed["packed_input_ids"].shape[1] == (row_length or MAX_LENGTH)
  assert (packing.BRANCH_KEY in packed) == share_prompts
  graphdef, state, _ = _tiny_state(attention=attention)
  objective = psipo_objective(
    graphdef, LossConfig("ipo", tau=0.1, normalize=normalize)
  )

  def loss(params, batch):
    loss_sum, (weight_sum, metrics, empty) = objective.terms(
      params, state.ref_params, batch, None
    )
    return loss_sum / weight_sum, (metrics, empty)

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (loss_padded, (m_padded, _)), g_padded = grad_fn(state.params, padded)
  (loss_packed, (m_packed, empty)), g_packed = grad_fn(state.params, packed)
  assert int(empty) == 0
  assert abs(float(loss_padded)) > 1e-3  # a real loss, not 0 == 0
  # Float32 rounding of sums of ~100 token log-probs of magnitude ~5 (in
  # another order when packed) moves h by ~1e-4; a token attending across
  # segments, or a position not restarting, moves it by O(1).
  scale = (
    1e-6
    * abs(float(m_padded["logps/chosen"]))
    * (1 if normalize == "mean" else 100)
  )
  np.testing.assert_allclose(loss_packed, loss_padded, rtol=1e-4)
  chex.assert_trees_all_close(m_packed, m_padded, rtol=1e-5, atol=scale)
  largest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_padded))
  assert largest > 0
  chex.assert_trees_all_close(
    g_packed, g_padded, rtol=1e-3, atol=1e-4 * largest
  )


def test_packed_step_on_eight_devices_equals_padded(pairs_file):
  """The whole jitted step on the 8-device mesh (rows and pairs split over
  devices): the same update, and the packing efficiency logged."""
  padded, packed = _batches(pairs_file, row_multiple=8, batch_size=16)
  # SGD: the update is the gradient, scaled (Adam's first step would turn
  # float32 rounding of near-zero gradients into differences of its size).
  graphdef, state, optimizer = _tiny_state(optax.sgd(1.0))
  step = make_train_step(
    graphdef, LossConfig("dpo", tau=0.5, normalize="mean"), optimizer
  )
  mesh = sharding.make_mesh()
  state_sharding = sharding.state_shardings(mesh, state)
  jitted = sharding.jit_train_step(step, mesh, state_sharding)
  results = []
  for batch in (padded, packed):
    start = jax.device_put(jax.tree.map(jnp.copy, state), state_sharding)
    results.append(
      jax.device_get(jitted(start, sharding.global_batch(mesh, batch)))
    )
  (state_padded, m_padded), (state_packed, m_packed) = results
  moved = jax.tree.map(
    lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
    state_padded.params,
    jax.device_get(state.params),
  )
  largest = max(jax.tree.leaves(moved))
  assert largest > 0
  chex.assert_trees_all_close(
    state_packed.params, state_padded.params, rtol=1e-5, atol=1e-4 * largest
  )
  for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
    np.testing.assert_allclose(
      m_packed[key], m_padded[key], rtol=1e-4, err_msg=key
    )
  real = np.sum(packed["packed_segment_ids"] != 0)
  np.testing.assert_allclose(
    m_packed["packing_efficiency"],
    real / packed["packed_segment_ids"].size,
    rtol=1e-6,
  )
  assert m_packed["packing_efficiency"] > m_padded["packing_efficiency"]


# ------------------------------------------------------------ the trainer


def test_packing_refuses_micro_batches_and_sft(tmp_path):
  from train_lm_test import _tiny_lm_config  # tests/ is on the path

  config = _tiny_lm_config(tmp_path)
  config.input.packing = True
  config.micro_batches = 2
  with pytest.raises(
    ValueError, match="input.packing=True with micro_batches=2"
  ):
    train.validate_config(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_kill_9_and_resume_of_a_packed_run_equals_the_uninterrupted_run(
  tmp_path,
):
  """As train_lm_test's kill -9 test, with input.packing=True: SIGKILL after
  the step-4 checkpoint, rerun, bit-identical parameters; the packing
  efficiency is logged."""
  whole = train_worker.check_lm_kill_9_resume(tmp_path, "--packed")
  lines = [
    json.loads(line)
    for line in (whole / "metrics.jsonl").read_text().splitlines()
  ]
  train_lines = [line for line in lines if line["split"] == "train"]
  assert train_lines and all(
    0 < line["packing_efficiency"] <= 1 for line in train_lines
  )


@pytest.mark.slow
def test_two_processes_of_a_packed_run_equal_one_process(tmp_path):
  """2 processes x 4 devices, each packing its own pairs into its own rows
  (global sequence ids and row indices), train as 1 process x 8 devices:
  the same pairs per step, permuted, so the same parameters up to float32
  rounding (a pair scored against another's tokens would move them by the
  learning rate)."""
  worker = pathlib.Path(__file__).with_name("train_worker.py")
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([str(worker.parents[1]), str(worker.parent)]),
  )
  text_task.cached_files(
    num_train=64, num_test=20, cache_dir=str(tmp_path / "cache")
  )

  def start(workdir, out, *extra):
    return subprocess.Popen(
      [sys.executable, str(worker), str(workdir), "4", "--lm", "--packed"]
      + [f"--out={out}", *extra],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  one = start(tmp_path / "one", tmp_path / "one.npz")
  output = one.communicate(timeout=900)[0]
  assert one.returncode == 0, output[-3000:]
  two = [
    start(
      tmp_path / "two",
      tmp_path / "two.npz",
      "--num_processes=2",
      f"--process_id={i}",
      f"--port={port}",
    )
    for i in range(2)
  ]
  for p in two:
    output = p.communicate(timeout=900)[0]
    assert p.returncode == 0, output[-3000:]
  want, got = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert len(want.files) == len(got.files) > 0
  for name in want.files:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=2e-5)
