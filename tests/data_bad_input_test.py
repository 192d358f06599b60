"""Every kind of bad input, each with its exact outcome."""

import json
import logging
import os

import pytest

from psipo_jax.data import DataError
from psipo_jax.data import make_preference_iterator
from psipo_jax.data.testing import experiment_config
from psipo_jax.data.preference_pairs import PreferencePairs
from psipo_jax.data.testing import write_jsonl

VERSION = str(PreferencePairs.VERSION)


def pair(i, **kw):
  record = {
    "id": f"p{i}",
    "prompt": f"Question {i}?",
    "chosen": f" yes {i}",
    "rejected": f" no {i}",
  }
  record.update(kw)
  return record


def build(tmp_path, files, split="train", **kw):
  options = dict(
    data_dir=tmp_path / "tfds",
    files=files,
    batch_size=2,
    max_length=64,
    max_prompt_length=32,
    return_ids=True,
    shuffle=False,
  )
  options.update(kw)
  return make_preference_iterator(
    experiment_config(**options), split, num_epochs=1
  )


def write_lines(path, lines):
  path.write_bytes(b"".join(line + b"\n" for line in lines))
  return str(path)


def ids(iterator):
  return [str(i) for batch in iterator for i in batch["id"]]


def test_malformed_json_line_names_file_and_line(tmp_path):
  path = write_lines(
    tmp_path / "bad.jsonl",
    [json.dumps(pair(0)).encode(), b"", b'{"prompt": "x",'],
  )
  with pytest.raises(
    DataError,
    match=r"bad.jsonl, line 3: malformed JSON: Expecting .* at column 16 \(set input.skip_invalid=True",
  ):
    build(tmp_path, path)


def test_skip_invalid_skips_counts_logs_and_writes_the_summary(
  tmp_path, caplog
):
  lines = [json.dumps(pair(i)).encode() for i in range(6)]
  lines[1] = b'{"prompt": "x",'
  lines[3] = json.dumps({"prompt": "Q", "rejected": "r"}).encode()
  lines[4] = json.dumps(pair(4, chosen="   ")).encode()
  path = write_lines(tmp_path / "mixed.jsonl", lines)
  with caplog.at_level(logging.INFO):
    it = build(tmp_path, path, skip_invalid=True, batch_size=1)
  assert ids(it) == ["p0", "p2", "p5"]
  source = it.summary["prepare"]["sources"]["train"]
  assert (
    source["records"] == 6 and source["kept"] == 3 and source["invalid"] == 3
  )
  assert source["invalid_by_kind"] == {
    "empty_response": 1,
    "malformed_json": 1,
    "missing_field": 1,
  }
  assert source["first_invalid"][0].endswith(
    "mixed.jsonl, line 2: malformed JSON: Expecting"
    " property name enclosed in double quotes at column 16"
  )
  assert "line 4: missing field 'chosen'" in source["first_invalid"][1]
  assert "line 5: 'chosen' is empty" in source["first_invalid"][2]
  # The summary lies beside the prepared dataset and was logged.
  dataset_dir = (
    tmp_path
    / "tfds"
    / "preference_pairs"
    / it.summary["prepare"]["config"]
    / VERSION
  )
  with open(dataset_dir / "prepare_summary.json") as f:
    assert json.load(f) == it.summary["prepare"]
  assert any(
    "line 4: missing field 'chosen'" in r.getMessage() for r in caplog.records
  )
  assert any("3 kept, 3 invalid" in r.getMessage() for r in caplog.records)


def test_missing_field_names_the_field_and_the_first_offending_record(tmp_path):
  records = [
    pair(0),
    pair(1),
    {"prompt": "Q", "chosen": "c"},
    {"prompt": "Q", "rejected": "r"},
  ]
  path = write_jsonl(tmp_path / "m.jsonl", records)
  with pytest.raises(
    DataError,
    match=r"m.jsonl, line 3: missing field 'rejected' \(layout prompt_response\)",
  ):
    build(tmp_path, path)


def test_missing_field_in_a_json_file_names_the_record_index(tmp_path):
  path = tmp_path / "m.json"
  path.write_text(json.dumps([pair(0), {"prompt": "Q", "chosen": "c"}]))
  with pytest.raises(
    DataError, match=r"m.json, record 1: missing field 'rejected'"
  ):
    build(tmp_path, str(path))


