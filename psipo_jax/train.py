"""train_and_evaluate(config, workdir): the training loop around the pure step.

Order of work: validate the whole config (fail before any training); build
the mesh, model, optimiser and input; resume from the newest readable
checkpoint in `workdir` or initialise; then step, log, evaluate and
checkpoint until `total_steps`, or until SIGTERM (checkpoint, clean exit).

Config keys read here (see DESIGN.md §2 and experiments/*.py): seed,
total_steps, input.*, model.*, loss.*, optimizer.*, micro_batches, fsdp,
skip_nonfinite, log_every, eval_every, ckpt_every, keep_checkpoints, and
reference_checkpoint (optional: another run's workdir whose newest policy
becomes the frozen reference instead of this run's initial policy; read once,
then stored in this run's workdir).

Inputs (`input.name`):
  "pairs"               an in-memory list `input.pairs` of (winner, loser)
                        actions, sampled by step (`pair_sampler`).
  "bandit_preferences"  a TFDS dataset of action pairs read through the Grain
                        pipeline of `psipo_jax.data` (every `input.*` key is
                        documented in psipo_jax/data/config.py). Its shuffle
                        seed is `input.seed`. `input.data_dir` defaults to
                        <workdir>/tfds. Evaluation uses the whole "test"
                        split if the dataset has one, else the whole "train"
                        split.
  "preference_pairs"    text pairs: validated, then refused until a sequence
                        model exists (the tabular policy scores actions).
Whatever the input, the train iterator's `get_state()` is saved in every checkpoint
and restored on resume, so a resumed run sees exactly the batches an
uninterrupted one would.
"""

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging
from flax import nnx

from psipo_jax import checkpointing
from psipo_jax import data
from psipo_jax import losses
from psipo_jax import metric_writers
from psipo_jax import models
from psipo_jax import optimizers
from psipo_jax import pair_sampler
from psipo_jax import sharding
from psipo_jax import sweeps
from psipo_jax.data import config as data_config
from psipo_jax.data import sources as data_sources
from psipo_jax.train_state import SAME_AS_POLICY, TrainState
from psipo_jax.train_step import LossConfig, make_eval_step, make_train_step

# Metrics whose non-finite value stops the run (or skips the update).
_CHECKED_METRICS = ("loss", "grad_norm", "param_norm")


def _require_positive_int(config: ml_collections.ConfigDict, key: str) -> None:
  value = config.get(key)
  if not isinstance(value, int) or value < 1:
    raise ValueError(f"{key} must be a positive integer, got {value!r}")


def _check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f"workdir {workdir!r} is not writable: {e}") from None


