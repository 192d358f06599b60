r"""A sweep of language-model runs as ONE vmapped, jitted program.

    python -m psipo_jax.lm_grid --config=experiments/lm_oracle.py:root=ROOT \
        --root=ROOT/sweep [--dry-run] [-- --config.total_steps=50 ...]

The same points as `launch/sweep.py --config=... --root=...` (the config
file's `get_sweep(arg)`, every point parsed by `sweeps.check_point` exactly
as the trainer's `--config` flag parses it), in the same workdirs
`ROOT/<sweep>/<run_name>`, each holding what a run of `python -m
psipo_jax.main` writes: config.json, metrics.jsonl (train and eval records
at the same steps), checkpoints/ and reference/ (Orbax, the trainer's
`checkpointing.Checkpointer`), and the FINISHED marker; plus the sweep's
sweep.json manifest. So `python -m psipo_jax.oracle_experiment
--stage=evaluate --policies='ROOT/sweep/lm_oracle*/*'`, `trained_policy`,
`launch/collect.py` and a resumed `python -m psipo_jax.main` read grid runs
unchanged. Points already FINISHED are skipped, as the launcher skips them;
an interrupted grid resumes from its points' newest checkpoint (the same
step in every point, their configs checked as a resumed run's are) and
then equals the uninterrupted grid.

How (the design of `psipo_jax.bandit.runner`, for the training system's own
step): the points' policy parameters, optimiser states and step keys are
stacked on a leading axis; the frozen reference, when every point shares it
(the initial policy read from `init_checkpoint` or `model.init_from_hf`, or
a `reference_checkpoint`), is held ONCE and broadcast (`vmap` in_axes=None).
The update is `train_step.make_train_step`, the trainer's own, under
`jax.vmap`; one jitted program advances every point by one step. A shared
reference scores each input stream's batch once for all the points that
train on it (not once per point: at 30 points on 3 seeds that removes 27 of
30 reference forward passes); the points' steps take those summed
log-probs as the trainer's precomputed-reference path does.

The loss differs across points, and a loss name is code, not a number:
points are grouped by loss name (and by their non-numeric options), each
group is one `vmap` over its points with τ and the numeric loss options as
traced per-point arrays, and all groups run in the same jitted program (one
compile). A `lax.switch` on a loss index would instead evaluate every loss
for every point (vmap turns a batched switch into a select), needs every
point to carry every loss's options, and would hide the loss name from the
step's static decisions (reference-free, batch-coupled, per-pair fields);
grouping keeps each point's step exactly the trainer's step for its loss.

What may vary between points: `seed` (and `input.seed`, which follows it:
the data order of each point is the one its own run draws, from its own
input pipeline; points with the same input and seed share one pipeline),
`loss.name`, `loss.tau` and numeric `loss.<option>`s. Anything else (model
sizes, batch size, max_length, total_steps, the optimiser, ...) changes the
program or its shapes: such a sweep is refused, naming the key; run it with
launch/sweep.py.

A point whose loss, gradient norm, parameter norm or optimiser state goes
non-finite stops there as its own run would (no checkpoint of that step, no
FINISHED marker) — unless `skip_nonfinite` is set, when the update is skipped
and logged — while the other points train on; at the end the command fails
naming every such point, its step and the metric. One process, one host:
multi-device meshes and multi-host runs are for launch/sweep.py.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from psipo_jax import checkpointing
from psipo_jax import data_order
from psipo_jax import inputs
from psipo_jax import metric_writers
from psipo_jax import models
from psipo_jax import optimizers
from psipo_jax import run_config
from psipo_jax import storage
from psipo_jax import sweeps
from psipo_jax import train
from psipo_jax import train_step
from psipo_jax.loss_config import LOSS_KEYS, LossConfig
from psipo_jax.train_state import TrainState

# Keys that may differ between the points of one grid (numeric loss options
# are allowed on top of these, `_varying_keys`).
VARYING_KEYS = ("seed", "input.seed", "loss.name", "loss.tau")
_ABSENT = "<absent>"  # run_config.differences' value of a missing key


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the grid: its sweep name, workdir and full config."""

  name: str
  workdir: str
  config: ml_collections.ConfigDict
  loss: LossConfig


