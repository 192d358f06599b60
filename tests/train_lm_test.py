"""The training system on text pairs: a tiny transformer trained with ΨPO.

The built-in text task (`psipo_jax.data.text_task`) and the real Anthropic HH
file in ../shared/data go through the trainer with the memory-lean LM head;
evaluation covers the whole held-out split, the last batch filled at weight 0.
"""

import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments import lm_ipo_tiny
from experiments import lm_sft_tiny
from psipo_jax import inputs
from psipo_jax import sharding
from psipo_jax import train
from psipo_jax.data import text_task

import train_worker  # tests/: the worker and its kill -9 check

HH = (
  pathlib.Path(__file__).resolve().parents[2]
  / "shared"
  / "data"
  / "hh_harmless_base_test.jsonl.gz"
)


def _tiny_lm_config(tmp_path, *, total_steps=4, num_train=64, num_test=20):
  config = lm_ipo_tiny.get_config("runlocal,init=")
  # The tests' own size: the `tiny` preset's 2 layers, not the experiment's 4.
  config.model.num_layers = 2
  config.input.files = text_task.cached_files(
    num_train=num_train, num_test=num_test, cache_dir=str(tmp_path / "cache")
  )
  config.input.batch_size = 16
  config.total_steps = total_steps
  config.optimizer.warmup_steps = 0
  config.log_every = config.eval_every = config.ckpt_every = total_steps
  return config


def _lines(workdir):
  return [
    json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()
  ]


def test_eval_batches_cover_the_split_once_with_exact_weights():
  mesh = sharding.make_mesh()
  whole = {
    "x": np.arange(20, dtype=np.float32),
    "weight": np.linspace(0.5, 2, 20),
  }
  batches = inputs.eval_batches(whole, 16, mesh)
  assert len(batches) == 2 and all(len(b["x"]) == 16 for b in batches)
  assert batches[1]["weight"][4:].sum() == 0  # the fill rows count for nothing

  def eval_step(
    state, batch
  ):  # weighted means of x, as make_eval_step reports them
    w = np.asarray(batch["weight"])
    return {
      "x": np.sum(w * batch["x"]) / w.sum(),
      "weight_sum": w.sum(),
      "empty_responses": 0,
    }

  got = train.evaluate(eval_step, None, batches)
  np.testing.assert_allclose(
    got["x"], np.average(whole["x"], weights=whole["weight"]), rtol=1e-6
  )


def test_vocabulary_mismatch_names_both_keys(tmp_path):
  config = _tiny_lm_config(tmp_path)
  config.model.vocab_size = 256  # the byte tokenizer has 259 ids
  with pytest.raises(
    ValueError,
    match=r"input.tokenizer='byte' has 259 tokens but model.vocab_size=256",
  ):
    train.validate_config(config, str(tmp_path / "run"))


