r"""Inspect the preference data of an experiment config.

    python -m psipo_jax.data.inspect --config=experiments/my_config.py \
        [--config.input.max_length=256] [--split=train] [--num_examples=3]

Prepares the dataset if needed, then prints for each split: its size and what
preparation dropped, token-length percentiles (before truncation), truncation
and drop rates under the configured lengths, and a few examples decoded
token-exactly, with the loss-masked response tokens between ⟦ and ⟧; with
`input.packing=True`, the packing efficiency against padding.
For `bandit_preferences`: pairs per split and the win counts between actions.
"""

from __future__ import annotations

import functools
import sys
from typing import TextIO

from absl import flags
import numpy as np
from ml_collections import config_flags

from psipo_jax import cli
from psipo_jax import config_checks
from psipo_jax.data import config as config_lib
from psipo_jax.data import pipeline
from psipo_jax.data import preference_pairs
from psipo_jax.data import sources
from psipo_jax.data import token_stats
from psipo_jax.data import tokenizers
from psipo_jax.data.readers import DataError

RESPONSE_OPEN, RESPONSE_CLOSE = "⟦", "⟧"


def render_marked(
  tokenizer: tokenizers.Tokenizer,
  input_ids: np.ndarray,
  loss_mask: np.ndarray,
  attention_mask: np.ndarray,
) -> str:
  """One packed row as text: special tokens named, loss-masked runs in ⟦ ⟧.

  Args:
    tokenizer: decodes the ids.
    input_ids: [T] ids.
    loss_mask: [T] 1 on the scored response tokens.
    attention_mask: [T] 1 on the non-padding tokens.
  """
  names = {tokenizer.bos_id: "<bos>", tokenizer.eos_id: "<eos>"}
  pieces, run, run_masked = [], [], None

  def flush():
    if run:
      text = "".join(_decode_run(tokenizer, run, names))
      pieces.append(
        f"{RESPONSE_OPEN}{text}{RESPONSE_CLOSE}" if run_masked else text
      )

  n = int(np.sum(attention_mask))  # right padding: the real tokens come first
  for token, masked in zip(input_ids[:n].tolist(), loss_mask[:n].tolist()):
    if masked != run_masked:
      flush()
      run, run_masked = [], masked
    run.append(token)
  flush()
  if n < len(input_ids):
    pieces.append(f"<pad>×{len(input_ids) - n}")
  return "".join(pieces)


def _decode_run(tokenizer, ids, names):
  """Decodes ordinary ids together (multi-token characters), names the special ones."""
  chunk = []
  for token in ids:
    if token in names:
      if chunk:
        yield tokenizer.decode(chunk)
        chunk = []
      yield names[token]
    else:
      chunk.append(token)
  if chunk:
    yield tokenizer.decode(chunk)


def report(
  config, *, splits=None, num_examples: int = 3, out: TextIO = sys.stdout
) -> None:
  """Prints the inspection report of `config` (see the module docstring)."""
  cfg = config_lib.parse_input_config(config)
  builder = sources.prepare(cfg)
  prepared = sources.prepare_summary(builder)
  print(f"dataset {builder.info.full_name} in {builder.data_dir}", file=out)
  for split in splits or sorted(builder.info.splits):
    source = sources.data_source(builder, split)
    print(f"\n== split {split}: {len(source)} examples", file=out)
    if cfg.name == "bandit_preferences":
      _report_bandit(prepared, split, out)
    else:
      _report_pairs(cfg, prepared, split, source, num_examples, out)
      if cfg.packing:
        _report_packing(config, cfg, split, out)


def _report_bandit(prepared, split, out):
  print("wins[i][j] (action i preferred to action j):", file=out)
  for i, row in enumerate(prepared["wins"][split]):
    print(f"  {i}: {row}", file=out)


