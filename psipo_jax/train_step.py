"""The pure train and eval steps: (state, batch) -> (state, metrics).

Written once against the data/model contract of DESIGN.md §2: a batch of B
preference pairs is a dict of [B, ...] arrays (`chosen_<name>` /
`rejected_<name>`, or `chosen` / `rejected` action indices; optionally
`ref_chosen_logps` / `ref_rejected_logps` and `weight`); a policy maps the
stacked sides to summed log-probs and token counts (`psipo_jax.models`).

Per step:
  1. policy log-probs of chosen and rejected responses in one forward pass
     over the 2B stacked responses; reference log-probs likewise, under
     `stop_gradient` (or read from the batch when precomputed);
  2. per-pair loss ℓ_i = loss(h-terms; τ, options[, the [B] batch fields the
     loss declares, e.g. REBEL's `margin`]) + nll_weight · nll_i with
     nll_i = −log π(y_w|x) / |y_w| (RPO, Pang et al. 2024, arXiv:2404.19733);
  3. L = Σ_i w_i ℓ_i / Σ_i w_i over the GLOBAL batch (w_i = `weight`, default
     1), so gradient accumulation over micro-batches and data parallelism
     both give the gradient of the one big batch;
  4. optax update of the policy only, through `psipo_jax.update` (the one
     update core of every training path): the update is dropped (state kept,
     `skipped_updates` incremented) when the loss, the gradient norm, the
     updated parameters or the new optimiser state are not finite, so a
     state never holds NaNs.
"""

import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from psipo_jax import metrics as metrics_lib
from psipo_jax import update as update_lib
from psipo_jax.loss_config import LossConfig
from psipo_jax.models import PolicyOutput
from psipo_jax.train_state import Params, TrainState

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def pair_inputs(batch: Batch) -> dict[str, jax.Array]:
  """Stacks both sides of each pair into one model input of 2B rows.

  Batch key `chosen_<name>` (with its partner `rejected_<name>`) becomes model
  input `<name>`; the finite-action keys `chosen` / `rejected` become
  `action`. Rows [0, B) are the chosen responses, rows [B, 2B) the rejected.
  A packed batch (data/packing.py) has no [B, T] sides: its rows
  `packed_<name>` become input `<name>`, and `chosen_packed_row` /
  `rejected_packed_row` become the [2B] `packed_row` that orders the
  model's per-sequence outputs as above.
  """
  inputs = {}
  for key in batch:
    if key.startswith("packed_"):
      inputs[key[len("packed_") :]] = batch[key]  # [R, T] packed rows
  for key in batch:
    if key != "chosen" and not key.startswith("chosen_"):
      continue
    rejected_key = "rejected" + key[len("chosen") :]
    if rejected_key not in batch:
      raise ValueError(f"batch has {key!r} but no {rejected_key!r}")
    name = key[len("chosen_") :] or "action"
    inputs[name] = jnp.concatenate(
      [batch[key], batch[rejected_key]]
    )  # [2B, ...]
  if not inputs:
    raise ValueError(
      f"batch has no chosen/rejected inputs; keys: {sorted(batch)}"
    )
  return inputs


def token_efficiency(batch: Batch) -> Metrics:
  """`packing_efficiency`: real tokens / token slots of a token batch (packed
  rows or both padded sides); empty for a batch of actions."""
  if "packed_segment_ids" in batch:
    real = batch["packed_segment_ids"] != 0  # [R, T]
  elif "chosen_attention_mask" in batch:
    real = (
      jnp.concatenate(
        [batch["chosen_attention_mask"], batch["rejected_attention_mask"]]
      )
      != 0
    )  # [2B, T]
  else:
    return {}
  return {"packing_efficiency": jnp.mean(real, dtype=jnp.float32)}


def _normalize(logps: jax.Array, num_tokens: jax.Array, mode: str) -> jax.Array:
  logps = logps.astype(jnp.float32)
  if mode == "mean":
    return logps / num_tokens
  return logps