def validate_config(config: ml_collections.ConfigDict, workdir: str) -> LossConfig:
  """Checks everything that can be checked before training; returns the loss config.

  Raises:
    ValueError: naming the offending config key (or the workdir).
  """
  for key in ("total_steps", "log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
    _require_positive_int(config, key)
  loss_config = LossConfig.from_config(config.loss)
  batch_size = config.input.batch_size
  micro_batches = config.get("micro_batches", 1)
  if not isinstance(micro_batches, int) or micro_batches < 1:
    raise ValueError(f"micro_batches must be a positive integer, got {micro_batches!r}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"input.batch_size must be a positive integer, got {batch_size!r}")
  devices = jax.device_count()
  if micro_batches > 1 and loss_config.name in losses.BATCH_COUPLED:
    raise ValueError(
        f"micro_batches={micro_batches} with loss.name={loss_config.name!r}:"
        " this loss sorts the whole batch, so accumulating micro-batches would"
        " change its gradient; use micro_batches=1"
    )
  if batch_size % (devices * micro_batches):
    raise ValueError(
        f"input.batch_size={batch_size} is not divisible by {devices} devices"
        f" x micro_batches={micro_batches}: every device needs an equal share"
        " of every micro-batch"
    )
  optimizers.make_optimizer(config.optimizer, config.total_steps)
  _validate_input(config, workdir)
  reference_checkpoint = config.get("reference_checkpoint")
  if reference_checkpoint:
    if loss_config.reference_free:
      raise ValueError(
          f"reference_checkpoint is set but loss.name={loss_config.name!r} is"
          " reference-free"
      )
    if not os.path.isdir(os.path.join(reference_checkpoint, "checkpoints")):
      raise ValueError(
          f"reference_checkpoint={reference_checkpoint!r} is not a workdir"
          " holding checkpoints/"
      )
  _check_workdir(workdir)
  return loss_config


# Inputs that yield action pairs ([B] `chosen` / `rejected` indices), the
# batches the tabular policy scores.
_ACTION_INPUTS = ("pairs", "bandit_preferences")
_INPUT_NAMES = ("pairs", *data_config.DATASET_NAMES)


def data_input_config(
    config: ml_collections.ConfigDict, workdir: str
) -> ml_collections.ConfigDict:
  """`config.input` as the data package reads it, with `data_dir` defaulting
  to <workdir>/tfds (a copy: the caller's config is left alone)."""
  section = config.input.copy_and_resolve_references()
  if section.get("data_dir") is None:
    with section.unlocked():
      section.data_dir = os.path.join(workdir, "tfds")
  return section


def _validate_input(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks `input.*` and that the model scores what the input yields."""
  name = config.input.get("name")
  if name not in _INPUT_NAMES:
    raise ValueError(f"input.name={name!r} is not a known input; choose one of {_INPUT_NAMES}")
  if name == "pairs":
    pair_sampler.validate_pairs(config.input.pairs, config.model.num_actions)
    return
  # Unknown keys, bad values and impossible combinations, each naming input.<key>.
  cfg = data.parse_input_config(data_input_config(config, workdir))
  if name not in _ACTION_INPUTS:
    raise ValueError(
        f"input.name={name!r} yields token sequences, which no model of"
        f" psipo_jax.models.MODELS ({sorted(models.MODELS)}) scores yet: the"
        f" tabular policy reads action indices (input.name in {_ACTION_INPUTS})."
        " The sequence models land with the language-model issue."
    )
  if cfg.num_actions != config.model.get("num_actions"):
    raise ValueError(
        f"input.num_actions={cfg.num_actions} differs from model.num_actions="
        f"{config.model.get('num_actions')}"
    )


def build_input(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    data_key: jax.Array,
    *,
    workdir: str,
) -> tuple[Iterator[dict[str, np.ndarray]], dict[str, np.ndarray]]:
  """Returns (train iterator with get_state/set_state, eval batch), both
  holding only this process's rows of each global batch.

  `data_key` drives the "pairs" sampler; a dataset's order is seeded by
  `input.seed`. Call `validate_config` first.
  """
  if config.input.name == "pairs":
    pairs = pair_sampler.validate_pairs(config.input.pairs, config.model.num_actions)
    rows = sharding.local_batch_rows(mesh, config.input.batch_size)
    train_iter = pair_sampler.PairSampler(
        pairs, batch_size=config.input.batch_size, data_key=data_key, rows=rows
    )
  else:
    section = data_input_config(config, workdir)
    train_iter = _dataset_train_iterator(section, config.total_steps)
    pairs = _whole_eval_split(section)
  # Every evaluation pair equally often, in a batch the devices split evenly.
  eval_batch = pair_sampler.all_pairs_batch(pairs, multiple=mesh.size)
  eval_rows = sharding.local_batch_rows(mesh, len(eval_batch["chosen"]))
  return train_iter, {k: v[eval_rows] for k, v in eval_batch.items()}


def _dataset_train_iterator(
    section: ml_collections.ConfigDict, total_steps: int
) -> data.PreferenceIterator:
  """The Grain iterator of the "train" split, one global batch per step.

  Process p yields the stream positions congruent to p modulo the process
  count; `sharding.global_batch` places them at this process's rows, so the
  global batch is the stream's batch up to a permutation of its rows, which
  the mean loss does not see.
  """
  train_iter = data.make_preference_iterator(section, "train")
  if train_iter.num_batches is not None and train_iter.num_batches < total_steps:
    raise ValueError(
        f"input.num_epochs={section.num_epochs} gives {train_iter.num_batches}"
        f" batches of input.batch_size={section.batch_size}, fewer than"
        f" total_steps={total_steps}; raise it or set it to None (repeat)"
    )
  return train_iter


def _whole_eval_split(section: ml_collections.ConfigDict) -> np.ndarray:
  """[N, 2] (winner, loser): every pair of the "test" split, else of "train"."""
  builder = data_sources.prepare(data.parse_input_config(section))
  split = "test" if "test" in builder.info.splits else "train"
  logging.info("Evaluating on the whole %r split of %s.", split, builder.info.full_name)
  whole = section.copy_and_resolve_references()
  whole.batch_size = builder.info.splits[split].num_examples
  # Every process reads the whole split, in its stored order, as one batch.
  (batch,) = data.make_preference_iterator(
      whole, split, process_index=0, process_count=1, shuffle=False, num_epochs=1
  )
  return np.stack([batch["chosen"], batch["rejected"]], axis=1)


def _load_reference(source_workdir: str, abstract_params: Any) -> Any:
  """The newest policy parameters of another run, to serve as the reference."""
  source = checkpointing.Checkpointer(source_workdir, max_to_keep=1, read_only=True)
  try:
    params = source.restore_params(abstract_params)
  finally:
    source.close()
  if params is None:
    raise ValueError(f"reference_checkpoint={source_workdir!r} holds no readable checkpoint")
  logging.info("Reference policy: the newest checkpoint of %s.", source_workdir)
  return params


def _restore_or_initialise(
    config: ml_collections.ConfigDict,
    workdir: str,
    ckpt: checkpointing.Checkpointer,
    train_iter: Any,
    *,
    init_state: Callable[[], TrainState],
    abstract_state: TrainState,
) -> TrainState:
  """The newest readable checkpoint's state (and data position), or a new run's.

  A new run stores its reference once and its config as config.json.
  """
  restored = ckpt.restore(abstract_state)
  if restored is not None:
    state, data_state = restored
    if abstract_state.ref_params is not None:
      state = state.replace(ref_params=ckpt.restore_reference(abstract_state.ref_params))
    train_iter.set_state(data_state)
    logging.info("Resumed from step %d in %s.", int(state.step), workdir)
    return state

  state = init_state()
  if config.get("reference_checkpoint"):
    state = state.replace(
        ref_params=_load_reference(config.reference_checkpoint, abstract_state.ref_params)
    )
  if state.ref_params is not None:
    ckpt.save_reference(state.ref_params)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  logging.info("Initialised a new run in %s.", workdir)
  return state


def _first_nonfinite(metrics: Mapping[str, Any]) -> str | None:
  for name in _CHECKED_METRICS:
    if not np.isfinite(metrics[name]):
      return name
  return None


def _format(metrics: Mapping[str, Any], keys: tuple[str, ...]) -> str:
  return ", ".join(f"{k}={float(metrics[k]):.4g}" for k in keys if k in metrics)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains the policy of `config`, checkpointing into (and resuming from) `workdir`.

  Returns:
    The final train state (on the devices).
  Raises:
    ValueError: a bad config, before anything is trained.
    FloatingPointError: a non-finite loss, gradient norm or parameter norm at
      some step, unless `skip_nonfinite` is set.
  """
  # Orbax needs an absolute path; a relative one would fail at the first save.
  workdir = os.path.abspath(os.fspath(workdir))
  loss_config = validate_config(config, workdir)
  total_steps = config.total_steps
  optimizer, schedule = optimizers.make_optimizer(config.optimizer, total_steps)

  # Threefry whatever jax_default_prng_impl says: the bandit data order
  # (bandit.minibatch_indices) hashes a Threefry key directly.
  init_key, state_key, data_key = map(
      jax.random.key_data,
      jax.random.split(jax.random.key(config.seed, impl="threefry2x32"), 3),
  )
  mesh = sharding.make_mesh()
  train_iter, eval_batch = build_input(config, mesh, data_key, workdir=workdir)

  def init_state() -> TrainState:
    model = models.build_model(config.model, rngs=nnx.Rngs(init_key))
    ref = None if loss_config.reference_free else SAME_AS_POLICY
    return TrainState.create(model, optimizer, rng=state_key, ref_params=ref)[1]

  abstract_model = nnx.eval_shape(
      lambda: models.build_model(config.model, rngs=nnx.Rngs(init_key))
  )
  model_def = nnx.split(abstract_model)[0]
  abstract_state = jax.eval_shape(init_state)
  state_sharding = sharding.state_shardings(
      mesh, abstract_state, fsdp=config.get("fsdp", False)
  )
  abstract_state = checkpointing.abstract_with_shardings(abstract_state, state_sharding)

  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  state = _restore_or_initialise(
      config, workdir, ckpt, train_iter,
      init_state=jax.jit(init_state, out_shardings=state_sharding),
      abstract_state=abstract_state,
  )

  train_step = sharding.jit_train_step(
      make_train_step(
          model_def, loss_config, optimizer,
          micro_batches=config.get("micro_batches", 1),
          learning_rate_fn=schedule,
      ),
      mesh, state_sharding,
  )
  eval_step = sharding.jit_eval_step(
      make_eval_step(model_def, loss_config), mesh, state_sharding
  )
  global_eval_batch = sharding.global_batch(mesh, eval_batch)

  writer = metric_writers.MetricWriter(workdir)
  start_step = int(state.step)
  interactive = sys.stderr.isatty() and jax.process_index() == 0
  progress = tqdm.tqdm(total=total_steps, initial=start_step, disable=not interactive)
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
          if not config.get("skip_nonfinite", False):
            raise FloatingPointError(
                f"step {step}: {bad} is {metrics[bad]} (non-finite); stopping"
                " without checkpointing this step. Set skip_nonfinite=True to"
                " skip such updates instead."
            )
          logging.warning(
              "step %d: %s is %s; update skipped (%d skipped so far).",
              step, bad, metrics[bad], int(metrics["skipped_updates"]),
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
                "step %d/%d: %s", step, total_steps,
                _format(metrics, ("loss", "rewards/accuracies", "grad_norm", "steps_per_sec")),
            )
        if step % config.eval_every == 0 or step == total_steps:
          eval_metrics = jax.device_get(eval_step(state, global_eval_batch))
          writer.write(step, eval_metrics, split="eval")
          logging.info("eval at step %d: %s", step, _format(eval_metrics, ("loss", "rewards/accuracies")))

        preempted = preemption.reached(step)
        if step % config.ckpt_every == 0 or step == total_steps or preempted:
          ckpt.save(step, state, train_iter.get_state())
        if preempted:
          logging.warning("Preempted: saved a checkpoint at step %d; exiting.", step)
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
