"""Files in each layout -> TFDS builder -> Grain pipeline -> batches.

Round trips (decoded tokens equal the original text, masks cover exactly the
response), determinism, exact resume, multi-process sharding, epochs, splits,
reference log-prob joins.
"""

import json
import os

import numpy as np
import pytest

from psipo_jax.data import DataError
from psipo_jax.data import config as config_lib
from psipo_jax.data import reference_logps
from psipo_jax.data import make_preference_iterator
from psipo_jax.data import tokenizers
from psipo_jax.data.testing import experiment_config
from psipo_jax.data.testing import synthetic_pairs
from psipo_jax.data.testing import write_jsonl

TOK = tokenizers.ByteTokenizer()
HH = "\n\nAssistant:"


def config(tmp_path, files, **kw):
  options = dict(
    data_dir=tmp_path / "tfds",
    files=files,
    batch_size=4,
    max_length=160,
    max_prompt_length=64,
  )
  options.update(kw)
  return experiment_config(**options)


def collect(iterator):
  """All batches, and the rows of all batches keyed by id."""
  batches = list(iterator)
  rows = {}
  for batch in batches:
    for i, example_id in enumerate(batch["id"]):
      rows[str(example_id)] = {k: v[i] for k, v in batch.items()}
  return batches, rows


def assert_row_is(row, side, prompt, response):
  """The row holds BOS + prompt + response + EOS + padding, mask on the response."""
  ids, mask, attention = (
    row[f"{side}_input_ids"],
    row[f"{side}_loss_mask"],
    row[f"{side}_attention_mask"],
  )
  p = 1 + len(prompt.encode("utf-8"))
  r = len(response.encode("utf-8")) + 1
  assert ids[0] == TOK.bos_id
  assert TOK.decode(ids[:p]) == prompt
  assert TOK.decode(ids[p : p + r]) == response and ids[p + r - 1] == TOK.eos_id
  np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(p, p + r))
  np.testing.assert_array_equal(np.flatnonzero(attention), np.arange(p + r))
  assert (ids[p + r :] == TOK.pad_id).all()


# ------------------------------------------------------------ round trips


def test_round_trip_prompt_response_jsonl_with_weights(tmp_path):
  records = synthetic_pairs(8)
  records[0]["prompt"] = "Ünïcödé ∑ 🙂 prompt?"
  for i, r in enumerate(records):
    r["weight"], r["margin"] = 0.5 * i, -float(i)
  files = write_jsonl(tmp_path / "pairs.jsonl", records)
  it = make_preference_iterator(
    config(tmp_path, files, return_ids=True), "train", num_epochs=1
  )
  batches, rows = collect(it)
  assert len(batches) == 2 and it.num_batches == 2
  assert set(batches[0]) == {
    "chosen_input_ids",
    "chosen_loss_mask",
    "chosen_attention_mask",
    "rejected_input_ids",
    "rejected_loss_mask",
    "rejected_attention_mask",
    "weight",
    "margin",
    "id",
  }
  assert batches[0]["chosen_input_ids"].shape == (4, 160)
  assert batches[0]["chosen_input_ids"].dtype == np.int32
  assert batches[0]["weight"].dtype == np.float32 and batches[0][
    "weight"
  ].shape == (4,)
  assert sorted(rows) == sorted(r["id"] for r in records)
  for r in records:
    row = rows[r["id"]]
    assert_row_is(row, "chosen", r["prompt"], r["chosen"])
    assert_row_is(row, "rejected", r["prompt"], r["rejected"])
    assert (row["weight"], row["margin"]) == (r["weight"], r["margin"])