def _report_pairs(cfg, prepared, split, source, num_examples, out):
  carved = split not in prepared["sources"]
  source_summary = prepared["sources"][
    preference_pairs.CARVED_SOURCE if carved else split
  ]
  print(
    "preparation (of the files of this split{}): {} records, {} kept, {} invalid {},"
    " {} dropped as chosen == rejected".format(
      ", before carving" if carved else "",
      source_summary["records"],
      source_summary["kept"],
      source_summary["invalid"],
      source_summary["invalid_by_kind"],
      source_summary["identical_dropped"],
    ),
    file=out,
  )
  encoder = pipeline.make_encoder(cfg)
  stats = token_stats.scan(source, encoder)
  summary = token_stats.summarize(stats)
  print(
    f"token lengths before truncation ({cfg.tokenizer}; prompt with BOS,"
    " responses with EOS; total = prompt + longer response):",
    file=out,
  )
  for name, q in summary["token_lengths"].items():
    cells = "  ".join(f"{k}={v:g}" for k, v in q.items())
    print(f"  {name:<9}{cells}", file=out)
  rates = summary["truncation_rate"]
  print(
    f"truncation at max_length={cfg.max_length}, max_prompt_length="
    f"{cfg.max_prompt_length}: prompt {rates['prompt']:.1%}, chosen"
    f" {rates['chosen']:.1%}, rejected {rates['rejected']:.1%}, any {rates['any']:.1%}",
    file=out,
  )
  print(
    f"dropped by truncation: {summary['dropped'] or 'none'}; kept {summary['kept']}",
    file=out,
  )
  shown = [i for i, r in enumerate(stats.drop_reasons) if r is None][
    :num_examples
  ]
  for index in shown:
    record = source[index]
    encoded = encoder.encode(*token_stats.read_texts(record))
    print(f"\n-- example {index} (id {record['id'].decode()})", file=out)
    for side in ("chosen", "rejected"):
      text = render_marked(
        encoder.tokenizer,
        encoded[f"{side}_input_ids"],
        encoded[f"{side}_loss_mask"],
        encoded[f"{side}_attention_mask"],
      )
      print(f"{side}: {text!r}", file=out)


def _report_packing(config, cfg, split, out):
  """The packed layout's efficiency (data/packing.py) against padding's."""
  try:
    iterator = pipeline.make_preference_iterator(
      config, split, process_index=0, process_count=1
    )
  except ValueError as e:  # e.g. fewer examples than one batch
    print(f"packing: not measured ({e})", file=out)
    return
  s = iterator.summary["packing"]
  print(
    f"packing (batch_size={cfg.batch_size}, one process): real tokens /"
    f" slots {s['efficiency']:.1%} packed vs {s['padded_efficiency']:.1%}"
    f" padded, over the first {s['batches']} batches; rows per batch"
    f" {s['rows_min']}-{s['rows_max']} (padded: {2 * cfg.batch_size})",
    file=out,
  )


def main(argv, *, config_flag, split_flag, num_examples_flag):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  config = config_flag.value
  with cli.user_errors():  # Before any work: the keys, the directory.
    cfg = config_lib.parse_input_config(config)
    config_checks.writable_directory(cfg.data_dir, name="input.data_dir")
  try:
    report(
      config, splits=split_flag.value, num_examples=num_examples_flag.value
    )
  except DataError as e:  # Names the file and line: the user's to fix.
    cli.fail(str(e))


if __name__ == "__main__":
  # Flags are defined here, not at import, so importing this module next to
  # another entry point that defines --config cannot clash.
  _config = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file."
  )
  _split = flags.DEFINE_multi_string(
    "split", None, "Split(s) to show (default: all)."
  )
  _num_examples = flags.DEFINE_integer(
    "num_examples", 3, "Decoded examples per split."
  )
  flags.mark_flag_as_required("config")
  cli.run(
    functools.partial(
      main,
      config_flag=_config,
      split_flag=_split,
      num_examples_flag=_num_examples,
    )
  )
