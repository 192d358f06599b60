"""TFDS builder `preference_pairs`: text preference pairs from local files.

The builder config carries the files (JSON Lines, JSON or Parquet; JSON gzipped
or not, see `readers.py`) and how to read them (see `layouts.py`). Preparation makes two passes over the files:

1. a scan that validates every record, tallies what is kept and dropped, carves
   splits by percentage if asked, and writes `prepare_summary.json` beside the
   prepared dataset (also logged); the first invalid record raises `DataError`
   naming its file and line unless `skip_invalid`;
2. the generation of each split, which re-reads the files and yields exactly
   the records the scan kept, in file order.

The dataset is written as array_record (no TensorFlow needed) and read back
with `tfds.data_source` / `builder.as_data_source`. Every example has:
  id (text), prompt (text), chosen (text), rejected (text),
  weight (float32, 1.0 when absent), margin (float32, 0.0 when absent;
  chosen_reward - rejected_reward when a record gives those instead).
The summary's "optional_fields" lists which of weight/margin the files gave
(each source's "records_with" how many kept records gave each),
and each source's "layouts" which layout each file was read with and why
(`choose_layout`: with layout "auto", a vote of the first valid records).

A record without an id gets "<path relative to the dataset's files' common
directory>:<line or record index>" (`readers.Location.default_id`), unique
across every file of every split.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from typing import Any

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from psipo_jax import storage
from psipo_jax.data import config as config_lib
from psipo_jax.data import layouts
from psipo_jax.data import readers
from psipo_jax.data import summaries

MAX_LOGGED_REASONS = 5
DETECT_LAYOUT_RECORDS = (
  100  # valid records that vote on a file's layout (layout "auto")
)
CARVED_SOURCE = (
  "all"  # summary key of the files that input.split_percent carves
)


@dataclasses.dataclass(eq=False)
class PreferencePairsConfig(tfds.core.BuilderConfig):
  """Builder config: which files, and how to read them (see config.py)."""

  files: tuple[
    tuple[str, tuple[str, ...]], ...
  ] = ()  # ((split, abs paths), ...)
  file_format: str = "auto"
  layout: str = "auto"
  fields: tuple[tuple[str, str], ...] = ()
  response_marker: str = ""
  chat_template: str = "{content}"
  split_percent: tuple[tuple[str, float], ...] | None = None
  split_seed: int = 0
  skip_invalid: bool = False


def builder_config(cfg: config_lib.InputConfig) -> PreferencePairsConfig:
  """The builder config for `cfg`; its name fingerprints files and options.

  The name changes when a file's path, size or modification time changes, or
  any reading option does, so a stale prepared dataset is never reused.
  """
  files = tuple(
    (split, tuple(readers.expand_paths(patterns, key=f"input.files ({split})")))
    for split, patterns in cfg.files
  )
  options = dict(
    files=files,
    file_format=cfg.file_format,
    layout=cfg.layout,
    fields=cfg.fields,
    response_marker=cfg.response_marker,
    chat_template=cfg.chat_template,
    split_percent=cfg.split_percent,
    split_seed=cfg.split_seed,
    skip_invalid=cfg.skip_invalid,
  )
  stats = [(p, *storage.size_and_mtime(p)) for _, ps in files for p in ps]
  digest = hashlib.sha256(json.dumps([options, stats]).encode()).hexdigest()
  return PreferencePairsConfig(
    name=f"files_{digest[:16]}",
    description=f"Preference pairs from {', '.join(p for _, ps in files for p in ps)}",
    **options,
  )


class PreferencePairs(tfds.core.GeneratorBasedBuilder):
  """Text preference pairs (prompt, chosen, rejected) from local files."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "First release.",
    "1.1.0": (
      "Default ids are paths relative to the files' common directory (unique across"
      " files of the same name); layout 'auto' is voted by valid records; text that"
      " is not Unicode (lone surrogates) is an invalid record."
    ),
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "prompt": tfds.features.Text(),
          "chosen": tfds.features.Text(),
          "rejected": tfds.features.Text(),
          "weight": tfds.features.Scalar(np.float32),
          "margin": tfds.features.Scalar(np.float32),
        }
      ),
      # Keep file order on disk; the pipeline shuffles with its own seed.
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    bc = self.builder_config
    sources = dict(
      bc.files
    )  # {split: paths}, or one source to carve splits from
    if bc.split_percent is not None:
      sources = {CARVED_SOURCE: sources["train"]}
    tallies = {source: _Tally() for source in sources}
    counts = {
      source: sum(1 for _ in iter_pairs(paths, bc, tallies[source]))
      for source, paths in sources.items()
    }
    if bc.split_percent is None:
      assignment = None
      split_sizes = counts
    else:
      (source,) = sources
      assignment, split_sizes = carve_splits(
        counts[source], bc.split_percent, seed=bc.split_seed
      )
    summary = _summary(bc.name, sources, tallies, split_sizes)
    summaries.write_json(
      os.path.join(self.data_dir, summaries.PREPARE_SUMMARY), summary
    )
    _log_summary(self.name, summary)
    for split, size in split_sizes.items():
      if size == 0:
        raise readers.DataError(
          f"split {split!r} has no valid records (summary: {summary['sources']});"
          " check input.files, input.layout and input.split_percent"
        )
    if assignment is None:
      return {
        split: self._generate_examples(paths=paths)
        for split, paths in sources.items()
      }
    (paths,) = sources.values()
    return {
      split: self._generate_examples(
        paths=paths, assignment=assignment, split_index=i
      )
      for i, split in enumerate(split_sizes)
    }

  def _generate_examples(
    self,
    *,
    paths: tuple[str, ...],
    assignment: np.ndarray | None = None,  # [num valid records] split index
    split_index: int = 0,
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    for position, pair in enumerate(
      iter_pairs(paths, self.builder_config, tally=None)
    ):
      if assignment is not None and assignment[position] != split_index:
        continue
      yield (
        pair.id,
        {
          "id": pair.id,
          "prompt": pair.prompt,
          "chosen": pair.chosen,
          "rejected": pair.rejected,
          "weight": 1.0 if pair.weight is None else pair.weight,
          "margin": 0.0 if pair.margin is None else pair.margin,
        },
      )


@dataclasses.dataclass
class _Tally:
  """What happened to the records of one source (a split's files)."""

  records: int = 0
  kept: int = 0
  identical_dropped: int = 0
  invalid: collections.Counter = dataclasses.field(
    default_factory=collections.Counter
  )
  first_invalid: list[str] = dataclasses.field(default_factory=list)
  optional_fields: set[str] = dataclasses.field(default_factory=set)
  # Kept records that gave the field, per optional field.
  records_with: collections.Counter = dataclasses.field(
    default_factory=collections.Counter
  )
  layouts: dict[str, dict[str, Any]] = dataclasses.field(
    default_factory=dict
  )  # {path: ...}


def iter_pairs(
  paths: tuple[str, ...], bc: PreferencePairsConfig, tally: _Tally | None
) -> Iterator[layouts.PreferencePair]:
  """Valid pairs of `paths` in order. Deterministic, so the scan and the
  generation agree record for record; only the scan passes a `tally`."""
  fields = dict(bc.fields)
  # Every file of every split: default ids are unique across splits too.
  root = readers.id_root(
    [p for _, split_paths in bc.files for p in split_paths]
  )
  seen_ids: dict[str, readers.Location] = {}
  for path in paths:
    fmt = readers.file_format(path, bc.file_format)
    layout, items = choose_layout(path, readers.iter_records(path, fmt), bc)
    if tally is not None:
      tally.layouts[path] = layout
    for item in items:
      if tally is not None:
        tally.records += 1
      try:
        if isinstance(item, readers.MalformedRecord):
          raise layouts.InvalidRecord(item.kind, item.reason)
        pair = _parse(
          item,
          layout["layout"],
          bc,
          fields,
          default_id=item.location.default_id(root),
        )
        if pair.id in seen_ids:
          raise layouts.InvalidRecord(
            "duplicate_id",
            f"id {pair.id!r} is already used at {seen_ids[pair.id]}",
          )
      except layouts.IdenticalResponses:
        if tally is not None:
          tally.identical_dropped += 1
        continue
      except layouts.InvalidRecord as e:
        message = f"{item.location}: {e.message}"
        if not bc.skip_invalid:
          raise readers.DataError(
            f"{message} (set input.skip_invalid=True to skip and count such records)"
          ) from None
        if tally is not None:
          tally.invalid[e.kind] += 1
          if len(tally.first_invalid) < MAX_LOGGED_REASONS:
            tally.first_invalid.append(message)
        continue
      seen_ids[pair.id] = item.location
      if tally is not None:
        tally.kept += 1
        given = [
          name
          for name in ("weight", "margin")
          if getattr(pair, name) is not None
        ]
        tally.optional_fields.update(given)
        tally.records_with.update(given)
      yield pair


def _parse(item, layout, bc, fields, *, default_id) -> layouts.PreferencePair:
  return layouts.parse_pair(
    item.value,
    layout=layout,
    fields=fields,
    response_marker=bc.response_marker,
    chat_template=bc.chat_template,
    default_id=default_id,
  )


def choose_layout(
  path: str,
  items: Iterator[readers.RawRecord | readers.MalformedRecord],
  bc: PreferencePairsConfig,
) -> tuple[
  dict[str, Any], Iterator[readers.RawRecord | readers.MalformedRecord]
]:
  """The layout of one file, and its records (none lost to the detection).

  With `input.layout="auto"`, each of the first `DETECT_LAYOUT_RECORDS` records
  that is valid under the layout its own fields suggest (`detect_layout`) is
  a vote; the most voted layout wins (the first seen among equals). Invalid
  records do not vote, so a bad first record cannot decide for the file.

  Returns:
    ({"layout": name, "chosen_by": why, ...}, the file's records from the first).
  """
  if bc.layout != "auto":
    return {"layout": bc.layout, "chosen_by": "input.layout"}, items
  fields = dict(bc.fields)
  examined: list[readers.RawRecord | readers.MalformedRecord] = []
  votes: collections.Counter = collections.Counter()
  first_valid = first_guess = None
  for item in items:
    examined.append(item)
    if not isinstance(item, readers.RawRecord):
      continue
    try:
      guess = layouts.detect_layout(item.value, fields)
    except layouts.InvalidRecord:
      continue  # not an object
    first_guess = first_guess or guess
    try:
      _parse(item, guess, bc, fields, default_id="-")
    except layouts.IdenticalResponses:
      pass  # well formed: the pair is dropped later, but its layout is clear
    except layouts.InvalidRecord:
      continue
    votes[guess] += 1
    first_valid = first_valid or item.location
    if sum(votes.values()) == DETECT_LAYOUT_RECORDS:
      break
  records = itertools.chain(examined, items)
  if not votes:
    # Every record examined is invalid: report them under the layout the first
    # object's fields suggest.
    layout = first_guess or "prompt_response"
    return {
      "layout": layout,
      "chosen_by": f"auto: no valid record in {path}; every record is checked as {layout}",
    }, records
  (layout, count), total = votes.most_common(1)[0], sum(votes.values())
  info = {
    "layout": layout,
    "chosen_by": (
      f"auto: {count} of the first {total} valid records (from {first_valid}) are {layout}"
    ),
    "votes": dict(votes),
  }
  return info, records


def carve_splits(
  num_records: int, split_percent: tuple[tuple[str, float], ...], *, seed: int
) -> tuple[np.ndarray, dict[str, int]]:
  """Assigns records to splits by a seeded permutation: exact sizes, no order bias.

  Returns (assignment [num_records] of split indices into `split_percent`,
  {split: size}). Sizes are rounded cumulative shares, so they sum to N.
  """
  permutation = np.random.default_rng(seed).permutation(num_records)
  cumulative = np.cumsum([pct for _, pct in split_percent])
  bounds = (
    [0]
    + [int(round(num_records * c / 100.0)) for c in cumulative[:-1]]
    + [num_records]
  )
  assignment = np.empty(num_records, np.int32)
  sizes = {}
  for i, (split, _) in enumerate(split_percent):
    assignment[permutation[bounds[i] : bounds[i + 1]]] = i
    sizes[split] = bounds[i + 1] - bounds[i]
  return assignment, sizes


def _summary(name, sources, tallies, split_sizes) -> dict[str, Any]:
  return {
    "config": name,
    "splits": dict(split_sizes),
    "optional_fields": sorted(
      set().union(*(t.optional_fields for t in tallies.values()))
    ),
    "sources": {
      source: {
        "files": list(sources[source]),
        "records": t.records,
        "kept": t.kept,
        "identical_dropped": t.identical_dropped,
        "invalid": sum(t.invalid.values()),
        "invalid_by_kind": dict(sorted(t.invalid.items())),
        "first_invalid": t.first_invalid,
        "records_with": dict(sorted(t.records_with.items())),
        "layouts": t.layouts,
      }
      for source, t in tallies.items()
    },
  }


def _log_summary(name: str, summary: dict[str, Any]) -> None:
  for source, s in summary["sources"].items():
    logging.info(
      "%s (%s): %d records read, %d kept, %d invalid %s, %d dropped as chosen == rejected",
      name,
      source,
      s["records"],
      s["kept"],
      s["invalid"],
      s["invalid_by_kind"],
      s["identical_dropped"],
    )
    for path, layout in s["layouts"].items():
      logging.info(
        "%s: %s read as %s (%s)",
        name,
        path,
        layout["layout"],
        layout["chosen_by"],
      )
      if len(layout.get("votes", ())) > 1:
        logging.warning(
          "%s: %s mixes layouts %s; records of the others are invalid (set input.layout)",
          name,
          path,
          layout["votes"],
        )
    for reason in s["first_invalid"]:
      logging.warning("%s: skipped invalid record: %s", name, reason)
  logging.info("%s splits: %s", name, summary["splits"])