@dataclasses.dataclass(frozen=True)
class Group:
  """The points of one loss (name and non-numeric options): one vmap.

  Attributes:
    loss: the first point's loss config (its τ and numeric options are
      replaced by each point's, traced).
    indices: the points' indices into the grid's point list.
    streams: [P_g] index of each point's input stream.
    hyper: {"tau": [P_g], "options": {name: [P_g]}}, float32.
  """

  loss: LossConfig
  indices: tuple[int, ...]
  streams: np.ndarray
  hyper: dict[str, Any]


# ----------------------------------------------------------------- checks


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_uniform(points: Sequence[Point]) -> None:
  """Refuses points that differ in anything but seed, loss name, τ and
  numeric loss options (everything else changes the program or its
  shapes).

  Raises:
    ValueError: naming the first differing key, both values and points.
  """
  first = points[0]
  base = run_config.to_plain(first.config)
  for point in points[1:]:
    for key, old, new in run_config.differences(
      base, run_config.to_plain(point.config)
    ):
      if key in VARYING_KEYS:
        continue
      if (
        key.startswith("loss.")
        and key[len("loss.") :] not in LOSS_KEYS
        and all(_is_number(v) or v is None or v == _ABSENT for v in (old, new))
      ):
        continue  # A numeric loss option: traced per point.
      raise ValueError(
        f"{key} is {old!r} in grid point {first.name!r} but {new!r} in"
        f" {point.name!r}: a vmapped grid varies only"
        f" {', '.join(VARYING_KEYS)} and numeric loss options; {key} changes"
        " the program or its shapes. Run this sweep with launch/sweep.py"
        " (one process per point)."
      )
  config = first.config
  if (config.get("objective") or "psipo") != "psipo":
    raise ValueError(
      f"objective={config.objective!r}: the vmapped grid trains pairwise"
      " ΨPO losses (objective='psipo'); use launch/sweep.py"
    )
  if (config.get("online") or {}).get("enabled"):
    raise ValueError(
      "online.enabled: online IPO samples each point's pairs from its own"
      " policy as it trains, which the vmapped grid does not; use"
      " launch/sweep.py"
    )
  if jax.process_count() > 1:
    raise ValueError(
      f"{jax.process_count()} processes: the vmapped grid runs in one"
      " process; use launch/sweep.py for multi-host runs"
    )
  if config.get("fsdp") or any(
    (config.get("mesh") or {}).get(axis) not in (None, 1, -1)
    for axis in ("fsdp", "tensor")
  ):
    raise ValueError(
      "fsdp / mesh.fsdp / mesh.tensor: the vmapped grid runs on one device,"
      " unsharded; use launch/sweep.py for sharded runs"
    )


# ------------------------------------------------------------- the program


def _point_loss(loss: LossConfig, hyper: Mapping[str, Any]) -> LossConfig:
  """`loss` with one point's (traced) τ and numeric options.

  The values were validated on the host by each point's own `LossConfig`;
  a tracer would not pass `LossConfig.__post_init__`'s number checks, so
  they are set on a copy directly.
  """
  point = copy.copy(loss)
  object.__setattr__(point, "tau", hyper["tau"])
  object.__setattr__(point, "options", {**loss.options, **hyper["options"]})
  return point


def _shared_reference(refs, ref_axes):
  """The reference every point shares (one tree, broadcast), or None."""
  return next(
    (r for r, axis in zip(refs, ref_axes) if r is not None and axis is None),
    None,
  )