def test_empty_chosen_is_an_invalid_record(tmp_path):
  path = write_jsonl(tmp_path / "e.jsonl", [pair(0), pair(1, chosen="")])
  with pytest.raises(DataError, match=r"e.jsonl, line 2: 'chosen' is empty"):
    build(tmp_path, path)


def test_chosen_identical_to_rejected_is_dropped_and_counted(tmp_path):
  records = [
    pair(0),
    pair(1, rejected=" yes 1"),
    pair(2),
    pair(3, chosen=" same", rejected=" same"),
    pair(4),
  ]
  it = build(tmp_path, write_jsonl(tmp_path / "i.jsonl", records), batch_size=1)
  assert ids(it) == ["p0", "p2", "p4"]
  source = it.summary["prepare"]["sources"]["train"]
  assert (source["kept"], source["identical_dropped"], source["invalid"]) == (
    3,
    2,
    0,
  )


def test_response_truncated_to_zero_tokens_is_dropped_and_counted(
  tmp_path, caplog
):
  # max_prompt_length == max_length: a prompt of >= 16 tokens leaves no room.
  records = [
    pair(0),
    pair(1, prompt="a prompt far longer than sixteen bytes"),
    pair(2),
    pair(3),
  ]
  with caplog.at_level(logging.INFO):
    it = build(
      tmp_path,
      write_jsonl(tmp_path / "z.jsonl", records),
      max_length=16,
      max_prompt_length=16,
      batch_size=1,
    )
  batches = list(it)
  assert [str(b["id"][0]) for b in batches] == ["p0", "p2", "p3"]
  for b in batches:
    for side in ("chosen", "rejected"):
      assert b[f"{side}_loss_mask"].sum() >= 1  # never a zero-token response
  tokenized = it.summary["tokenized"]
  assert tokenized["dropped"] == {"empty_response_after_truncation": 1}
  assert (tokenized["examples"], tokenized["kept"]) == (4, 3)
  assert tokenized["truncated"]["prompt"] == 1
  assert any(
    "example 1 dropped: empty_response_after_truncation" in r.getMessage()
    for r in caplog.records
  )
  dataset_dir = os.path.join(
    tmp_path,
    "tfds",
    "preference_pairs",
    it.summary["prepare"]["config"],
    VERSION,
  )
  assert any(f.startswith("tokenized_train_") for f in os.listdir(dataset_dir))


def test_responses_identical_after_truncation_are_dropped_and_counted(tmp_path):
  records = [
    pair(0),
    pair(1, chosen=" same long start A", rejected=" same long start B"),
    pair(2),
  ]
  it = build(
    tmp_path,
    write_jsonl(tmp_path / "t.jsonl", records),
    max_length=24,
    max_prompt_length=12,
    batch_size=1,
  )
  assert ids(it) == ["p0", "p2"]
  assert it.summary["tokenized"]["dropped"] == {"identical_after_truncation": 1}


@pytest.mark.parametrize("skip_invalid", [False, True])
def test_non_utf8_bytes_name_file_and_line_even_when_skipping(
  tmp_path, skip_invalid
):
  path = write_lines(
    tmp_path / "latin1.jsonl",
    [
      json.dumps(pair(0)).encode(),
      json.dumps(pair(1, chosen="caf\u00e9"))
      .replace("\\u00e9", "\u00e9")
      .encode("latin-1"),
    ],
  )
  with pytest.raises(
    DataError,
    match=r"latin1.jsonl, line 2: bytes b'\\xe9' at byte column \d+ are not UTF-8",
  ):
    build(tmp_path, path, skip_invalid=skip_invalid)


