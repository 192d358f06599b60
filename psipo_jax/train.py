"""train_and_evaluate(config, workdir): the training loop around the pure step.

Order of work: validate the whole config (fail before any training); build
the mesh, model, optimiser and input; resume from the newest readable
checkpoint in `workdir` (refusing a changed config, `psipo_jax.run_config`)
or initialise; then step, log, evaluate and checkpoint until `total_steps`,
or until SIGTERM (checkpoint, clean exit).

Config keys read here (see DESIGN.md §2 and experiments/*.py): seed,
total_steps, input.* (`psipo_jax.inputs`: one entry per `input.name`),
model.* (`psipo_jax.models`), loss.* (`psipo_jax.loss_config`),
optimizer.* (`psipo_jax.optimizers`), mesh.* (`mesh.data`, `mesh.fsdp`,
`mesh.tensor`: the device mesh, `psipo_jax.sharding`; default every device
on `data`), objective ("psipo", "sft" or "kto"), init_checkpoint,
micro_batches, fsdp, skip_nonfinite,
log_every, eval_every, ckpt_every, keep_checkpoints, allow_config_change
(accept a resumed run's changed config, recording it), and
online (pairs sampled from the policy as it trains, `psipo_jax.online`),
reference_checkpoint (optional: another run's workdir whose newest policy
becomes the frozen reference instead of this run's initial policy; read once,
then stored in this run's workdir). `model.init_from_hf=DIR` starts the
policy (and the default reference) from a Hugging Face checkpoint
(`psipo_jax.models.hf_checkpoint`), each host reading only its shards. Any other key is refused, naming the
nearest valid one.
"""

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from flax import nnx

from psipo_jax import checkpointing
from psipo_jax import config_checks
from psipo_jax import data_order
from psipo_jax import host_allocator
from psipo_jax import inputs
from psipo_jax import kto
from psipo_jax import metric_writers
from psipo_jax import models
from psipo_jax import online
from psipo_jax import optimizers
from psipo_jax import run_config
from psipo_jax import sharding
from psipo_jax import storage
from psipo_jax import sweeps
from psipo_jax.loss_config import LossConfig
from psipo_jax.models import hf_checkpoint
from psipo_jax.train_state import SAME_AS_POLICY, TrainState
from psipo_jax import train_step as train_step_lib
from psipo_jax.train_step import make_eval_step, make_train_step

# Every top-level key the trainer reads.
CONFIG_KEYS = (
  "seed",
  "total_steps",
  "input",
  "model",
  "loss",
  "optimizer",
  "micro_batches",
  "fsdp",
  "mesh",
  "skip_nonfinite",
  "log_every",
  "eval_every",
  "ckpt_every",
  "keep_checkpoints",
  "reference_checkpoint",
  "allow_config_change",
  "objective",
  "init_checkpoint",
  "online",
)
# `objective`: "psipo", a pairwise loss of `loss.*` (default), or "sft",
# token-level NLL of single responses (the chosen ones of text pairs, or the
# completions of an "unpaired" file; no reference, no `loss` block),
# or "kto", KTO on labelled single responses (`psipo_jax.kto`; input.name
# "unpaired").
OBJECTIVES = ("psipo", "sft", "kto")
# Metrics whose non-finite value stops the run (or skips the update).
_CHECKED_METRICS = ("loss", "grad_norm", "param_norm")