def _with_reference_logps(model_def, ref_params, batches, *, in_axes):
  """`batches` with the shared reference's summed log-probs of its pairs
  (`ref_chosen_logps`, `ref_rejected_logps`): each batch is scored once for
  all the points that train on it, instead of once per point (the points'
  steps then take the precomputed-reference path of the trainer's step,
  which computes the same loss). `in_axes=0`: leaves [S, B, ...], one
  batch per stream; None: one batch."""
  score = lambda b: train_step.reference_logps(model_def, ref_params, b)
  if in_axes is not None:
    score = jax.vmap(score, in_axes=in_axes)
  chosen, rejected = score(batches)
  return {**batches, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


def _group_reference(shared, ref, ref_axis, batch, scored):
  """(the reference a group's points take, their batch): a group on the
  shared reference takes the batch it scored (`scored`) and no reference."""
  if shared is not None and ref is not None and ref_axis is None:
    return None, scored
  return ref, batch


def make_grid_step(model_def, groups, ref_axes, optimizer, schedule, config):
  """`(states, refs, stream_batches) -> (states, metrics)` over every group.

  Args (of the returned function):
    states: per group, a TrainState stacked over its P_g points, with
      ref_params=None.
    refs: per group, the reference: one shared tree (ref_axes[g] None), a
      tree stacked over the points (0), or None (no reference).
    stream_batches: the batch of every input stream, [S, B, ...] leaves.
  Returns:
    (new states, per group the step's metrics as [P_g] arrays).
  """
  micro_batches = config.get("micro_batches", 1)

  def point_step(loss, state, ref_params, batch, hyper):
    point_loss = _point_loss(loss, hyper)
    step = train_step.make_train_step(
      model_def,
      point_loss,
      optimizer,
      micro_batches=micro_batches,
      learning_rate_fn=schedule,
    )
    new_state, metrics = step(state.replace(ref_params=ref_params), batch)
    return new_state.replace(ref_params=None), metrics

  def grid_step(states, refs, stream_batches, hypers):
    new_states, metrics = [], []
    shared = _shared_reference(refs, ref_axes)
    scored = (
      None
      if shared is None
      else _with_reference_logps(model_def, shared, stream_batches, in_axes=0)
    )
    for group, state, ref, ref_axis, hyper in zip(
      groups, states, refs, ref_axes, hypers
    ):
      ref, batches = _group_reference(
        shared, ref, ref_axis, stream_batches, scored
      )
      batch = jax.tree.map(lambda x: x[group.streams], batches)
      new_state, group_metrics = jax.vmap(
        lambda s, r, b, h, loss=group.loss: point_step(loss, s, r, b, h),
        in_axes=(0, ref_axis, 0, 0),
      )(state, ref, batch, hyper)
      new_states.append(new_state)
      metrics.append(group_metrics)
    return tuple(new_states), tuple(metrics)

  return grid_step


def make_grid_eval(model_def, groups, ref_axes):
  """`(states, refs, batch) -> per group the eval metrics as [P_g] arrays`
  (`train_step.make_eval_step` of every point on the same batch)."""

  def point_eval(loss, state, ref_params, batch, hyper):
    return train_step.make_eval_step(model_def, _point_loss(loss, hyper))(
      state.replace(ref_params=ref_params), batch
    )

  def grid_eval(states, refs, batch, hypers):
    shared = _shared_reference(refs, ref_axes)
    scored = (
      None
      if shared is None
      else _with_reference_logps(model_def, shared, batch, in_axes=None)
    )
    results = []
    for group, state, ref, ref_axis, hyper in zip(
      groups, states, refs, ref_axes, hypers
    ):
      ref, group_batch = _group_reference(shared, ref, ref_axis, batch, scored)
      results.append(
        jax.vmap(
          lambda s, r, h, b=group_batch, loss=group.loss: point_eval(
            loss, s, r, b, h
          ),
          in_axes=(0, ref_axis, 0),
        )(state, ref, hyper)
      )
    return tuple(results)

  return grid_eval


# ------------------------------------------------------------ planning


def load_points(
  spec: str, root: str, extra_flags: Sequence[str] = ()
) -> tuple[str, list[sweeps.Point], list[Point]]:
  """(sweep dir, the sweep's points, every point as a grid Point)."""
  sweep_dir = os.path.join(os.path.abspath(root), sweeps.sweep_name(spec))
  swept = sweeps.load_sweep(spec)
  points = []
  for p in swept:
    config = sweeps.check_point(spec, p, extra_flags)
    workdir = os.path.join(sweep_dir, p.name)
    loss = train.validate_config(config, workdir)
    points.append(Point(p.name, workdir, config, loss))
  check_uniform(points)
  return sweep_dir, swept, points


def _group_key(loss: LossConfig) -> tuple:
  static = tuple(
    sorted((k, repr(v)) for k, v in loss.options.items() if not _is_number(v))
  )
  numeric = tuple(sorted(k for k, v in loss.options.items() if _is_number(v)))
  return (loss.name, static, numeric)


def make_groups(points: Sequence[Point], streams: Sequence[int]) -> list[Group]:
  """Points grouped by loss (name, non-numeric options), in sweep order."""
  keys: dict[tuple, list[int]] = {}
  for i, point in enumerate(points):
    keys.setdefault(_group_key(point.loss), []).append(i)
  groups = []
  for (_, _, numeric), indices in keys.items():
    hyper = {
      "tau": np.array([points[i].loss.tau for i in indices], np.float32),
      "options": {
        k: np.array([points[i].loss.options[k] for i in indices], np.float32)
        for k in numeric
      },
    }
    groups.append(
      Group(
        loss=points[indices[0]].loss,
        indices=tuple(indices),
        streams=np.array([streams[i] for i in indices], np.int32),
        hyper=hyper,
      )
    )
  return groups


def _stream_key(config: ml_collections.ConfigDict) -> str:
  """Points with the same input block and seed see the same batches."""
  return json.dumps(
    [run_config.to_plain(config.input), config.seed], sort_keys=True
  )


def _stack(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: Any, i: int) -> Any:
  return jax.tree.map(lambda x: x[i], tree)


@jax.jit
def _unstack_all(tree: Any) -> list[Any]:
  """Every point's tree of a stacked one, in one program (slicing each leaf
  point by point would dispatch points × leaves operations)."""
  return [_unstack(tree, i) for i in range(jax.tree.leaves(tree)[0].shape[0])]


# ------------------------------------------------------------ training


class NonFiniteError(FloatingPointError):
  """Some grid points stopped on a non-finite value; names each."""


def _initial_states(points, optimizer, abstract_model):
  """(per point TrainState without its reference, the reference, its kind).

  The reference is one tree shared by every point (kind "shared": the
  initial policy of `init_checkpoint` / `model.init_from_hf`, or a
  `reference_checkpoint`), a list of per-point trees (kind "own": each
  point's random initial policy), or None (precomputed log-probs).
  """
  config = points[0].config
  device = jax.devices()[0]
  single = jax.sharding.SingleDeviceSharding(device)
  abstract_params = nnx.to_pure_dict(
    nnx.split(abstract_model, nnx.Param, ...)[1]
  )
  abstract_params = checkpointing.abstract_with_shardings(
    abstract_params, jax.tree.map(lambda _: single, abstract_params)
  )
  shared_init = None
  if config.get("init_checkpoint"):
    shared_init = train.load_params(
      "init_checkpoint", config.init_checkpoint, abstract_params
    )
  elif config.model.get("init_from_hf"):
    from psipo_jax.models import hf_checkpoint

    shared_init = hf_checkpoint.load_params(
      config.model.init_from_hf,
      hf_checkpoint.model_config(config.model),
      jax.tree.map(lambda x: x.sharding, abstract_params),
    )
  if shared_init is not None:
    # Every point starts from the same policy: one optimiser state, copied.
    opt_state = jax.jit(optimizer.init)(shared_init)
    states = [
      TrainState(
        step=jnp.zeros((), jnp.int32),
        params=shared_init,
        ref_params=None,
        opt_state=opt_state,
        rng=jnp.asarray(data_order.run_keys(p.config.seed)[1], jnp.uint32),
        skipped_updates=jnp.zeros((), jnp.int32),
      )
      for p in points
    ]
  else:
    # A random initial policy per seed, as its own run draws it; one
    # compile for every point (the keys are arguments).
    @jax.jit
    def init(init_key, state_key):
      model = models.build_model(config.model, rngs=nnx.Rngs(init_key))
      return TrainState.create(
        model, optimizer, rng=state_key, ref_params=None
      )[1]

    states = [init(*data_order.run_keys(p.config.seed)[:2]) for p in points]
  own_refs = [state.params for state in states]
  precomputed = bool(config.input.get("ref_logps_file"))
  if precomputed:
    return states, None, None
  if config.get("reference_checkpoint"):
    ref = train.load_params(
      "reference_checkpoint", config.reference_checkpoint, abstract_params
    )
    return states, ref, "shared"
  if shared_init is not None:
    return states, shared_init, "shared"
  # A random initial policy: each point's reference is its own init.
  return states, own_refs, "own"


def _newest_common_step(points: Sequence[Point]) -> int:
  """The step of every point's newest checkpoint (0: none has one).

  Raises:
    ValueError: the points' newest checkpoints are at different steps (a
      grid stopped while saving them), naming the points and steps.
  """
  newest = {}
  for point in points:
    path = storage.as_path(point.workdir) / "checkpoints"
    steps = (
      checkpointing.Checkpointer(
        point.workdir, max_to_keep=1, read_only=True
      ).all_steps()
      if path.is_dir()
      else []
    )
    newest[point.name] = steps[-1] if steps else 0
  if len(set(newest.values())) > 1:
    raise ValueError(
      "the grid's points hold their newest checkpoints at different steps"
      f" ({newest}): a grid resumes only when every point stopped at the same"
      " step. Resume the points one by one with launch/sweep.py (or python"
      " -m psipo_jax.main), or remove the newer steps' checkpoints/<step>"
      " directories to resume the grid from the older one"
    )
  return next(iter(newest.values()))


def _abstract(tree: Any) -> Any:
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
  )


