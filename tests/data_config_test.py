"""The `input` config section: defaults, and errors that name the key."""

import ml_collections
import pytest

from psipo_jax.data import config as config_lib
from psipo_jax.data.testing import experiment_config


def parse(**overrides):
  """Parses a hand-written `input` section (no typed defaults in the way)."""
  base = dict(data_dir="/tmp/d", files="/tmp/a.jsonl")
  base.update(overrides)
  return config_lib.parse_input_config(
    ml_collections.ConfigDict({"input": base})
  )


def test_defaults_and_both_config_forms():
  cfg = config_lib.parse_input_config(
    experiment_config(data_dir="/tmp/d", files="/tmp/a.jsonl")
  )
  assert cfg == parse()
  assert cfg.files == (("train", ("/tmp/a.jsonl",)),)
  assert (cfg.batch_size, cfg.max_length, cfg.tokenizer, cfg.skip_invalid) == (
    8,
    512,
    "byte",
    False,
  )
  assert dict(cfg.fields)["chosen"] == "chosen"
  section = experiment_config(data_dir="/tmp/d", files="/tmp/a.jsonl").input
  assert config_lib.parse_input_config(section) == cfg
  # A hand-written section needs only the keys it changes.
  minimal = ml_collections.ConfigDict(
    {"input": {"data_dir": "/d", "files": {"test": ["a", "b"]}}}
  )
  assert config_lib.parse_input_config(minimal).files == (("test", ("a", "b")),)


def test_unknown_key_names_it_and_suggests_the_closest():
  config = ml_collections.ConfigDict(
    {"input": {"data_dir": "/d", "files": "a", "batch_szie": 4}}
  )
  with pytest.raises(
    ValueError,
    match=r"unknown config key input.batch_szie \(did you mean input.batch_size\?\)",
  ):
    config_lib.parse_input_config(config)
  with pytest.raises(
    ValueError, match=r"unknown config key input.fields.answer"
  ):
    parse(fields={"answer": "x"})


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(data_dir=None), r"input.data_dir must be a non-empty string"),
    (dict(files=None), r"input.files must be set"),
    (dict(name="mnist"), r"input.name='mnist' is not one of"),
    (dict(batch_size=0), r"input.batch_size=0 must be >= 1"),
    (dict(batch_size=2.5), r"input.batch_size must be an integer, got 2.5"),
    (dict(shuffle="yes"), r"input.shuffle must be True or False"),
    (
      dict(max_length=64, max_prompt_length=65),
      r"input.max_prompt_length=65 must be <= input.max_length=64",
    ),
    (dict(layout="hh"), r"input.layout='hh' is not one of"),
    (
      dict(chat_template="{role}: {text}"),
      r"input.chat_template must contain '\{content\}' exactly once",
    ),
    (
      dict(split_percent={"train": 80, "test": 10}),
      r"input.split_percent must sum to 100",
    ),
    (
      dict(split_percent={"train": 100, "test": 0}),
      r"input.split_percent.test=0 must be a number in \(0, 100\]",
    ),
    (
      dict(files={"train": "a"}, split_percent={"train": 90, "test": 10}),
      r"input.split_percent carves splits from one set of files",
    ),
    (dict(files=[]), r"input.files must be a path"),
    (
      dict(fields={"chosen": ""}),
      r"input.fields.chosen must be a non-empty string",
    ),
    (dict(ref_logps_file=3), r"input.ref_logps_file must be a path"),
  ],
)
def test_bad_values_name_the_key(overrides, message):
  with pytest.raises(ValueError, match=message):
    parse(**overrides)


def bandit(**overrides):
  base = dict(name="bandit_preferences", data_dir="/d", num_actions=3)
  base.update(overrides)
  return config_lib.parse_input_config(
    ml_collections.ConfigDict({"input": base})
  )


def test_bandit_config():
  cfg = bandit(pairs=[[0, 1], [2, 1]])
  assert cfg.pairs == ((0, 1), (2, 1))
  pref = [[0.5, 0.9, 0.7], [0.1, 0.5, 0.4], [0.3, 0.6, 0.5]]
  cfg = bandit(preference_matrix=pref, num_pairs={"train": 10, "test": 5})
  assert cfg.num_pairs == (("test", 5), ("train", 10))


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(num_actions=None, pairs=[[0, 1]]), r"input.num_actions must be set"),
    (dict(), r"set exactly one of input.pairs and input.preference_matrix"),
    (
      dict(pairs=[[0, 3]]),
      r"input.pairs\[0\] = \(0, 3\) has an action index outside \[0, 3\)",
    ),
    (
      dict(pairs=[[0, 1], [2, 2]]),
      r"input.pairs\[1\] = \(2, 2\) compares an action with itself",
    ),
    (
      dict(pairs=[[0, 1], [1]]),
      r"input.pairs\[1\]=\[1\] must be \[winner, loser\]",
    ),
    (
      dict(preference_matrix=[[0.5, 0.9], [0.1, 0.5]], num_pairs=4),
      r"input.preference_matrix must be 3×3",
    ),
    (
      dict(
        preference_matrix=[[0.5, 0.9, 0.7], [0.2, 0.5, 0.4], [0.3, 0.6, 0.5]],
        num_pairs=4,
      ),
      r"input.preference_matrix\[0, 1\] \+ input.preference_matrix\[1, 0\] = 0.9 \+ 0.2",
    ),
    (
      dict(
        preference_matrix=[[0.5, 1.2, 0.7], [-0.2, 0.5, 0.4], [0.3, 0.6, 0.5]],
        num_pairs=4,
      ),
      r"input.preference_matrix\[0, 1\] = 1.2 is not a probability in \[0, 1\]",
    ),
    (
      dict(
        preference_matrix=[[0.5] * 3] * 3,
        num_pairs=4,
        behaviour_policy=[0.5, 0.6, -0.1],
      ),
      r"input.behaviour_policy must be 3 non-negative probabilities summing to 1",
    ),
    (dict(preference_matrix=[[0.5] * 3] * 3), r"input.num_pairs must be set"),
    (
      dict(preference_matrix=[[0.5] * 3] * 3, num_pairs={"train": 0}),
      r"input.num_pairs.train must be a positive integer",
    ),
  ],
)
def test_bad_bandit_values_name_the_key(overrides, message):
  with pytest.raises(ValueError, match=message):
    bandit(**overrides)


def test_every_key_is_documented():
  doc = config_lib.__doc__
  for key in config_lib.get_input_config():
    assert f"\n  {key} " in doc or f"\n  {key}\n" in doc, key
