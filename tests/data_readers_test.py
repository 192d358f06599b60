"""Files as they are published: gzipped, with a byte-order mark, a Git LFS
pointer in their place, or cut short."""

import gzip
import json

import pytest

from psipo_jax.data import DataError
from psipo_jax.data import make_preference_iterator
from psipo_jax.data import readers
from psipo_jax.data.testing import experiment_config

RECORDS = [
  {
    "id": f"p{i}",
    "prompt": f"Q{i}?",
    "chosen": f" yes {i}",
    "rejected": f" no {i}",
  }
  for i in range(4)
]
IDS = [r["id"] for r in RECORDS]


def jsonl_bytes(records):
  return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def build(tmp_path, files, **kw):
  options = dict(
    data_dir=tmp_path / "tfds",
    files=files,
    batch_size=1,
    max_length=64,
    max_prompt_length=32,
    return_ids=True,
    shuffle=False,
  )
  options.update(kw)
  return make_preference_iterator(
    experiment_config(**options), "train", num_epochs=1
  )


def ids(iterator):
  return [str(i) for batch in iterator for i in batch["id"]]


def source_summary(iterator):
  return iterator.summary["prepare"]["sources"]["train"]


# ---------------------------------------------------------------- gzip


def test_gzipped_jsonl_and_json_are_read_directly(tmp_path):
  jsonl = tmp_path / "train.jsonl.gz"
  jsonl.write_bytes(gzip.compress(jsonl_bytes(RECORDS)))
  as_json = tmp_path / "train.json.gz"
  as_json.write_bytes(gzip.compress(json.dumps(RECORDS).encode()))
  assert readers.file_format(str(jsonl), "auto") == "jsonl"
  assert readers.file_format(str(as_json), "auto") == "json"
  assert ids(build(tmp_path, str(jsonl))) == IDS
  assert ids(build(tmp_path, str(as_json))) == IDS
  # Default ids keep the whole file name.
  unnamed = [{k: v for k, v in r.items() if k != "id"} for r in RECORDS[:2]]
  jsonl.write_bytes(gzip.compress(jsonl_bytes(unnamed)))
  assert ids(build(tmp_path, str(jsonl))) == [
    "train.jsonl.gz:1",
    "train.jsonl.gz:2",
  ]


def test_an_error_inside_a_gzipped_file_names_the_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl.gz"
  path.write_bytes(
    gzip.compress(jsonl_bytes(RECORDS[:1]) + b'{"prompt": "x",\n')
  )
  with pytest.raises(
    DataError, match=r"bad.jsonl.gz, line 2: malformed JSON: Expecting"
  ):
    build(tmp_path, str(path))


def test_compression_is_told_by_the_content_not_the_extension(tmp_path):
  # A gzipped file under any name, with the format given explicitly ...
  hidden = tmp_path / "pairs.data"
  hidden.write_bytes(gzip.compress(jsonl_bytes(RECORDS)))
  assert ids(build(tmp_path, str(hidden), file_format="jsonl")) == IDS
  # ... and a ".gz" that a download already decompressed.
  plain = tmp_path / "pairs.jsonl.gz"
  plain.write_bytes(jsonl_bytes(RECORDS))
  assert ids(build(tmp_path, str(plain))) == IDS


