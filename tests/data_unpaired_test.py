"""Tests for psipo_jax.data.unpaired: records, errors, mismatched rows."""

import json

import numpy as np
import pytest

from psipo_jax.data import readers
from psipo_jax.data import unpaired


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _section(**overrides):
  section = unpaired.get_input_config()
  section.max_length = 32
  section.max_prompt_length = 16
  for k, v in overrides.items():
    section[k] = v
  return section


def _iterator(examples, encoder, *, seed=1, process_index=0, process_count=1):
  """A shuffled, repeating train iterator of 4-example global batches."""
  return unpaired.UnpairedIterator(
    examples,
    encoder,
    batch_size=4,
    seed=seed,
    shuffle=True,
    num_epochs=None,
    process_index=process_index,
    process_count=process_count,
    split="train",
  )


GOOD = {"prompt": "p0 =", "completion": " a", "label": True}


@pytest.mark.parametrize(
  "bad,reason",
  [
    ({"prompt": "p", "completion": " a"}, "'label' is missing"),
    (
      {"prompt": "p", "completion": " a", "label": 1},
      "'label' must be true or false, got 1",
    ),
    (
      {"prompt": "p", "completion": " a", "label": "true"},
      "'label' must be true or false",
    ),
    (
      {"prompt": "p", "completion": " a", "label": None},
      "'label' must be true or false",
    ),
    ({"prompt": "p", "label": False}, "'completion' is missing"),
    (
      {"prompt": "p", "completion": "  ", "label": False},
      "'completion' is empty",
    ),
    (
      {"prompt": 3, "completion": " a", "label": False},
      "'prompt' must be a string",
    ),
    (
      {"prompt": "p", "completion": " a", "label": True, "weight": -1},
      "'weight'",
    ),
  ],
)
def test_bad_record_is_named_by_file_line_and_field(tmp_path, bad, reason):
  path = _write(tmp_path / "feedback.jsonl", [GOOD, bad])
  with pytest.raises(readers.DataError) as info:
    unpaired.read_examples([path])
  message = str(info.value)
  assert f"{path}, line 2" in message and reason in message, message


def test_pairs_become_two_examples_and_ids_are_unique(tmp_path):
  path = _write(
    tmp_path / "mixed.jsonl",
    [
      {
        "prompt": "sort: ba =",
        "chosen": " ab",
        "rejected": " ba",
        "weight": 2.0,
      },
      {"prompt": "q =", "completion": " x", "label": False, "id": "u1"},
    ],
  )
  examples = unpaired.read_examples([path])
  assert [
    (e.prompt, e.completion, e.desirable, e.weight) for e in examples
  ] == [
    ("sort: ba =", " ab", True, 2.0),
    ("sort: ba =", " ba", False, 2.0),
    ("q =", " x", False, 1.0),
  ]
  assert [e.id for e in examples] == [
    "mixed.jsonl:1/chosen",
    "mixed.jsonl:1/rejected",
    "u1",
  ]
  dup = _write(
    tmp_path / "dup.jsonl", [{**GOOD, "id": "a"}, {**GOOD, "id": "a"}]
  )
  with pytest.raises(readers.DataError, match="line 2: field 'id'"):
    unpaired.read_examples([dup])


EOS = 2  # The byte tokenizer: PAD 0, BOS 1, EOS 2, byte b is b + 3.


def _decode(ids, mask):
  """The response text of one row (its loss-mask tokens, EOS dropped)."""
  return bytes(int(t) - 3 for t, m in zip(ids, mask) if m and t != EOS).decode()


def _records(n):
  return [
    {"prompt": f"p{i} =", "completion": f" c{i}", "label": i % 3 == 0}
    for i in range(n)
  ]


