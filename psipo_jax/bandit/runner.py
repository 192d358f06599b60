"""The vmapped finite-action ("bandit") runner: a whole sweep as one program.

The paper's illustrative examples (Azar et al., arXiv:2310.12036, §5.3–5.4)
train a tabular policy π_θ = softmax(θ), θ ∈ ℝ^K, on a finite dataset of
observed (winner, loser) action pairs, with Adam on mini-batches drawn
uniformly with replacement. This module runs any number of such runs —
every combination of loss × dataset × τ × seed — as ONE jit-compiled program:
``jax.vmap`` over runs, ``jax.lax.scan`` over steps, the action probabilities
recorded every ``record_every`` steps. Changing τ, seeds or the datasets'
contents (not their sizes) reuses the compiled program.

What one run does (the contract the training system reproduces for the
same seed, `tests/train_test.py`):

* **Initialisation.** θ₀ = log π_ref, so π_θ₀ = π_ref.
* **Data order.** The mini-batch of step ``s`` (0-based) is
  ``dataset[minibatch_indices(data_key(seed), s, batch_size=B,
  dataset_size=N)]`` (:mod:`psipo_jax.data_order`). Nothing else is random.
* **Objective.** With ``logp = log_softmax(θ)`` and the batch's chosen and
  rejected actions ``w, l`` (each ``[B]``), the sampled objective is
  ``mean(loss_fn(logp[w], logp[l], log π_ref[w], log π_ref[l], tau=τ,
  **options))`` for a loss registered in :mod:`psipo_jax.losses`. A
  *population* loss (:data:`POPULATION_LOSSES`) instead evaluates the exact
  expectation of :mod:`psipo_jax.psi` on the dataset's preference matrix, with
  no sampling at all. Two losses read more than the pair:
  ``rebel`` (``losses.BATCH_FIELDS``: the pair's reward difference
  ``margin``) gets logit p*(w ≻ l) from the dataset's preference matrix,
  which for a Bradley–Terry matrix σ(r_i − r_j) is exactly r_w − r_l; and
  ``kto`` (:data:`UNPAIRED_LOSSES`, :mod:`psipo_jax.kto`) labels each pair's
  winner desirable and loser undesirable (TRL's unpairing of preference
  data), so a mini-batch of B pairs is 2B labelled actions; with one context
  the mismatched pairs of z₀ are the batch's own 2B actions (shifted by one,
  which leaves their mean unchanged).
* **Update.** :func:`psipo_jax.update.apply_update`, the training system's
  update core: the optax update of the ``optimizer.*`` block
  (:mod:`psipo_jax.optimizers`), dropped — and counted in
  ``SweepResult.nonfinite_steps`` — when the loss, the gradient norm, the new
  θ or the new optimiser state is not finite.
* Probabilities are recorded at steps 0, E, 2E, …, T (``E = record_every``),
  each after the update of the step before.

Every protocol number (steps, batch size, optimiser, τ grid) is an argument:
the paper's live in ``experiments/common.py``. Runs with different numbers
of actions K cannot share a vmap; runs are grouped by (loss, K), each group
vmapped, and all groups advance in the same scan of the same program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from psipo_jax import data_order
from psipo_jax import kto
from psipo_jax import loss_config
from psipo_jax import losses
from psipo_jax import optimizers
from psipo_jax import psi
from psipo_jax import update as update_lib
from psipo_jax.finite_actions import Dataset

Array = jax.Array

# Population losses: exact expectations over y, y' ~ μ on a KNOWN preference
# matrix (no sampling). Signature fn(logits, pref, pi_ref, mu, tau[, psi]).
POPULATION_LOSSES = {
  "ipo_population": psi.ipo_population_loss,  # Eq. 13
  "ipo_sampled_population": psi.ipo_sampled_population_loss,  # Eq. 16
  "dpo_population": psi.dpo_population_loss,  # Eq. 5
  "psi_regression": psi.psi_regression_loss,  # Eq. 11, any Ψ
}
# Losses on unpaired labelled actions, with their options (see the module
# docstring for how the pairs are labelled).
UNPAIRED_LOSSES = {"kto": ("desirable_weight", "undesirable_weight")}


# ---------------------------------------------------------------------------
# Losses as per-run objectives.


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """One loss of a sweep: a registered pairwise loss or a population loss.

  Attributes:
    name: a key of ``psipo_jax.losses.LOSSES`` (trained on sampled pairs) or
      of :data:`POPULATION_LOSSES` (exact expectation, no sampling).
    options: the loss's keyword options, as ``((name, value), ...)``:
      numbers for a pairwise loss (checked by
      ``loss_config.check_loss_options``, as the training system checks
      ``loss.*``); for ``psi_regression`` only ``psi``, a name of
      ``psi.PSI_MAPS`` or a callable Ψ.
    label: name in tables and figures (default ``name``).
  """

  name: str
  options: tuple[tuple[str, Any], ...] = ()
  label: str = ""

  def __post_init__(self):
    if not self.label:
      object.__setattr__(self, "label", self.name)
    if self.name in UNPAIRED_LOSSES:
      allowed = UNPAIRED_LOSSES[self.name]
      bad = [k for k, _ in self.options if k not in allowed]
      if bad:
        raise ValueError(
          f"loss {self.name!r} has no option(s) {bad}; its options are"
          f" {list(allowed)}."
        )
      return
    if not self.is_population:
      if self.name not in losses.LOSSES:
        raise ValueError(
          f"Unknown loss {self.name!r}; valid names: pairwise"
          f" {', '.join(sorted(losses.LOSSES))}; population"
          f" {', '.join(sorted(POPULATION_LOSSES))}; unpaired"
          f" {', '.join(sorted(UNPAIRED_LOSSES))}."
        )
      loss_config.check_loss_options(self.name, self.option_dict)
      return
    allowed = ("psi",) if self.name == "psi_regression" else ()
    bad = [k for k, _ in self.options if k not in allowed]
    if bad:
      raise ValueError(
        f"loss {self.name!r} has no option(s) {bad}; its options are"
        f" {list(allowed)}."
      )
    if "psi" in self.option_dict:
      psi.get_psi(self.option_dict["psi"])  # A bad name fails here.

  @property
  def is_population(self) -> bool:
    return self.name in POPULATION_LOSSES

  @property
  def option_dict(self) -> dict[str, Any]:
    return dict(self.options)


def _sampled_objective(spec: LossSpec):
  """Mean registered loss over a batch of action pairs, as a function of θ."""

  def objective(theta, run, batch):
    chosen, rejected, ref_chosen, ref_rejected = batch[:4]  # each [B]
    fields = {"margin": batch[4]} if len(batch) > 4 else {}
    policy_chosen, policy_rejected = _policy_logps(theta, chosen, rejected)
    per_pair = loss_config.pair_loss(
      spec.name,
      policy_chosen,
      policy_rejected,
      ref_chosen,
      ref_rejected,
      tau=run["tau"],
      options=run["options"],
      fields=fields,
    )  # [B]
    return jnp.mean(per_pair)

  return objective


def _policy_logps(theta, chosen, rejected):
  """(log π(chosen), log π(rejected)), each [B], for π = softmax(θ)."""
  logp = jax.nn.log_softmax(theta)  # [K]
  actions = jnp.arange(theta.shape[-1])
  # A one-hot contraction instead of logp[chosen]: the gather's transpose
  # is a scatter-add, and the whole sweep ran about twice as long with it.
  chosen_hot = (chosen[:, None] == actions).astype(logp.dtype)  # [B, K]
  rejected_hot = (rejected[:, None] == actions).astype(logp.dtype)  # [B, K]
  return jnp.sum(chosen_hot * logp, -1), jnp.sum(rejected_hot * logp, -1)


def _kto_objective(spec: LossSpec):
  """Mean KTO loss over the 2B labelled actions of a batch of B pairs."""
  del spec

  def objective(theta, run, batch):
    chosen, rejected, ref_chosen, ref_rejected = batch[:4]  # each [B]
    policy = jnp.concatenate(_policy_logps(theta, chosen, rejected))  # [2B]
    ref = jnp.concatenate([ref_chosen, ref_rejected])  # [2B]
    desirable = jnp.arange(policy.shape[0]) < chosen.shape[0]  # [2B]
    # Mismatched pairs: action i − 1 of the batch (one context).
    z0 = kto.reference_point(jnp.roll(policy, 1), jnp.roll(ref, 1))
    return jnp.mean(
      kto.kto_loss(policy, ref, desirable, z0, tau=run["tau"], **run["options"])
    )

  return objective


def _population_objective(spec: LossSpec):
  """The exact population loss of :mod:`psipo_jax.psi`, as a function of θ."""
  loss_fn = POPULATION_LOSSES[spec.name]
  static = spec.option_dict  # Only Ψ, a name or a callable: static.

  def objective(theta, run, batch):
    del batch  # No sampling.
    return loss_fn(
      theta,
      run["preference"],
      run["pi_ref"],
      run["mu"],
      run["tau"],
      **static,
    )

  return objective


def _check_population_target(spec: LossSpec, dataset: Dataset, tau: float):
  """Fails on the host if the loss has no finite value on `dataset`.

  Under vmap the inputs are traced, so psi's own concrete checks (e.g. a
  logit Ψ that is infinite on a deterministic preference) cannot run there.
  """
  POPULATION_LOSSES[spec.name](
    np.log(dataset.pi_ref),
    dataset.preference,
    dataset.pi_ref,
    dataset.mu,
    tau,
    **spec.option_dict,
  )


# ---------------------------------------------------------------------------
# The sweep program.


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """An ``optimizer.*`` block (:mod:`psipo_jax.optimizers`), hashable.

  The same keys, checks and schedules as the training system's optimiser:
  ``name``, ``learning_rate``, ``schedule``, ``warmup_steps``,
  ``grad_clip_norm`` and the optax constructor's own options. Hashable, so it
  can be a static argument.
  """

  name: str
  kwargs: tuple[tuple[str, Any], ...]

  @classmethod
  def from_config(cls, block: Any) -> OptimizerSpec:
    """From an ``optimizer`` config block (a mapping with ``name``)."""
    block = dict(block)
    return cls(name=block.pop("name"), kwargs=tuple(sorted(block.items())))

  def build(self, total_steps: int) -> optax.GradientTransformation:
    config = ml_collections.ConfigDict({"name": self.name, **dict(self.kwargs)})
    return optimizers.make_optimizer(config, total_steps)[0]


@dataclasses.dataclass(frozen=True)
class _Group:
  """Runs sharing one loss and one K: vmapped together."""

  loss: LossSpec
  num_actions: int
  num_runs: int


@dataclasses.dataclass(frozen=True)
class _Program:
  """Everything static about a sweep: changing it recompiles."""

  groups: tuple[_Group, ...]
  total_steps: int
  record_every: int
  batch_size: int
  optimizer: OptimizerSpec


def _gather_batches(run, idx):
  """One run's mini-batches from dataset indices ``idx`` ``[C, B]``.

  Returns:
    (chosen, rejected, ref_chosen_logps, ref_rejected_logps[, margin]), each
    ``[C, B]``; margin for a loss that reads it (REBEL).
  """
  chosen, rejected = run["winners"][idx], run["losers"][idx]
  log_ref = run["log_ref"]
  batch = (chosen, rejected, log_ref[chosen], log_ref[rejected])
  if "reward_difference" in run:  # [K, K]
    batch += (run["reward_difference"][chosen, rejected],)
  return batch


@functools.partial(jax.jit, static_argnums=0)
def _run_program(program: _Program, group_inputs: tuple[dict, ...]):
  """Trains every run of every group; returns per-group records.

  Returns:
    A tuple, per group, of ``(probs [R, M+1, K], loss [R, M+1],
    nonfinite_steps [R])`` with M = total_steps / record_every; ``loss`` at
    record 0 is NaN (no step taken yet).
  """
  optimizer = program.optimizer.build(program.total_steps)
  chunk_len = program.record_every
  num_chunks = program.total_steps // chunk_len

  def make_step(group):
    if group.loss.is_population:
      objective = _population_objective(group.loss)
    elif group.loss.name in UNPAIRED_LOSSES:
      objective = _kto_objective(group.loss)
    else:
      objective = _sampled_objective(group.loss)

    def step(theta, opt_state, run, batch):
      loss, grad = jax.value_and_grad(objective)(theta, run, batch)
      # The training system's update core: a non-finite step is counted and
      # its update dropped, so one overflow does not poison the run for good.
      update = update_lib.apply_update(optimizer, grad, theta, opt_state, loss)
      return update.params, update.opt_state, loss, update.finite

    return jax.vmap(step)

  steps = [make_step(g) for g in program.groups]

  sampled = [
    i for i, g in enumerate(program.groups) if not g.loss.is_population
  ]
  # All sampled runs draw their indices in one call: one copy of the
  # Threefry code in the program, one set of kernels per chunk.
  if sampled:
    sampled_keys = jnp.concatenate([group_inputs[i]["key"] for i in sampled])
    sampled_sizes = jnp.concatenate(
      [group_inputs[i]["num_pairs"] for i in sampled]
    )
  offsets = np.cumsum([0] + [program.groups[i].num_runs for i in sampled])
  draw = jax.vmap(
    functools.partial(
      data_order.minibatch_indices, batch_size=program.batch_size
    ),
    in_axes=(0, None),
  )

  def chunk(carry, chunk_index):
    step_ids = chunk_index * chunk_len + jnp.arange(chunk_len)  # [C]
    xs = [None] * len(program.groups)
    if sampled:
      idx = draw(sampled_keys, step_ids, dataset_size=sampled_sizes)
      for i, start, stop in zip(sampled, offsets[:-1], offsets[1:]):
        batches = jax.vmap(_gather_batches)(
          group_inputs[i], idx[start:stop]
        )  # 4 × [R, C, B]
        xs[i] = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), batches)

    def one_step(carry, xs_t):
      new_carry, step_losses = [], []
      for step, run, (theta, opt_state, bad), batch in zip(
        steps, group_inputs, carry, xs_t
      ):
        theta, opt_state, loss, finite = step(theta, opt_state, run, batch)
        new_carry.append((theta, opt_state, bad + (~finite).astype(jnp.int32)))
        step_losses.append(loss)
      return tuple(new_carry), tuple(step_losses)

    carry, step_losses = jax.lax.scan(
      one_step, carry, tuple(xs), length=chunk_len
    )
    records = tuple(
      (jax.nn.softmax(theta), loss[-1])
      for (theta, _, _), loss in zip(carry, step_losses)
    )
    return carry, records

  init = []
  for run in group_inputs:
    theta = run["log_ref"]  # [R, K]
    init.append(
      (
        theta,
        jax.vmap(optimizer.init)(theta),
        jnp.zeros(theta.shape[0], jnp.int32),
      )
    )
  carry, records = jax.lax.scan(chunk, tuple(init), jnp.arange(num_chunks))
  outputs = []
  for (theta0, _, _), (_, _, bad), (probs, loss) in zip(init, carry, records):
    probs = jnp.concatenate(
      [jax.nn.softmax(theta0)[None], probs], axis=0
    )  # [M+1, R, K]
    loss = jnp.concatenate(
      [jnp.full((1, loss.shape[1]), jnp.nan, loss.dtype), loss], axis=0
    )  # [M+1, R]
    outputs.append((jnp.moveaxis(probs, 0, 1), loss.T, bad))
  return tuple(outputs)


@dataclasses.dataclass(frozen=True)
class Run:
  """One row of a sweep's run table."""

  loss: str  # LossSpec.label
  dataset: str
  tau: float
  seed: int