def test_round_trip_hh_json_file(tmp_path):
  history = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tea or coffee?" + HH
  conversations = [
    (
      history + " Tea.",
      history + " Tea, and coffee too.",
    ),  # a response is a prefix of the other
    ("\n\nHuman: 2+2?" + HH + " 4", "\n\nHuman: 2+2?" + HH + " 5"),
    (
      "\n\nHuman: Hi" + HH + " Hello!\n\nHuman: Bye" + HH + " Bye!",
      "\n\nHuman: Hi" + HH + " Go away." + "\n\nHuman: Bye" + HH + " Fine.",
    ),  # differ mid-way
    (
      "\n\nHuman: Sky?" + HH + " Blue.",
      "\n\nHuman: Sky?" + HH + " Blue whales.",
    ),
  ]
  path = tmp_path / "hh.json"
  path.write_text(
    json.dumps([{"chosen": c, "rejected": r} for c, r in conversations])
  )
  it = make_preference_iterator(
    config(tmp_path, str(path), return_ids=True), "train", num_epochs=1
  )
  _, rows = collect(it)
  expected_prompts = [
    history,
    "\n\nHuman: 2+2?" + HH,
    "\n\nHuman: Hi" + HH,
    "\n\nHuman: Sky?" + HH,
  ]
  for index, ((chosen, rejected), prompt) in enumerate(
    zip(conversations, expected_prompts)
  ):
    row = rows[f"hh.json:{index}"]  # default ids: file name and record index
    assert_row_is(row, "chosen", prompt, chosen[len(prompt) :])
    assert_row_is(row, "rejected", prompt, rejected[len(prompt) :])


