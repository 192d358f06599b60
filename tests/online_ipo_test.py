"""Online IPO (`psipo_jax.online`) on the known-oracle task's tiny LM.

One module fixture builds a small oracle experiment (data, a short SFT, the
SFT policy's labelled pairs) and trains a few online IPO steps through the
experiment's train stage; the iterator tests then sample from the SFT
policy and from that updated policy.
"""

import dataclasses
import json
import types

import ml_collections
import numpy as np
import pytest

from experiments import lm_oracle
from psipo_jax import online
from psipo_jax import oracle_experiment
from psipo_jax import sharding
from psipo_jax import trained_policy
from psipo_jax.data import oracle_task as ot
from psipo_jax.loss_config import LossConfig

BATCH = 8


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  """(settings, SFT policy, online-trained policy) of a tiny experiment."""
  settings = oracle_experiment.Settings(
    workdir=str(tmp_path_factory.mktemp("online")),
    num_train_prompts=32,
    num_test_prompts=8,
    sft_responses_per_prompt=4,
    pairs_per_prompt=2,
    sft_steps=40,
    train_steps=3,
    batch_size=BATCH,
    learning_rate=3e-3,
    eval_samples_per_prompt=2,
    online_every=1,
  )
  for stage in ("data", "sft", "pairs", "train"):
    oracle_experiment.run(stage, settings)
  sft = trained_policy.Policy(settings.path("sft"))
  trained = trained_policy.Policy(settings.path("policies", settings.run_name))
  return settings, sft, trained


def _config(settings, seed=0, **online_keys):
  config = lm_oracle.get_config(f"root={settings.path()},online")
  config.input.batch_size = BATCH
  config.seed = seed
  config.online.update(online_keys)
  return config


def _pairs(settings, seed=0, **online_keys):
  config = _config(settings, seed, **online_keys)
  settings_ = online.validate(config, LossConfig.from_config(config.loss))
  return online.build(config, settings_, sharding.make_mesh(), settings.path())


def _state(step, params, ref_params):
  return types.SimpleNamespace(step=step, params=params, ref_params=ref_params)


def _scores(policy, refresh):
  samples = refresh["samples"]
  return policy.sequence_logps(
    [s["prompt"] for s in samples], [s["tokens"] for s in samples]
  )


def _sampled(refresh):
  return np.asarray([s["logp"] for s in refresh["samples"]])


@pytest.mark.slow
def test_the_experiment_stage_trains_online_and_evaluates(experiment):
  settings, _, _ = experiment
  run = settings.path("policies", settings.run_name)
  assert settings.run_name == "online1_mix0_ipo_tau0.25_seed0"
  config = json.load(open(f"{run}/config.json"))
  assert config["online"]["enabled"] and config["online"]["every"] == 1
  lines = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
  train = [l for l in lines if l["split"] == "train"][-1]
  assert train["step"] == 3 and np.isfinite(train["loss"])
  assert np.isfinite([l["loss"] for l in lines if l["split"] == "eval"]).all()
  (result,) = oracle_experiment.stage_evaluate(settings)
  assert result["online"] == {"every": 1, "mixture": 0.0}
  for key in ("win_rate", "kl", "reward_accuracy"):
    assert np.isfinite(result[key]), key


@pytest.mark.slow
def test_each_batch_is_sampled_from_the_current_policy(experiment):
  settings, sft, trained = experiment
  pairs = _pairs(settings)
  current = [_state(0, sft.params, sft.params)]
  pairs.follow(lambda: current[0])
  next(pairs)
  before = pairs.last_refresh
  np.testing.assert_allclose(_sampled(before), _scores(sft, before), atol=1e-4)
  # After an update: the next batch's samples are the new policy's.
  current[0] = _state(1, trained.params, sft.params)
  next(pairs)
  after = pairs.last_refresh
  assert after["step"] == 2
  np.testing.assert_allclose(
    _sampled(after), _scores(trained, after), atol=1e-4
  )
  assert np.abs(_sampled(after) - _scores(sft, after)).max() > 1e-2
  # A handle lagging behind the iterator is refused.
  with pytest.raises(RuntimeError, match="batch of step 3 but the train state"):
    next(pairs)


