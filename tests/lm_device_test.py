"""benchmarks/lm_device.py runs (a CPU smoke run of its code path; its
figures are only meaningful on an accelerator)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
_SPEC = importlib.util.spec_from_file_location(
  "lm_device", _PATH / "lm_device.py"
)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_the_batch_scores_response_halves_with_precomputed_references():
  batch = bench.make_batch(3, 8, vocab=50)
  for side in ("chosen", "rejected"):
    np.testing.assert_array_equal(
      batch[f"{side}_loss_mask"].sum(axis=1), [4, 4, 4]
    )
    assert batch[f"{side}_input_ids"].max() < 50
    assert batch[f"ref_{side}_logps"].shape == (3,)


def test_a_tiny_preset_reports_throughput_memory_and_mfu(monkeypatch, capsys):
  monkeypatch.setattr(
    sys,
    "argv",
    [
      "lm_device.py",
      "--presets=tiny",
      "--batch_sizes=2",
      "--steps=1",
      "--seq_len=16",
      "--peak_tflops=1",
    ],
  )
  bench.main()
  out = capsys.readouterr().out
  assert "tiny:" in out and "tokens/s" in out and "MFU" in out, out


def test_a_batch_over_the_memory_limit_is_skipped_for_the_next(
  monkeypatch, capsys
):
  class Chip:  # what run_preset reads of a device: its allocator's limit
    def memory_stats(self):
      return {"bytes_limit": 2**30}

  needs = iter([2**40, 2**20])  # XLA's analysis: 1 TiB, then 1 MiB
  monkeypatch.setattr(bench, "compiled_bytes", lambda compiled: next(needs))
  args = bench.argparse.Namespace(
    attention="xla", remat=False, batch_sizes=[4, 2], seq_len=16, steps=1
  )
  bench.run_preset(args, "tiny", Chip(), peak=1.0)
  out = capsys.readouterr().out
  assert "4 pairs need 1024.0 GiB > 1.0 GiB" in out, out
  assert "2 pairs x 16 tokens" in out and "0.0 GiB by XLA's" in out, out


def test_an_unknown_chip_needs_its_peak():
  class Chip:
    device_kind = "a chip nobody lists"

  with pytest.raises(SystemExit, match="pass --peak_tflops"):
    bench.peak_tflops(Chip(), None)
  assert bench.peak_tflops(Chip(), 123.0) == 123.0


@pytest.mark.slow
def test_the_one_shot_device_script_runs_each_configuration(tmp_path):
  # benchmarks/lm_device_check.sh is what a session lent an accelerator runs
  # at once; on CPU its smoke settings exercise every line but the cuDNN run.
  env = {
    **os.environ,
    "PRESETS": "tiny",
    "BATCH_SIZES": "2",
    "STEPS": "1",
    "SEQ_LEN": "16",
    "PEAK_TFLOPS": "1",
    "PYTHON": sys.executable,
    "OUT": str(tmp_path),
    "JAX_PLATFORMS": "cpu",
  }
  done = subprocess.run(
    ["bash", str(_PATH / "lm_device_check.sh")],
    cwd=_PATH.parent,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr
  for name, remat in (("xla", "remat False"), ("remat", "remat True")):
    text = (tmp_path / f"{name}.txt").read_text()
    assert remat in text and "tiny:" in text and "MFU" in text, text
  assert not (tmp_path / "cudnn.txt").exists()  # not a GPU