def _resume(points, ckpts, fresh_states, ref, ref_kind):
  """(step, each point's restored state and data position, the restored
  reference) of an interrupted grid, as `python -m psipo_jax.main` resumes
  each run: the newest readable checkpoint, its config checked against
  config.json (a change of the computation is refused,
  run_config.check_resume), and the reference the run saved.

  Raises:
    ValueError: the points restored different steps (a newest checkpoint
      unreadable in some of them only).
  """
  states, data_states = [], []
  for point, ckpt, fresh in zip(points, ckpts, fresh_states):
    state, data_state = ckpt.restore(_abstract(fresh))
    run_config.check_resume(point.workdir, point.config, step=int(state.step))
    states.append(state)
    data_states.append(data_state)
  steps = {p.name: int(s.step) for p, s in zip(points, states)}
  if len(set(steps.values())) > 1:
    raise ValueError(
      f"the grid's points restored different steps ({steps}): resume them"
      " one by one with launch/sweep.py"
    )
  abstract_params = _abstract(fresh_states[0].params)
  if ref_kind == "shared":
    ref = ckpts[0].restore_reference(abstract_params)
  elif ref_kind == "own":
    ref = [ckpt.restore_reference(abstract_params) for ckpt in ckpts]
  step = next(iter(steps.values()))
  logging.info("Resumed %d grid points from step %d.", len(points), step)
  return step, states, data_states, ref


