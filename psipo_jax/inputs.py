"""The training system's inputs: one entry per `input.name`, outside the loop.

    inputs.validate(config, workdir)                        # before training
    train_iter, eval_batches = inputs.build(config, mesh, data_key, workdir)

Each kind reads its own `input.*` keys and refuses every other key with the
nearest valid name; `train.py` knows none of them. Every kind yields only
this process's rows of each global batch, and its train iterator has
`get_state()` / `set_state()` (saved in every checkpoint, so a resumed run
sees exactly the batches an uninterrupted one would).

Kinds:
  "pairs"               an in-memory list `input.pairs` of (winner, loser)
                        actions, sampled by step (`pair_sampler`; the data
                        order follows the top-level `seed`, as in the
                        vmapped runner). Keys: name, batch_size, pairs.
  "bandit_preferences"  a TFDS dataset of action pairs read through the
                        Grain pipeline of `psipo_jax.data` (keys:
                        psipo_jax/data/config.py). `input.data_dir`
                        defaults to <workdir>/tfds (a local cache for a
                        gs:// workdir: `dataset_section`). Evaluation uses the
                        whole "test" split if the dataset has one, else the
                        whole "train" split.
  "preference_pairs"    text pairs for a model that scores tokens (keys:
                        psipo_jax/data/config.py); the tokenizer's vocabulary
                        must fit model.vocab_size. Evaluation runs over the
                        WHOLE "test" split (else "validation", else "train")
                        in global batches of input.batch_size, the last one
                        filled at weight 0, so its means are exact.
  "unpaired"            single responses: labelled for objective="kto"
                        (with its mismatched rows), labels optional for
                        objective="sft" (a prompt/completion file;
                        examples labelled false are skipped and counted)
                        (`psipo_jax.data.unpaired`); evaluation as for
                        text pairs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from psipo_jax import config_checks
from psipo_jax import data
from psipo_jax import finite_actions
from psipo_jax import models
from psipo_jax import pair_sampler
from psipo_jax import sharding
from psipo_jax import storage
from psipo_jax.data import sources as data_sources
from psipo_jax.data import unpaired as unpaired_data

Batch = dict[str, np.ndarray]
Train = Iterator[Batch]  # with get_state() / set_state()


@dataclasses.dataclass(frozen=True)
class InputKind:
  """One `input.name`.

  Attributes:
    validate: `(config, workdir) -> None`; raises ValueError naming the key.
    build: `(config, mesh, data_key, workdir) -> (train iterator, list of
      evaluation batches)`, this process's rows of each global batch.
  """

  validate: Callable[[ml_collections.ConfigDict, str], None]
  build: Callable[..., tuple[Train, list[Batch]]]


def _kind(config: ml_collections.ConfigDict) -> InputKind:
  name = config.input.get("name")
  if name not in INPUTS:
    raise ValueError(
      f"input.name={name!r} is not a known input; choose one of"
      f" {sorted(INPUTS)}"
    )
  return INPUTS[name]


def validate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks `input.*` and that the model scores what the input yields."""
  _kind(config).validate(config, workdir)


def build(
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  data_key: jax.Array,
  workdir: str,
) -> tuple[Train, list[Batch]]:
  """The train iterator and the evaluation batches of `config.input`.

  `data_key` drives the "pairs" sampler; a dataset's order is seeded by
  `input.seed`. Call `validate` first.
  """
  return _kind(config).build(config, mesh, data_key, workdir)


def _action_eval_batches(
  pairs: np.ndarray, mesh: jax.sharding.Mesh
) -> list[Batch]:
  """Every evaluation pair equally often, in one batch the devices split evenly."""
  batch = pair_sampler.all_pairs_batch(pairs, multiple=mesh.size)
  rows = sharding.local_batch_rows(mesh, len(batch["chosen"]))
  return [{k: v[rows] for k, v in batch.items()}]


def _check_action_model(
  config: ml_collections.ConfigDict, num_actions: Any, key: str
):
  if config.model.get("num_actions") != num_actions:
    raise ValueError(
      f"{key}={num_actions} differs from model.num_actions="
      f"{config.model.get('num_actions')}"
    )


# ------------------------------------------------------------------ "pairs"

_PAIRS_KEYS = ("name", "batch_size", "pairs")