def validate_config(
  config: ml_collections.ConfigDict, workdir: str
) -> LossConfig | kto.KTOConfig | None:
  """Checks everything that can be checked before training.

  Returns:
    The loss config (None for `objective="sft"`, a `kto.KTOConfig` for
    "kto").
  Raises:
    ValueError: naming the offending config key (or the workdir).
  """
  config_checks.check_keys(config, CONFIG_KEYS)
  objective = config.get("objective") or "psipo"
  if objective not in OBJECTIVES:
    raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")
  config_checks.integer(config, "seed", minimum=0)
  for key in (
    "total_steps",
    "log_every",
    "eval_every",
    "ckpt_every",
    "keep_checkpoints",
  ):
    config_checks.integer(config, key, minimum=1)
  micro_batches = (
    config_checks.integer(config, "micro_batches", minimum=1, optional=True)
    or 1
  )
  if objective == "sft":
    if "loss" in config:
      raise ValueError(
        "objective='sft' reads no loss.* block (its loss is the NLL); remove it"
      )
    if config.input.get("name") not in ("preference_pairs", "unpaired"):
      raise ValueError(
        "objective='sft' trains on single responses: the chosen responses of"
        " text pairs (input.name='preference_pairs') or the completions of a"
        " prompt/completion file (input.name='unpaired'), got"
        f" input.name={config.input.get('name')!r}"
      )
    loss_config = None
  elif objective == "kto":
    loss_config = kto.KTOConfig.from_config(config.get("loss"))
    if config.input.get("name") != "unpaired":
      raise ValueError(
        "objective='kto' trains on labelled single responses: input.name"
        f" must be 'unpaired', got {config.input.get('name')!r}"
      )
  else:
    loss_config = LossConfig.from_config(config.loss)
  batch_size = config_checks.integer(
    config.input, "batch_size", minimum=1, prefix="input."
  )
  # The model block: each model refuses keys it does not read.
  nnx.eval_shape(lambda: models.build_model(config.model, rngs=nnx.Rngs(0)))
  # The mesh block (errors name mesh.<key>); the batch splits over data x fsdp.
  shards = sharding.batch_shards(
    sharding.make_mesh(config.get("mesh"), fsdp=config.get("fsdp", False))
  )
  if (
    micro_batches > 1 and loss_config is not None and loss_config.batch_coupled
  ):
    raise ValueError(
      f"micro_batches={micro_batches} with loss.name={loss_config.name!r}:"
      " this loss sorts the whole batch, so accumulating micro-batches would"
      " change its gradient; use micro_batches=1"
    )
  if batch_size % (shards * micro_batches):
    raise ValueError(
      f"input.batch_size={batch_size} is not divisible by {shards} batch"
      f" shards (mesh data x fsdp) x micro_batches={micro_batches}: every"
      " shard needs an equal share of every micro-batch"
    )
  optimizers.make_optimizer(config.optimizer, config.total_steps)
  inputs.validate(config, workdir)
  online.validate(config, loss_config)
  reference_checkpoint = config.get("reference_checkpoint")
  if reference_checkpoint and config.input.get("ref_logps_file"):
    raise ValueError(
      "reference_checkpoint and input.ref_logps_file are both set: the"
      " precomputed file already is the reference (computed with"
      " python -m psipo_jax.precompute_reference); set one"
    )
  if reference_checkpoint and (
    loss_config is None or loss_config.reference_free
  ):
    what = (
      "objective='sft'"
      if loss_config is None
      else f"loss.name={loss_config.name!r}"
    )
    raise ValueError(
      f"reference_checkpoint is set but {what} uses no reference"
    )
  if config.get("init_checkpoint") and config.model.get("init_from_hf"):
    raise ValueError(
      "init_checkpoint and model.init_from_hf both name the initial policy;"
      " set one"
    )
  for key in ("reference_checkpoint", "init_checkpoint"):
    source = config.get(key)
    if source and not (storage.as_path(source) / "checkpoints").is_dir():
      raise ValueError(
        f"{key}={source!r} is not a workdir holding checkpoints/"
      )
  config_checks.writable_directory(workdir, name="workdir")
  return loss_config


def load_params(
  key: str, source_workdir: str, abstract_params: Any, step: int | None = None
) -> Any:
  """The newest policy parameters of another run (config key `key` names
  it), or those of its checkpoint `step`."""
  source = checkpointing.Checkpointer(
    storage.resolve(source_workdir), max_to_keep=1, read_only=True
  )
  try:
    params = source.restore_params(abstract_params, step)
  except RuntimeError as e:  # No step fits this model: another model's run.
    raise config_checks.UserError(
      f"{key}={source_workdir!r} holds no checkpoint of this model ({e})"
    ) from None
  except ValueError as e:  # No such step.
    raise config_checks.UserError(f"{key}={source_workdir!r}: {e}") from None
  finally:
    source.close()
  if params is None:
    raise config_checks.UserError(
      f"{key}={source_workdir!r} holds no readable checkpoint"
    )
  logging.info(
    "%s: the %s policy of %s.",
    key,
    "newest" if step is None else f"step {step}",
    source_workdir,
  )
  return params


