"""A pass over a split with the pair encoder: lengths, truncation and drops.

The pipeline needs to know, before it shuffles and shards, which examples
survive truncation: a dropped example must leave the index space (so every
process agrees on every global batch and an epoch has a known length), not
leave a hole in a batch. `kept_indices` computes this once per split and
encoder, writes the summary (kept, dropped by reason, truncated, token-length
percentiles) beside the prepared dataset, logs it, and reuses it afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from absl import logging
import numpy as np

from psipo_jax.data import encoding
from psipo_jax.data import summaries

READ_CHUNK = 1024
PERCENTILES = (50, 90, 99, 100)


@dataclasses.dataclass(frozen=True)
class TokenStats:
  full_lengths: (
    np.ndarray
  )  # [N, 3] (prompt, chosen, rejected) tokens before truncation
  truncated: np.ndarray  # [N, 3] bool: (prompt, chosen, rejected) lost tokens
  drop_reasons: tuple[str | None, ...]  # [N]
  # Content of the split and which examples survive: equal digests mean the
  # same examples in the same order (what a restored iterator relies on).
  digest: str


def read_texts(record: dict[str, Any]) -> tuple[str, str, str]:
  """(prompt, chosen, rejected) of a TFDS record (text features are bytes)."""
  return tuple(
    record[k].decode("utf-8") for k in ("prompt", "chosen", "rejected")
  )


def iter_source(source, indices=None):
  """Yields the records of a random-access source in chunks (fewer reads)."""
  indices = range(len(source)) if indices is None else indices
  for start in range(0, len(indices), READ_CHUNK):
    yield from source.__getitems__(list(indices[start : start + READ_CHUNK]))


def scan(source, encoder: encoding.PairEncoder) -> TokenStats:
  """Truncates every pair of `source`; keeps what happened, not the tokens."""
  lengths, truncated, reasons = [], [], []
  digest = hashlib.sha256()
  for record in iter_source(source):
    texts = read_texts(record)
    pair = encoder.truncate(*texts)
    lengths.append(pair.full_lengths)
    truncated.append(pair.truncated)
    reasons.append(pair.drop_reason)
    fields = [
      record["id"].decode(),
      *texts,
      float(record["weight"]),
      float(record["margin"]),
    ]
    digest.update(json.dumps([fields, pair.drop_reason is None]).encode())
  return TokenStats(
    full_lengths=np.asarray(lengths, np.int64).reshape(-1, 3),
    truncated=np.asarray(truncated, bool).reshape(-1, 3),
    drop_reasons=tuple(reasons),
    digest=digest.hexdigest()[:32],
  )


def summarize(stats: TokenStats) -> dict[str, Any]:
  """Counts, rates and length percentiles (over all examples, pre-truncation)."""
  n = len(stats.drop_reasons)
  dropped: dict[str, int] = {}
  for reason in stats.drop_reasons:
    if reason is not None:
      dropped[reason] = dropped.get(reason, 0) + 1
  truncated = {
    "prompt": int(stats.truncated[:, 0].sum()),
    "chosen": int(stats.truncated[:, 1].sum()),
    "rejected": int(stats.truncated[:, 2].sum()),
    "any": int(stats.truncated.any(axis=1).sum()),
  }
  prompt, chosen, rejected = stats.full_lengths.T
  columns = {
    "prompt": prompt,
    "chosen": chosen,
    "rejected": rejected,
    "total": prompt + np.maximum(chosen, rejected),
  }
  return {
    "digest": stats.digest,
    "examples": n,
    "kept": n - sum(dropped.values()),
    "dropped": dropped,
    "truncated": truncated,
    "truncation_rate": {k: v / max(n, 1) for k, v in truncated.items()},
    "token_lengths": {
      name: {
        f"p{q}": float(np.percentile(values, q)) if n else 0.0
        for q in PERCENTILES
      }
      for name, values in columns.items()
    },
  }


def kept_indices(
  dataset_dir: str, split: str, source, encoder: encoding.PairEncoder
) -> tuple[np.ndarray, dict[str, Any]]:
  """Indices of `split` that survive truncation, and the split's summary.

  Cached in `dataset_dir` under a name keyed by the split and the encoder's
  fingerprint (tokenizer file, lengths, BOS/EOS), so a change re-scans.
  """
  key = hashlib.sha256(f"{split}|{encoder.fingerprint}".encode()).hexdigest()[
    :16
  ]
  path = os.path.join(dataset_dir, f"tokenized_{split}_{key}.json")
  if os.path.exists(path):
    cached = summaries.read_json(path)
    summary, dropped = cached["summary"], cached["dropped_indices"]
  else:
    stats = scan(source, encoder)
    summary = {
      "split": split,
      "encoder": encoder.fingerprint,
      **summarize(stats),
    }
    dropped = [
      [i, r] for i, r in enumerate(stats.drop_reasons) if r is not None
    ]
    summaries.write_json(path, {"summary": summary, "dropped_indices": dropped})
  _log(summary, dropped)
  keep = np.ones(len(source), bool)
  keep[[i for i, _ in dropped]] = False
  return np.flatnonzero(keep), summary


def _log(summary: dict[str, Any], dropped: list) -> None:
  logging.info(
    "split %s: %d examples, %d kept, dropped %s, truncated %s",
    summary["split"],
    summary["examples"],
    summary["kept"],
    summary["dropped"],
    summary["truncated"],
  )
  for index, reason in dropped[:5]:
    logging.warning(
      "split %s: example %d dropped: %s", summary["split"], index, reason
    )
