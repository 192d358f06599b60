"""The inspection CLI: sizes, length percentiles, truncation, marked examples."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from psipo_jax.data import inspect as inspect_lib
from psipo_jax.data import tokenizers
from psipo_jax.data.testing import experiment_config
from psipo_jax.data.testing import write_jsonl

RECORDS = [
  {"id": "a", "prompt": "Q1?", "chosen": " yes", "rejected": " no"},
  {
    "id": "b",
    "prompt": "A much longer question?",
    "chosen": " a long answer here",
    "rejected": " no",
  },
  {"id": "c", "prompt": "Q3?", "chosen": " same", "rejected": " same"},
]


def test_render_marked_shows_specials_response_and_padding():
  tok = tokenizers.ByteTokenizer()
  ids = np.r_[
    tok.bos_id,
    tok.encode("Q?"),
    tok.encode(" ok"),
    tok.eos_id,
    tok.pad_id,
    tok.pad_id,
  ]
  mask = np.r_[0, 0, 0, 1, 1, 1, 1, 0, 0]
  attention = np.r_[[1] * 7, 0, 0]
  assert (
    inspect_lib.render_marked(tok, ids, mask, attention)
    == "<bos>Q?⟦ ok<eos>⟧<pad>×2"
  )


def test_report(tmp_path):
  files = write_jsonl(tmp_path / "p.jsonl", RECORDS)
  config = experiment_config(
    data_dir=tmp_path / "tfds", files=files, max_length=24, max_prompt_length=8
  )
  out = io.StringIO()
  inspect_lib.report(config, num_examples=2, out=out)
  text = out.getvalue()
  assert "== split train: 2 examples" in text
  assert (
    "3 records, 2 kept, 0 invalid {}, 1 dropped as chosen == rejected" in text
  )
  # Prompt lengths with BOS are 4 and 24 bytes+1: the median is 14, the max 24.
  assert "prompt   p50=14  p90=22  p99=23.8  p100=24" in text
  # b: P = 24, R = 20 > 24 - 8, so k = 8 prompt tokens and 16 for each response.
  assert (
    "truncation at max_length=24, max_prompt_length=8: prompt 50.0%, chosen 50.0%,"
    " rejected 0.0%, any 50.0%"
  ) in text
  assert "dropped by truncation: none; kept 2" in text
  assert "chosen: '<bos>Q1?⟦ yes<eos>⟧<pad>×15'" in text
  # b keeps BOS + the prompt's last 7 bytes, and the first 16 of its response (no EOS).
  assert "chosen: '<bos>estion?⟦ a long answer h⟧'" in text
  assert "rejected: '<bos>estion?⟦ no<eos>⟧<pad>×12'" in text


@pytest.mark.slow
def test_command_line(tmp_path):
  files = write_jsonl(tmp_path / "p.jsonl", RECORDS)
  config_file = tmp_path / "config.py"
  config_file.write_text(
    "from psipo_jax.data.testing import experiment_config\n"
    "def get_config():\n"
    f"  return experiment_config(data_dir={str(tmp_path / 'tfds')!r}, files={files!r})\n"
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "psipo_jax.data.inspect",
      f"--config={config_file}",
      "--config.input.max_length=12",
      "--config.input.max_prompt_length=12",
      "--num_examples=1",
    ],
    capture_output=True,
    text=True,
    env=env,
    cwd=root,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert (
    "dropped by truncation: {'empty_response_after_truncation': 1}; kept 1"
    in result.stdout
  )
  # b (24 prompt tokens) leaves no room at L = M = 12; a is 4 + 4 tokens.
  assert "rejected: '<bos>Q1?⟦ no<eos>⟧<pad>×4'" in result.stdout


def test_report_of_carved_splits(tmp_path):
  files = write_jsonl(
    tmp_path / "p.jsonl", RECORDS[:2] + [dict(RECORDS[1], id="d")]
  )
  config = experiment_config(
    data_dir=tmp_path / "tfds",
    files=files,
    split_percent={"train": 50, "test": 50},
  )
  out = io.StringIO()
  inspect_lib.report(config, splits=["test"], num_examples=0, out=out)
  assert (
    "== split test: 2 examples" in out.getvalue()
  )  # round(3 * 0.5) = 2 in sorted order
  assert (
    "(of the files of this split, before carving): 3 records, 3 kept"
    in out.getvalue()
  )