@dataclasses.dataclass
class SweepResult:
  """Recorded curves of a sweep, runs in the order of ``runs``.

  Attributes:
    runs: the run table.
    steps: ``[M+1]`` the recorded steps 0, E, …, T.
    probs: ``[R, M+1, K_max]`` π_θ at each recorded step (NaN-padded beyond a
      run's own K).
    loss: ``[R, M+1]`` the objective at the last step before each record
      (NaN at step 0).
    nonfinite_steps: ``[R]`` steps whose loss or gradient was not finite.
  """

  runs: list[Run]
  steps: np.ndarray
  probs: np.ndarray
  loss: np.ndarray
  nonfinite_steps: np.ndarray

  def select(self, **where) -> np.ndarray:
    """Indices of the runs whose fields equal ``where`` (e.g. loss="ipo")."""
    return np.array(
      [
        i
        for i, run in enumerate(self.runs)
        if all(getattr(run, k) == v for k, v in where.items())
      ],
      dtype=np.int64,
    )


def _group_inputs(runs_of_group, datasets, loss: LossSpec, num_pairs_max):
  """Stacks the per-run arrays of one group (numpy, host side)."""
  num_runs = len(runs_of_group)
  rows = [(datasets[r.dataset], r) for r in runs_of_group]
  inputs = {
    "tau": np.array([r.tau for _, r in rows], np.float32),
    "log_ref": np.stack([np.log(d.pi_ref) for d, _ in rows]).astype(np.float32),
  }
  if loss.is_population:
    # Ψ is static (a name or a callable): it is part of the program.
    for d, r in rows:
      if d.preference is None:
        raise ValueError(
          f"loss {loss.name!r} is a population loss and needs a known"
          f" preference matrix; dataset {d.name!r} has only pairs (add"
          " `preference` to its config)."
        )
      _check_population_target(loss, d, r.tau)
    inputs["preference"] = np.stack([d.preference for d, _ in rows]).astype(
      np.float32
    )
    inputs["pi_ref"] = np.stack([d.pi_ref for d, _ in rows]).astype(np.float32)
    inputs["mu"] = np.stack([d.mu for d, _ in rows]).astype(np.float32)
  else:
    # Numeric options are traced per run, like τ.
    inputs["options"] = {
      name: np.full(num_runs, value, np.float32) for name, value in loss.options
    }
    winners = np.zeros((num_runs, num_pairs_max), np.int32)
    losers = np.zeros((num_runs, num_pairs_max), np.int32)
    for i, (d, _) in enumerate(rows):
      if d.pairs is None:
        raise ValueError(
          f"loss {loss.name!r} trains on sampled pairs; dataset {d.name!r}"
          " has none (give `pairs`, or `num_pairs` to sample them from"
          " `preference`)."
        )
      # Padding beyond num_pairs is never drawn.
      winners[i, : len(d.pairs)] = d.pairs[:, 0]
      losers[i, : len(d.pairs)] = d.pairs[:, 1]
    inputs["winners"], inputs["losers"] = winners, losers
    fields = losses.BATCH_FIELDS.get(loss.name, ())
    if fields:
      inputs["reward_difference"] = np.stack(
        [_reward_difference(loss.name, fields, d) for d, _ in rows]
      ).astype(np.float32)
    inputs["num_pairs"] = np.array([len(d.pairs) for d, _ in rows], np.uint32)
    inputs["key"] = np.asarray(
      jax.random.key_data(
        jax.vmap(data_order.data_key)(np.array([r.seed for _, r in rows]))
      )
    )
  return inputs


