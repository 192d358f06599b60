"""The known-oracle pipeline's stages on a tiny LM: SFT data, SFT, labelled
samples, a ΨPO run on them, and the evaluation against the reference."""

import json

import numpy as np
import pytest

from experiments import lm_ipo_tiny
from experiments import lm_sft_tiny
from psipo_jax import oracle_pipeline as op
from psipo_jax import sample
from psipo_jax import train
from psipo_jax.data import oracle_task as ot

MAX_NEW_TOKENS = 10  # the base responses have at most 6 letters + space + EOS


def _text_config(config, files, tmp, steps):
  config.input.files = files
  config.input.data_dir = str(tmp / "tfds")
  config.input.batch_size = 16
  config.input.max_length = 24  # BOS + "abcde ->" + 10 response tokens fit
  config.input.max_prompt_length = 12
  config.total_steps = steps
  config.optimizer.warmup_steps = 0
  config.log_every = config.eval_every = config.ckpt_every = steps
  return config


def test_sft_data_has_base_responses_and_disjoint_prompts(tmp_path):
  prompts = op.split_prompts(30, 10, seed=0)
  assert not set(prompts["train"]) & set(prompts["test"])
  files = op.write_sft_data(
    str(tmp_path), prompts, responses_per_prompt=3, seed=0
  )
  for split, path in files.items():
    records = [json.loads(l) for l in open(path)]
    assert len(records) == 3 * len(prompts[split])
    for r in records:
      x = r["prompt"].removesuffix(" ->")
      assert x in prompts[split] and r["prompt"] == ot.prompt_text(x)
      y, y2 = (ot.response_word(r[k]) for k in ("chosen", "rejected"))
      assert y != y2 and set(y + y2) <= set(ot.ALPHABET)
      assert 1 <= len(y) <= ot.MAX_RESPONSE_LENGTH


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("oracle")
  prompts = op.split_prompts(64, 16, seed=0)
  files = op.write_sft_data(
    str(tmp / "sft_data"), prompts, responses_per_prompt=4, seed=0
  )
  config = _text_config(lm_sft_tiny.get_config("runlocal"), files, tmp, 150)
  train.train_and_evaluate(config, str(tmp / "sft"))
  return tmp, prompts


@pytest.mark.slow
def test_every_stage_runs_and_the_evaluation_is_consistent(sft_run):
  tmp, prompts = sft_run
  reference = sample.Policy(str(tmp / "sft"))
  oracle = ot.make_oracle("deterministic")
  files = {}
  for split, seed in (("train", 0), ("test", 1)):
    records, counts = op.label_policy_samples(
      reference,
      prompts[split],
      oracle,
      pairs_per_prompt=2,
      max_new_tokens=MAX_NEW_TOKENS,
      seed=seed,
      split=split,
    )
    # The SFT policy has learnt the format: nearly every pair is usable.
    assert counts["pairs"] >= 1.5 * len(prompts[split]), counts
    for r in records:
      x = r["prompt"].removesuffix(" ->")
      y, y2 = ot.response_word(r["chosen"]), ot.response_word(r["rejected"])
      assert r["p_chosen"] == oracle.prob(x, y, y2) == 1.0  # the winner
    files[split] = op.write_jsonl(
      str(tmp / "pairs" / f"{split}.jsonl"), records
    )

  # The ΨPO stage: IPO from the SFT policy (also its reference).
  config = lm_ipo_tiny.get_config(f"runlocal,init={tmp / 'sft'}")
  config = _text_config(config, files, tmp, 30)
  config.optimizer.learning_rate = 3e-3
  train.train_and_evaluate(config, str(tmp / "ipo"))
  policy = sample.Policy(str(tmp / "ipo"))
  test_pairs = [json.loads(l) for l in open(files["test"])]

  kwargs = dict(
    samples_per_prompt=4,
    max_new_tokens=MAX_NEW_TOKENS,
    seed=3,
    pairs=test_pairs,
  )
  # The reference against itself: every log-ratio is 0 (the sampler's
  # log-probs are the scorer's), so the KL and every margin h vanish.
  same = op.evaluate(reference, reference, prompts["test"], oracle, **kwargs)
  assert abs(same["kl"]) < 1e-4 and same["kl_ci"] < 1e-4
  assert same["reward_accuracy"] == 0.0  # h > 0 never holds at h = 0

  got = op.evaluate(policy, reference, prompts["test"], oracle, **kwargs)
  for key, value in got.items():
    assert np.isfinite(value), key
  assert 0 <= got["win_rate"] <= 1 and got["kl"] > 0
  # The implicit-reward accuracy is the trainer's own on the same pairs.
  lines = [json.loads(l) for l in open(tmp / "ipo" / "metrics.jsonl")]
  trainer = [l for l in lines if l["split"] == "eval"][-1]["rewards/accuracies"]
  assert got["reward_accuracy"] == pytest.approx(trainer, abs=1e-6)