def test_batches_hold_the_mismatched_pairs_of_row_i_and_row_i_minus_1(tmp_path):
  section = _section()
  examples = unpaired.read_examples(
    [_write(tmp_path / "t.jsonl", _records(10))]
  )
  encoder = unpaired.make_encoder(section)
  batch = next(_iterator(examples, encoder))
  completions = [
    _decode(i, m)
    for i, m in zip(
      batch["completion_input_ids"], batch["completion_loss_mask"]
    )
  ]
  kl = [
    _decode(i, m) for i, m in zip(batch["kl_input_ids"], batch["kl_loss_mask"])
  ]
  assert kl == [completions[-1]] + completions[:-1]
  # Each row's prompt is the same in both sides: only the response moved.
  prompt_of = lambda ids, mask: ids[: int(np.argmax(mask))].tolist()
  for row in range(4):
    assert prompt_of(
      batch["completion_input_ids"][row], batch["completion_loss_mask"][row]
    ) == prompt_of(batch["kl_input_ids"][row], batch["kl_loss_mask"][row])
  by_completion = {e.completion: e.desirable for e in examples}
  labels = [by_completion[c] for c in completions]
  np.testing.assert_array_equal(batch["label"], np.asarray(labels, np.int32))


def test_mismatched_pairs_do_not_depend_on_the_process_count(tmp_path):
  # The rows of the processes together hold the same (completion, mismatched
  # completion) pairs as one process's batch, and so give KTO the same z₀.
  examples = unpaired.read_examples(
    [_write(tmp_path / "t.jsonl", _records(10))]
  )
  encoder = unpaired.make_encoder(_section())

  def rows(process_index, process_count, num_batches=3):
    it = _iterator(
      examples,
      encoder,
      process_index=process_index,
      process_count=process_count,
    )
    out = []
    for _ in range(num_batches):
      batch = next(it)
      out.append(
        {
          (
            _decode(c, cm),
            _decode(k, km),
          )
          for c, cm, k, km in zip(
            batch["completion_input_ids"],
            batch["completion_loss_mask"],
            batch["kl_input_ids"],
            batch["kl_loss_mask"],
          )
        }
      )
    return out

  one = rows(0, 1)
  two = [a | b for a, b in zip(rows(0, 2), rows(1, 2))]
  assert one == two
  assert all(len(batch) == 4 for batch in one)


def test_state_round_trip_and_identity_check(tmp_path):
  section = _section()
  examples = unpaired.read_examples([_write(tmp_path / "t.jsonl", _records(9))])
  encoder = unpaired.make_encoder(section)
  make = lambda seed: _iterator(examples, encoder, seed=seed)
  first = make(0)
  for _ in range(3):
    next(first)
  state = first.get_state()
  want = next(first)
  resumed = make(0)
  resumed.set_state(state)
  got = next(resumed)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])
  with pytest.raises(ValueError, match="seed"):
    make(1).set_state(state)


def test_eval_batches_cover_every_example_once_filler_at_weight_zero(tmp_path):
  examples = unpaired.read_examples([_write(tmp_path / "t.jsonl", _records(7))])
  encoder = unpaired.make_encoder(_section())
  batches = unpaired.eval_batches(examples, encoder, 4)
  assert len(batches) == 2
  np.testing.assert_array_equal(batches[1]["weight"], [1, 1, 1, 0])
  assert sum(float(b["weight"].sum()) for b in batches) == 7
  # The last batch's mismatched rows shift over its 3 real rows only.
  last = batches[1]
  completions = [
    _decode(i, m)
    for i, m in zip(last["completion_input_ids"], last["completion_loss_mask"])
  ]
  kl = [
    _decode(i, m) for i, m in zip(last["kl_input_ids"], last["kl_loss_mask"])
  ]
  assert completions[:3] == [" c4", " c5", " c6"]
  assert kl[:3] == [" c6", " c4", " c5"]


def test_config_errors_name_the_key(tmp_path):
  path = _write(tmp_path / "t.jsonl", _records(3))
  with pytest.raises(ValueError, match="input.files"):
    unpaired.validate(_section())
  with pytest.raises(ValueError, match="input.layout"):
    unpaired.validate(_section(files={"train": path}, layout="chat"))
  with pytest.raises(ValueError, match="'train'"):
    unpaired.validate(_section(files={"test": path}))
  unpaired.validate(_section(files={"train": path}))