def test_a_model_that_scores_actions_refuses_text(tmp_path):
  config = _tiny_lm_config(tmp_path)
  config.model = ml_collections.ConfigDict(
    {"name": "tabular", "num_actions": 3}
  )
  with pytest.raises(
    ValueError, match=r"model.name='tabular' does not score .* actions"
  ):
    train.validate_config(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_tiny_lm_trains_with_ipo_and_evaluates_the_whole_split(tmp_path):
  workdir = tmp_path / "run"
  state = train.train_and_evaluate(_tiny_lm_config(tmp_path), workdir)
  assert int(state.step) == 4
  lines = _lines(workdir)
  train_line = next(l for l in lines if l["split"] == "train")
  eval_line = next(l for l in lines if l["split"] == "eval")
  assert np.isfinite(train_line["loss"]) and np.isfinite(eval_line["loss"])
  # The same metric names in both, the eval ones over all 20 test pairs.
  for key in (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "h",
    "logps/chosen",
  ):
    assert key in train_line and key in eval_line, key
  acc = eval_line["rewards/accuracies"]
  assert (
    abs(acc * 20 - round(acc * 20)) < 1e-4
  )  # a fraction of 20 pairs, the fill rows ignored
  # The reference stayed the initial policy; the policy moved.
  moved = jax.tree.map(
    lambda p, r: float(np.abs(np.asarray(p) - np.asarray(r)).max()),
    jax.device_get(state.params),
    jax.device_get(state.ref_params),
  )
  assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.slow
@pytest.mark.skipif(
  not HH.exists(), reason="../shared/data is not beside the repository"
)
def test_real_hh_pairs_train_a_few_steps(tmp_path):
  """Anthropic HH harmless-base test, gzipped as published: 4 pairs whose
  chosen reply is empty are counted and skipped; losses stay finite."""
  config = _tiny_lm_config(tmp_path, total_steps=3)
  config.input.files = str(HH)
  config.input.split_percent = {"train": 95, "test": 5}
  config.input.skip_invalid = True
  config.input.max_length = 256
  config.input.max_prompt_length = 192
  config.input.batch_size = 8
  workdir = tmp_path / "hh"
  train.train_and_evaluate(config, workdir)
  lines = _lines(workdir)
  assert all(np.isfinite(l["loss"]) for l in lines)
  (summary_path,) = (workdir / "tfds").glob(
    "preference_pairs/*/*/prepare_summary.json"
  )
  summary = json.loads(summary_path.read_text())
  source = summary["sources"][next(iter(summary["sources"]))]
  assert source["records"] == 2312
  assert source["invalid_by_kind"] == {"empty_response": 4}
  assert (
    source["kept"] + source["invalid"] + source["identical_dropped"] == 2312
  )


def _sft_config(tmp_path, total_steps=6):
  config = lm_sft_tiny.get_config("runlocal")
  ipo = _tiny_lm_config(tmp_path, total_steps=total_steps)
  config.input, config.model = ipo.input, ipo.model
  config.total_steps = total_steps
  config.optimizer.warmup_steps = 0
  config.log_every = config.eval_every = config.ckpt_every = total_steps
  return config


@pytest.mark.slow
def test_sft_then_ipo_from_its_checkpoint(tmp_path):
  """SFT learns the chosen responses (token NLL falls, perplexity logged);
  its checkpoint becomes the IPO run's initial policy and reference."""
  sft_dir = tmp_path / "sft"
  sft_state = train.train_and_evaluate(
    _sft_config(tmp_path, total_steps=30), sft_dir
  )
  assert sft_state.ref_params is None  # SFT keeps no reference.
  lines = [l for l in _lines(sft_dir) if l["split"] == "train"]
  first_eval = next(l for l in _lines(sft_dir) if l["split"] == "eval")
  assert np.isclose(
    first_eval["perplexity"], np.exp(first_eval["nll"]), rtol=1e-5
  )
  assert np.isclose(first_eval["loss"], first_eval["nll"], rtol=1e-6)
  assert (
    lines[-1]["nll"] < np.log(259) - 1.0
  )  # far below a uniform guess over the bytes

  ipo = _tiny_lm_config(tmp_path, total_steps=1)
  ipo.init_checkpoint = str(sft_dir)
  ipo.optimizer.learning_rate = 1e-12  # one step barely moves the policy
  state = train.train_and_evaluate(ipo, tmp_path / "ipo")
  sft_params = jax.device_get(sft_state.params)
  for got, want in zip(
    jax.tree.leaves(jax.device_get(state.ref_params)),
    jax.tree.leaves(sft_params),
  ):
    np.testing.assert_array_equal(got, want)  # the reference IS the SFT policy
  for got, want in zip(
    jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(sft_params)
  ):
    np.testing.assert_allclose(got, want, atol=1e-6)
  eval_line = next(l for l in _lines(tmp_path / "ipo") if l["split"] == "eval")
  # Policy = reference up to one tiny step: every margin h is ~0.
  assert abs(eval_line["h"]) < 1e-3


def test_missing_init_checkpoint_names_the_key(tmp_path):
  config = _tiny_lm_config(tmp_path)
  config.init_checkpoint = str(tmp_path / "nowhere")
  with pytest.raises(
    ValueError,
    match=r"init_checkpoint='.*nowhere' is not a workdir holding checkpoints/",
  ):
    train.validate_config(config, str(tmp_path / "run"))


def test_sft_refuses_a_loss_block_and_action_inputs(tmp_path):
  config = _sft_config(tmp_path)
  with config.unlocked():
    config.loss = ml_collections.ConfigDict({"name": "ipo", "tau": 0.1})
  with pytest.raises(
    ValueError, match=r"objective='sft' reads no loss.\* block"
  ):
    train.validate_config(config, str(tmp_path / "run"))
  config = _sft_config(tmp_path)
  config.objective = "dpo"
  with pytest.raises(
    ValueError, match=r"objective='dpo' is not one of \('psipo', 'sft', 'kto'\)"
  ):
    train.validate_config(config, str(tmp_path / "run"))


def test_the_reference_job_shards_the_reference_as_the_run_would(tmp_path):
  """On a data × fsdp × tensor mesh the reference job holds the reference
  split by the rule table (never whole on one device) and writes the values
  of the one-axis mesh's job."""
  from psipo_jax import precompute_reference  # pylint: disable=g-import-not-at-top

  config = _tiny_lm_config(tmp_path)
  config.mesh = ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2})
  mesh = sharding.make_mesh(config.mesh)
  _, params = precompute_reference.load_reference(config, mesh)
  # q_proj [L, d, H, Dh] = [2, 64, 4, 16]: d over fsdp, heads over tensor.
  q_proj = params["layers"]["attention"]["q_proj"]
  assert q_proj.sharding.spec == P(None, "fsdp", "tensor", None)
  assert {s.data.shape for s in q_proj.addressable_shards} == {(2, 32, 2, 16)}
  # embed_tokens [V, d]: d over fsdp (the byte tokenizer's V = 259 is odd).
  embed = params["embed_tokens"]
  assert embed.sharding.spec[1] == "fsdp"

  paths = {
    name: precompute_reference.precompute(cfg, str(tmp_path / name), ["test"])
    for name, cfg in (("mesh", config), ("default", _tiny_lm_config(tmp_path)))
  }
  rows = {
    name: [json.loads(l) for l in open(p["test"]).read().splitlines()[1:]]
    for name, p in paths.items()
  }
  assert [r["id"] for r in rows["mesh"]] == [r["id"] for r in rows["default"]]
  for key in ("ref_chosen_logps", "ref_rejected_logps"):
    np.testing.assert_allclose(
      [r[key] for r in rows["mesh"]],
      [r[key] for r in rows["default"]],
      rtol=1e-5,
    )
  for key in ("ref_chosen_tokens", "ref_rejected_tokens"):
    assert [r[key] for r in rows["mesh"]] == [r[key] for r in rows["default"]]


