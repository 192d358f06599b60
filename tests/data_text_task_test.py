"""The built-in text task: deterministic, disjoint splits, correct chosen and
wrong rejected responses (checked by a solver written here from the grammar),
and files the preference_pairs builder reads."""

import collections
import json
import os
import re
import subprocess
import sys

import pytest

from psipo_jax.data import make_preference_iterator
from psipo_jax.data import text_task
from psipo_jax.data.testing import experiment_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = re.compile(r"^(sort|reverse|count ([a-z])): ([a-z]+) =$")


def read(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def solve(prompt):
  """(task, word, correct answer) of a prompt, from the documented grammar."""
  match = PROMPT.match(prompt)
  assert match, prompt
  task, letter, word = match.groups()
  if task == "sort":
    return "sort", word, "".join(sorted(word))
  if task == "reverse":
    return "reverse", word, "".join(reversed(word))
  return "count", word, str(sum(c == letter for c in word))


def is_documented_mistake(kind, word, answer, wrong):
  if kind in ("unsorted", "unreversed"):
    return wrong == word
  if kind == "descending":
    return wrong == "".join(sorted(word, reverse=True))
  if kind == "last_kept":
    return wrong == "".join(reversed(word[:-1])) + word[-1]
  if kind == "swap":
    diff = [i for i, (a, b) in enumerate(zip(answer, wrong)) if a != b]
    return (
      len(diff) == 2
      and diff[1] == diff[0] + 1
      and (wrong[diff[0]], wrong[diff[1]]) == (answer[diff[1]], answer[diff[0]])
    )
  if kind == "off_by_one":
    return int(wrong) >= 0 and abs(int(wrong) - int(answer)) == 1
  raise AssertionError(f"undocumented mistake kind {kind!r}")


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
  return text_task.write_text_task(
    tmp_path_factory.mktemp("task"), num_train=600, num_test=90, seed=3
  )


def test_chosen_is_correct_and_rejected_a_documented_mistake(task_files):
  mistakes = collections.Counter()
  for split in ("train", "test"):
    for record in read(task_files[split]):
      task, word, answer = solve(record["prompt"])
      assert record["task"] == task
      assert text_task.MIN_WORD_LENGTH <= len(word) <= text_task.MAX_WORD_LENGTH
      assert set(word) <= set(text_task.ALPHABET)
      assert record["chosen"] == " " + answer
      wrong = record["rejected"]
      assert wrong.startswith(" ") and wrong != record["chosen"]
      assert len(wrong) == len(record["chosen"])  # not told apart by length
      assert is_documented_mistake(
        record["mistake"], word, answer, wrong[1:]
      ), record
      mistakes[task, record["mistake"]] += 1
  # Every documented kind occurs.
  assert set(mistakes) == {
    ("sort", "unsorted"),
    ("sort", "swap"),
    ("sort", "descending"),
    ("reverse", "unreversed"),
    ("reverse", "swap"),
    ("reverse", "last_kept"),
    ("count", "off_by_one"),
  }
  counts = collections.Counter(t for t, _ in mistakes.elements())
  assert counts == {
    "sort": 230,
    "reverse": 230,
    "count": 230,
  }  # tasks in turn: equal shares


def test_splits_have_the_asked_sizes_and_no_prompt_in_common(task_files):
  train, test = read(task_files["train"]), read(task_files["test"])
  assert (len(train), len(test)) == (600, 90)
  train_prompts, test_prompts = (
    [r["prompt"] for r in train],
    [r["prompt"] for r in test],
  )
  assert len(set(train_prompts)) == 600 and len(set(test_prompts)) == 90
  assert not set(train_prompts) & set(test_prompts)
  assert [r["id"] for r in train[:2]] == ["train-0", "train-1"]


def test_same_seed_same_bytes_another_seed_other_data(tmp_path):
  def files(directory, seed):
    paths = text_task.write_text_task(
      tmp_path / directory, num_train=50, num_test=10, seed=seed
    )
    return {split: open(path, "rb").read() for split, path in paths.items()}

  assert files("a", 0) == files("b", 0)
  assert files("c", 1)["train"] != files("a", 0)["train"]


def test_unchanged_content_is_not_rewritten(tmp_path):
  paths = text_task.write_text_task(tmp_path, num_train=20, num_test=5, seed=0)
  os.utime(paths["train"], ns=(1, 1))
  text_task.write_text_task(tmp_path, num_train=20, num_test=5, seed=0)
  assert (
    os.stat(paths["train"]).st_mtime_ns == 1
  )  # a prepared dataset stays valid
  text_task.write_text_task(tmp_path, num_train=20, num_test=5, seed=1)
  assert os.stat(paths["train"]).st_mtime_ns != 1
  assert sorted(os.listdir(tmp_path)) == ["test.jsonl", "train.jsonl"]


def test_a_subset_of_tasks_and_bad_arguments(tmp_path, monkeypatch):
  paths = text_task.write_text_task(
    tmp_path, num_train=12, num_test=4, seed=0, tasks=("count",)
  )
  assert {r["task"] for r in read(paths["train"]) + read(paths["test"])} == {
    "count"
  }
  with pytest.raises(ValueError, match=r"unknown text task 'upper'"):
    text_task.write_text_task(
      tmp_path, num_train=4, num_test=4, seed=0, tasks=("sort", "upper")
    )
  with pytest.raises(ValueError, match=r"num_test >= 1"):
    text_task.write_text_task(tmp_path, num_train=4, num_test=0, seed=0)
  # 2 letters x 8 words of length 3: only 16 distinct count prompts exist.
  monkeypatch.setattr(text_task, "ALPHABET", "ab")
  monkeypatch.setattr(text_task, "MAX_WORD_LENGTH", 3)
  assert len(text_task.generate(16, seed=0, tasks=("count",))) == 16
  with pytest.raises(
    ValueError, match=r"could not draw 17 distinct \('count',\) prompts"
  ):
    text_task.generate(17, seed=0, tasks=("count",))


def test_the_files_load_through_the_builder_uncut(task_files, tmp_path):
  config = experiment_config(
    data_dir=tmp_path / "tfds",
    files=task_files,
    tokenizer="byte",
    max_length=32,
    max_prompt_length=24,
    batch_size=10,
    return_ids=True,
    shuffle=False,
  )
  for split, size in (("train", 600), ("test", 90)):
    it = make_preference_iterator(config, split, num_epochs=1)
    assert it.summary["prepare"]["sources"][split]["kept"] == size
    tokenized = it.summary["tokenized"]
    assert (tokenized["kept"], tokenized["truncated"]["any"]) == (size, 0)
    assert it.summary["prepare"]["sources"][split]["layouts"][
      task_files[split]
    ]["layout"] == ("prompt_response")
    batches = list(it)
    assert [str(i) for b in batches for i in b["id"]] == [
      f"{split}-{i}" for i in range(size)
    ]
  # The scored tokens are exactly the response bytes and EOS.
  first = read(task_files["test"])[0]
  batch = batches[0]
  for side in ("chosen", "rejected"):
    scored = batch[f"{side}_input_ids"][0][batch[f"{side}_loss_mask"][0] == 1]
    assert bytes(int(t) - 3 for t in scored[:-1]).decode() == first[side]
    assert scored[-1] == 2  # the byte tokenizer's EOS


def test_command_line_writes_the_files(tmp_path):
  out = tmp_path / "cli"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "psipo_jax.data.text_task",
      f"--out_dir={out}",
      "--num_train=6",
      "--num_test=3",
      "--seed=2",
      "--tasks=sort,count",
    ],
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=ROOT),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == [
    "train:",
    str(out / "train.jsonl"),
    "test:",
    str(out / "test.jsonl"),
  ]
  records = read(out / "train.jsonl") + read(out / "test.jsonl")
  assert len(records) == 9 and {r["task"] for r in records} == {"sort", "count"}
  without_ids = [{k: v for k, v in r.items() if k != "id"} for r in records]
  assert without_ids == text_task.generate(9, seed=2, tasks=("sort", "count"))