def test_round_trip_chat_parquet_and_shared_prefix_chat_jsonl(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  m = lambda role, content: {"role": role, "content": content}
  explicit = [
    {
      "prompt": [m("system", "Be brief."), m("user", f"{i}+{i}?")],
      "chosen": [m("assistant", str(2 * i))],
      "rejected": [m("assistant", str(2 * i + 1))],
    }
    for i in range(4)
  ]
  pq.write_table(pa.Table.from_pylist(explicit), tmp_path / "chat.parquet")
  history = [m("user", "Hi"), m("assistant", "Hello"), m("user", "Colour?")]
  implicit = [
    {
      "chosen": history + [m("assistant", "Blue")],
      "rejected": history + [m("assistant", "Bl")],
    },
    {
      "chosen": history + [m("assistant", "Red")],
      "rejected": history
      + [m("assistant", "Red?"), m("user", "Yes"), m("assistant", "OK")],
    },
  ] * 2
  write_jsonl(tmp_path / "chat.jsonl", implicit)

  template = "<|{role}|>\n{content}<|end|>\n"
  render = lambda msgs: "".join(
    f"<|{x['role']}|>\n{x['content']}<|end|>\n" for x in msgs
  )
  for name, records in (
    ("chat.parquet", explicit),
    ("chat.jsonl", implicit[:2]),
  ):
    cfg = config(
      tmp_path, str(tmp_path / name), chat_template=template, return_ids=True
    )
    _, rows = collect(make_preference_iterator(cfg, "train", num_epochs=1))
    for index, record in enumerate(records):
      row = rows[f"{name}:{index if name.endswith('parquet') else index + 1}"]
      prompt_messages = record.get("prompt", history)
      prompt = render(prompt_messages) + "<|assistant|>\n"
      for side in ("chosen", "rejected"):
        full = (
          render(prompt_messages + record[side])
          if "prompt" in record
          else render(record[side])
        )
        assert full.startswith(prompt)
        assert_row_is(row, side, prompt, full[len(prompt) :])


def test_other_tokenizers_keep_masks_on_the_response(tmp_path):
  tk = pytest.importorskip("tokenizers")
  tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  records = synthetic_pairs(8)
  tok.train_from_iterator(
    [r[k] for r in records for k in ("prompt", "chosen", "rejected")],
    tk.trainers.BpeTrainer(
      vocab_size=200,
      special_tokens=["<pad>", "<s>", "</s>"],
      initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
    ),
  )
  tok.save(str(tmp_path / "tokenizer.json"))
  cfg = config(
    tmp_path,
    write_jsonl(tmp_path / "p.jsonl", records),
    tokenizer=f"hf:{tmp_path}/tokenizer.json",
    bos_token="<s>",
    eos_token="</s>",
    pad_token="<pad>",
    return_ids=True,
  )
  _, rows = collect(make_preference_iterator(cfg, "train", num_epochs=1))
  hf = tokenizers.make_tokenizer(
    f"hf:{tmp_path}/tokenizer.json",
    bos_token="<s>",
    eos_token="</s>",
    pad_token="<pad>",
  )
  for r in records:
    for side in ("chosen", "rejected"):
      ids, mask = (
        rows[r["id"]][f"{side}_input_ids"],
        rows[r["id"]][f"{side}_loss_mask"],
      )
      np.testing.assert_array_equal(
        ids[mask == 1], np.r_[hf.encode(r[side]), hf.eos_id]
      )
      start = np.argmax(mask)
      np.testing.assert_array_equal(
        ids[:start], np.r_[hf.bos_id, hf.encode(r["prompt"])]
      )


# ------------------------------------------- determinism, resume, sharding


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
  directory = tmp_path_factory.mktemp("pairs")
  return directory, write_jsonl(directory / "pairs.jsonl", synthetic_pairs(24))


def stream(directory, files, **kw):
  options = dict(return_ids=True, num_epochs=2, batch_size=8)
  options.update(kw)
  process = {
    k: options.pop(k)
    for k in ("process_index", "process_count")
    if k in options
  }
  return make_preference_iterator(
    config(directory, files, **options), "train", **process
  )


def ids_of(batches):
  return [list(map(str, b["id"])) for b in batches]


def test_same_seed_same_batches_and_each_epoch_a_new_permutation(pairs_file):
  a, b = list(stream(*pairs_file, seed=3)), list(stream(*pairs_file, seed=3))
  assert len(a) == 6  # 24 examples x 2 epochs / 8
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  epoch0, epoch1 = sum(ids_of(a[:3]), []), sum(ids_of(a[3:]), [])
  assert (
    sorted(epoch0) == sorted(epoch1) == sorted(f"pair-{i}" for i in range(24))
  )
  assert epoch0 != epoch1
  assert ids_of(stream(*pairs_file, seed=4)) != ids_of(a)
  unshuffled = sum(ids_of(stream(*pairs_file, shuffle=False, num_epochs=1)), [])
  assert unshuffled == [f"pair-{i}" for i in range(24)]


@pytest.mark.parametrize("prefetch_threads", [0, 2])
def test_restored_state_continues_with_exactly_the_next_batch(
  pairs_file, prefetch_threads
):
  reference = ids_of(stream(*pairs_file, seed=1))
  it = stream(*pairs_file, seed=1, prefetch_threads=prefetch_threads)
  for _ in range(2):  # stop mid-epoch (3 batches per epoch)
    next(it)
  saved = json.loads(
    json.dumps(it.get_state())
  )  # as a checkpoint would store it
  next(it)
  resumed = stream(*pairs_file, seed=1, prefetch_threads=prefetch_threads)
  resumed.set_state(saved)
  assert (
    ids_of(resumed) == reference[2:]
  )  # across the epoch boundary to the end
  it.set_state(saved)  # the same iterator can also jump back
  assert ids_of([next(it)]) == reference[2:3]


def test_state_round_trips_through_an_orbax_checkpoint(pairs_file, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  reference = ids_of(stream(*pairs_file, seed=2))
  it = stream(*pairs_file, seed=2)
  next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(
      1, args=ocp.args.Composite(data=ocp.args.JsonSave(it.get_state()))
    )
    manager.wait_until_finished()
    restored = manager.restore(
      1, args=ocp.args.Composite(data=ocp.args.JsonRestore())
    )
  resumed = stream(*pairs_file, seed=2)
  resumed.set_state(restored["data"])
  assert ids_of(resumed) == reference[1:]


def test_state_survives_a_copy_of_the_data_but_not_an_edit(tmp_path):
  path = tmp_path / "p.jsonl"
  records = synthetic_pairs(16)
  write_jsonl(path, records)
  it = stream(tmp_path, str(path))
  next(it)
  state = it.get_state()
  write_jsonl(path, records)  # same content, new modification time: rebuilt
  os.utime(path, ns=(1, 1))
  resumed = stream(tmp_path, str(path))
  assert (
    len(os.listdir(tmp_path / "tfds" / "preference_pairs")) == 2
  )  # a second build
  resumed.set_state(state)
  assert ids_of([next(resumed)]) == ids_of([next(it)])
  records[3]["chosen"] += " (edited)"
  write_jsonl(path, records)
  with pytest.raises(
    ValueError,
    match=r"it has examples='\w+' but this pipeline has '\w+' \(the split's content",
  ):
    stream(tmp_path, str(path)).set_state(state)


def test_restore_jumps_back_across_epochs(pairs_file):
  reference = ids_of(
    [b for b, _ in zip(stream(*pairs_file, seed=1, num_epochs=None), range(4))]
  )
  it = stream(*pairs_file, seed=1, num_epochs=None)
  next(it)
  early = it.get_state()
  for _ in range(12):  # 3 batches per epoch: into the fifth epoch
    next(it)
  it.set_state(early)
  assert ids_of([next(it) for _ in range(3)]) == reference[1:4]


def test_state_from_another_stream_is_refused(pairs_file):
  state = stream(*pairs_file, seed=1).get_state()
  with pytest.raises(
    ValueError, match=r"seed=1 but this pipeline has 2 \(input.seed\)"
  ):
    stream(*pairs_file, seed=2).set_state(state)
  with pytest.raises(ValueError, match=r"input.batch_size"):
    stream(*pairs_file, seed=1, batch_size=4).set_state(state)


def test_two_processes_get_disjoint_halves_of_every_global_batch(pairs_file):
  whole = ids_of(stream(*pairs_file, seed=5))
  halves = [
    ids_of(stream(*pairs_file, seed=5, process_index=p, process_count=2))
    for p in (0, 1)
  ]
  assert len(halves[0]) == len(halves[1]) == len(whole)
  for step, global_ids in enumerate(whole):
    first, second = halves[0][step], halves[1][step]
    assert len(first) == len(second) == 4
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(global_ids)
    # As documented: process p takes every P-th row, not a contiguous block.
    assert first == global_ids[0::2] and second == global_ids[1::2]


def test_each_of_four_processes_takes_every_fourth_row(pairs_file):
  whole = ids_of(stream(*pairs_file, seed=5))
  for p in range(4):
    part = ids_of(stream(*pairs_file, seed=5, process_index=p, process_count=4))
    assert part == [global_ids[p::4] for global_ids in whole]


def test_resume_with_another_process_count_continues_the_global_stream(
  pairs_file,
):
  whole = ids_of(stream(*pairs_file, seed=5))
  it = stream(*pairs_file, seed=5, process_index=1, process_count=2)
  next(it), next(it)
  single = stream(*pairs_file, seed=5)
  single.set_state(it.get_state())
  assert ids_of(single) == whole[2:]


def test_batch_size_must_divide_among_processes(pairs_file):
  with pytest.raises(
    ValueError, match="input.batch_size=8 is not divisible by the 3 processes"
  ):
    stream(*pairs_file, process_index=0, process_count=3)


def test_infinite_repeat_and_remainder_dropped(pairs_file):
  it = stream(*pairs_file, batch_size=5, num_epochs=None)
  assert it.num_batches is None
  seen = sum(
    ids_of([next(it) for _ in range(10)]), []
  )  # 50 examples: > 2 epochs
  assert all(seen.count(f"pair-{i}") >= 2 for i in range(24))
  assert (
    len(list(stream(*pairs_file, batch_size=5, num_epochs=1))) == 4
  )  # 24 // 5


# -------------------------------------------------------------- splits


def test_splits_by_file_and_unknown_split(tmp_path):
  train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(8))
  test = write_jsonl(tmp_path / "test.jsonl", synthetic_pairs(4, seed=1))
  cfg = config(tmp_path, {"train": train, "test": test}, return_ids=True)
  assert (
    len(sum(ids_of(make_preference_iterator(cfg, "test", num_epochs=1)), []))
    == 4
  )
  with pytest.raises(
    ValueError, match=r"split 'validation' is not in .* \['test', 'train'\]"
  ):
    make_preference_iterator(cfg, "validation")


def test_splits_carved_by_percentage(tmp_path):
  files = write_jsonl(tmp_path / "all.jsonl", synthetic_pairs(20))
  cfg = config(
    tmp_path,
    files,
    split_percent={"train": 75, "test": 25},
    batch_size=1,
    return_ids=True,
    shuffle=False,
  )
  train_iterator = make_preference_iterator(cfg, "train", num_epochs=1)
  prepared = train_iterator.summary["prepare"]
  assert prepared["splits"] == {"test": 5, "train": 15}
  assert (
    list(prepared["sources"]) == ["all"]
    and prepared["sources"]["all"]["kept"] == 20
  )
  train = sum(ids_of(train_iterator), [])
  test = sum(ids_of(make_preference_iterator(cfg, "test", num_epochs=1)), [])
  assert (len(train), len(test)) == (15, 5)
  assert sorted(train + test) == sorted(f"pair-{i}" for i in range(20))
  assert test != [
    f"pair-{i}" for i in range(15, 20)
  ]  # a permutation, not the file's tail
  cfg.input.split_seed = 1
  other = sum(ids_of(make_preference_iterator(cfg, "test", num_epochs=1)), [])
  assert len(other) == 5 and other != test


# ------------------------------------------------- reference log-probs


def _token_counts(tmp_path, files):
  """{id: (chosen, rejected) scored tokens} of the run's own data."""
  _, rows = collect(
    make_preference_iterator(
      config(tmp_path, files, return_ids=True), "train", num_epochs=1
    )
  )
  return {
    i: (int(r["chosen_loss_mask"].sum()), int(r["rejected_loss_mask"].sum()))
    for i, r in rows.items()
  }


def _reference_file(tmp_path, files, values, **settings_changes):
  """A reference file in the one format (summed log-probs and token counts)."""
  counts = _token_counts(tmp_path, files)
  settings = reference_logps.settings_of(
    config_lib.parse_input_config(config(tmp_path, files))
  )
  settings.update(settings_changes)
  path = str(tmp_path / "ref.jsonl")
  reference_logps.write(
    path,
    [
      {
        "id": i,
        "ref_chosen_logps": c,
        "ref_rejected_logps": r,
        "ref_chosen_tokens": counts.get(i, (1, 1))[0],
        "ref_rejected_tokens": counts.get(i, (1, 1))[1],
      }
      for i, (c, r) in values.items()
    ],
    computed_with=settings,
  )
  return path


def test_reference_logps_are_joined_by_id(tmp_path):
  records = synthetic_pairs(8)
  files = write_jsonl(tmp_path / "p.jsonl", records)
  values = {r["id"]: (-1.0 - i, -100.0 - i) for i, r in enumerate(records)}
  values["other-split"] = (-1.0, -2.0)
  ref = _reference_file(tmp_path, files, values)
  _, rows = collect(
    make_preference_iterator(
      config(tmp_path, files, ref_logps_file=ref, return_ids=True),
      "train",
      num_epochs=1,
    )
  )
  for i, r in enumerate(records):
    assert rows[r["id"]]["ref_chosen_logps"] == np.float32(-1.0 - i)
    assert rows[r["id"]]["ref_rejected_logps"] == np.float32(-100.0 - i)


_HEADER = {"psipo_reference_logps": 1, "logps": "sum", "computed_with": {}}


@pytest.mark.parametrize(
  "lines, message",
  [
    (
      [
        {
          "id": "pair-0",
          "ref_chosen_logps": float("nan"),
          "ref_rejected_logps": -2,
          "ref_chosen_tokens": 3,
          "ref_rejected_tokens": 3,
        }
      ],
      r"ref.jsonl, line 2: ref_chosen_logps=nan for id 'pair-0' is not a finite log-probability",
    ),
    (
      [
        {
          "id": "pair-0",
          "ref_chosen_logps": -1,
          "ref_rejected_logps": 0.5,
          "ref_chosen_tokens": 3,
          "ref_rejected_tokens": 3,
        }
      ],
      r"line 2: ref_rejected_logps=0.5 .* \(<= 0\)",
    ),
    (
      [{"id": "pair-0", "ref_chosen_logps": -1, "ref_rejected_logps": -2}],
      r"line 2: ref_chosen_tokens=None for id 'pair-0' must be a positive integer",
    ),
    (
      [
        {
          "id": "x",
          "ref_chosen_logps": -1,
          "ref_rejected_logps": -1,
          "ref_chosen_tokens": 1,
          "ref_rejected_tokens": 1,
        }
      ]
      * 2,
      r"ref.jsonl, line 3: id 'x' already appears at line 2",
    ),
  ],
)
def test_bad_reference_logps(tmp_path, lines, message):
  files = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(4))
  ref = tmp_path / "ref.jsonl"
  ref.write_text(
    "\n".join(json.dumps(x) for x in [_HEADER, *lines]) + "\n"
  )  # NaN as NaN
  with pytest.raises(DataError, match=message):
    make_preference_iterator(
      config(tmp_path, files, ref_logps_file=str(ref)), "train"
    )