def _validate_pairs(config: ml_collections.ConfigDict, workdir: str) -> None:
  del workdir
  if "seed" in config.input:
    raise ValueError(
      "input.seed is not read by input.name='pairs': its data order follows"
      " the top-level `seed` (as the vmapped runner's does); remove it"
    )
  config_checks.check_keys(config.input, _PAIRS_KEYS, prefix="input.")
  config_checks.integer(config.input, "batch_size", minimum=1, prefix="input.")
  num_actions = config.model.get("num_actions")
  if not isinstance(num_actions, int):
    raise ValueError(
      "input.name='pairs' scores action indices: set model.num_actions"
      " (and model.name='tabular')"
    )
  finite_actions.check_pairs(
    config.input.get("pairs"), num_actions, key="input.pairs"
  )


def _build_pairs(config, mesh, data_key, workdir):
  del workdir
  pairs = finite_actions.check_pairs(
    config.input.pairs, config.model.num_actions, key="input.pairs"
  )
  rows = sharding.local_batch_rows(mesh, config.input.batch_size)
  train = pair_sampler.PairSampler(
    pairs, batch_size=config.input.batch_size, data_key=data_key, rows=rows
  )
  return train, _action_eval_batches(pairs, mesh)


# ---------------------------------------------------- TFDS datasets (Grain)


def dataset_section(
  config: ml_collections.ConfigDict, workdir: str
) -> ml_collections.ConfigDict:
  """`config.input` as the data package reads it, with `data_dir` defaulting
  to <workdir>/tfds (a copy: the caller's config is left alone).

  The prepared array_record files must be on a local disk: ArrayRecord
  reads and writes local files only (google/array_record#120). So with a
  gs:// workdir the default is a host-local cache, `storage.local_cache`
  ("tfds"), where each host prepares its own copy (`data.sources`), and a
  gs:// `input.data_dir` is refused.
  """
  section = config.input.copy_and_resolve_references()
  data_dir = section.get("data_dir")
  if data_dir is not None and storage.is_remote(data_dir):
    raise ValueError(
      f"input.data_dir={data_dir!r}: the prepared dataset must be on a local"
      " disk (ArrayRecord reads local files only); leave input.data_dir unset"
      " for a host-local cache, or give a local directory"
    )
  if data_dir is None:
    with section.unlocked():
      section.data_dir = (
        storage.local_cache("tfds")
        if storage.is_remote(workdir)
        else os.path.join(workdir, "tfds")
      )
  return section


def _train_iterator(
  section: ml_collections.ConfigDict,
  total_steps: int,
  row_multiple: int | None = None,
):
  """The Grain iterator of the "train" split, one global batch per step.

  Process p yields the stream positions congruent to p modulo the process
  count; `sharding.global_batch` places them at this process's rows, so the
  global batch is the stream's batch up to a permutation of its rows, which
  the mean loss does not see.
  """
  train = data.make_preference_iterator(
    section, "train", row_multiple=row_multiple
  )
  if train.num_batches is not None and train.num_batches < total_steps:
    raise ValueError(
      f"input.num_epochs={section.num_epochs} gives {train.num_batches}"
      f" batches of input.batch_size={section.batch_size}, fewer than"
      f" total_steps={total_steps}; raise it or set it to None (repeat)"
    )
  return train


def _validate_bandit_dataset(
  config: ml_collections.ConfigDict, workdir: str
) -> None:
  cfg = data.parse_input_config(dataset_section(config, workdir))
  _check_action_model(config, cfg.num_actions, "input.num_actions")


def _whole_action_split(section: ml_collections.ConfigDict) -> np.ndarray:
  """[N, 2] (winner, loser): every pair of the "test" split, else of "train"."""
  builder = data_sources.prepare(data.parse_input_config(section))
  split = "test" if "test" in builder.info.splits else "train"
  logging.info(
    "Evaluating on the whole %r split of %s.", split, builder.info.full_name
  )
  whole = section.copy_and_resolve_references()
  whole.batch_size = builder.info.splits[split].num_examples
  # Every process reads the whole split, in its stored order, as one batch.
  (batch,) = data.make_preference_iterator(
    whole, split, process_index=0, process_count=1, shuffle=False, num_epochs=1
  )
  return np.stack([batch["chosen"], batch["rejected"]], axis=1)


def _build_bandit_dataset(config, mesh, data_key, workdir):
  del data_key  # The dataset's order is seeded by input.seed.
  section = dataset_section(config, workdir)
  train = _train_iterator(section, config.total_steps)
  return train, _action_eval_batches(_whole_action_split(section), mesh)


