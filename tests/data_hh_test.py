"""Smoke test on real data: Anthropic HH-RLHF harmless-base test, as published.

`../shared/data/hh_harmless_base_test.jsonl.gz` (relative to the repository
root; never copied into the project): 2,312 gzipped JSON lines of whole
conversations sharing a prefix. Every record must be accounted for.
"""

import gzip
import json
import os

import pytest

from psipo_jax.data import DataError
from psipo_jax.data import make_preference_iterator
from psipo_jax.data.testing import experiment_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH_TEST = os.path.join(
  ROOT, "..", "shared", "data", "hh_harmless_base_test.jsonl.gz"
)
MARKER = "\n\nAssistant:"

pytestmark = pytest.mark.skipif(
  not os.path.exists(HH_TEST), reason=f"{HH_TEST} is not here"
)


def hh_config(data_dir, **kw):
  options = dict(
    data_dir=data_dir,
    files=HH_TEST,
    tokenizer="byte",
    batch_size=8,
    max_length=512,
    max_prompt_length=256,
    skip_invalid=True,
    return_ids=True,
    shuffle=False,
  )
  options.update(kw)
  return experiment_config(**options)


def empty_final_turn_lines():
  """Lines whose chosen conversation ends with an empty assistant turn (an
  independent reading of the file, not the builder's prefix rule)."""
  with gzip.open(HH_TEST, "rt", encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 2312
  return [
    i + 1
    for i, r in enumerate(records)
    if not r["chosen"].rsplit(MARKER, 1)[1].strip()
  ]


@pytest.fixture(scope="module")
def hh(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("hh_tfds")
  it = make_preference_iterator(hh_config(str(data_dir)), "train", num_epochs=1)
  return data_dir, it


def test_every_hh_record_is_accounted_for(hh):
  _, it = hh
  prepare = it.summary["prepare"]["sources"]["train"]
  tokenized = it.summary["tokenized"]
  empty = empty_final_turn_lines()
  assert len(empty) == 4
  # The 4 empty chosen turns are invalid records (a response must hold text),
  # each named by its line; nothing else is dropped before tokenisation.
  assert prepare["records"] == 2312
  assert prepare["invalid_by_kind"] == {"empty_response": 4}
  assert prepare["identical_dropped"] == 0
  assert [
    int(m.split(", line ")[1].split(":")[0]) for m in prepare["first_invalid"]
  ] == empty
  assert all(
    "'chosen' is empty once the shared prompt is split off" in m
    for m in prepare["first_invalid"]
  )
  assert (
    prepare["layouts"][os.path.abspath(HH_TEST)]["layout"] == "shared_prefix"
  )
  assert tokenized["examples"] == prepare["kept"] == 2308
  # With max_prompt_length 256 < max_length 512 each response keeps at least
  # min(its length, 256) tokens: truncation can never empty one.
  assert "empty_response_after_truncation" not in tokenized["dropped"]
  assert (
    tokenized["kept"] + sum(tokenized["dropped"].values())
    == tokenized["examples"]
  )
  accounted = (
    tokenized["kept"]
    + sum(tokenized["dropped"].values())
    + prepare["invalid"]
    + prepare["identical_dropped"]
  )
  assert accounted == 2312


def test_hh_batches_cover_every_kept_pair_once(hh):
  _, it = hh
  batches = list(it)
  kept = it.summary["tokenized"]["kept"]
  assert len(batches) == kept // 8
  seen = [str(i) for b in batches for i in b["id"]]
  assert len(set(seen)) == len(seen) == kept // 8 * 8
  assert (
    seen[0] == "hh_harmless_base_test.jsonl.gz:1"
  )  # default id: file name and line
  for b in batches[:5]:
    for side in ("chosen", "rejected"):
      assert b[f"{side}_input_ids"].shape == (8, 512)
      assert (b[f"{side}_loss_mask"].sum(axis=1) >= 1).all()


def test_hh_without_skip_invalid_names_the_first_empty_turn(tmp_path):
  first = empty_final_turn_lines()[0]
  with pytest.raises(
    DataError,
    match=rf"hh_harmless_base_test.jsonl.gz, line {first}: 'chosen' is"
    r" empty once the shared prompt is split off",
  ):
    make_preference_iterator(
      hh_config(str(tmp_path), skip_invalid=False), "train"
    )