@pytest.mark.slow
def test_precomputed_reference_trains_exactly_as_the_reference_on_device(
  tmp_path,
):
  """precompute_reference scores every split with the run's own reference;
  the run given those files holds no reference and reaches the same policy."""
  from psipo_jax import precompute_reference  # pylint: disable=g-import-not-at-top

  on_the_fly = train.train_and_evaluate(
    _tiny_lm_config(tmp_path), tmp_path / "fly"
  )
  paths = precompute_reference.precompute(
    _tiny_lm_config(tmp_path), str(tmp_path / "ref")
  )
  assert sorted(paths) == ["test", "train"]
  header = json.loads(open(paths["train"]).readline())
  assert (
    header["logps"] == "sum" and header["computed_with"]["max_length"] == 32
  )

  config = _tiny_lm_config(tmp_path)
  config.input.ref_logps_file = paths
  precomputed = train.train_and_evaluate(config, tmp_path / "pre")
  assert precomputed.ref_params is None
  for got, want in zip(
    jax.tree.leaves(jax.device_get(precomputed.params)),
    jax.tree.leaves(jax.device_get(on_the_fly.params)),
  ):
    # Adam turns float32 rounding of the two reference computations into
    # differences of ~1e-5 after a few steps; a wrong reference moves the
    # parameters by the learning rate (3e-3) every step.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
  fly_eval, pre_eval = (
    [l for l in _lines(tmp_path / name) if l["split"] == "eval"][-1]
    for name in ("fly", "pre")
  )
  for key in ("loss", "h", "rewards/accuracies"):
    np.testing.assert_allclose(
      pre_eval[key], fly_eval[key], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("name", ["lm_125m", "lm_1b"])
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_accelerator_configs_validate(name, arg, tmp_path):
  import importlib  # pylint: disable=g-import-not-at-top

  config = importlib.import_module(f"experiments.{name}").get_config(arg)
  train.validate_config(config, str(tmp_path))
  assert config.model.preset == name[3:]
  if arg == "runlocal":  # a CPU check: the preset's width, 2 layers
    assert config.model.num_layers == 2 and config.total_steps <= 10


@pytest.mark.slow
def test_kill_9_and_resume_of_an_lm_run_equals_the_uninterrupted_run(tmp_path):
  """SIGKILL after the step-4 checkpoint (mid-run, step 6 of 12), then the
  same command again: the Grain position and the state restore exactly."""
  train_worker.check_lm_kill_9_resume(tmp_path)