def _reward_difference(name: str, fields, dataset: Dataset) -> np.ndarray:
  """[K, K] logit p*(i ≻ j): r_i − r_j for a Bradley–Terry preference."""
  if tuple(fields) != ("margin",):
    raise ValueError(
      f"loss {name!r} reads the batch fields {list(fields)}; the bandit"
      " runner can supply only 'margin' (from the preference matrix)."
    )
  if dataset.preference is None:
    raise ValueError(
      f"loss {name!r} reads each pair's reward difference (margin), taken"
      f" here as logit p*(winner ≻ loser); dataset {dataset.name!r} has no"
      " preference matrix (add `preference`)."
    )
  p = np.asarray(dataset.preference, np.float64)
  winners, losers = dataset.pairs[:, 0], dataset.pairs[:, 1]
  observed = p[winners, losers]
  if np.any((observed <= 0) | (observed >= 1)):
    bad = int(np.argmax((observed <= 0) | (observed >= 1)))
    raise ValueError(
      f"loss {name!r} needs finite reward differences logit p*(w ≻ l), but"
      f" dataset {dataset.name!r} has p*({winners[bad]} ≻ {losers[bad]}) ="
      f" {observed[bad]} (a deterministic preference has no finite"
      " Bradley–Terry reward)."
    )
  with np.errstate(divide="ignore"):
    table = np.log(p) - np.log1p(-p)
  # Entries of pairs the dataset never holds are never gathered; NaN, not
  # ±inf, so that any use would show in the loss.
  return np.where(np.isfinite(table), table, np.nan)