def test_malformed_json_file_names_the_line(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text(
    '[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": }\n]'
  )
  with pytest.raises(DataError, match=r"broken.json, line 3: malformed JSON"):
    build(tmp_path, str(path))


def test_a_split_left_empty_is_an_error(tmp_path):
  path = write_lines(tmp_path / "junk.jsonl", [b"{", b"[1, 2]"])
  with pytest.raises(DataError, match=r"split 'train' has no valid records"):
    build(tmp_path, path, skip_invalid=True)


def test_duplicate_ids_name_both_records(tmp_path):
  path = write_jsonl(
    tmp_path / "d.jsonl", [pair(0), pair(1), pair(0, chosen=" other")]
  )
  with pytest.raises(
    DataError,
    match=r"d.jsonl, line 3: id 'p0' is already used at .*d.jsonl, line 1",
  ):
    build(tmp_path, path)


def test_unreadable_parquet_unknown_extension_and_missing_files(tmp_path):
  pytest.importorskip("pyarrow")
  (tmp_path / "x.parquet").write_bytes(b"not parquet")
  with pytest.raises(
    DataError, match=r"x.parquet: not a readable Parquet file"
  ):
    build(tmp_path, str(tmp_path / "x.parquet"))
  (tmp_path / "x.txt").write_text(json.dumps(pair(0)))
  with pytest.raises(DataError, match=r"x.txt .* set input.file_format"):
    build(tmp_path, str(tmp_path / "x.txt"))
  assert ids(
    build(tmp_path, str(tmp_path / "x.txt"), file_format="jsonl", batch_size=1)
  ) == ["p0"]
  with pytest.raises(
    DataError,
    match=r"input.files \(train\): no file matches '.*nothing\*.jsonl'",
  ):
    build(tmp_path, str(tmp_path / "nothing*.jsonl"))


def test_weight_that_is_not_a_number_is_invalid(tmp_path):
  path = write_jsonl(
    tmp_path / "w.jsonl", [pair(0, weight=1.0), pair(1, weight="heavy")]
  )
  with pytest.raises(
    DataError, match=r"w.jsonl, line 2: field 'weight' must be a finite number"
  ):
    build(tmp_path, path)


def test_batch_size_above_the_dataset_is_an_error(tmp_path):
  path = write_jsonl(tmp_path / "s.jsonl", [pair(0), pair(1)])
  with pytest.raises(
    ValueError, match=r"input.batch_size=4 exceeds the 2 examples x 1 epoch"
  ):
    build(tmp_path, path, batch_size=4)


def test_every_example_dropped_by_truncation_is_an_error(tmp_path):
  path = write_jsonl(tmp_path / "l.jsonl", [pair(0, prompt="x" * 40)])
  with pytest.raises(
    ValueError, match=r"no example of split 'train' survives truncation"
  ):
    build(tmp_path, path, max_length=16, max_prompt_length=16)


# ------------------------------------------- default ids, Unicode, layout "auto"


def unnamed(i, **kw):
  record = pair(i, **kw)
  del record["id"]
  return record


def test_default_ids_are_unique_across_files_of_the_same_name(tmp_path):
  # Anthropic HH's layout: helpful-base/train.jsonl.gz, harmless-base/train.jsonl.gz, ...
  for name in ("harmless", "helpful"):
    (tmp_path / name).mkdir()
    write_jsonl(tmp_path / name / "train.jsonl", [unnamed(i) for i in range(2)])
  files = [
    str(tmp_path / "harmless" / "train.jsonl"),
    str(tmp_path / "helpful" / "train.jsonl"),
  ]
  expected = [
    "harmless/train.jsonl:1",
    "harmless/train.jsonl:2",
    "helpful/train.jsonl:1",
    "helpful/train.jsonl:2",
  ]
  for skip_invalid in (False, True):
    it = build(tmp_path, files, batch_size=1, skip_invalid=skip_invalid)
    assert ids(it) == expected
    source = it.summary["prepare"]["sources"]["train"]
    assert (source["records"], source["kept"], source["invalid"]) == (4, 4, 0)


def test_default_ids_are_unique_across_splits_and_survive_a_move(tmp_path):
  for name in ("a", "b"):
    (tmp_path / "data" / name).mkdir(parents=True)
    write_jsonl(
      tmp_path / "data" / name / "part.jsonl", [unnamed(i) for i in range(2)]
    )
  files = {
    "train": str(tmp_path / "data" / "a" / "part.jsonl"),
    "test": str(tmp_path / "data" / "b" / "part.jsonl"),
  }
  train = ids(build(tmp_path, files, batch_size=1))
  test = ids(build(tmp_path, files, "test", batch_size=1))
  assert train == ["a/part.jsonl:1", "a/part.jsonl:2"]
  assert test == ["b/part.jsonl:1", "b/part.jsonl:2"]
  # Another machine (or a moved tree): absolute paths differ, ids do not.
  os.rename(tmp_path / "data", tmp_path / "moved")
  moved = {
    split: path.replace(os.sep + "data" + os.sep, os.sep + "moved" + os.sep)
    for split, path in files.items()
  }
  assert ids(build(tmp_path, moved, batch_size=1)) == train
  # One file alone keeps the file-name id.
  assert ids(build(tmp_path, moved["train"], batch_size=1)) == [
    "part.jsonl:1",
    "part.jsonl:2",
  ]


def surrogate_line(i, field):
  # A lone high surrogate, as JSON escapes it: json.loads accepts it, UTF-8 does not.
  return (
    json.dumps(pair(i))
    .replace(f'"{field}": "', f'"{field}": "\\ud83d', 1)
    .encode()
  )


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected", "id"])
def test_lone_surrogate_names_file_line_and_field(tmp_path, field):
  path = write_lines(
    tmp_path / "s.jsonl",
    [json.dumps(pair(0)).encode(), surrogate_line(1, field)],
  )
  with pytest.raises(
    DataError,
    match=rf"s.jsonl, line 2: field '{field}' holds '\\ud83d' at"
    r" character 0: a lone UTF-16 surrogate",
  ):
    build(tmp_path, path)


def test_lone_surrogates_are_skipped_and_counted(tmp_path):
  chat = {
    "prompt": [{"role": "user", "content": "Hi"}],
    "chosen": [{"role": "assistant", "content": "Hello \ud83d"}],
    "rejected": [{"role": "assistant", "content": "Go"}],
  }
  lines = [
    json.dumps(pair(0)).encode(),
    surrogate_line(1, "chosen"),
    json.dumps(pair(2)).encode(),
  ]
  path = write_lines(tmp_path / "s.jsonl", lines)
  chat_path = write_lines(
    tmp_path / "c.jsonl",
    [json.dumps(chat).encode()]
    + [
      json.dumps(
        dict(chat, id=i, chosen=[{"role": "assistant", "content": f"Yes {i}"}])
      ).encode()
      for i in range(2)
    ],
  )
  it = build(tmp_path, path, skip_invalid=True, batch_size=1)
  assert ids(it) == ["p0", "p2"]
  source = it.summary["prepare"]["sources"]["train"]
  assert (source["records"], source["kept"], source["invalid_by_kind"]) == (
    3,
    2,
    {"invalid_unicode": 1},
  )
  it = build(tmp_path, chat_path, skip_invalid=True, batch_size=1)
  assert ids(it) == ["0", "1"]
  source = it.summary["prepare"]["sources"]["train"]
  assert source["invalid_by_kind"] == {"invalid_unicode": 1}
  assert (
    "c.jsonl, line 1: field 'chosen[0].content' holds '\\ud83d' at character 6"
    in source["first_invalid"][0]
  )


def test_auto_layout_is_not_decided_by_an_invalid_first_record(tmp_path):
  records = [{"chosen": "c", "rejected": "r"}] + [pair(i) for i in range(4)]
  path = write_jsonl(tmp_path / "a.jsonl", records)
  it = build(tmp_path, path, skip_invalid=True, batch_size=1)
  assert ids(it) == ["p0", "p1", "p2", "p3"]
  source = it.summary["prepare"]["sources"]["train"]
  assert source["invalid_by_kind"] == {"missing_field": 1}
  layout = source["layouts"][path]
  assert layout["layout"] == "prompt_response" and layout["votes"] == {
    "prompt_response": 4
  }
  assert (
    layout["chosen_by"]
    == "auto: 4 of the first 4 valid records (from "
    + path
    + ", line 2) are prompt_response"
  )
  with pytest.raises(
    DataError,
    match=r"a.jsonl, line 1: missing field 'prompt' \(layout prompt_response\)",
  ):
    build(tmp_path, path)


def test_auto_layout_follows_the_majority_and_an_explicit_layout_is_recorded(
  tmp_path,
):
  hh = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Go",
  }
  # A shared-prefix record first, valid under its own layout, then three prompt/response ones.
  path = write_jsonl(tmp_path / "m.jsonl", [hh] + [pair(i) for i in range(3)])
  it = build(tmp_path, path, skip_invalid=True, batch_size=1)
  source = it.summary["prepare"]["sources"]["train"]
  assert ids(it) == ["p0", "p1", "p2"] and source["invalid_by_kind"] == {
    "missing_field": 1
  }
  assert source["layouts"][path]["votes"] == {
    "shared_prefix": 1,
    "prompt_response": 3,
  }
  it = build(
    tmp_path, path, skip_invalid=True, batch_size=1, layout="shared_prefix"
  )
  assert ids(it) == ["m.jsonl:1"]
  assert it.summary["prepare"]["sources"]["train"]["layouts"][path] == {
    "layout": "shared_prefix",
    "chosen_by": "input.layout",
  }