def test_reference_file_missing_ids_is_refused(tmp_path):
  files = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(4))
  ref = _reference_file(tmp_path, files, {"pair-0": (-1.0, -2.0)})
  with pytest.raises(
    DataError,
    match=r"ref.jsonl has no reference log-probs for 3 example\(s\)"
    r" of split 'train', the first being id 'pair-1'",
  ):
    make_preference_iterator(
      config(tmp_path, files, ref_logps_file=ref), "train"
    )


def test_reference_file_of_one_convention_only(tmp_path):
  """Issue 14, bug 6: an averaged file used to be read as summed and then
  divided by the token count again (h = 0.4957 instead of 0). One convention
  now: summed log-probs with their token counts, recorded in the header; a
  file that says otherwise, or says nothing, is refused."""
  files = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(4))
  row = {
    "id": "pair-0",
    "ref_chosen_logps": -1.0,
    "ref_rejected_logps": -2.0,
    "ref_chosen_tokens": 3,
    "ref_rejected_tokens": 3,
  }
  ref = tmp_path / "ref.jsonl"
  for header, message in [
    (
      None,
      r"ref.jsonl, line 1: a reference log-prob file starts with its header",
    ),
    (
      {**_HEADER, "logps": "mean"},
      r"line 1: the header says the log-probs are 'mean'; they must be summed",
    ),
  ]:
    lines = [row] if header is None else [header, row]
    ref.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(DataError, match=message):
      make_preference_iterator(
        config(tmp_path, files, ref_logps_file=str(ref)), "train"
      )