def run_sweep(
  datasets: Sequence[Dataset],
  loss_specs: Sequence[LossSpec],
  taus: Sequence[float],
  seeds: Sequence[int],
  *,
  total_steps: int,
  batch_size: int,
  record_every: int,
  optimizer: OptimizerSpec,
) -> SweepResult:
  """Runs every (loss, dataset, τ, seed) combination in one compiled program.

  Population losses are deterministic, so they run once per (dataset, τ),
  with the first seed only.

  Args:
    datasets: the problems; datasets with equal K share a vmap.
    loss_specs: the losses.
    taus: the τ grid (traced: new values do not recompile).
    seeds: the seeds (traced).
    total_steps: T, a multiple of ``record_every``.
    batch_size: B, pairs per step (sampled losses).
    record_every: E, steps between recorded probabilities.
    optimizer: the optax optimiser.

  Returns:
    A :class:`SweepResult`.
  """
  if (
    record_every < 1
    or total_steps < record_every
    or (total_steps % record_every)
  ):
    raise ValueError(
      f"total_steps ({total_steps}) must be a positive multiple of"
      f" record_every ({record_every})."
    )
  if batch_size < 1:
    raise ValueError(f"batch_size must be ≥ 1; got {batch_size}.")
  if not taus or any(not t > 0 for t in taus):
    raise ValueError(f"taus must be a non-empty list of τ > 0; got {taus}.")
  if not seeds:
    raise ValueError("seeds must not be empty.")
  optimizer.build(total_steps)  # Bad optimizer.* keys fail before compiling.
  names = [d.name for d in datasets]
  if len(set(names)) != len(names) or not names:
    raise ValueError(f"dataset names must be distinct and non-empty: {names}.")
  labels = [s.label for s in loss_specs]
  if len(set(labels)) != len(labels) or not labels:
    raise ValueError(f"loss labels must be distinct and non-empty: {labels}.")
  by_name = {d.name: d for d in datasets}

  groups, inputs, runs = [], [], []
  for spec in loss_specs:
    run_seeds = list(seeds)[:1] if spec.is_population else list(seeds)
    for k in sorted({d.num_actions for d in datasets}):
      group_runs = [
        Run(loss=spec.label, dataset=d.name, tau=float(t), seed=int(s))
        for d in datasets
        if d.num_actions == k
        for t in taus
        for s in run_seeds
      ]
      pair_counts = [
        len(by_name[r.dataset].pairs)
        for r in group_runs
        if by_name[r.dataset].pairs is not None
      ]
      inputs.append(
        _group_inputs(group_runs, by_name, spec, max(pair_counts, default=1))
      )
      groups.append(_Group(loss=spec, num_actions=k, num_runs=len(group_runs)))
      runs.extend(group_runs)
  program = _Program(
    groups=tuple(groups),
    total_steps=total_steps,
    record_every=record_every,
    batch_size=batch_size,
    optimizer=optimizer,
  )
  outputs = jax.device_get(_run_program(program, tuple(inputs)))
  k_max = max(d.num_actions for d in datasets)
  probs = []
  for p, _, _ in outputs:
    pad = np.full(p.shape[:2] + (k_max - p.shape[2],), np.nan, p.dtype)
    probs.append(np.concatenate([p, pad], axis=2))
  return SweepResult(
    runs=runs,
    steps=np.arange(0, total_steps + 1, record_every),
    probs=np.concatenate(probs),
    loss=np.concatenate([o[1] for o in outputs]),
    nonfinite_steps=np.concatenate([o[2] for o in outputs]),
  )


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _stepwise_update(
  loss,
  optimizer,
  batch_size,
  total_steps,
  theta,
  opt_state,
  step,
  key,
  pairs,
  log_ref,
  tau,
):
  """One plain training step of :func:`run_stepwise` (gather, grad, update)."""
  idx = data_order.minibatch_indices(
    key, step, batch_size=batch_size, dataset_size=pairs.shape[0]
  )  # [B]
  chosen, rejected = pairs[idx, 0], pairs[idx, 1]

  def objective(theta):
    logp = jax.nn.log_softmax(theta)
    return jnp.mean(
      loss_config.pair_loss(
        loss.name,
        logp[chosen],
        logp[rejected],
        log_ref[chosen],
        log_ref[rejected],
        tau=tau,
        options={k: jnp.float32(v) for k, v in loss.options},
      )
    )

  value, grad = jax.value_and_grad(objective)(theta)
  update = update_lib.apply_update(
    optimizer.build(total_steps), grad, theta, opt_state, value
  )
  return update.params, update.opt_state


