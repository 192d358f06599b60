"""psipo_jax.metric_writers: metrics.jsonl and TensorBoard events, without
importing torch (tensorboardX would, at 2 s of CPU per training process)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(
  importlib.util.find_spec("torch") is None, reason="torch is not installed"
)
def test_writing_metrics_imports_no_torch_and_torch_still_imports(tmp_path):
  script = f"""
import sys
from psipo_jax import metric_writers, train
writer = metric_writers.MetricWriter({str(tmp_path)!r})
writer.write(3, {{"loss": 0.5}}, split="train")
writer.close()
assert "torch" not in sys.modules, "torch was imported"
import torch  # a later import by the user still works
print(torch.tensor([1.0]).sum().item())
"""
  result = subprocess.run(
    [sys.executable, "-c", script],
    env=dict(os.environ, PYTHONPATH=REPO),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == "1.0"
  record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
  assert record == {"step": 3, "split": "train", "loss": 0.5}
  events = [
    name
    for _, _, files in os.walk(tmp_path)
    for name in files
    if name.startswith("events.out.tfevents")
  ]
  assert events, "no TensorBoard event file was written"