def test_reference_file_of_other_token_settings_is_refused(tmp_path):
  records = synthetic_pairs(4)
  files = write_jsonl(tmp_path / "p.jsonl", records)
  values = {r["id"]: (-1.0, -2.0) for r in records}
  ref = _reference_file(tmp_path, files, values, max_length=999)
  with pytest.raises(
    DataError,
    match=r"computed with other token settings than this run's"
    r" \(input.max_length: file 999, run",
  ):
    make_preference_iterator(
      config(tmp_path, files, ref_logps_file=ref), "train"
    )
  # The same settings but other token counts (another truncation or data).
  ref = _reference_file(tmp_path, files, values)
  text = (
    open(ref).read().replace('"ref_chosen_tokens": ', '"ref_chosen_tokens": 1')
  )
  open(ref, "w").write(text)
  with pytest.raises(
    DataError, match=r"id 'pair-\d' was scored on \(1\d+, \d+\)"
  ):
    list(
      make_preference_iterator(
        config(tmp_path, files, ref_logps_file=ref), "train", num_epochs=1
      )
    )


def test_prepared_dataset_is_reused_and_rebuilt_when_a_file_changes(tmp_path):
  path = tmp_path / "p.jsonl"
  write_jsonl(path, synthetic_pairs(8))
  cfg = config(tmp_path, str(path), return_ids=True)
  first = make_preference_iterator(cfg, "train", num_epochs=1).summary[
    "prepare"
  ]["config"]
  assert (
    make_preference_iterator(cfg, "train", num_epochs=1).summary["prepare"][
      "config"
    ]
    == first
  )
  write_jsonl(path, synthetic_pairs(12))
  it = make_preference_iterator(cfg, "train", num_epochs=1)
  assert it.summary["prepare"]["config"] != first
  assert len(sum(ids_of(it), [])) == 12
  assert len(os.listdir(tmp_path / "tfds" / "preference_pairs")) == 2