def _restore_or_initialise(
  config: ml_collections.ConfigDict,
  workdir: str,
  ckpt: checkpointing.Checkpointer,
  train_iter: Any,
  *,
  init_state: Callable[[], TrainState],
  abstract_state: TrainState,
  optimizer: Any,
) -> TrainState:
  """The newest readable checkpoint's state (and data position), or a new run's.

  A new run stores its reference once and its config as config.json.
  """
  restored = ckpt.restore(abstract_state)
  if restored is not None:
    state, data_state = restored
    # Before anything else: a changed config must not continue silently.
    run_config.check_resume(
      workdir, config, step=int(state.step), write=jax.process_index() == 0
    )
    if abstract_state.ref_params is not None:
      state = state.replace(
        ref_params=ckpt.restore_reference(abstract_state.ref_params)
      )
    train_iter.set_state(data_state)
    logging.info("Resumed from step %d in %s.", int(state.step), workdir)
    return state

  state = init_state()
  params = None
  if config.get("init_checkpoint"):
    # The policy starts from another run's (e.g. an SFT run's) newest policy,
    # and so does the default reference, the initial policy.
    params = load_params(
      "init_checkpoint", config.init_checkpoint, abstract_state.params
    )
  elif config.model.get("init_from_hf"):
    # The same from a Hugging Face checkpoint, built on the devices.
    params = hf_checkpoint.load_params(
      config.model.init_from_hf,
      hf_checkpoint.model_config(config.model),
      jax.tree.map(lambda x: x.sharding, abstract_state.params),
    )
    logging.info("model.init_from_hf: %s.", config.model.init_from_hf)
  if params is not None:
    state = state.replace(
      params=params,
      opt_state=optimizer.init(params),
      ref_params=None
      if state.ref_params is None
      else jax.tree.map(jnp.copy, params),
    )
  if config.get("reference_checkpoint"):
    state = state.replace(
      ref_params=load_params(
        "reference_checkpoint",
        config.reference_checkpoint,
        abstract_state.ref_params,
      )
    )
  if state.ref_params is not None:
    ckpt.save_reference(state.ref_params)
  if jax.process_index() == 0:
    run_config.write_new(workdir, config)
  logging.info("Initialised a new run in %s.", workdir)
  return state


def evaluate(
  eval_step: Callable[[TrainState, Any], Mapping[str, jax.Array]],
  state: TrainState,
  batches: list[Any],
  finalize: Callable[[dict[str, Any]], dict[str, Any]] = lambda m: m,
) -> dict[str, float]:
  """Weighted means of the eval metrics over every batch (each batch's means
  weighted by its divisor, Σ w_i, so the result is the mean over all pairs
  or tokens), then `finalize` (the objective's derived metrics)."""
  totals, weight = {}, 0.0
  for batch in batches:
    metrics = jax.device_get(eval_step(state, batch))
    w = float(metrics.pop("weight_sum"))
    empty = int(metrics.pop("empty_responses"))
    totals["empty_responses"] = totals.get("empty_responses", 0) + empty
    for key, value in metrics.items():
      totals[key] = totals.get(key, 0.0) + w * float(value)
    weight += w
  means = {
    k: (v if k == "empty_responses" else v / weight) for k, v in totals.items()
  }
  return {k: float(v) for k, v in finalize(means).items()}


def _first_nonfinite(metrics: Mapping[str, Any]) -> str | None:
  for name in _CHECKED_METRICS:
    if not np.isfinite(metrics[name]):
      return name
  if not metrics["opt_state_finite"]:
    return "optimizer state"
  return None