@pytest.mark.slow
def test_labels_follow_the_oracle_and_encode_like_offline_pairs(experiment):
  settings, sft, _ = experiment
  pairs = _pairs(settings, pairs_per_prompt=2)
  pairs.follow(lambda: _state(0, sft.params, sft.params))
  batch = next(pairs)
  labelled = pairs.last_refresh["pairs"]
  assert len(labelled) == BATCH and len(pairs.last_refresh["samples"]) == 16
  # Two pairs per prompt: each prompt twice, side by side.
  assert [p["prompt"] for p in labelled[::2]] == [
    p["prompt"] for p in labelled[1::2]
  ]
  kept = [i for i, p in enumerate(labelled) if p["drop"] is None]
  assert kept and sum(pairs.counts.values()) == BATCH
  np.testing.assert_array_equal(
    batch["weight"], [float(p["drop"] is None) for p in labelled]
  )
  encoder = pairs._encoder
  for i in kept:
    p = labelled[i]
    x = ot.prompt_word(p["prompt"])
    y, y2 = ot.response_word(p["chosen"]), ot.response_word(p["rejected"])
    # Deterministic oracle: the chosen response is always the winner.
    assert (ot.score(x, y), y) > (ot.score(x, y2), y2) and p["p_chosen"] == 1
    want = encoder.encode(p["prompt"], p["chosen"], p["rejected"])
    for key, value in want.items():
      np.testing.assert_array_equal(batch[key][i], value, err_msg=key)


@pytest.mark.slow
def test_mixture_one_samples_only_the_reference(experiment):
  settings, sft, trained = experiment
  pairs = _pairs(settings, mixture=1.0)
  pairs.follow(lambda: _state(0, trained.params, sft.params))
  next(pairs)
  refresh = pairs.last_refresh
  np.testing.assert_allclose(
    _sampled(refresh), _scores(sft, refresh), atol=1e-4
  )
  assert np.abs(_sampled(refresh) - _scores(trained, refresh)).max() > 1e-2


@pytest.mark.slow
def test_same_seed_same_pairs_and_a_restored_window_resamples_nothing(
  experiment,
):
  settings, sft, _ = experiment
  state = _state(0, sft.params, sft.params)

  def batches(seed, n, restore=None):
    pairs = _pairs(settings, seed, every=2)
    pairs.follow(lambda: state)
    if restore is not None:
      pairs.set_state(json.loads(json.dumps(restore)))
    got = [next(pairs)]
    saved = pairs.get_state()
    got += [next(pairs) for _ in range(n - 1)]
    return got, saved

  first, saved = batches(0, 2)
  again, _ = batches(0, 1)
  for key in first[0]:
    np.testing.assert_array_equal(first[0][key], again[0][key], err_msg=key)
  other, _ = batches(1, 1)
  assert not np.array_equal(
    first[0]["chosen_input_ids"], other[0]["chosen_input_ids"]
  )
  # The checkpointed state after step 1 holds step 2's pairs: a resumed
  # iterator yields them without sampling (its handle is never read: the
  # state at step 0 would be refused for step 2).
  assert saved["next_step"] == 2 and len(saved["pending"]) == 1
  resumed = _pairs(settings, every=2)
  resumed.follow(lambda: pytest.fail("a restored window sampled again"))
  resumed.set_state(json.loads(json.dumps(saved)))
  batch = next(resumed)
  for key in batch:
    np.testing.assert_array_equal(batch[key], first[1][key], err_msg=key)
  with pytest.raises(ValueError, match="online.every"):
    _pairs(settings, every=3).set_state(saved)


def _bad(tmp_path, **changes):
  settings = oracle_experiment.Settings(workdir=str(tmp_path))
  config = _config(settings)
  for key, value in changes.items():
    block, _, name = key.rpartition(".")
    (config[block] if block else config)[name] = value
  with pytest.raises(ValueError) as error:
    online.validate(config, LossConfig.from_config(config.loss))
  return str(error.value)


def test_bad_online_configs_name_their_key(tmp_path):
  assert "online.every=0 must be >= 1" in _bad(tmp_path, **{"online.every": 0})
  assert "online.mixture=1.5 must be in [0, 1]" in _bad(
    tmp_path, **{"online.mixture": 1.5}
  )
  assert "online.oracle='oracle'" in _bad(
    tmp_path, **{"online.oracle": "oracle"}
  )
  assert "online.evry" in _bad(tmp_path, **{"online.evry": 2})
  assert "online.pairs_per_prompt=3 does not divide" in _bad(
    tmp_path, **{"online.pairs_per_prompt": 3}
  )
  assert "input.ref_logps_file" in _bad(
    tmp_path, **{"input.ref_logps_file": "/x.npz"}
  )
  tabular = ml_collections.ConfigDict(dict(name="tabular", num_actions=3))
  assert "is not a language model" in _bad(tmp_path, **{"model": tabular})


def test_an_online_block_that_is_off_leaves_the_run_offline(tmp_path):
  settings = oracle_experiment.Settings(workdir=str(tmp_path))
  config = _config(settings, enabled=False)
  assert online.validate(config, LossConfig.from_config(config.loss)) is None
  assert "online" not in lm_oracle.get_config(f"root={tmp_path}")
  assert dataclasses.replace(settings, online_every=2).run_name.startswith(
    "online2_mix0_"
  )
