"""Where metrics go: JSON lines and TensorBoard event files in the workdir.

`metrics.jsonl` holds one object per write, {"step": s, "split": "train" |
"eval", <metric>: value, ...}, easy to load with pandas or plain `json`.
TensorBoard scalars `<split>/<metric>` go to `tensorboard/`, written with
tensorboardX (event files without TensorFlow). Only process 0 writes. After
a resume, the steps between the last checkpoint and the interruption are
written again; readers should keep the last line per (split, step).
"""

import json
import os
from collections.abc import Mapping

import jax
import numpy as np
import tensorboardX

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Writes scalar metrics to `<workdir>/metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir: str | os.PathLike[str]):
    self._enabled = jax.process_index() == 0
    if not self._enabled:
      return
    self._jsonl = open(os.path.join(workdir, JSONL_NAME), "a", encoding="utf-8")
    self._tensorboard = tensorboardX.SummaryWriter(
      os.path.join(workdir, TENSORBOARD_DIR)
    )

  def write(
    self, step: int, metrics: Mapping[str, float], *, split: str
  ) -> None:
    if not self._enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self._jsonl.write(
      json.dumps({"step": step, "split": split, **scalars}) + "\n"
    )
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(f"{split}/{name}", value, step)
    self._tensorboard.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tensorboard.close()