def train_grid(points: Sequence[Point]) -> dict[str, str]:
  """Trains every point as one vmapped program; writes each run's workdir.

  Returns:
    {point name: "finished"} for every point.
  Raises:
    NonFiniteError: after the other points finished, naming each point that
      stopped on a non-finite loss, gradient, parameter norm or optimiser
      state (its workdir is left unfinished, as its own run would leave it).
    ValueError: a response without loss-mask tokens (an input error, as in
      the trainer).
  """
  first = points[0].config
  total_steps = first.total_steps
  for point in points:
    storage.as_path(point.workdir).mkdir(parents=True, exist_ok=True)
  resuming = _newest_common_step(points) > 0
  optimizer, schedule = optimizers.make_optimizer(first.optimizer, total_steps)
  init_key, _, _ = data_order.run_keys(first.seed)
  abstract_model = nnx.eval_shape(
    lambda: models.build_model(first.model, rngs=nnx.Rngs(init_key))
  )
  model_def = nnx.split(abstract_model)[0]
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))

  # One input pipeline per distinct (input block, seed).
  stream_of: dict[str, int] = {}
  stream_points: list[int] = []
  point_stream = []
  for i, point in enumerate(points):
    key = _stream_key(point.config)
    if key not in stream_of:
      stream_of[key] = len(stream_points)
      stream_points.append(i)
    point_stream.append(stream_of[key])
  streams, eval_batches = [], None
  for i in stream_points:
    point = points[i]
    data_key = data_order.run_keys(point.config.seed)[2]
    train_iter, batches = inputs.build(
      point.config, mesh, data_key, point.workdir
    )
    streams.append(train_iter)
    eval_batches = batches if eval_batches is None else eval_batches
  groups = make_groups(points, point_stream)

  point_states, ref, ref_kind = _initial_states(
    points, optimizer, abstract_model
  )
  ckpts = [
    checkpointing.Checkpointer(
      point.workdir, max_to_keep=point.config.keep_checkpoints
    )
    for point in points
  ]
  start = 0
  if resuming:
    start, point_states, data_states, ref = _resume(
      points, ckpts, point_states, ref, ref_kind
    )
    for stream, i in zip(streams, stream_points):
      stream.set_state(data_states[i])  # its points saved the same position
  states = tuple(_stack([point_states[i] for i in g.indices]) for g in groups)
  refs, ref_axes = [], []
  for g in groups:
    if ref_kind is None or g.loss.reference_free:
      refs.append(None)
      ref_axes.append(None)
    elif ref_kind == "shared":
      refs.append(ref)
      ref_axes.append(None)
    else:
      refs.append(_stack([ref[i] for i in g.indices]))
      ref_axes.append(0)
  refs = tuple(refs)
  hypers = tuple(jax.tree.map(jnp.asarray, g.hyper) for g in groups)

  grid_step = jax.jit(
    make_grid_step(model_def, groups, ref_axes, optimizer, schedule, first),
    donate_argnums=0,
  )
  grid_eval = jax.jit(make_grid_eval(model_def, groups, ref_axes))
  finalize = lambda m: m  # The pairwise objective derives nothing.

  writers = [metric_writers.MetricWriter(p.workdir) for p in points]
  # A resumed grid keeps the interrupted runs' config.json and reference.
  for i, (point, ckpt) in enumerate(zip(points, ckpts) if not resuming else ()):
    run_config.write_new(point.workdir, point.config)
    g = next(g for g in groups if i in g.indices)
    point_ref = refs[groups.index(g)]
    if point_ref is not None:
      if ref_axes[groups.index(g)] == 0:
        point_ref = _unstack(point_ref, g.indices.index(i))
      ckpt.save_reference(point_ref)
  # Where point i sits: (group, position in the group).
  where = {
    i: (gi, g.indices.index(i))
    for gi, g in enumerate(groups)
    for i in g.indices
  }
  failed: dict[int, str] = {}
  skip_nonfinite = bool(first.get("skip_nonfinite", False))

  log_time, log_step = time.perf_counter(), start
  try:
    for step in range(start + 1, total_steps + 1):
      host = [next(s) for s in streams]
      stream_batches = {
        k: np.stack([b[k] for b in host]) for k in host[0]
      }  # [S, B, ...]
      states, group_metrics = grid_step(states, refs, stream_batches, hypers)
      group_metrics = jax.device_get(group_metrics)
      per_point = {}
      for i in where:
        gi, j = where[i]
        per_point[i] = {k: v[j] for k, v in group_metrics[gi].items()}
      for i, metrics in per_point.items():
        if i in failed:
          continue
        if metrics["empty_responses"]:
          raise ValueError(
            f"grid point {points[i].name!r}, step {step}:"
            f" {int(metrics['empty_responses'])} responses in the batch have"
            " no loss-mask tokens; every chosen and rejected response needs"
            " at least one"
          )
        bad = train._first_nonfinite(metrics)
        if bad is not None:
          value = metrics.get(bad, "not finite")
          if not skip_nonfinite:
            failed[i] = f"step {step}: {bad} is {value} (non-finite)"
            logging.error(
              "grid point %s stopped: %s", points[i].name, failed[i]
            )
          else:
            logging.warning(
              "grid point %s, step %d: %s is %s; update skipped.",
              points[i].name,
              step,
              bad,
              value,
            )
      log = step % first.log_every == 0 or step == total_steps
      if log:
        now = time.perf_counter()
        steps_per_sec = (step - log_step) / (now - log_time)
        log_time, log_step = now, step
        for i, metrics in per_point.items():
          if i not in failed:
            writers[i].write(
              step, {**metrics, "steps_per_sec": steps_per_sec}, split="train"
            )
        logging.info(
          "step %d/%d: %d points, %.3g grid steps/s",
          step,
          total_steps,
          len(points) - len(failed),
          steps_per_sec,
        )
      if step % first.eval_every == 0 or step == total_steps:
        results = [
          jax.device_get(grid_eval(states, refs, b, hypers))
          for b in eval_batches
        ]
        for i in where:
          if i in failed:
            continue
          gi, j = where[i]
          eval_metrics = train.evaluate(
            lambda _, b, gi=gi, j=j: {
              k: v[j] for k, v in results[b][gi].items()
            },
            None,
            range(len(results)),
            finalize,
          )
          writers[i].write(step, eval_metrics, split="eval")
      if step % first.ckpt_every == 0 or step == total_steps:
        group_points = [_unstack_all(s) for s in states]
        for i, (gi, j) in where.items():
          if i not in failed:
            ckpts[i].save(
              step, group_points[gi][j], streams[point_stream[i]].get_state()
            )
  finally:
    for ckpt in ckpts:
      ckpt.wait_until_finished()
      ckpt.close()
    for writer in writers:
      writer.close()
  for i, point in enumerate(points):
    if i not in failed:
      sweeps.mark_finished(point.workdir, total_steps)
  if failed:
    raise NonFiniteError(
      f"{len(failed)} of {len(points)} grid points stopped on a non-finite"
      " value (their workdirs are unfinished; set skip_nonfinite=True to"
      " skip such updates instead): "
      + "; ".join(f"{points[i].name}: {why}" for i, why in failed.items())
    )
  return {p.name: "finished" for p in points}