def run_stepwise(
  dataset: Dataset,
  loss: LossSpec,
  tau: float,
  seed: int,
  *,
  total_steps: int,
  batch_size: int,
  record_every: int,
  optimizer: OptimizerSpec,
) -> np.ndarray:
  """One sampled run, one jitted step per Python iteration: the reference.

  The same contract as :func:`run_sweep` written the plain way — indices of
  each step from :func:`data_order.minibatch_indices`, a gather, a jitted
  update — with no vmap, no scan and no chunking. The benchmark's baseline
  and the tests' reference.

  Returns:
    ``[total_steps / record_every + 1, K]`` the recorded probabilities.
  """
  if loss.is_population or loss.name in UNPAIRED_LOSSES:
    raise ValueError("run_stepwise runs sampled pairwise losses only.")
  log_ref = jnp.asarray(np.log(dataset.pi_ref), jnp.float32)
  pairs = jnp.asarray(dataset.pairs)
  key = jax.random.key_data(data_order.data_key(seed))
  theta, opt_state = log_ref, optimizer.build(total_steps).init(log_ref)
  records = [jax.nn.softmax(theta)]
  for step in range(total_steps):
    theta, opt_state = _stepwise_update(
      loss,
      optimizer,
      batch_size,
      total_steps,
      theta,
      opt_state,
      np.uint32(step),
      key,
      pairs,
      log_ref,
      jnp.float32(tau),
    )
    if (step + 1) % record_every == 0:
      records.append(jax.nn.softmax(theta))
  return np.asarray(jnp.stack(records))