def _format(metrics: Mapping[str, Any], keys: tuple[str, ...]) -> str:
  return ", ".join(f"{k}={float(metrics[k]):.4g}" for k in keys if k in metrics)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> TrainState:
  """Trains the policy of `config`, checkpointing into (and resuming from) `workdir`.

  Returns:
    The final train state (on the devices).
  Raises:
    ValueError: a bad config, before anything is trained.
    FloatingPointError: a non-finite loss, gradient norm or parameter norm at
      some step, unless `skip_nonfinite` is set.
  """
  # Orbax needs an absolute path; a relative one would fail at the first save.
  # A gs:// workdir stays a URL: every file goes through etils.epath.
  workdir = storage.resolve(workdir)
  loss_config = validate_config(config, workdir)
  total_steps = config.total_steps
  optimizer, schedule = optimizers.make_optimizer(config.optimizer, total_steps)

  # The vmapped runner's keys for the same seed (one definition).
  init_key, state_key, data_key = data_order.run_keys(config.seed)
  mesh = sharding.make_mesh(config.get("mesh"), fsdp=config.get("fsdp", False))
  if jax.default_backend() == "cpu" and (
    hint := host_allocator.this_host_hint()
  ):
    logging.warning(hint)
  train_iter, eval_batches = inputs.build(config, mesh, data_key, workdir)
  online_config = online.validate(config, loss_config)
  if online_config is not None:  # Same evaluation; batches from the policy.
    train_iter = online.build(config, online_config, mesh, workdir)

  def init_state() -> TrainState:
    model = models.build_model(config.model, rngs=nnx.Rngs(init_key))
    # No reference on device when the batches carry its log-probs.
    precomputed = bool(config.input.get("ref_logps_file"))
    ref = (
      None
      if loss_config is None or loss_config.reference_free or precomputed
      else SAME_AS_POLICY
    )
    return TrainState.create(model, optimizer, rng=state_key, ref_params=ref)[1]

  abstract_model = nnx.eval_shape(
    lambda: models.build_model(config.model, rngs=nnx.Rngs(init_key))
  )
  model_def = nnx.split(abstract_model)[0]
  if loss_config is None:
    objective = train_step_lib.sft_objective(model_def)
  elif isinstance(loss_config, kto.KTOConfig):
    objective = kto.make_objective(model_def, loss_config)
  else:
    objective = train_step_lib.psipo_objective(model_def, loss_config)
  abstract_state = jax.eval_shape(init_state)
  state_sharding = sharding.state_shardings(
    mesh,
    abstract_state,
    fsdp=config.get("fsdp", False),
    logical_axes=sharding.logical_axes(abstract_model),
  )
  abstract_state = checkpointing.abstract_with_shardings(
    abstract_state, state_sharding
  )

  ckpt = checkpointing.Checkpointer(
    workdir, max_to_keep=config.keep_checkpoints
  )
  state = _restore_or_initialise(
    config,
    workdir,
    ckpt,
    train_iter,
    init_state=jax.jit(init_state, out_shardings=state_sharding),
    abstract_state=abstract_state,
    optimizer=optimizer,
  )

  if online_config is not None:
    # A handle on the loop's current state (this closure reads `state` as
    # the loop reassigns it): the next batch is sampled from that policy.
    train_iter.follow(lambda: state)

  train_step = sharding.jit_train_step(
    make_train_step(
      model_def,
      loss_config,
      optimizer,
      micro_batches=config.get("micro_batches", 1),
      learning_rate_fn=schedule,
      objective=objective,
    ),
    mesh,
    state_sharding,
  )
  eval_step = sharding.jit_eval_step(
    make_eval_step(model_def, loss_config, objective=objective),
    mesh,
    state_sharding,
  )
  global_eval_batches = [sharding.global_batch(mesh, b) for b in eval_batches]

  writer = metric_writers.MetricWriter(workdir)
  start_step = int(state.step)
  interactive = sys.stderr.isatty() and jax.process_index() == 0
  progress = tqdm.tqdm(
    total=total_steps, initial=start_step, disable=not interactive
  )
  log_time, log_step = time.perf_counter(), start_step
  try:
    with checkpointing.PreemptionGuard() as preemption:
      for step in range(start_step + 1, total_steps + 1):
        batch = sharding.global_batch(mesh, next(train_iter))
        state, metrics = train_step(state, batch)
        metrics = jax.device_get(metrics)

        if metrics["empty_responses"]:
          raise ValueError(
            f"step {step}: {int(metrics['empty_responses'])} responses in"
            " the batch have no loss-mask tokens; every chosen and rejected"
            " response needs at least one (the data pipeline drops such"
            " pairs; check a custom input)."
          )
        bad = _first_nonfinite(metrics)
        if bad is not None:
          value = metrics.get(bad, "not finite")
          if not config.get("skip_nonfinite", False):
            raise FloatingPointError(
              f"step {step}: {bad} is {value} (non-finite); stopping"
              " without checkpointing this step. Set skip_nonfinite=True to"
              " skip such updates instead."
            )
          logging.warning(
            "step %d: %s is %s; update skipped (%d skipped so far).",
            step,
            bad,
            value,
            int(metrics["skipped_updates"]),
          )

        progress.update(1)
        if interactive:
          progress.set_postfix(loss=f"{float(metrics['loss']):.4g}")
        if step % config.log_every == 0 or step == total_steps:
          now = time.perf_counter()
          metrics["steps_per_sec"] = (step - log_step) / (now - log_time)
          log_time, log_step = now, step
          writer.write(step, metrics, split="train")
          if not interactive:
            logging.info(
              "step %d/%d: %s",
              step,
              total_steps,
              _format(
                metrics,
                (
                  "loss",
                  "rewards/accuracies",
                  "perplexity",
                  "grad_norm",
                  "steps_per_sec",
                ),
              ),
            )
        if step % config.eval_every == 0 or step == total_steps:
          eval_metrics = evaluate(
            eval_step, state, global_eval_batches, objective.finalize
          )
          writer.write(step, eval_metrics, split="eval")
          logging.info(
            "eval at step %d: %s",
            step,
            _format(eval_metrics, ("loss", "rewards/accuracies", "perplexity")),
          )

        preempted = preemption.reached(step)
        if step % config.ckpt_every == 0 or step == total_steps or preempted:
          ckpt.save(step, state, train_iter.get_state())
        if preempted:
          logging.warning(
            "Preempted: saved a checkpoint at step %d; exiting.", step
          )
          break
  finally:
    ckpt.wait_until_finished()
    ckpt.close()
    writer.close()
    progress.close()
  # Written after the final checkpoint is committed: a sweep skips this run
  # on rerun (a preempted run exits cleanly too, so exit 0 is not enough).
  if int(state.step) == total_steps and jax.process_index() == 0:
    sweeps.mark_finished(workdir, total_steps)
  return state
