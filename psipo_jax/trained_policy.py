"""A trained policy loaded from a run's workdir, ready to sample and score.

    policy = trained_policy.Policy("runs/lm_ipo_tiny")
    config = policy.sampling_config(max_new_tokens=32, temperature=0.0)
    for result in policy.complete(["sort: dcab ="], config):
      print(result["completion"], result["logp"])

The run's `config.json` (written by the trainer) gives the model and the
tokenizer (`input.tokenizer`, `input.bos_token` / `eos_token` /
`pad_token`, `input.add_bos`); the policy parameters come from the newest
readable checkpoint in `workdir/checkpoints` (`psipo_jax.checkpointing`).
A prompt is encoded as the training pipeline encodes a prompt of the
`prompt_response` layout: BOS (when `input.add_bos` and the tokenizer has
one), then the text as given (for a chat-layout run, pass the rendered
prompt). `python -m psipo_jax.sample` is the command line over it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from psipo_jax import checkpointing
from psipo_jax import config_checks
from psipo_jax import models
from psipo_jax import run_config
from psipo_jax import sampling
from psipo_jax import sharding
from psipo_jax import train
from psipo_jax.data import tokenizers


# One jitted scorer per model graph and one sampler per (graph, settings,
# mesh, parameter shardings), shared by every Policy of that model (a grid's
# runs and their reference): each compiles once per process, not once per
# run loaded. The shardings come flattened (a dict is not hashable).
@functools.cache
def _scorer(model_def: Any) -> Any:
  return jax.jit(
    lambda params, inputs: nnx.merge(model_def, params)(inputs).logps
  )


@functools.cache
def _sampler(
  model_def: Any,
  config: sampling.SamplingConfig,
  mesh: Any,
  shardings_def: Any,
  shardings: tuple,
) -> Any:
  return sampling.make_sampler(
    model_def,
    config,
    mesh=mesh,
    param_sharding=jax.tree.unflatten(shardings_def, shardings),
  )


class Policy:
  """A run's trained policy and tokenizer, loaded from its workdir.

  Attributes:
    config: the run's config (from config.json).
    model_def: the transformer's graph definition.
    workdir: the run's directory.
    params: the newest readable checkpoint's policy parameters, sharded
      over the mesh (`load_step` replaces them by another step's).
    tokenizer: the run's tokenizer.
    add_bos: whether prompts start with BOS.
    mesh: the mesh the sampler runs on.
  """

  def __init__(self, workdir: str, *, mesh: Any = None):
    """Loads the run in `workdir`.

    Args:
      workdir: the run's directory.
      mesh: where to sample (`sharding.make_mesh`): None for every device on
        `data` with the parameters replicated; a data × fsdp × tensor mesh
        splits the parameters by the rule table (restored straight into
        their shards), for a policy that does not fit one device.
    """
    workdir = os.path.abspath(workdir)
    plain = run_config.read(workdir)
    if plain is None:
      raise config_checks.UserError(
        f"--workdir={workdir!r} holds no {run_config.CONFIG_FILE}: not a"
        " training run's directory"
      )
    self.config = ml_collections.ConfigDict(plain)
    model_config = self.config.get("model")
    if model_config is None or model_config.get("name") != "transformer":
      raise config_checks.UserError(
        f"{workdir}/{run_config.CONFIG_FILE}: model.name is"
        f" {None if model_config is None else model_config.get('name')!r};"
        " sampling needs a 'transformer' run"
      )
    section = self.config.get("input") or {}
    self.tokenizer = tokenizers.make_tokenizer(
      section.get("tokenizer") or "byte",
      bos_token=section.get("bos_token"),
      eos_token=section.get("eos_token"),
      pad_token=section.get("pad_token"),
    )
    self.add_bos = bool(section.get("add_bos", True))
    abstract = nnx.eval_shape(
      lambda: models.build_model(model_config, rngs=nnx.Rngs(0))
    )
    if self.tokenizer.vocab_size > abstract.config.vocab_size:
      raise config_checks.UserError(
        f"input.tokenizer has {self.tokenizer.vocab_size} tokens but"
        f" model.vocab_size={abstract.config.vocab_size}"
      )
    self.model_def, abstract_params = nnx.split(abstract, nnx.Param, ...)[:2]
    self.mesh = sharding.make_mesh() if mesh is None else mesh
    abstract_params = nnx.to_pure_dict(abstract_params)
    shardings = sharding.param_shardings(
      self.mesh, abstract_params, sharding.logical_axes(abstract)
    )
    leaves, treedef = jax.tree.flatten(shardings)
    self._sampler_shardings = (treedef, tuple(leaves))  # `_sampler`'s key
    self._score = _scorer(self.model_def)  # [N] summed response log-probs
    self.workdir = workdir
    self._abstract_params = checkpointing.abstract_with_shardings(
      abstract_params, shardings
    )
    self.params = train.load_params("--workdir", workdir, self._abstract_params)

  def checkpoint_steps(self) -> list[int]:
    """The steps of the run's checkpoints, oldest first."""
    source = checkpointing.Checkpointer(
      self.workdir, max_to_keep=1, read_only=True
    )
    try:
      return source.all_steps()
    finally:
      source.close()

  def load_step(self, step: int) -> None:
    """Replaces `params` by those of checkpoint `step` (one of
    `checkpoint_steps()`), keeping the compiled sampler and scorer."""
    self.params = train.load_params(
      "--workdir", self.workdir, self._abstract_params, step
    )

  def encode(self, prompt: str) -> np.ndarray:
    """Prompt ids as the pipeline encodes a prompt: [BOS] + text."""
    bos = (
      [self.tokenizer.bos_id]
      if self.add_bos and self.tokenizer.bos_id is not None
      else []
    )
    ids = np.concatenate(
      [np.asarray(bos, np.int32), self.tokenizer.encode(prompt)]
    )
    if not len(ids):
      raise config_checks.UserError(
        f"--prompt={prompt!r} encodes to no tokens (and the run adds no BOS)"
      )
    return ids

  def complete(
    self,
    prompts: Sequence[str],
    config: sampling.SamplingConfig,
    *,
    num_samples: int = 1,
    seed: int = 0,
  ) -> list[dict[str, Any]]:
    """`num_samples` completions of every prompt, prompt-major.

    Returns:
      One dict per completion: prompt, sample (index), completion (text),
      tokens (ids), token_logps (the policy's, per token), logp (their
      sum), eos (whether it ended with EOS).
    """
    if num_samples < 1:
      raise config_checks.UserError(
        f"--num_samples must be >= 1, got {num_samples}"
      )
    rows = [p for p in prompts for _ in range(num_samples)]
    ids = [self.encode(p) for p in rows]
    # Fill up to a multiple of the batch shards; the fill rows are dropped.
    shards = sharding.batch_shards(self.mesh)
    ids += [ids[0]] * (-len(ids) % shards)
    tokens, lengths = sampling.left_pad(ids, pad_id=self.tokenizer.pad_id)
    sampler = _sampler(
      self.model_def, config, self.mesh, *self._sampler_shardings
    )
    out = jax.device_get(
      sampler(self.params, tokens, lengths, jax.random.key(seed))
    )
    results = []
    for row, prompt in enumerate(rows):
      n = int(out.lengths[row])
      generated = out.tokens[row, :n].tolist()
      eos = bool(n and generated[-1] == config.eos_id)
      results.append(
        dict(
          prompt=prompt,
          sample=row % num_samples,
          completion=self.tokenizer.decode(generated),
          tokens=generated,
          token_logps=out.logps[row, :n].tolist(),
          logp=float(out.logps[row, :n].sum()),
          eos=eos,
        )
      )
    return results

  def sequence_logps(
    self,
    prompts: Sequence[str],
    responses: Sequence[Sequence[int]],
  ) -> np.ndarray:
    """[n] summed log π(response | prompt) of token-id responses (EOS
    included where it is one of them), by the model's full forward pass:
    the training scorer, not the sampler."""
    rows = [
      (self.encode(p), np.asarray(r, np.int32))
      for p, r in zip(prompts, responses)
    ]
    width = max(len(p) + len(r) for p, r in rows)
    width = 8 * -(-width // 8)  # fewer distinct shapes, fewer compiles
    n = len(rows)
    ids = np.full((n, width), self.tokenizer.pad_id, np.int32)
    loss_mask = np.zeros((n, width), np.int32)
    attention = np.zeros((n, width), np.int32)
    for i, (p, r) in enumerate(rows):
      ids[i, : len(p) + len(r)] = np.concatenate([p, r])
      loss_mask[i, len(p) : len(p) + len(r)] = 1
      attention[i, : len(p) + len(r)] = 1
    inputs = dict(input_ids=ids, loss_mask=loss_mask, attention_mask=attention)
    return np.asarray(self._score(self.params, inputs))

  def sampling_config(self, **settings) -> sampling.SamplingConfig:
    """A SamplingConfig that stops at the tokenizer's EOS, pads with PAD."""
    return sampling.SamplingConfig(
      eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id, **settings
    )