@pytest.mark.parametrize("skip_invalid", [False, True])
def test_a_gzip_stream_cut_short_is_a_file_error(tmp_path, skip_invalid):
  many = [
    dict(RECORDS[0], id=f"p{i}", chosen=f" yes {i} " + "x" * (i % 97))
    for i in range(3000)
  ]
  compressed = gzip.compress(jsonl_bytes(many))
  path = tmp_path / "cut.jsonl.gz"
  path.write_bytes(compressed[: len(compressed) // 2])
  with pytest.raises(
    DataError,
    match=r"cut.jsonl.gz: the gzip stream is damaged after line \d+"
    r" \(.*\); the file is truncated or corrupt: fetch it again",
  ):
    build(tmp_path, str(path), skip_invalid=skip_invalid)


def test_gzipped_parquet_is_refused_by_name(tmp_path):
  pytest.importorskip("pyarrow")
  path = tmp_path / "p.parquet.gz"
  path.write_bytes(gzip.compress(b"PAR1"))
  with pytest.raises(
    DataError, match=r"p.parquet.gz is gzip-compressed Parquet; decompress it"
  ):
    build(tmp_path, str(path))


# ------------------------------------------------------- byte-order marks


@pytest.mark.parametrize("skip_invalid", [False, True])
def test_a_utf8_byte_order_mark_is_stripped_and_nothing_is_miscounted(
  tmp_path, skip_invalid
):
  path = tmp_path / "bom.jsonl"
  # A BOM on line 1 (an editor's), and on line 3 (a second file concatenated after the first).
  path.write_bytes(
    b"\xef\xbb\xbf"
    + jsonl_bytes(RECORDS[:2])
    + b"\xef\xbb\xbf"
    + jsonl_bytes(RECORDS[2:])
  )
  it = build(tmp_path, str(path), skip_invalid=skip_invalid)
  assert ids(it) == IDS
  source = source_summary(it)
  assert (source["records"], source["kept"], source["invalid"]) == (4, 4, 0)
  as_json = tmp_path / "bom.json"
  as_json.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS).encode())
  assert ids(build(tmp_path, str(as_json), skip_invalid=skip_invalid)) == IDS


def test_a_utf16_file_is_named_as_such(tmp_path):
  path = tmp_path / "u16.jsonl"
  path.write_bytes(
    jsonl_bytes(RECORDS).decode().encode("utf-16")
  )  # starts with its BOM
  with pytest.raises(
    DataError, match=r"u16.jsonl is UTF-16 .*; re-encode the file as UTF-8"
  ):
    build(tmp_path, str(path))


# ----------------------------------------------------------- Git LFS


@pytest.mark.parametrize(
  "name", ["train.jsonl.gz", "train.json", "train.parquet"]
)
@pytest.mark.parametrize("skip_invalid", [False, True])
def test_a_git_lfs_pointer_is_named_as_such(tmp_path, name, skip_invalid):
  if name.endswith(".parquet"):
    pytest.importorskip("pyarrow")
  path = tmp_path / name
  path.write_text(
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 2543\n"
  )
  with pytest.raises(
    DataError,
    match=rf"{name} is a Git LFS pointer, not the data \(the real file"
    r" has 2543 bytes\): run `git lfs pull`",
  ):
    build(tmp_path, str(path), skip_invalid=skip_invalid)


# ------------------------------------------------------ truncated files


def test_a_last_line_cut_mid_record_is_named(tmp_path):
  path = tmp_path / "cut.jsonl"
  path.write_bytes(
    jsonl_bytes(RECORDS[:3]) + json.dumps(RECORDS[3]).encode()[:20]
  )
  with pytest.raises(
    DataError,
    match=r"cut.jsonl, line 4: malformed JSON: .*; it is the last line"
    r" and has no newline: the file looks cut short mid-record",
  ):
    build(tmp_path, str(path))
  it = build(tmp_path, str(path), skip_invalid=True)
  assert ids(it) == IDS[:3]
  source = source_summary(it)
  assert (source["records"], source["kept"], source["invalid_by_kind"]) == (
    4,
    3,
    {"truncated_record": 1},
  )


def test_a_whole_last_line_without_newline_is_a_record(tmp_path):
  path = tmp_path / "no_newline.jsonl"
  path.write_bytes(jsonl_bytes(RECORDS).rstrip(b"\n"))
  assert ids(build(tmp_path, str(path))) == IDS


def test_a_json_file_cut_short_says_so(tmp_path):
  path = tmp_path / "cut.json"
  path.write_text(json.dumps(RECORDS)[:-30])
  with pytest.raises(
    DataError,
    match=r"cut.json, line 1: malformed JSON: .*; the file does not end"
    r" with '\]': is it truncated\?",
  ):
    build(tmp_path, str(path))
