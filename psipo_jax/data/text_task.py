"""A built-in text preference task: string transformations, generated locally.

No download: `write_text_task(out_dir, ...)` writes `train.jsonl` and
`test.jsonl` in the `prompt_response` layout, read by the normal
`preference_pairs` builder:

    files = write_text_task("/tmp/text_task", num_train=4000, num_test=400, seed=0)
    config.input.files = files          # {"train": ".../train.jsonl", "test": ...}

or from the command line:

    python -m psipo_jax.data.text_task --out_dir=/tmp/text_task [--num_train=4000]
        [--num_test=400] [--seed=0] [--tasks=sort,reverse,count]

Grammar of one record (every string is ASCII, so bytes = characters):

    prompt    = TASK ": " WORD " ="
    chosen    = " " ANSWER                  the correct transformation
    rejected  = " " MISTAKE                 a plausible mistake: the same length
                                            as ANSWER, never equal to it
    TASK      = "sort" | "reverse" | "count " LETTER
    WORD      = MIN_WORD_LENGTH..MAX_WORD_LENGTH (3..7) letters, each uniform
                over ALPHABET ("abcdefgh")
    LETTER    = with probability 1/2 a letter of WORD (uniform over its
                positions), else uniform over ALPHABET (so counts of 0 occur)

    ANSWER("sort", w)      = the letters of w in alphabetical order
    ANSWER("reverse", w)   = w backwards
    ANSWER("count x", w)   = how many times x occurs in w, in decimal (0..7)

    MISTAKE, uniform over the kinds below that differ from ANSWER (a word
    with none, e.g. "aaa" for sort and reverse, is drawn again):
      sort:     "unsorted"   w itself
                "swap"       ANSWER with one adjacent pair of different
                             letters exchanged (uniform over such pairs)
                "descending" the letters of w in reverse alphabetical order
      reverse:  "unreversed" w itself
                "swap"       as for sort, on w backwards
                "last_kept"  all but the last letter of w reversed, the last
                             letter left at the end ("abcd" -> "cbad")
      count:    "off_by_one" ANSWER + 1 or ANSWER - 1 (each with probability
                             1/2; + 1 when ANSWER is 0): always one digit

e.g. {"prompt": "sort: dcab =", "chosen": " abcd", "rejected": " abdc"},
     {"prompt": "reverse: abc =", "chosen": " cba", "rejected": " bac"},
     {"prompt": "count a: bacada =", "chosen": " 3", "rejected": " 4"}.
Records also carry "id" ("train-17"), "task" ("sort", "reverse", "count")
and "mistake" (the kind above) for analysis; the builder ignores the last two.

Examples cycle through `tasks` in order (equal shares). Every prompt occurs
once in the two files together, so the test split holds no prompt seen in
training. The same arguments give the same bytes (NumPy's PCG64 seeded with
`seed`), and a file whose content would not change is not rewritten (so a
prepared dataset, keyed by file modification times, stays valid when every
run calls `write_text_task` at start-up). The longest record, prompt and
response, is len("reverse: abcdefg =") + len(" gfedcba") = 26 bytes: with BOS
and EOS a byte-level model needs max_length >= 28, so max_length 32 cuts
nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from absl import app
from absl import flags
import numpy as np

from psipo_jax.data import summaries

TASKS = ("sort", "reverse", "count")
ALPHABET = "abcdefgh"
MIN_WORD_LENGTH = 3
MAX_WORD_LENGTH = 7
DEFAULT_NUM_TRAIN = 4000
DEFAULT_NUM_TEST = 400
SPLIT_FILES = {"train": "train.jsonl", "test": "test.jsonl"}
_MAX_DRAWS_PER_EXAMPLE = 1000  # a prompt space this crowded is an error


def _swapped(answer: str, rng: np.random.Generator) -> str | None:
  """`answer` with one adjacent pair of different letters exchanged."""
  pairs = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
  if not pairs:
    return None
  i = pairs[rng.integers(len(pairs))]
  return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]


def _sort(
  word: str, rng: np.random.Generator
) -> tuple[str, dict[str, str | None]]:
  answer = "".join(sorted(word))
  return answer, {
    "unsorted": word,
    "swap": _swapped(answer, rng),
    "descending": answer[::-1],
  }


def _reverse(
  word: str, rng: np.random.Generator
) -> tuple[str, dict[str, str | None]]:
  answer = word[::-1]
  return answer, {
    "unreversed": word,
    "swap": _swapped(answer, rng),
    "last_kept": word[-2::-1] + word[-1],
  }


def _count(
  letter: str, word: str, rng: np.random.Generator
) -> tuple[str, dict[str, str | None]]:
  count = word.count(letter)
  step = 1 if count == 0 or rng.integers(2) else -1
  return str(count), {"off_by_one": str(count + step)}


def draw_example(task: str, rng: np.random.Generator) -> dict[str, str] | None:
  """One record of `task` (see the module docstring), or None to draw again."""
  length = rng.integers(MIN_WORD_LENGTH, MAX_WORD_LENGTH + 1)
  word = "".join(rng.choice(list(ALPHABET), size=length))
  if task == "count":
    pool = word if rng.integers(2) else ALPHABET
    letter = pool[rng.integers(len(pool))]
    name = f"count {letter}"
    answer, mistakes = _count(letter, word, rng)
  elif task in ("sort", "reverse"):
    name = task
    answer, mistakes = (_sort if task == "sort" else _reverse)(word, rng)
  else:
    raise ValueError(f"unknown text task {task!r}; tasks are {TASKS}")
  kinds = sorted(
    k for k, m in mistakes.items() if m is not None and m != answer
  )
  if not kinds:
    return None
  kind = kinds[rng.integers(len(kinds))]
  return {
    "task": task,
    "prompt": f"{name}: {word} =",
    "chosen": f" {answer}",
    "rejected": f" {mistakes[kind]}",
    "mistake": kind,
  }


def generate(
  num_examples: int, *, seed: int, tasks: Sequence[str] = TASKS
) -> list[dict[str, str]]:
  """`num_examples` records with distinct prompts, cycling through `tasks`."""
  if not tasks:
    raise ValueError("tasks must name at least one of " + ", ".join(TASKS))
  for task in tasks:
    if task not in TASKS:
      raise ValueError(f"unknown text task {task!r}; tasks are {TASKS}")
  rng = np.random.default_rng(seed)
  prompts: set[str] = set()
  records = []
  for i in range(num_examples):
    task = tasks[i % len(tasks)]
    for _ in range(_MAX_DRAWS_PER_EXAMPLE):
      record = draw_example(task, rng)
      if record is not None and record["prompt"] not in prompts:
        break
    else:
      raise ValueError(
        f"could not draw {num_examples} distinct {tasks} prompts; ask for fewer examples"
      )
    prompts.add(record["prompt"])
    records.append(record)
  return records


def write_text_task(
  out_dir: str | os.PathLike,
  *,
  num_train: int = DEFAULT_NUM_TRAIN,
  num_test: int = DEFAULT_NUM_TEST,
  seed: int = 0,
  tasks: Sequence[str] = TASKS,
) -> dict[str, str]:
  """Writes the train and test JSON Lines files; returns {split: path}.

  Train and test are one stream of distinct prompts cut in two (train first),
  so no test prompt occurs in training. Identical content is left untouched.
  """
  if num_train < 1 or num_test < 1:
    raise ValueError(
      f"need num_train >= 1 and num_test >= 1, got {num_train}, {num_test}"
    )
  records = generate(num_train + num_test, seed=seed, tasks=tuple(tasks))
  splits = {"train": records[:num_train], "test": records[num_train:]}
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  for split, split_records in splits.items():
    lines = (
      json.dumps({"id": f"{split}-{i}", **record}) + "\n"
      for i, record in enumerate(split_records)
    )
    paths[split] = os.path.join(out_dir, SPLIT_FILES[split])
    _write_if_changed(paths[split], "".join(lines).encode("utf-8"))
  return paths


def cached_files(
  *,
  num_train: int = DEFAULT_NUM_TRAIN,
  num_test: int = DEFAULT_NUM_TEST,
  seed: int = 0,
  cache_dir: str | None = None,
) -> dict[str, str]:
  """`write_text_task` into a per-user cache directory; returns {split: path}.

  For experiment configs that use the built-in task as data: the files are
  written on first use (and rewritten only if their content would change),
  under `$PSIPO_JAX_CACHE` or `~/.cache/psipo_jax`, in a directory named by
  the arguments, so configs with other sizes or seeds never share files.
  """
  root = cache_dir or os.environ.get(
    "PSIPO_JAX_CACHE",
    os.path.join(os.path.expanduser("~"), ".cache", "psipo_jax"),
  )
  out_dir = os.path.join(
    root, "text_task", f"seed{seed}-train{num_train}-test{num_test}"
  )
  return write_text_task(
    out_dir, num_train=num_train, num_test=num_test, seed=seed
  )


def _write_if_changed(path: str, data: bytes) -> None:
  """Atomic write (another host may be reading), skipped when nothing changes."""
  if os.path.exists(path):
    with open(path, "rb") as f:
      if f.read() == data:
        return
  summaries.write_atomically(path, data)


def main(
  argv: Sequence[str], *, out_dir, num_train, num_test, seed, tasks
) -> None:
  """The command line: writes the files and prints their paths."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  paths = write_text_task(
    out_dir,
    num_train=num_train,
    num_test=num_test,
    seed=seed,
    tasks=tuple(tasks),
  )
  for split, path in paths.items():
    print(f"{split}: {path}")


if __name__ == "__main__":
  # Flags are defined here, not at import, so that importing this module next
  # to another entry point cannot clash with its flags.
  _out_dir = flags.DEFINE_string(
    "out_dir", None, "Directory for train.jsonl and test.jsonl."
  )
  _num_train = flags.DEFINE_integer(
    "num_train", DEFAULT_NUM_TRAIN, "Training pairs."
  )
  _num_test = flags.DEFINE_integer(
    "num_test", DEFAULT_NUM_TEST, "Held-out pairs."
  )
  _seed = flags.DEFINE_integer("seed", 0, "Generator seed.")
  _tasks = flags.DEFINE_list(
    "tasks", list(TASKS), f"Tasks, a subset of {','.join(TASKS)}."
  )
  flags.mark_flag_as_required("out_dir")
  app.run(
    lambda argv: main(
      argv,
      out_dir=_out_dir.value,
      num_train=_num_train.value,
      num_test=_num_test.value,
      seed=_seed.value,
      tasks=_tasks.value,
    )
  )
