"""Where metrics go: JSON lines and TensorBoard event files in the workdir.

`metrics.jsonl` holds one object per write, {"step": s, "split": "train" |
"eval", <metric>: value, ...}, easy to load with pandas or plain `json`.
TensorBoard scalars `<split>/<metric>` go to `tensorboard/`, written with
tensorboardX (event files without TensorFlow). Only process 0 writes. After
a resume, the steps between the last checkpoint and the interruption are
written again; readers should keep the last line per (split, step). The
workdir may be a gs:// or s3:// URL (`psipo_jax.storage`): both files are then
written through etils.epath, each object rewritten whole at every write.
"""

import json
import os
import sys
from collections.abc import Mapping

import jax
import numpy as np

from psipo_jax import storage


def _import_tensorboardx():
  """tensorboardX, imported without importing torch.

  tensorboardX's writer imports torch whenever it is installed, only to
  accept torch tensors as values (we write floats); that import alone costs
  each training process about 2 s of CPU (measured: `python -c "import
  torch"`, 2.2 s), so it is made to fail while tensorboardX loads. A torch
  already imported is left as it is.
  """
  if "torch" in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top

    return tensorboardX
  sys.modules["torch"] = None  # `import torch` raises ImportError
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return tensorboardX


tensorboardX = _import_tensorboardx()

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Writes scalar metrics to `<workdir>/metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir: str | os.PathLike[str]):
    self._enabled = jax.process_index() == 0
    if not self._enabled:
      return
    self._jsonl = storage.AppendLog(storage.join(workdir, JSONL_NAME))
    storage.register_tensorboard_schemes()
    self._tensorboard = tensorboardX.SummaryWriter(
      storage.join(storage.resolve(workdir), TENSORBOARD_DIR)
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
    for name, value in scalars.items():
      self._tensorboard.add_scalar(f"{split}/{name}", value, step)
    self._tensorboard.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tensorboard.close()