# ------------------------------------------------------------ command line


def run(
  spec: str, root: str, extra_flags: Sequence[str] = (), *, dry_run=False
) -> list[str]:
  """Plans the sweep of `spec` under `root` and trains its unfinished
  points as one grid; returns the names of the points trained (or, with
  `dry_run`, that would be)."""
  sweep_dir, swept, points = load_points(spec, root, extra_flags)
  todo = [
    p for p in points if not sweeps.is_finished(p.workdir, p.config.total_steps)
  ]
  logging.info(
    "sweep %s: %d points, %d finished (skipped), %d to train as one"
    " vmapped program.",
    sweep_dir,
    len(points),
    len(points) - len(todo),
    len(todo),
  )
  if dry_run or not todo:
    return [p.name for p in todo]
  sweeps.write_manifest(
    sweep_dir,
    spec=spec,
    module="psipo_jax.lm_grid",
    where="vmapped",
    extra=extra_flags,
    points=swept,
  )
  train_grid(todo)
  return [p.name for p in todo]


def main(argv: Sequence[str]) -> int:
  argv, extra = sweeps.split_extra_flags(argv)
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--config", required=True, help="file.py[:arg]")
  parser.add_argument(
    "--root", required=True, help="runs go to ROOT/<sweep>/<run_name>"
  )
  parser.add_argument(
    "--dry-run", action="store_true", help="list the points to train only"
  )
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  from psipo_jax import cli

  try:
    with cli.user_errors():
      names = run(args.config, args.root, extra, dry_run=args.dry_run)
  except NonFiniteError as e:  # Not the user's mistake: exit 1, not 2.
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
  for name in names:
    print(name)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
