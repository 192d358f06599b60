"""`python -m psipo_jax.sample`: completions of a run's newest policy."""

import functools
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from psipo_jax import checkpointing
from psipo_jax import run_config
from psipo_jax import sharding
from psipo_jax import trained_policy
from psipo_jax.data import tokenizers
from psipo_jax.models import transformer as tr
from psipo_jax.train_state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["abc ->", "sort: dcab ="]


def _config():
  config = ml_collections.ConfigDict()
  config.model = dict(name="transformer", preset="tiny", vocab_size=259)
  config.input = dict(name="preference_pairs", tokenizer="byte", add_bos=True)
  return config


def _params(seed):
  model = tr.Transformer(
    tr.config_from_model_block(ml_collections.ConfigDict(_config().model)),
    rngs=nnx.Rngs(seed),
  )
  graphdef, state = nnx.split(model)
  # Larger weights than at initialisation: peaked, seed-specific logits.
  state = jax.tree.map(lambda x: 8 * x, state)
  return graphdef, nnx.to_pure_dict(state)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run directory with two checkpoints, steps 1 and 2, of other policies."""
  path = tmp_path_factory.mktemp("run")
  ckpt = checkpointing.Checkpointer(path, max_to_keep=3, async_save=False)
  for step, seed in ((1, 1), (2, 2)):
    graphdef, params = _params(seed)
    _, state = TrainState.create(
      nnx.merge(graphdef, params),
      optax.sgd(0.1),
      rng=jax.random.key_data(jax.random.key(0)),
      ref_params=None,
    )
    ckpt.save(
      step, state.replace(step=jax.numpy.asarray(step, state.step.dtype)), {}
    )
  ckpt.wait_until_finished()
  ckpt.close()
  run_config.write_new(str(path), _config())
  return str(path)


@functools.lru_cache(maxsize=None)
def _logits_fn(params_seed):
  graphdef, params = _params(params_seed)
  return jax.jit(lambda inputs: nnx.merge(graphdef, params).logits(inputs))


def _greedy(params_seed, prompt, num_tokens, eos_id):
  """Greedy decoding by full recomputation (one right-padded row of 32)."""
  tok = tokenizers.ByteTokenizer()
  ids = [tok.bos_id, *tok.encode(prompt).tolist()]
  out = []
  for _ in range(num_tokens):
    row = np.zeros((1, 32), np.int32)
    row[0, : len(ids)] = ids
    mask = (np.arange(32) < len(ids))[None].astype(np.int32)
    logits = _logits_fn(params_seed)(dict(input_ids=row, attention_mask=mask))
    ids.append(int(np.argmax(logits[0, len(ids) - 1])))
    out.append(ids[-1])
    if ids[-1] == eos_id:
      break
  return out


def test_completions_are_the_newest_checkpoints_greedy_decoding(workdir):
  policy = trained_policy.Policy(workdir)
  config = policy.sampling_config(max_new_tokens=6, temperature=0.0)
  assert config.eos_id == 2 and config.pad_id == 0
  results = policy.complete(PROMPTS, config)
  for prompt, result in zip(PROMPTS, results):
    newest = _greedy(2, prompt, 6, eos_id=2)
    assert result["tokens"] == newest
    assert newest != _greedy(1, prompt, 6, eos_id=2)  # step 1 would differ
    assert result["completion"] == tokenizers.ByteTokenizer().decode(newest)
    assert result["eos"] == (newest[-1] == 2)
    assert result["logp"] == pytest.approx(sum(result["token_logps"]))
    assert all(lp <= 0 for lp in result["token_logps"])


def test_several_samples_per_prompt_differ_and_are_prompt_major(workdir):
  policy = trained_policy.Policy(workdir)
  config = policy.sampling_config(max_new_tokens=8, temperature=1.5)
  results = policy.complete(PROMPTS, config, num_samples=3, seed=1)
  assert [(r["prompt"], r["sample"]) for r in results] == [
    (p, i) for p in PROMPTS for i in range(3)
  ]
  assert len({tuple(r["tokens"]) for r in results}) > 1


def test_a_policy_split_over_devices_samples_and_scores_as_a_replicated_one(
  workdir,
):
  replicated = trained_policy.Policy(workdir)
  split = trained_policy.Policy(
    workdir, mesh=sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  )
  q_proj = split.params["layers"]["attention"]["q_proj"]  # [L, d, H, Dh]
  assert q_proj.sharding.spec == P(None, "fsdp", "tensor", None)
  assert replicated.params["embed_tokens"].sharding.is_fully_replicated
  config = replicated.sampling_config(max_new_tokens=6, temperature=0.0)
  want, got = (p.complete(PROMPTS, config) for p in (replicated, split))
  assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
  np.testing.assert_allclose(
    [r["logp"] for r in got], [r["logp"] for r in want], rtol=1e-5
  )
  responses = [r["tokens"] for r in want]
  np.testing.assert_allclose(
    split.sequence_logps(PROMPTS, responses),
    replicated.sequence_logps(PROMPTS, responses),
    rtol=1e-5,
  )


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "psipo_jax.sample", *args],
    cwd=ROOT,
    env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.slow
def test_command_line_prints_the_completions(workdir, tmp_path):
  done = _cli(
    f"--workdir={workdir}",
    f"--prompt={PROMPTS[0]}",
    f"--prompt={PROMPTS[1]}",
    "--temperature=0",
    "--max_new_tokens=6",
    "--json",
  )
  assert done.returncode == 0, done.stderr
  lines = [json.loads(l) for l in done.stdout.splitlines()]
  assert [l["tokens"] for l in lines] == [
    _greedy(2, p, 6, eos_id=2) for p in PROMPTS
  ]
  plain = _cli(f"--workdir={workdir}", "--prompt=abc ->", "--temperature=0")
  assert plain.returncode == 0, plain.stderr
  assert plain.stdout.startswith("[0.0] 'abc ->' -> ")
  bad = _cli(f"--workdir={tmp_path}", "--prompt=x")
  assert bad.returncode == 2
  assert "holds no config.json: not a training run's directory" in bad.stderr
  split = _cli(
    f"--workdir={workdir}",
    f"--prompt={PROMPTS[0]}",
    "--temperature=0",
    "--max_new_tokens=6",
    "--json",
    "--mesh=1,-1,1",
  )
  assert split.returncode == 0, split.stderr
  assert json.loads(split.stdout)["tokens"] == lines[0]["tokens"]
  bad_mesh = _cli(f"--workdir={workdir}", "--prompt=x", "--mesh=3,-1,1")
  assert bad_mesh.returncode == 2
  assert "--mesh: fsdp=-1 cannot take the remaining devices" in bad_mesh.stderr
