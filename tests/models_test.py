"""Tests of the policy registry and the tabular softmax policy."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from psipo_jax import models


def _config(**overrides):
  config = ml_collections.ConfigDict(
    {"name": "tabular", "num_actions": 3, "ref_probs": None}
  )
  config.update(overrides)
  return config


def test_tabular_policy_scores_actions_by_log_softmax():
  model = models.build_model(
    _config(ref_probs=(0.5, 0.25, 0.25)), rngs=nnx.Rngs(0)
  )
  out = model({"action": jnp.array([0, 2, 1, 0])})
  np.testing.assert_allclose(
    out.logps, np.log([0.5, 0.25, 0.25, 0.5]), rtol=1e-6
  )
  np.testing.assert_array_equal(out.num_tokens, np.ones(4))


def test_tabular_policy_defaults_to_uniform_reference():
  model = models.build_model(_config(), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(
    jax.nn.softmax(model.logits[...]), np.full(3, 1 / 3), rtol=1e-6
  )


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(name="mlp"), "model.name"),
    (dict(ref_probs=(0.5, 0.5)), "model.ref_probs"),
    (dict(ref_probs=(0.5, 0.6, -0.1)), "model.ref_probs"),
  ],
)
def test_bad_model_config_names_the_key(overrides, message):
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    models.build_model(_config(**overrides), rngs=nnx.Rngs(0))