def _split_pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[2B] stacked scores -> ([B] chosen, [B] rejected)."""
  half = x.shape[0] // 2
  return x[:half], x[half:]


def reference_logps(
  model_def: nnx.GraphDef, ref_params: Params, batch: Batch
) -> tuple[jax.Array, jax.Array]:
  """The reference's SUMMED log-probs of `batch`'s responses, ([B] chosen,
  [B] rejected) in float32: what a batch's `ref_chosen_logps` /
  `ref_rejected_logps` carry, so that a step given them (and no
  `ref_params`) computes what it computes with `ref_params`."""
  reference: PolicyOutput = nnx.merge(model_def, ref_params)(
    pair_inputs(batch), rngs=None
  )
  return _split_pairs(reference.logps.astype(jnp.float32))


def _pair_terms(
  model_def: nnx.GraphDef,
  loss_config: LossConfig,
  params: Params,
  ref_params: Params | None,
  batch: Batch,
  rngs: nnx.Rngs | None,
) -> tuple[jax.Array, tuple[jax.Array, Metrics]]:
  """Σ_i w_i ℓ_i over one (micro-)batch, with Σ_i w_i and Σ_i w_i m_i.

  Returns:
    (loss_sum, (weight_sum, metric_sums, empty_responses)); only the first
    term carries gradient. Dividing by the global weight sum gives the weighted means.
  """
  inputs = pair_inputs(batch)
  policy: PolicyOutput = nnx.merge(model_def, params)(inputs, rngs=rngs)
  norm = loss_config.normalize
  policy_chosen, policy_rejected = _split_pairs(
    _normalize(policy.logps, policy.num_tokens, norm)
  )  # [B], [B]

  # The reference's SUMMED log-probs, precomputed (data/reference_logps.py:
  # the file says so, and the pipeline checked that they score exactly these
  # tokens) or from ref_params; the policy's token counts normalise them,
  # once, as they do the policy's.
  if "ref_chosen_logps" in batch:
    ref_sums = (batch["ref_chosen_logps"], batch["ref_rejected_logps"])
  elif ref_params is not None:
    ref_sums = reference_logps(model_def, ref_params, batch)
  else:
    ref_sums = None
    if not loss_config.reference_free:
      raise ValueError(
        f"loss {loss_config.name!r} needs reference log-probs, but the batch"
        " has no ref_chosen_logps and the state holds no reference"
        " (an input.ref_logps_file that misses this split?)"
      )
  if ref_sums is not None:
    ref = _normalize(jnp.concatenate(ref_sums), policy.num_tokens, norm)  # [2B]
    ref_chosen, ref_rejected = _split_pairs(jax.lax.stop_gradient(ref))
  else:
    ref_chosen = ref_rejected = None

  fields = {k: batch[k] for k in loss_config.batch_fields if k in batch}
  pair_loss = loss_config(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, fields
  )  # [B]
  chosen_logps_sum, _ = _split_pairs(policy.logps.astype(jnp.float32))
  chosen_tokens, _ = _split_pairs(policy.num_tokens)
  nll = -chosen_logps_sum / chosen_tokens  # [B]
  # Static: with the term off, 0·NaN from an empty response cannot leak in.
  per_pair = (
    pair_loss + loss_config.nll_weight * nll
    if loss_config.nll_weight
    else pair_loss
  )  # [B]

  weight = batch.get("weight")
  if weight is not None and loss_config.batch_coupled:
    # Rank-ordered outputs are not aligned with the pairs their weights
    # belong to.
    raise ValueError(
      f"loss.name={loss_config.name!r} sorts the batch, so per-pair"
      " `weight` in the data cannot apply; drop the field or choose"
      " another loss."
    )
  if weight is None:
    weight = jnp.ones_like(per_pair)
  weight = weight.astype(jnp.float32)  # [B]

  # Weighted sums over this (micro-)batch; the caller divides by the global
  # weight sum, so every metric is a weighted mean over the whole batch.
  per_pair_metrics = metrics_lib.per_example_metrics(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    tau=loss_config.tau,
  )  # each [B]; a missing reference counts as log-probs of zero
  per_pair_metrics.update(pair_loss=pair_loss, nll=nll)
  # A response without loss-mask tokens has log π = 0 under "sum": an input
  # error that no loss value would reveal. Counted here; the loop stops on it.
  empty = jnp.sum(policy.num_tokens == 0)
  metric_sums = {k: jnp.sum(weight * v) for k, v in per_pair_metrics.items()}
  return jnp.sum(weight * per_pair), (jnp.sum(weight), metric_sums, empty)


def _sft_terms(
  model_def: nnx.GraphDef,
  params: Params,
  ref_params: Params | None,
  batch: Batch,
  rngs: nnx.Rngs | None,
) -> tuple[jax.Array, tuple[jax.Array, Metrics, jax.Array]]:
  """Σ −log π(y_t | x, y_<t) over the response tokens of single responses.

  Supervised fine-tuning: the batch's `completion_*` arrays (an "unpaired"
  prompt/completion file), else its `chosen_*` arrays (a
  `preference_pairs` dataset's chosen responses), each token weighted by
  its row's `weight` (default 1). The divisor returned is the weighted
  token count, so the step's loss is the mean NLL per response token over
  the whole (global) batch.
  """
  del ref_params  # SFT has no reference.
  side = "completion_" if "completion_input_ids" in batch else "chosen_"
  inputs = {
    key[len(side) :]: value
    for key, value in batch.items()
    if key.startswith(side)
  }
  if "input_ids" not in inputs:
    raise ValueError(
      "objective='sft' trains on token sequences (completion_input_ids or"
      f" chosen_input_ids, ...); the batch has {sorted(batch)}"
    )
  out: PolicyOutput = nnx.merge(model_def, params)(inputs, rngs=rngs)
  weight = batch.get("weight")
  weight = (jnp.ones_like(out.logps) if weight is None else weight).astype(
    jnp.float32
  )
  tokens = jnp.sum(weight * out.num_tokens)  # weighted response tokens
  nll_sum = -jnp.sum(weight * out.logps.astype(jnp.float32))
  empty = jnp.sum(out.num_tokens == 0)
  return nll_sum, (tokens, {"nll": nll_sum}, empty)


def _whole_batch(params, ref_params, batch):
  del params, ref_params
  return batch


class Objective(NamedTuple):
  """What a step minimises: per-(micro-)batch sums and a final touch.

  Attributes:
    terms: `(params, ref_params, batch, rngs) -> (loss_sum, (divisor,
      metric_sums, empty_responses))`; the step divides every sum by the
      global divisor (the weight sum of the pairs, or the weighted token
      count for SFT).
    finalize: metrics (already divided) -> metrics with derived entries.
    prepare: `(params, ref_params, batch) -> batch`, run once on the whole
      global batch before it is split into micro-batches, outside the
      gradient: for statistics of the whole batch that `terms` reads as
      constants (KTO's reference point, `psipo_jax.kto`). Default: none.
  """

  terms: Callable[..., tuple[jax.Array, tuple[jax.Array, Metrics, jax.Array]]]
  finalize: Callable[[Metrics], Metrics]
  prepare: Callable[..., Batch] = _whole_batch


def psipo_objective(
  model_def: nnx.GraphDef, loss_config: LossConfig
) -> Objective:
  """The pairwise ΨPO loss of `loss_config` (module docstring)."""
  terms = lambda params, ref_params, batch, rngs: _pair_terms(
    model_def, loss_config, params, ref_params, batch, rngs
  )
  return Objective(terms=terms, finalize=lambda metrics: metrics)


def sft_objective(model_def: nnx.GraphDef) -> Objective:
  """Token-level NLL of the chosen responses; adds `perplexity` = e^nll."""

  def finalize(metrics: Metrics) -> Metrics:
    return {**metrics, "perplexity": jnp.exp(metrics["nll"])}

  terms = lambda params, ref_params, batch, rngs: _sft_terms(
    model_def, params, ref_params, batch, rngs
  )
  return Objective(terms=terms, finalize=finalize)


def _micro_batches(batch: Batch, num: int) -> Batch:
  """[B, ...] -> [num, B/num, ...]; micro-batch j holds rows j, j+num, ...

  Interleaving keeps each device's contiguous shard of the data axis inside
  every micro-batch, so splitting needs no communication.
  """

  def split(x):
    if x.shape[0] % num:
      raise ValueError(
        f"batch size {x.shape[0]} is not divisible by {num} micro-batches"
      )
    x = x.reshape((x.shape[0] // num, num) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, dict(batch))


def make_train_step(
  model_def: nnx.GraphDef,
  loss_config: LossConfig | None,
  optimizer: optax.GradientTransformation,
  *,
  micro_batches: int = 1,
  learning_rate_fn: optax.Schedule | None = None,
  objective: Objective | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Returns the pure train step `(state, batch) -> (state, metrics)`.

  Args:
    model_def: the policy's static graph definition (from `TrainState.create`).
    loss_config: loss name, τ, options, normalisation and NLL weight.
    optimizer: optax transformation of the policy's parameters (include
      gradient clipping here, e.g. `optax.clip_by_global_norm`).
    micro_batches: accumulate gradients over this many equal micro-batches
      (`lax.scan`); the result equals one step on the whole batch.
    learning_rate_fn: the optimiser's schedule, reported as `learning_rate`.
    objective: what to minimise; default `psipo_objective(model_def,
      loss_config)`, the pairwise loss (`sft_objective` for SFT, where
      `loss_config` is unused).

  Returns:
    A pure function; jit it (see `psipo_jax.sharding`). Metrics, weighted
    means over the whole batch: `loss` (the objective), `pair_loss`, `nll`
    and the `psipo_jax.metrics` set (rewards/*, logps/*, h); then
    `grad_norm` (before clipping), `param_norm` (after the update),
    `opt_state_finite` (0/1), `packing_efficiency` (token batches),
    `learning_rate`, `update_skipped` (0/1) and `skipped_updates` (running
    count).
  """
  if micro_batches < 1:
    raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
  if objective is None:
    objective = psipo_objective(model_def, loss_config)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    rng, step_key = jax.random.split(state.rng)
    batch = objective.prepare(state.params, state.ref_params, batch)

    def micro_step(grad_sum, scan_input):
      index, micro_batch = scan_input
      rngs = nnx.Rngs(jax.random.fold_in(step_key, index))
      terms = functools.partial(
        objective.terms,
        ref_params=state.ref_params,
        batch=micro_batch,
        rngs=rngs,
      )
      (loss_sum, aux), grads = jax.value_and_grad(terms, has_aux=True)(
        state.params
      )
      grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
      return grad_sum, (loss_sum, *aux)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grad_sum, (loss_sums, weight_sums, metric_sums, empty) = jax.lax.scan(
      micro_step,
      zeros,
      (jnp.arange(micro_batches), _micro_batches(batch, micro_batches)),
    )  # leaves of the outputs: [micro_batches]
    total_weight = jnp.sum(weight_sums)
    loss = jnp.sum(loss_sums) / total_weight
    grads = jax.tree.map(lambda g: g / total_weight, grad_sum)
    metrics = objective.finalize(
      {k: jnp.sum(v) / total_weight for k, v in metric_sums.items()}
    )

    update = update_lib.apply_update(
      optimizer, grads, state.params, state.opt_state, loss
    )
    update_skipped = jnp.logical_not(update.finite).astype(jnp.int32)
    skipped = state.skipped_updates + update_skipped

    new_state = state.replace(
      step=state.step + 1,
      params=update.params,
      opt_state=update.opt_state,
      rng=rng,
      skipped_updates=skipped,
    )
    metrics.update(
      loss=loss,
      empty_responses=jnp.sum(empty),
      grad_norm=update.grad_norm,
      param_norm=update.param_norm,
      opt_state_finite=update.opt_state_finite.astype(jnp.int32),
      update_skipped=update_skipped,
      skipped_updates=skipped,
      **token_efficiency(batch),
    )
    if learning_rate_fn is not None:
      # The optimiser's own count does not advance on a skipped update.
      metrics["learning_rate"] = jnp.asarray(
        learning_rate_fn(state.step - state.skipped_updates), jnp.float32
      )
    return new_state, metrics

  return step


def make_eval_step(
  model_def: nnx.GraphDef,
  loss_config: LossConfig | None,
  *,
  objective: Objective | None = None,
) -> Callable[[TrainState, Batch], Metrics]:
  """Returns `(state, batch) -> metrics`: the train step's loss and
  preference metrics on `batch` (weighted means), deterministic (no
  dropout), no update; plus `weight_sum` (Σ w_i) and `empty_responses`, so
  that means over several batches combine exactly (`train.evaluate`)."""

  if objective is None:
    objective = psipo_objective(model_def, loss_config)

  def eval_step(state: TrainState, batch: Batch) -> Metrics:
    batch = objective.prepare(state.params, state.ref_params, batch)
    loss_sum, (weight_sum, metric_sums, empty) = objective.terms(
      state.params, state.ref_params, batch, None
    )
    # Not finalized here: derived metrics (e.g. perplexity = e^nll) are
    # taken of the means over ALL batches (`train.evaluate`), not averaged.
    metrics = {k: v / weight_sum for k, v in metric_sums.items()}
    metrics["loss"] = loss_sum / weight_sum
    metrics["empty_responses"] = empty
    metrics["weight_sum"] = weight_sum  # To combine several batches exactly.
    return metrics

  return eval_step
