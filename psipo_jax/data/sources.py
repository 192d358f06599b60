"""The prepared TFDS dataset of an input config, built on first use.

A dataset is prepared once under `input.data_dir` (array_record files, plus
`prepare_summary.json`) and reused while its builder config name, a
fingerprint of the files and options, is unchanged.

With several JAX processes, process 0 prepares first while the others wait at
a barrier; then any process that still finds nothing (a host-local data_dir)
prepares its own copy. Every process reaches the barrier, so none can hang.
"""

from __future__ import annotations

import importlib.util
import os

import jax
from jax.experimental import multihost_utils
import tensorflow_datasets as tfds

from psipo_jax.data import bandit_preferences
from psipo_jax.data import config as config_lib
from psipo_jax.data import preference_pairs
from psipo_jax.data import summaries


def make_builder(cfg: config_lib.InputConfig) -> tfds.core.DatasetBuilder:
  """The (possibly not yet prepared) builder for `cfg`."""
  if importlib.util.find_spec("importlib_resources") is None:
    # tensorflow-datasets 4.9 imports it when preparing a builder defined in a
    # package but declares it only for Python < 3.9 (tensorflow/datasets#11212).
    raise ImportError(
      "preparing a TFDS dataset needs: pip install importlib_resources"
    )
  if cfg.name == "preference_pairs":
    builder_cls, builder_config = (
      preference_pairs.PreferencePairs,
      preference_pairs.builder_config(cfg),
    )
  else:
    builder_cls, builder_config = (
      bandit_preferences.BanditPreferences,
      bandit_preferences.builder_config(cfg),
    )
  return builder_cls(
    config=builder_config,
    data_dir=os.path.expanduser(cfg.data_dir),
    file_format="array_record",  # the default, tfrecord, needs TensorFlow
  )


def prepare(cfg: config_lib.InputConfig) -> tfds.core.DatasetBuilder:
  """Prepares the dataset of `cfg` if needed; returns its ready builder."""
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      _prepare_if_missing(cfg)
    multihost_utils.sync_global_devices("psipo_jax.data.prepare")
  return _prepare_if_missing(cfg)


def _prepare_if_missing(cfg):
  builder = make_builder(cfg)
  if not builder.is_prepared():
    builder.download_and_prepare()
    builder = make_builder(cfg)  # re-reads the dataset info just written
  return builder


def data_source(builder: tfds.core.DatasetBuilder, split: str):
  """Random-access source of `split`; an unknown split names the valid ones."""
  if split not in builder.info.splits:
    raise ValueError(
      f"split {split!r} is not in dataset {builder.info.full_name}; its splits:"
      f" {sorted(builder.info.splits)}"
    )
  return builder.as_data_source(split)


def prepare_summary(builder: tfds.core.DatasetBuilder) -> dict:
  return summaries.read_prepare_summary(os.fspath(builder.data_dir))
