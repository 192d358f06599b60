"""Policies: Flax NNX modules that score responses with per-sequence log-probs.

The train step is written once against this contract (DESIGN.md §2):

    model(inputs, *, rngs) -> PolicyOutput(logps=[N], num_tokens=[N])

`inputs` is a dict of arrays with a leading axis of N rows (the train step
stacks the chosen and rejected sides of a batch of B pairs, N = 2B). `logps`
are SUMMED log-probs of each response; `num_tokens` the number of response
tokens behind each sum, so that the step can length-normalise
(`loss.normalize="mean"`) without knowing the model. A finite-action policy
reads `inputs["action"]` and reports one token per response; a sequence model
reads `inputs["input_ids"]` and `inputs["loss_mask"]`. `rngs` is an
`nnx.Rngs` for stochastic layers (dropout) during training and None for a
deterministic pass (evaluation, the reference policy).

`build_model(config)` maps `config.name` to a constructor registered in
`MODELS`: "tabular" (finite actions) and "transformer" (the decoder LM,
`psipo_jax.models.transformer`, whose docstring lists its config keys; with
`model.init_from_hf=DIR` its architecture is that Hugging Face checkpoint's,
`psipo_jax.models.hf_checkpoint`).
"""

from collections.abc import Callable

import ml_collections
from flax import nnx

from psipo_jax.models import hf_checkpoint
from psipo_jax.models import transformer
from psipo_jax.models.policy import PolicyOutput
from psipo_jax.models.tabular import TabularPolicy, tabular_from_config
from psipo_jax.models.transformer import Transformer


def transformer_from_config(
  config: ml_collections.ConfigDict, *, rngs: nnx.Rngs
) -> Transformer:
  """The decoder LM of a `model.*` block (`hf_checkpoint.model_config`)."""
  c = hf_checkpoint.model_config(config)
  transformer.check_attention_available(c)
  return Transformer(c, rngs=rngs)


# name -> constructor(model_config, *, rngs) -> nnx.Module obeying the contract.
MODELS: dict[str, Callable[..., nnx.Module]] = {
  "tabular": tabular_from_config,
  "transformer": transformer_from_config,
}
# What each model scores: action indices, or token sequences.
INPUT_KINDS: dict[str, str] = {"tabular": "actions", "transformer": "tokens"}


def vocab_size(config: ml_collections.ConfigDict) -> int:
  """The vocabulary size of the token model the `model.*` block builds."""
  return hf_checkpoint.model_config(config).vocab_size


def build_model(
  config: ml_collections.ConfigDict, *, rngs: nnx.Rngs
) -> nnx.Module:
  """Builds the policy named by `config.name` (the `model.*` config block)."""
  if config.name not in MODELS:
    raise ValueError(
      f"model.name={config.name!r} is not a known model; choose one of"
      f" {sorted(MODELS)}"
    )
  return MODELS[config.name](config, rngs=rngs)


__all__ = [
  "INPUT_KINDS",
  "MODELS",
  "PolicyOutput",
  "TabularPolicy",
  "Transformer",
  "build_model",
  "vocab_size",
]
