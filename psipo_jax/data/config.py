"""The `input` section of an experiment config: keys, defaults and validation.

Every key of `config.input` is listed below with its default. Each dataset
reads the common keys and its own; a key of the other dataset, a key that is
not listed, or a value of the wrong kind raises a `ValueError` naming
`input.<key>`; a misspelt key gets the closest valid name suggested.
`get_input_config(name)` returns exactly the keys dataset `name` reads.

Keys for every dataset:

  name              "preference_pairs" (text pairs) or "bandit_preferences"
                    (pairs over K actions).
  data_dir          Directory of prepared TFDS datasets. Required. A dataset
                    is prepared there on first use and reused afterwards.
  batch_size        GLOBAL batch size (all processes together). Must be
                    divisible by the number of processes.
  seed              Shuffle seed. The same seed gives the same batches.
  shuffle           Shuffle examples (a new permutation each epoch).
  num_epochs        Passes over the data; None repeats forever. Batches run
                    across epoch boundaries; the final partial batch is
                    dropped so that every batch has the same shape.
  prefetch_threads  Threads that prepare batches ahead of the consumer
                    (0: batches are made on demand in the calling thread).

Keys for `preference_pairs`:

  files             Local files: a path or glob, a list of them (one split,
                    "train", unless `split_percent` carves it), or a dict
                    {split: path, glob or list}.
  file_format       "auto" (from the extension: .jsonl/.ndjson, .json,
                    .parquet, the first two also gzipped as .jsonl.gz /
                    .json.gz), "jsonl", "json" or "parquet" (needs pyarrow).
  layout            How a record holds a pair (see `layouts.py`): "auto"
                    (each file's layout by a vote of its first valid
                    records; the choice is in the prepare summary),
                    "prompt_response", "shared_prefix", "chat" or
                    "chat_shared_prefix".
  fields            Names of the record fields: prompt, chosen, rejected,
                    weight, margin, chosen_reward, rejected_reward, id (all
                    but the pair's texts optional in the records; the two
                    rewards, given together, make the margin: layouts.py).
  response_marker   For "shared_prefix": the prompt ends just after the last
                    occurrence of this marker inside the longest common
                    prefix of chosen and rejected. "" splits at the longest
                    common prefix itself.
  chat_template     Rendering of one chat message: a string with exactly one
                    "{content}" and optionally "{role}"; or "hf:DIR", the
                    Jinja chat template of a Hugging Face model directory
                    (then set add_bos and append_eos False: it writes them).
  split_percent     None, or {split: percent} summing to 100: carves the
                    splits from `files` (a path, glob or list) by a seeded
                    permutation of the valid records.
  split_seed        Seed of that permutation.
  skip_invalid      False: the first invalid record raises an error naming
                    its file and line. True: invalid records are skipped,
                    counted in the summary, and the first few logged.
  tokenizer         "byte" (built in), "sentencepiece:PATH" (a .model file)
                    or "huggingface:PATH" (a tokenizer.json; "hf:" also
                    accepted).
  bos_token         Token strings overriding the tokenizer's own special
  eos_token         tokens (None: the tokenizer's, or those named in a
  pad_token         tokenizer_config.json beside a tokenizer.json). Without
                    a pad token the EOS id pads.
  add_bos           Start every sequence with BOS (when the tokenizer has one).
  append_eos        End every complete response with EOS. EOS is part of
                    the response and is scored.
  max_length        T, the length of every sequence in a batch.
  max_prompt_length The prompt is never cut below this many tokens (BOS
                    included). 1 <= max_prompt_length <= max_length. See
                    `encoding.truncate_pair` for the full policy.
  ref_logps_file    None, or a reference log-prob file (or {split: file}) of
                    summed log-probs and token counts, joined to the
                    examples by id; it must have been computed with this
                    run's token settings (see `reference_logps.py`).
  return_ids        Add the example ids to each batch as a NumPy string
                    array under "id" (host side only: not a JAX type).
  packing           Pack the batch's sequences several to a row of
                    max_length tokens (`packing.py`: segment ids, positions,
                    the same batch_size pairs per batch) instead of padding
                    each to max_length.
  packed_rows       With packing: None (the rows the pairs need, rounded up
                    to a multiple of the batch shards) or R, the fewest rows
                    of a global batch; a batch needing more gets more. A
                    fixed R keeps one shape (each new row count compiles the
                    train step once more).
  packed_row_length With packing: None (rows of max_length tokens) or the
                    tokens per packed row, at least max_length. Longer rows
                    take more of the pairs whose shared prompt and two
                    responses exceed max_length (`share_prompts`); with
                    model.attention="blocked" a row's cost is that of its
                    sequences, with "xla" it grows as the row length squared.
  share_prompts     With packing: hold each pair's prompt once, its chosen
                    and rejected responses branching from it (`packing.py`,
                    "Shared prompts"): fewer tokens for the same pairs and
                    log-probs. Needs a model that reads `branch_ids`
                    (the transformer does).

Keys for `bandit_preferences`:

  num_actions       K.
  pairs             Explicit [[winner, loser], ...] (a "train" split), or
  preference_matrix a K x K matrix P[i][j] = p(y_i > y_j) from which pairs
                    are sampled: y, y' ~ behaviour_policy independently, and
                    y wins with probability P[y][y'].
  behaviour_policy  mu, a distribution over the K actions (None: uniform).
  num_pairs         Pairs to sample: an int (a "train" split) or
                    {split: int}.
  data_seed         Seed of that sampling.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from ml_collections import config_dict

from psipo_jax import config_checks
from psipo_jax import finite_actions
from psipo_jax.data import layouts
from psipo_jax.data import reference_logps

DATASET_NAMES = ("preference_pairs", "bandit_preferences")
LAYOUTS = (
  "auto",
  "prompt_response",
  "shared_prefix",
  "chat",
  "chat_shared_prefix",
)
FILE_FORMATS = ("auto", "jsonl", "json", "parquet")
FIELD_ROLES = (
  "prompt",
  "chosen",
  "rejected",
  "weight",
  "margin",
  *layouts.REWARD_ROLES,
  "id",
)


COMMON_KEYS = (
  "name",
  "data_dir",
  "batch_size",
  "seed",
  "shuffle",
  "num_epochs",
  "prefetch_threads",
)


_TEXT_KEYS = (
  "files",
  "file_format",
  "layout",
  "fields",
  "response_marker",
  "chat_template",
  "split_percent",
  "split_seed",
  "skip_invalid",
  *reference_logps.TOKEN_KEYS,
  "ref_logps_file",
  "return_ids",
  "packing",
  "packed_rows",
  "packed_row_length",
  "share_prompts",
)
_BANDIT_KEYS = (
  "num_actions",
  "pairs",
  "preference_matrix",
  "behaviour_policy",
  "num_pairs",
  "data_seed",
)


def dataset_keys(name: str) -> tuple[str, ...]:
  """The `input.*` keys dataset `name` reads: the common ones and its own."""
  if name not in DATASET_NAMES:
    raise ValueError(f"input.name={name!r} is not one of {DATASET_NAMES}")
  return tuple(_all_defaults()[name])


def get_input_config(
  name: str = "preference_pairs",
) -> ml_collections.ConfigDict:
  """The `input` section of dataset `name`, every key at its default.

  Only the keys that dataset reads (see module doc): a key of the other
  dataset is refused by `parse_input_config`.
  """
  if name not in DATASET_NAMES:
    raise ValueError(f"input.name={name!r} is not one of {DATASET_NAMES}")
  c = _every_key()
  c.name = name
  for key in list(c.keys()):
    if key not in _all_defaults()[name]:
      del c[key]
  return c


def _all_defaults() -> dict[str, tuple[str, ...]]:
  return {
    "preference_pairs": COMMON_KEYS + _TEXT_KEYS,
    "bandit_preferences": COMMON_KEYS + _BANDIT_KEYS,
  }


def _every_key() -> ml_collections.ConfigDict:
  """Every key of both datasets at its default, common keys first."""
  c = ml_collections.ConfigDict()
  c.name = "preference_pairs"
  c.data_dir = config_dict.placeholder(str)
  c.batch_size = 8
  c.seed = 0
  c.shuffle = True
  c.num_epochs = config_dict.placeholder(int)
  c.prefetch_threads = 0
  # preference_pairs
  c.files = config_dict.placeholder(object)
  c.file_format = "auto"
  c.layout = "auto"
  c.fields = ml_collections.ConfigDict({role: role for role in FIELD_ROLES})
  c.response_marker = "\n\nAssistant:"
  c.chat_template = "<|{role}|>\n{content}\n"
  c.split_percent = config_dict.placeholder(object)
  c.split_seed = 0
  c.skip_invalid = False
  c.tokenizer = "byte"
  c.bos_token = config_dict.placeholder(str)
  c.eos_token = config_dict.placeholder(str)
  c.pad_token = config_dict.placeholder(str)
  c.add_bos = True
  c.append_eos = True
  c.max_length = 512
  c.max_prompt_length = 256
  c.ref_logps_file = config_dict.placeholder(object)
  c.return_ids = False
  c.packing = False
  c.packed_rows = config_dict.placeholder(int)
  c.packed_row_length = config_dict.placeholder(int)
  c.share_prompts = False
  # bandit_preferences
  c.num_actions = config_dict.placeholder(int)
  c.pairs = config_dict.placeholder(object)
  c.preference_matrix = config_dict.placeholder(object)
  c.behaviour_policy = config_dict.placeholder(object)
  c.num_pairs = config_dict.placeholder(object)
  c.data_seed = 0
  return c


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """Validated `config.input` (see the module docstring for each key)."""

  name: str
  data_dir: str
  batch_size: int
  seed: int
  shuffle: bool
  num_epochs: int | None
  prefetch_threads: int
  files: tuple[tuple[str, tuple[str, ...]], ...] | None  # ((split, paths), ...)
  file_format: str
  layout: str
  fields: tuple[tuple[str, str], ...]  # ((role, field name), ...)
  response_marker: str
  chat_template: str
  split_percent: tuple[tuple[str, float], ...] | None
  split_seed: int
  skip_invalid: bool
  tokenizer: str
  bos_token: str | None
  eos_token: str | None
  pad_token: str | None
  add_bos: bool
  append_eos: bool
  max_length: int
  max_prompt_length: int
  ref_logps_file: tuple[tuple[str, str], ...] | str | None
  return_ids: bool
  packing: bool
  packed_rows: int | None
  packed_row_length: int | None
  share_prompts: bool
  num_actions: int | None
  pairs: tuple[tuple[int, int], ...] | None
  preference_matrix: tuple[tuple[float, ...], ...] | None
  behaviour_policy: tuple[float, ...] | None
  num_pairs: tuple[tuple[str, int], ...] | None
  data_seed: int

  def ref_logps_path(self, split: str) -> str | None:
    if isinstance(self.ref_logps_file, tuple):
      return dict(self.ref_logps_file).get(split)
    return self.ref_logps_file


def parse_input_config(config: Any) -> InputConfig:
  """Validates an experiment config (or its `input` section) into InputConfig.

  Keys missing from `config.input` take their defaults; unknown keys and bad
  values raise `ValueError` naming `input.<key>`.
  """
  section = config.input if _has_key(config, "input") else config
  given = _to_plain(section)
  if not isinstance(given, Mapping):
    raise ValueError(
      f"config.input must be a mapping, got {type(given).__name__}"
    )
  name = given.get("name", "preference_pairs")
  read = dataset_keys(name)
  every = _to_plain(_every_key())
  for key in given:
    if key in read:
      continue
    if key in every:
      (owner,) = [n for n in DATASET_NAMES if n != name]
      raise ValueError(
        f"input.{key} is a key of input.name={owner!r}, which"
        f" input.name={name!r} does not read; remove it"
      )
    raise ValueError(
      config_checks.unknown_key_message(key, read, prefix="input.")
    )
  v = {**every, **given}
  fields = {**every["fields"], **(_mapping(v, "fields") or {})}
  for role in fields:
    if role not in FIELD_ROLES:
      raise ValueError(
        f"unknown config key input.fields.{role}; valid: {FIELD_ROLES}"
      )
    _string(fields, role, prefix="input.fields.")

  cfg = InputConfig(
    name=_choice(v, "name", DATASET_NAMES),
    data_dir=_string(v, "data_dir"),
    batch_size=_integer(v, "batch_size", minimum=1),
    seed=_integer(v, "seed"),
    shuffle=_boolean(v, "shuffle"),
    num_epochs=_integer(v, "num_epochs", minimum=1, optional=True),
    prefetch_threads=_integer(v, "prefetch_threads", minimum=0),
    files=_files(v),
    file_format=_choice(v, "file_format", FILE_FORMATS),
    layout=_choice(v, "layout", LAYOUTS),
    fields=tuple((role, fields[role]) for role in FIELD_ROLES),
    response_marker=_string(v, "response_marker", allow_empty=True),
    chat_template=_chat_template(v),
    split_percent=_split_percent(v),
    split_seed=_integer(v, "split_seed"),
    skip_invalid=_boolean(v, "skip_invalid"),
    tokenizer=_string(v, "tokenizer"),
    bos_token=_string(v, "bos_token", optional=True),
    eos_token=_string(v, "eos_token", optional=True),
    pad_token=_string(v, "pad_token", optional=True),
    add_bos=_boolean(v, "add_bos"),
    append_eos=_boolean(v, "append_eos"),
    max_length=_integer(v, "max_length", minimum=2),
    max_prompt_length=_integer(v, "max_prompt_length", minimum=1),
    ref_logps_file=_ref_logps_file(v),
    return_ids=_boolean(v, "return_ids"),
    packing=_boolean(v, "packing"),
    packed_rows=_integer(v, "packed_rows", minimum=1, optional=True),
    packed_row_length=_integer(
      v, "packed_row_length", minimum=2, optional=True
    ),
    share_prompts=_boolean(v, "share_prompts"),
    num_actions=_integer(v, "num_actions", minimum=2, optional=True),
    pairs=_pairs(v),
    preference_matrix=_matrix(v),
    behaviour_policy=_vector(v, "behaviour_policy"),
    num_pairs=_num_pairs(v),
    data_seed=_integer(v, "data_seed"),
  )
  if cfg.max_prompt_length > cfg.max_length:
    raise ValueError(
      f"input.max_prompt_length={cfg.max_prompt_length} must be <= "
      f"input.max_length={cfg.max_length}"
    )
  if cfg.packed_rows is not None and not cfg.packing:
    raise ValueError(
      f"input.packed_rows={cfg.packed_rows} is read only with"
      " input.packing=True; set it or drop input.packed_rows"
    )
  if cfg.packed_row_length is not None and not cfg.packing:
    raise ValueError(
      f"input.packed_row_length={cfg.packed_row_length} is read only with"
      " input.packing=True; set it or drop input.packed_row_length"
    )
  if cfg.packed_row_length is not None and (
    cfg.packed_row_length < cfg.max_length
  ):
    raise ValueError(
      f"input.packed_row_length={cfg.packed_row_length} must be >="
      f" input.max_length={cfg.max_length} (a sequence fits one row)"
    )
  if cfg.share_prompts and not cfg.packing:
    raise ValueError(
      "input.share_prompts=True shares prompts within packed rows; set"
      " input.packing=True or drop input.share_prompts"
    )
  if cfg.name == "preference_pairs" and cfg.files is None:
    raise ValueError(
      "input.files must be set for input.name='preference_pairs'"
    )
  if cfg.split_percent is not None and cfg.files is not None:
    if isinstance(v["files"], Mapping):
      raise ValueError(
        "input.split_percent carves splits from one set of files: give"
        " input.files as a path, glob or list, not a {split: files} dict"
      )
  if cfg.chat_template.startswith(layouts.HF_TEMPLATE_PREFIX):
    # The model's template writes BOS and the end of each turn itself.
    for key in ("add_bos", "append_eos"):
      if getattr(cfg, key):
        raise ValueError(
          f"input.{key} must be False with input.chat_template="
          f"{cfg.chat_template!r}: the model's template writes the special"
          " tokens itself"
        )
  if cfg.name == "bandit_preferences":
    _check_bandit(cfg)
  return cfg


# ---------------------------------------------------------------- helpers


def _has_key(config: Any, key: str) -> bool:
  try:
    return key in config
  except TypeError:
    return False


def _to_plain(value: Any) -> Any:
  """ConfigDicts (and FieldReferences inside them) to plain dicts/values."""
  if isinstance(value, ml_collections.ConfigDict):
    return {k: _to_plain(value[k]) for k in value.keys()}
  if isinstance(value, Mapping):
    return {k: _to_plain(x) for k, x in value.items()}
  if isinstance(value, config_dict.FieldReference):
    return _to_plain(value.get())
  return value


def _mapping(v: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
  value = v[key]
  if value is not None and not isinstance(value, Mapping):
    raise ValueError(f"input.{key} must be a mapping, got {value!r}")
  return value


def _string(v, key, *, optional=False, allow_empty=False, prefix="input."):
  value = v[key]
  if value is None and optional:
    return None
  if not isinstance(value, str) or (not value and not allow_empty):
    need = "a string" if allow_empty else "a non-empty string"
    raise ValueError(f"{prefix}{key} must be {need}, got {value!r}")
  return value


def _choice(v, key, choices):
  value = v[key]
  if value not in choices:
    raise ValueError(f"input.{key}={value!r} is not one of {choices}")
  return value


def _boolean(v, key):
  value = v[key]
  if not isinstance(value, bool):
    raise ValueError(f"input.{key} must be True or False, got {value!r}")
  return value


def _integer(v, key, *, minimum=None, optional=False):
  value = v[key]
  if value is None and optional:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"input.{key} must be an integer, got {value!r}")
  if minimum is not None and value < minimum:
    raise ValueError(f"input.{key}={value} must be >= {minimum}")
  return int(value)


def _paths(value: Any, key: str) -> tuple[str, ...]:
  if isinstance(value, str):
    value = [value]
  if (
    not isinstance(value, Sequence)
    or not value
    or not all(isinstance(p, str) and p for p in value)
  ):
    raise ValueError(
      f"{key} must be a path, a glob or a non-empty list of them, got {value!r}"
    )
  return tuple(value)


def _files(v):
  value = v["files"]
  if value is None:
    return None
  if isinstance(value, Mapping):
    if not value:
      raise ValueError("input.files is an empty mapping")
    return tuple(
      (str(split), _paths(paths, f"input.files.{split}"))
      for split, paths in sorted(value.items())
    )
  return (("train", _paths(value, "input.files")),)


def _split_percent(v):
  value = _mapping(v, "split_percent")
  if value is None:
    return None
  items = []
  for split, pct in sorted(value.items()):
    if (
      isinstance(pct, bool)
      or not isinstance(pct, numbers.Real)
      or not 0 < pct <= 100
    ):
      raise ValueError(
        f"input.split_percent.{split}={pct!r} must be a number in (0, 100]"
      )
    items.append((str(split), float(pct)))
  total = sum(p for _, p in items)
  if not math.isclose(total, 100.0, abs_tol=1e-6):
    raise ValueError(
      f"input.split_percent must sum to 100, got {total} ({dict(items)})"
    )
  return tuple(items)


def _chat_template(v):
  template = _string(v, "chat_template")
  if template.startswith(layouts.HF_TEMPLATE_PREFIX):
    try:
      layouts.model_chat_template(template[len(layouts.HF_TEMPLATE_PREFIX) :])
    except (OSError, ValueError) as e:
      raise ValueError(f"input.chat_template={template!r}: {e}") from None
    return template
  if template.count("{content}") != 1:
    raise ValueError(
      f"input.chat_template must contain '{{content}}' exactly once, got {template!r}"
    )
  return template


def _ref_logps_file(v):
  value = v["ref_logps_file"]
  if value is None or isinstance(value, str):
    return value or None
  if isinstance(value, Mapping):
    return tuple(
      (str(split), _string(value, split, prefix="input.ref_logps_file."))
      for split in sorted(value)
    )
  raise ValueError(
    f"input.ref_logps_file must be a path or {{split: path}}, got {value!r}"
  )


def _pairs(v):
  value = v["pairs"]
  if value is None:
    return None
  if not isinstance(value, Sequence) or isinstance(value, str) or not value:
    raise ValueError(
      f"input.pairs must be a non-empty list of [winner, loser], got {value!r}"
    )
  pairs = []
  for i, pair in enumerate(value):
    if (
      isinstance(pair, str)
      or not isinstance(pair, Sequence)
      or len(pair) != 2
      or not all(
        isinstance(a, numbers.Integral) and not isinstance(a, bool)
        for a in pair
      )
    ):
      raise ValueError(
        f"input.pairs[{i}]={pair!r} must be [winner, loser] action indices"
      )
    pairs.append((int(pair[0]), int(pair[1])))
  return tuple(pairs)


def _matrix(v):
  value = v["preference_matrix"]
  if value is None:
    return None
  if not isinstance(value, Sequence) or isinstance(value, str):
    raise ValueError(
      f"input.preference_matrix must be a K x K list of lists, got {value!r}"
    )
  return tuple(
    _real_row(row, f"input.preference_matrix[{i}]")
    for i, row in enumerate(value)
  )


def _vector(v, key):
  value = v[key]
  if value is None:
    return None
  return _real_row(value, f"input.{key}")


def _real_row(row, name):
  if isinstance(row, str) or not isinstance(row, Sequence):
    raise ValueError(f"{name} must be a list of numbers, got {row!r}")
  out = []
  for x in row:
    if (
      isinstance(x, bool)
      or not isinstance(x, numbers.Real)
      or not math.isfinite(x)
    ):
      raise ValueError(f"{name} must hold finite numbers, got {row!r}")
    out.append(float(x))
  return tuple(out)


def _num_pairs(v):
  value = v["num_pairs"]
  if value is None:
    return None
  items = value.items() if isinstance(value, Mapping) else [("train", value)]
  out = []
  for split, n in sorted(items):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
      name = (
        "input.num_pairs"
        if not isinstance(value, Mapping)
        else f"input.num_pairs.{split}"
      )
      raise ValueError(f"{name} must be a positive integer, got {n!r}")
    out.append((str(split), int(n)))
  return tuple(out)


def _check_bandit(cfg: InputConfig) -> None:
  """Cross-key checks for `bandit_preferences`, by `finite_actions`' rules
  (the runner's and the `pairs` input's); each error names its key."""
  k = cfg.num_actions
  if k is None:
    raise ValueError(
      "input.num_actions must be set for input.name='bandit_preferences'"
    )
  if (cfg.pairs is None) == (cfg.preference_matrix is None):
    raise ValueError(
      "set exactly one of input.pairs and input.preference_matrix"
    )
  if cfg.pairs is not None:
    finite_actions.check_pairs(cfg.pairs, k, key="input.pairs")
    return
  if cfg.num_pairs is None:
    raise ValueError(
      "input.num_pairs must be set to sample from input.preference_matrix"
    )
  finite_actions.check_preference(
    cfg.preference_matrix, k, key="input.preference_matrix"
  )
  if cfg.behaviour_policy is not None:
    mu = finite_actions.check_distribution(
      cfg.behaviour_policy, k, key="input.behaviour_policy"
    )
    if np.sum(mu > 0) < 2:
      raise ValueError(
        "input.behaviour_policy must put mass on at least two actions"
      )