def _validate_text_pairs(
  config: ml_collections.ConfigDict, workdir: str
) -> None:
  cfg = data.parse_input_config(dataset_section(config, workdir))
  kind = models.INPUT_KINDS.get(config.model.get("name"))
  if kind != "tokens":
    raise ValueError(
      f"input.name='preference_pairs' yields token sequences, which"
      f" model.name={config.model.get('name')!r} does not score (it reads"
      f" {kind}); use a model that scores tokens:"
      f" {sorted(n for n, k in models.INPUT_KINDS.items() if k == 'tokens')}"
    )
  tokenizer = data.make_tokenizer(
    cfg.tokenizer,
    bos_token=cfg.bos_token,
    eos_token=cfg.eos_token,
    pad_token=cfg.pad_token,
  )
  ref_file = cfg.ref_logps_file
  if isinstance(ref_file, tuple) and "test" not in dict(ref_file):
    raise ValueError(
      f"input.ref_logps_file names {sorted(dict(ref_file))} but not 'test': the"
      " evaluation over the held-out split needs its reference log-probs too"
      " (python -m psipo_jax.precompute_reference scores every split)"
    )
  if cfg.packing:
    _check_packing(config)
  vocab_size = models.vocab_size(config.model)
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(
      f"input.tokenizer={cfg.tokenizer!r} has {tokenizer.vocab_size} tokens but"
      f" model.vocab_size={vocab_size}: every token id must be below"
      " model.vocab_size (set it to at least the tokenizer's)"
    )


def _check_packing(config: ml_collections.ConfigDict) -> None:
  """What input.packing=True cannot go with (data/packing.py)."""
  if (config.get("objective") or "psipo") == "sft":
    raise ValueError(
      "input.packing=True is for pairwise objectives; objective='sft' reads"
      " the padded chosen_* arrays: drop input.packing"
    )
  micro_batches = config.get("micro_batches") or 1
  if micro_batches > 1:
    # Micro-batches split rows and pairs apart, but a packed row's sequence
    # ids name pairs of the whole batch.
    raise ValueError(
      f"input.packing=True with micro_batches={micro_batches}: packed rows"
      " index the pairs of the whole batch; use micro_batches=1"
    )


def _check_packed_slices(mesh: jax.sharding.Mesh, batch_size: int) -> None:
  """Packed rows name global pairs and rows assuming process p feeds slice p
  of the batch (data/packing.py); refuse a mesh where it does not."""
  rows = sharding.local_batch_rows(mesh, batch_size)
  share = batch_size // jax.process_count()
  if rows.start != jax.process_index() * share:
    raise ValueError(
      f"input.packing=True: process {jax.process_index()} feeds rows"
      f" {rows.start}:{rows.stop} of the batch, not slice"
      f" {jax.process_index()}; packing needs the mesh's devices ordered"
      " process by process (drop input.packing on this mesh)"
    )


# Held-out splits, in order of preference, for evaluation.
_EVAL_SPLITS = ("test", "validation", "train")


def text_splits(section: ml_collections.ConfigDict) -> list[str]:
  """The splits of the (prepared) text dataset of `section`."""
  builder = data_sources.prepare(data.parse_input_config(section))
  return sorted(builder.info.splits)


def whole_text_split(
  section: ml_collections.ConfigDict, split: str | None = None
) -> tuple[str, Batch]:
  """(split, every pair of `split` as one host batch, in stored order).

  `split` defaults to the held-out one: "test", else "validation", else
  "train".
  """
  if split is None:
    available = text_splits(section)
    split = next(s for s in _EVAL_SPLITS if s in available)
  whole = section.copy_and_resolve_references()
  whole.batch_size = 1
  # Every pair once, in stored order, whatever the process: one row a batch,
  # padded (evaluation batches are not packed).
  rows = list(
    data.make_preference_iterator(
      whole,
      split,
      process_index=0,
      process_count=1,
      shuffle=False,
      num_epochs=1,
      packing=False,
    )
  )
  batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
  return split, batch


