"""Two real JAX processes (jax.distributed on 127.0.0.1) share one dataset.

Process 0 prepares the dataset while process 1 waits at the barrier; each then
reads its rows of every global batch (process p: rows p, p + 2, ...), using jax.process_index() and
jax.process_count() by default.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

import xla_flags  # tests/xla_flags.py

from psipo_jax.data import make_preference_iterator
from psipo_jax.data.testing import experiment_config
from psipo_jax.data.testing import synthetic_pairs
from psipo_jax.data.testing import write_jsonl

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    port, process_id, config_json, out = sys.argv[1:]
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
    from psipo_jax.data import make_preference_iterator
    from psipo_jax.data.testing import experiment_config
    it = make_preference_iterator(experiment_config(**json.loads(config_json)), "train")
    with open(out, "w") as f:
      json.dump([[str(i) for i in batch["id"]] for batch in it], f)
    jax.distributed.shutdown()
""")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_jax_processes_read_disjoint_halves_of_each_global_batch(tmp_path):
  files = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(16))
  options = dict(
    data_dir=str(tmp_path / "tfds"),
    files=files,
    batch_size=4,
    num_epochs=2,
    max_length=96,
    max_prompt_length=48,
    return_ids=True,
    seed=3,
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS=xla_flags.xla_flags())
  env.update(PYTHONPATH=root, JAX_PLATFORMS="cpu")
  port = free_port()
  workers = [
    subprocess.Popen(
      [
        sys.executable,
        "-c",
        WORKER,
        str(port),
        str(i),
        json.dumps(options),
        str(tmp_path / f"ids{i}.json"),
      ],
      env=env,
      cwd=root,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in (0, 1)
  ]
  for worker in workers:
    output, _ = worker.communicate(timeout=180)
    assert worker.returncode == 0, output[-3000:]
  halves = [json.loads((tmp_path / f"ids{i}.json").read_text()) for i in (0, 1)]

  # The same stream read by one process (the dataset is already prepared).
  whole = [
    [str(i) for i in b["id"]]
    for b in make_preference_iterator(
      experiment_config(**options), "train", process_index=0, process_count=1
    )
  ]
  assert len(whole) == len(halves[0]) == len(halves[1]) == 8
  for global_ids, first, second in zip(whole, *halves):
    assert len(first) == len(second) == 2 and not set(first) & set(second)
    assert sorted(first + second) == sorted(global_ids)
    # Process p takes every P-th row of the global batch (the documented
    # order), not a contiguous block.
    assert first == global_ids[0::2] and second == global_ids[1::2]