def eval_batches(
  whole: Batch, batch_size: int, mesh: jax.sharding.Mesh
) -> list[Batch]:
  """The whole split in global batches of `batch_size`, this process's rows.

  The last batch is filled with copies of its first row at weight 0, so
  every batch has one shape (one compilation) and the weighted means over
  all batches are exact means over the split.
  """
  n = len(next(iter(whole.values())))
  weight = whole.get("weight", np.ones(n, np.float32)).astype(np.float32)
  rows = sharding.local_batch_rows(mesh, batch_size)
  batches = []
  for start in range(0, n, batch_size):
    index = np.arange(start, min(start + batch_size, n))
    fill = batch_size - len(index)
    weights = np.concatenate([weight[index], np.zeros(fill, np.float32)])
    index = np.concatenate([index, np.full(fill, index[0])])  # [batch_size]
    batch = {k: v[index] for k, v in whole.items()}
    batch["weight"] = weights
    batches.append({k: v[rows] for k, v in batch.items()})
  return batches


def _build_text_pairs(config, mesh, data_key, workdir):
  del data_key  # The dataset's order is seeded by input.seed.
  section = dataset_section(config, workdir)
  if section.get("packing"):
    _check_packed_slices(mesh, config.input.batch_size)
  # Packed rows split over the batch shards like the pairs.
  train = _train_iterator(
    section, config.total_steps, row_multiple=sharding.batch_shards(mesh)
  )
  split, whole = whole_text_split(section)
  whole.pop("id", None)  # Host-side strings: not a model input.
  logging.info(
    "Evaluating on the whole %r split: %d pairs.",
    split,
    len(whole["chosen_input_ids"]),
  )
  return train, eval_batches(whole, config.input.batch_size, mesh)


# ------------------------------------------------------------- "unpaired"


def _validate_unpaired(config: ml_collections.ConfigDict, workdir: str) -> None:
  del workdir
  if (config.get("objective") or "psipo") not in ("kto", "sft"):
    raise ValueError(
      "input.name='unpaired' yields single responses, which only"
      " objective='kto' or 'sft' trains on"
    )
  unpaired_data.validate(config.input)
  kind = models.INPUT_KINDS.get(config.model.get("name"))
  if kind != "tokens":
    raise ValueError(
      f"input.name='unpaired' yields token sequences, which"
      f" model.name={config.model.get('name')!r} does not score"
    )
  encoder = unpaired_data.make_encoder(config.input)
  vocab_size = models.vocab_size(config.model)
  if encoder.tokenizer.vocab_size > vocab_size:
    raise ValueError(
      f"input.tokenizer={config.input.tokenizer!r} has"
      f" {encoder.tokenizer.vocab_size} tokens but"
      f" model.vocab_size={vocab_size}"
    )


def _build_unpaired(config, mesh, data_key, workdir):
  del data_key, workdir  # The order is seeded by input.seed.
  section = config.input
  paths = unpaired_data.split_paths(section)
  encoder = unpaired_data.make_encoder(section)
  kto = config.get("objective") == "kto"  # else SFT: labels optional
  examples = {}
  for split, split_paths in paths.items():
    read = unpaired_data.read_examples(split_paths, require_label=kto)
    if not kto:
      read = unpaired_data.desirable_only(read, split)
    examples[split] = unpaired_data.kept_after_truncation(encoder, read, split)
  train = unpaired_data.UnpairedIterator(
    examples["train"],
    encoder,
    batch_size=section.batch_size,
    seed=section.seed,
    shuffle=section.shuffle,
    num_epochs=section.get("num_epochs"),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    split="train",
    mismatched=kto,
  )
  if train.num_batches is not None and train.num_batches < config.total_steps:
    raise ValueError(
      f"input.num_epochs={section.num_epochs} gives {train.num_batches}"
      f" batches of input.batch_size={section.batch_size}, fewer than"
      f" total_steps={config.total_steps}; raise it or set it to None"
    )
  split = next(s for s in _EVAL_SPLITS if s in examples)
  logging.info(
    "Evaluating on the whole %r split: %d examples.",
    split,
    len(examples[split]),
  )
  rows = sharding.local_batch_rows(mesh, section.batch_size)
  batches = unpaired_data.eval_batches(
    examples[split], encoder, section.batch_size, mismatched=kto
  )
  return train, [{k: v[rows] for k, v in b.items()} for b in batches]


INPUTS: dict[str, InputKind] = {
  "pairs": InputKind(_validate_pairs, _build_pairs),
  "bandit_preferences": InputKind(
    _validate_bandit_dataset, _build_bandit_dataset
  ),
  "preference_pairs": InputKind(_validate_text_pairs, _build_text_pairs),
  "unpaired": InputKind(_validate_unpaired, _build_unpaired),
}
