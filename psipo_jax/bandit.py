"""Finite-action ("bandit") preference experiments, a whole sweep as one program.

The paper's illustrative examples (Azar et al., arXiv:2310.12036, §5.3–5.4)
train a tabular policy π_θ = softmax(θ), θ ∈ ℝ^K, on a finite dataset of
observed (winner, loser) action pairs, with Adam on mini-batches drawn
uniformly with replacement. This module runs any number of such runs —
every combination of loss × dataset × τ × seed — as ONE jit-compiled program:
``jax.vmap`` over runs, ``jax.lax.scan`` over steps, the action probabilities
recorded every ``record_every`` steps. Changing τ, seeds or the datasets'
contents (not their sizes) reuses the compiled program.

What one run does (the contract another training loop reproduces):

* **Initialisation.** θ₀ = log π_ref, so π_θ₀ = π_ref.
* **Data order.** The mini-batch of step ``s`` (0-based) is
  ``dataset[minibatch_indices(data_key(seed), s, batch_size=B,
  dataset_size=N)]``; see :func:`minibatch_indices`. Nothing else is random.
* **Objective.** With ``logp = log_softmax(θ)`` and the batch's chosen and
  rejected actions ``w, l`` (each ``[B]``), the sampled objective is
  ``mean(loss_fn(logp[w], logp[l], log π_ref[w], log π_ref[l], tau=τ,
  **options))`` for a loss registered in :mod:`psipo_jax.losses`. A
  *population* loss (:data:`POPULATION_LOSSES`) instead evaluates the exact
  expectation of :mod:`psipo_jax.psi` on the dataset's preference matrix, with
  no sampling at all.
* **Update.** ``updates, opt_state = optimizer.update(grad, opt_state, θ)``,
  ``θ ← optax.apply_updates(θ, updates)``; the optimiser is
  ``optax.<name>(**kwargs)``, by default ``optax.adam(learning_rate=0.01)``.
* Probabilities are recorded at steps 0, E, 2E, …, T (``E = record_every``),
  each after the update of the step before.
* A step whose loss or gradient is not finite is counted
  (``SweepResult.nonfinite_steps``) and its update dropped, as in the
  training system.

Config keys. A sweep config describes a GRID, so it uses list-valued keys
(``losses``, ``taus``, ``loss_options``, ``num_seeds``, ``datasets``)
where a single-run config of :mod:`psipo_jax.train` has ``loss.name``,
``loss.tau`` and ``seed``. To sweep a single-run config over τ instead, use
``experiments/bandit_train.py`` with :mod:`psipo_jax.sweeps` and
``launch/sweep.py``.

Runs with different numbers of actions K cannot share a vmap; runs are
grouped by (loss, K), each group vmapped, and all groups advance in the same
scan of the same program.

Command line (the paper's Figures 1 and 2)::

  python -m psipo_jax.bandit --config=experiments/paper_figures.py \
      --workdir=runs/paper_figures
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import shutil
import time
from typing import Any, Mapping, Optional, Sequence

from absl import flags

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from psipo_jax import losses
from psipo_jax import optimizers
from psipo_jax import psi

Array = jax.Array

# Population losses: exact expectations over y, y' ~ μ on a KNOWN preference
# matrix (no sampling). Signature fn(logits, pref, pi_ref, mu, tau[, psi]).
POPULATION_LOSSES = {
    "ipo_population": psi.ipo_population_loss,  # Eq. 13
    "ipo_sampled_population": psi.ipo_sampled_population_loss,  # Eq. 16
    "dpo_population": psi.dpo_population_loss,  # Eq. 5
    "psi_regression": psi.psi_regression_loss,  # Eq. 11, any Ψ
}


# ---------------------------------------------------------------------------
# Data order: which pairs each step trains on.


def data_key(seed: int) -> Array:
  """The key that fixes run ``seed``'s data order.

  ``jax.random.split(jax.random.key(seed), 3)[2]``: the data key of the
  training system's (init, state, data) split (psipo_jax/train.py), so a run
  of ``python -m psipo_jax.main`` with the same seed draws the same pairs.
  Always the Threefry-2x32 implementation, whatever ``jax_default_prng_impl``
  says, because :func:`minibatch_indices` hashes with Threefry directly.
  """
  return jax.random.split(jax.random.key(seed, impl="threefry2x32"), 3)[2]


# Threefry-2x32 rotation constants (Salmon et al., SC'11, Table 4), applied
# in groups of four rounds, alternating.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(
    key_0: Array, key_1: Array, count_0: Array, count_1: Array
) -> tuple[Array, Array]:
  """The Threefry-2x32 block function, 20 rounds, elementwise on uint32.

  Bit-identical to ``jax.extend.random.threefry2x32_p`` (and so to
  ``jax.random``'s default generator), but written out round by round: XLA
  fuses it into one vectorised loop, where the primitive's CPU lowering loops
  over the rounds and was about ten times slower here, and slower to compile.

  Reference: Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy
  as 1, 2, 3", SC 2011.
  """
  key_2 = key_0 ^ key_1 ^ jnp.uint32(0x1BD11BDA)
  schedule = (key_0, key_1, key_2)
  x_0, x_1 = count_0 + key_0, count_1 + key_1
  for group in range(5):
    for rotation in _THREEFRY_ROTATIONS[group % 2]:
      x_0 = x_0 + x_1
      x_1 = (x_1 << jnp.uint32(rotation)) | (x_1 >> jnp.uint32(32 - rotation))
      x_1 = x_1 ^ x_0
    x_0 = x_0 + schedule[(group + 1) % 3]
    x_1 = x_1 + schedule[(group + 2) % 3] + jnp.uint32(group + 1)
  return x_0, x_1


def _mul_high_u32(a: Array, b: Array) -> Array:
  """⌊a·b / 2³²⌋ for uint32 a, b, exactly, without 64-bit integers."""
  mask = jnp.uint32(0xFFFF)
  sixteen = jnp.uint32(16)
  a_hi, a_lo = a >> sixteen, a & mask
  b_hi, b_lo = b >> sixteen, b & mask
  lo_lo, lo_hi, hi_lo = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo
  # The middle column's carry into the high word; each term is < 2¹⁶.
  middle = (lo_lo >> sixteen) + (lo_hi & mask) + (hi_lo & mask)
  return a_hi * b_hi + (lo_hi >> sixteen) + (hi_lo >> sixteen) + (
      middle >> sixteen
  )


def minibatch_indices(
    key: Array, step: Any, *, batch_size: int, dataset_size: Any
) -> Array:
  """Dataset indices of the mini-batch that step ``step`` trains on.

  Counter-based, so the indices of a step depend only on
  ``(key, step, batch_size, dataset_size)`` — never on how many steps are
  drawn at once, on other runs, or on vmap. Slot ``j`` of step ``s`` takes the
  32-bit word

      w = Threefry-2x32(key, counter=(s, j))[0]

  (the first output word of the raw 20-round block function,
  :func:`threefry2x32`) and maps it to ``⌊w · N / 2³²⌋`` (multiply-shift), a uniform
  draw from {0, …, N−1} up to a bias below N / 2³². Sampling is with
  replacement, as in the paper.

  Why not ``jax.random.randint(jax.random.fold_in(key, s), ...)``: it is
  counter-based too, but costs about ten times more here (a split and two
  draws per index, the hash's CPU lowering looping over rounds), and the
  random numbers dominate the cost of a bandit sweep. The ``rbg`` generator
  is cheap but its batched form under ``vmap`` reads only the first key, so a
  run inside a sweep would not equal the same run alone.

  Args:
    key: a Threefry key (``data_key(seed)``), typed or raw ``uint32[2]``.
    step: integer step, or an integer array of steps of any shape.
    batch_size: B, static.
    dataset_size: N ≥ 1, may be traced (≤ 2³² − 1).

  Returns:
    ``int32`` indices of shape ``step.shape + (batch_size,)``.
  """
  if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  key = jnp.asarray(key, jnp.uint32)
  if key.shape != (2,):
    raise ValueError(
        f"key must be one Threefry key (raw shape (2,)); got shape {key.shape}."
    )
  step = jnp.asarray(step, jnp.uint32)
  shape = step.shape + (batch_size,)
  counter_hi = jnp.broadcast_to(step[..., None], shape)
  counter_lo = jnp.broadcast_to(jnp.arange(batch_size, dtype=jnp.uint32), shape)
  # One word per block: pairing both words of a block into adjacent slots
  # would interleave two arrays, which XLA's CPU backend does not fuse and
  # which cost 8× the hash itself.
  words, _ = threefry2x32(key[0], key[1], counter_hi, counter_lo)  # [..., B]
  size = jnp.asarray(dataset_size, jnp.uint32)
  return _mul_high_u32(words, size).astype(jnp.int32)


# ---------------------------------------------------------------------------
# Datasets.


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A finite action space with observed pairs and/or a known preference.

  Attributes:
    name: label used in tables, files and figures.
    num_actions: K.
    pi_ref: ``[K]`` reference policy (the init of θ is ``log pi_ref``).
    pairs: ``[N, 2]`` int (winner, loser) pairs the sampled losses train on;
      ``None`` for a population-only problem.
    preference: ``[K, K]`` ``p*(y_i ≻ y_j)`` when known (needed by the
      population losses and the ΨPO closed forms), else ``None``.
    mu: ``[K]`` behaviour policy μ of the population losses.
  """

  name: str
  num_actions: int
  pi_ref: np.ndarray
  pairs: Optional[np.ndarray] = None
  preference: Optional[np.ndarray] = None
  mu: Optional[np.ndarray] = None

  def __post_init__(self):
    k = self.num_actions
    where = f"dataset {self.name!r}"
    if k < 2:
      raise ValueError(f"{where}: needs at least 2 actions; got {k}.")
    pi_ref = np.asarray(self.pi_ref, np.float64)
    if pi_ref.shape != (k,) or np.any(pi_ref <= 0) or not np.isclose(
        pi_ref.sum(), 1.0, atol=1e-6
    ):
      raise ValueError(
          f"{where}: pi_ref must be {k} positive probabilities summing to 1;"
          f" got {self.pi_ref}."
      )
    object.__setattr__(self, "pi_ref", pi_ref)
    if self.pairs is None and self.preference is None:
      raise ValueError(f"{where}: give `pairs` or `preference` (or both).")
    if self.pairs is not None:
      pairs = np.asarray(self.pairs)
      if (
          pairs.ndim != 2 or pairs.shape[1] != 2 or len(pairs) == 0
          or not np.issubdtype(pairs.dtype, np.integer)
      ):
        raise ValueError(
            f"{where}: pairs must be a non-empty list of (winner, loser)"
            f" integer pairs; got {self.pairs!r}."
        )
      try:
        psi.validate_pairs(pairs, k)
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
      object.__setattr__(self, "pairs", pairs.astype(np.int32))
    if self.preference is not None:
      pref = np.asarray(self.preference, np.float64)
      if pref.shape != (k, k):
        raise ValueError(
            f"{where}: preference must be {k}×{k}; got shape {pref.shape}."
        )
      try:
        psi.validate_preference(pref)
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
      object.__setattr__(self, "preference", pref)
    mu = np.full(k, 1.0 / k) if self.mu is None else np.asarray(
        self.mu, np.float64
    )
    if mu.shape != (k,) or np.any(mu < 0) or not np.isclose(
        mu.sum(), 1.0, atol=1e-6
    ):
      raise ValueError(
          f"{where}: mu must be {k} probabilities summing to 1; got {self.mu}."
      )
    object.__setattr__(self, "mu", mu)


def sample_pairs(
    preference: np.ndarray, mu: np.ndarray, *, num_pairs: int, seed: int
) -> np.ndarray:
  """Draws a fixed dataset of comparisons from a known preference matrix.

  Each pair compares two different actions, (y, y') drawn with probability
  ∝ μ(y)μ(y') for y ≠ y' (nobody compares a response with itself; the y = y'
  terms of Eq. 13 are zero anyway), and y wins with probability p*(y ≻ y').

  Returns:
    ``[num_pairs, 2]`` int32 (winner, loser) pairs.
  """
  rng = np.random.default_rng(seed)
  k = len(mu)
  weight = np.outer(mu, mu)
  np.fill_diagonal(weight, 0.0)
  if weight.sum() <= 0:
    raise ValueError(f"mu = {mu} puts no mass on two different actions.")
  flat = rng.choice(k * k, size=num_pairs, p=(weight / weight.sum()).ravel())
  first, second = np.divmod(flat, k)
  first_wins = rng.random(num_pairs) < np.asarray(preference)[first, second]
  winners = np.where(first_wins, first, second)
  losers = np.where(first_wins, second, first)
  return np.stack([winners, losers], axis=1).astype(np.int32)


def dataset_from_config(name: str, cfg: Mapping[str, Any]) -> Dataset:
  """Builds a :class:`Dataset` from a config entry.

  Keys: ``pairs`` (list of [winner, loser]) and/or ``preference`` (K×K
  list); ``num_actions`` (default: from ``preference``, else 1 + the largest
  action in ``pairs``); ``pi_ref`` and ``mu`` (default uniform); with
  ``preference`` but no ``pairs``, ``num_pairs`` > 0 draws a fixed dataset
  with :func:`sample_pairs` (seed ``data_seed``, default 0).
  """
  known = {"pairs", "preference", "num_actions", "pi_ref", "mu", "num_pairs",
           "data_seed"}
  unknown = set(cfg) - known
  if unknown:
    raise ValueError(
        f"datasets.{name}: unknown keys {sorted(unknown)}; valid keys:"
        f" {sorted(known)}."
    )
  pairs = cfg.get("pairs")
  pref = cfg.get("preference")
  if cfg.get("num_actions") is not None:
    k = int(cfg["num_actions"])
  elif pref is not None:
    k = len(pref)
  elif pairs:
    k = int(np.max(pairs)) + 1
  else:
    raise ValueError(f"datasets.{name}: give `pairs` or `preference`.")
  pi_ref = cfg.get("pi_ref")
  pi_ref = np.full(k, 1.0 / k) if pi_ref is None else np.asarray(pi_ref)
  mu = cfg.get("mu")
  mu = None if mu is None else np.asarray(mu, np.float64)
  num_pairs = cfg.get("num_pairs") or 0
  if pairs is None and pref is not None and num_pairs > 0:
    pairs = sample_pairs(
        np.asarray(pref), np.full(k, 1.0 / k) if mu is None else mu,
        num_pairs=int(num_pairs), seed=int(cfg.get("data_seed") or 0),
    )
  elif num_pairs and pairs is not None:
    raise ValueError(
        f"datasets.{name}: `num_pairs` samples pairs from `preference`; it"
        " cannot be combined with explicit `pairs`."
    )
  return Dataset(
      name=name, num_actions=k, pi_ref=pi_ref,
      pairs=None if pairs is None else np.asarray(pairs),
      preference=None if pref is None else np.asarray(pref), mu=mu,
  )


# ---------------------------------------------------------------------------
# Losses as per-run objectives.


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """One loss of a sweep: a registered pairwise loss or a population loss.

  Attributes:
    name: a key of ``psipo_jax.losses.LOSSES`` (trained on sampled pairs) or
      of :data:`POPULATION_LOSSES` (exact expectation, no sampling).
    options: the loss's numeric keyword options (for ``psi_regression``, the
      Ψ name under ``psi``).
    label: name in tables and figures (default ``name``).
  """

  name: str
  options: tuple[tuple[str, Any], ...] = ()
  label: str = ""

  def __post_init__(self):
    if not self.label:
      object.__setattr__(self, "label", self.name)
    if self.is_population:
      allowed = ("psi",) if self.name == "psi_regression" else ()
    elif self.name in losses.LOSSES:
      allowed = losses.loss_option_names(self.name)
    else:
      raise ValueError(
          f"Unknown loss {self.name!r}; valid names: pairwise"
          f" {', '.join(sorted(losses.LOSSES))}; population"
          f" {', '.join(sorted(POPULATION_LOSSES))}."
      )
    bad = [k for k, _ in self.options if k not in allowed]
    if bad:
      raise ValueError(
          f"loss {self.name!r} has no option(s) {bad}; its options are"
          f" {list(allowed)}."
      )

  @property
  def is_population(self) -> bool:
    return self.name in POPULATION_LOSSES

  @property
  def option_dict(self) -> dict[str, Any]:
    return dict(self.options)


def _sampled_objective(spec: LossSpec):
  """Mean registered loss over a batch of action pairs, as a function of θ."""
  loss_fn = losses.get_loss(spec.name)

  def objective(theta, run, batch):
    chosen, rejected, ref_chosen, ref_rejected = batch  # each [B]
    logp = jax.nn.log_softmax(theta)  # [K]
    actions = jnp.arange(theta.shape[-1])
    # A one-hot contraction instead of logp[chosen]: the gather's transpose
    # is a scatter-add, and the whole sweep ran about twice as long with it.
    chosen_hot = (chosen[:, None] == actions).astype(logp.dtype)  # [B, K]
    rejected_hot = (rejected[:, None] == actions).astype(logp.dtype)  # [B, K]
    per_pair = loss_fn(
        jnp.sum(chosen_hot * logp, -1), jnp.sum(rejected_hot * logp, -1),
        ref_chosen, ref_rejected,
        tau=run["tau"], **run["options"],
    )  # [B]
    return jnp.mean(per_pair)

  return objective


def _population_objective(spec: LossSpec):
  """The exact population loss of :mod:`psipo_jax.psi`, as a function of θ."""
  loss_fn = POPULATION_LOSSES[spec.name]
  static = spec.option_dict  # Only Ψ, which is a name (static).

  def objective(theta, run, batch):
    del batch  # No sampling.
    return loss_fn(
        theta, run["preference"], run["pi_ref"], run["mu"], run["tau"],
        **static,
    )

  return objective


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

  name: str = "adam"
  kwargs: tuple[tuple[str, Any], ...] = (("learning_rate", 0.01),)

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
    (chosen, rejected, ref_chosen_logps, ref_rejected_logps), each ``[C, B]``.
  """
  chosen, rejected = run["winners"][idx], run["losers"][idx]
  log_ref = run["log_ref"]
  return chosen, rejected, log_ref[chosen], log_ref[rejected]


def _keep_if_finite(finite: Array, new: Any, old: Any) -> Any:
  """``new`` where the step was finite, else ``old`` (leafwise select)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


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
    objective = (
        _population_objective(group.loss) if group.loss.is_population
        else _sampled_objective(group.loss)
    )

    def step(theta, opt_state, run, batch):
      loss, grad = jax.value_and_grad(objective)(theta, run, batch)
      updates, new_opt_state = optimizer.update(grad, opt_state, theta)
      finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(grad))
      # As the training system does: a non-finite step is counted and its
      # update dropped, so one overflow does not poison the run for good.
      return (
          *_keep_if_finite(
              finite, (optax.apply_updates(theta, updates), new_opt_state),
              (theta, opt_state),
          ),
          loss,
          finite,
      )

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
      functools.partial(minibatch_indices, batch_size=program.batch_size),
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
        (theta, jax.vmap(optimizer.init)(theta),
         jnp.zeros(theta.shape[0], jnp.int32))
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
    return np.array([
        i for i, run in enumerate(self.runs)
        if all(getattr(run, k) == v for k, v in where.items())
    ], dtype=np.int64)


def _group_inputs(runs_of_group, datasets, loss: LossSpec, num_pairs_max):
  """Stacks the per-run arrays of one group (numpy, host side)."""
  num_runs = len(runs_of_group)
  rows = [(datasets[r.dataset], r) for r in runs_of_group]
  inputs = {
      "tau": np.array([r.tau for _, r in rows], np.float32),
      "log_ref": np.stack([np.log(d.pi_ref) for d, _ in rows]).astype(
          np.float32),
      "options": {
          name: np.full(num_runs, value, np.float32)
          for name, value in loss.options
      },
  }
  if loss.is_population:
    inputs["options"] = {}
    for d, _ in rows:
      if d.preference is None:
        raise ValueError(
            f"loss {loss.name!r} is a population loss and needs a known"
            f" preference matrix; dataset {d.name!r} has only pairs (add"
            " `preference` to its config)."
        )
    inputs["preference"] = np.stack([d.preference for d, _ in rows]).astype(
        np.float32)
    inputs["pi_ref"] = np.stack([d.pi_ref for d, _ in rows]).astype(np.float32)
    inputs["mu"] = np.stack([d.mu for d, _ in rows]).astype(np.float32)
  else:
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
    inputs["num_pairs"] = np.array(
        [len(d.pairs) for d, _ in rows], np.uint32)
    inputs["key"] = np.asarray(jax.random.key_data(
        jax.vmap(data_key)(np.array([r.seed for _, r in rows]))
    ))
  return inputs


def run_sweep(
    datasets: Sequence[Dataset],
    loss_specs: Sequence[LossSpec],
    taus: Sequence[float],
    seeds: Sequence[int],
    *,
    total_steps: int = 18_000,
    batch_size: int = 9,
    record_every: int = 100,
    optimizer: OptimizerSpec = OptimizerSpec(),
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
  if record_every < 1 or total_steps < record_every or (
      total_steps % record_every
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
          for d in datasets if d.num_actions == k
          for t in taus for s in run_seeds
      ]
      pair_counts = [
          len(by_name[r.dataset].pairs) for r in group_runs
          if by_name[r.dataset].pairs is not None
      ]
      inputs.append(_group_inputs(
          group_runs, by_name, spec, max(pair_counts, default=1)))
      groups.append(_Group(loss=spec, num_actions=k, num_runs=len(group_runs)))
      runs.extend(group_runs)
  program = _Program(
      groups=tuple(groups), total_steps=total_steps, record_every=record_every,
      batch_size=batch_size, optimizer=optimizer,
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
def _stepwise_update(loss, optimizer, batch_size, total_steps, theta,
                     opt_state, step, key, pairs, log_ref, tau):
  """One plain training step of :func:`run_stepwise` (gather, grad, update)."""
  idx = minibatch_indices(
      key, step, batch_size=batch_size, dataset_size=pairs.shape[0]
  )  # [B]
  chosen, rejected = pairs[idx, 0], pairs[idx, 1]
  loss_fn = losses.get_loss(loss.name)

  def objective(theta):
    logp = jax.nn.log_softmax(theta)
    return jnp.mean(loss_fn(
        logp[chosen], logp[rejected], log_ref[chosen], log_ref[rejected],
        tau=tau, **{k: jnp.float32(v) for k, v in loss.options},
    ))

  value, grad = jax.value_and_grad(objective)(theta)
  updates, new_opt_state = optimizer.build(total_steps).update(
      grad, opt_state, theta
  )
  finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(grad))
  return _keep_if_finite(
      finite, (optax.apply_updates(theta, updates), new_opt_state),
      (theta, opt_state),
  )


def run_stepwise(
    dataset: Dataset,
    loss: LossSpec,
    tau: float,
    seed: int,
    *,
    total_steps: int,
    batch_size: int = 9,
    record_every: int = 100,
    optimizer: OptimizerSpec = OptimizerSpec(),
) -> np.ndarray:
  """One sampled run, one jitted step per Python iteration: the reference.

  The same contract as :func:`run_sweep` written the plain way — indices of
  each step from :func:`minibatch_indices`, a gather, a jitted update — with
  no vmap, no scan and no chunking. The benchmark's baseline and the tests'
  reference.

  Returns:
    ``[total_steps / record_every + 1, K]`` the recorded probabilities.
  """
  if loss.is_population:
    raise ValueError("run_stepwise runs sampled losses only.")
  log_ref = jnp.asarray(np.log(dataset.pi_ref), jnp.float32)
  pairs = jnp.asarray(dataset.pairs)
  key = jax.random.key_data(data_key(seed))
  theta, opt_state = log_ref, optimizer.build(total_steps).init(log_ref)
  records = [jax.nn.softmax(theta)]
  for step in range(total_steps):
    theta, opt_state = _stepwise_update(
        loss, optimizer, batch_size, total_steps, theta, opt_state,
        np.uint32(step), key,
        pairs, log_ref, jnp.float32(tau),
    )
    if (step + 1) % record_every == 0:
      records.append(jax.nn.softmax(theta))
  return np.asarray(jnp.stack(records))


# ---------------------------------------------------------------------------
# Configs, results on disk, command line.


def paper_protocol(arg: Optional[str] = None):
  """The training protocol of Azar et al. §5.4, as a config to extend.

  10 seeds from 0; 18,000 steps; probabilities recorded every 100 steps;
  mini-batches of 9 pairs; ``optax.adam(learning_rate=0.01)``; losses DPO
  and IPO; τ ∈ {0.05, 0.1, 0.25, 0.5, 1, 2} (the paper does not print the τ
  of its figures; this grid spans greedy to near-π_ref); no datasets or
  figures yet. ``arg="runlocal"`` shortens it to 2,000 steps and 3 seeds.

  Returns:
    An ``ml_collections.ConfigDict``.
  """

  if arg not in (None, "runlocal"):
    raise ValueError(f"Unknown config arg {arg!r}; use runlocal.")
  runlocal = arg == "runlocal"
  return ml_collections.ConfigDict({
      "seed": 0,
      "num_seeds": 3 if runlocal else 10,
      "total_steps": 2_000 if runlocal else 18_000,
      "record_every": 100,
      "input": {"batch_size": 9},
      "optimizer": {"name": "adam", "learning_rate": 0.01},
      "losses": ("dpo", "ipo"),
      "loss_options": {},
      "taus": (0.05, 0.1, 0.25, 0.5, 1.0, 2.0),
      "datasets": {},
      "figures": {},
  })


def sweep_from_config(config) -> tuple[list[Dataset], list[LossSpec], dict]:
  """Reads a bandit experiment config (see experiments/paper_figures.py).

  Returns:
    ``(datasets, loss_specs, kwargs)`` where ``run_sweep(datasets,
    loss_specs, **kwargs)`` runs the experiment.
  """
  datasets = [
      dataset_from_config(name, dict(cfg)) for name, cfg in
      config.datasets.items()
  ]
  options = config.get("loss_options") or {}
  unknown = set(options) - set(config.losses)
  if unknown:
    raise ValueError(
        f"loss_options names {sorted(unknown)}, which are not in losses"
        f" {list(config.losses)}."
    )
  loss_specs = [
      LossSpec(name, options=tuple(sorted(dict(options.get(name, {})).items())))
      for name in config.losses
  ]
  optimizer_cfg = dict(config.optimizer)
  optimizer = OptimizerSpec(
      name=optimizer_cfg.pop("name"),
      kwargs=tuple(sorted(optimizer_cfg.items())),
  )
  kwargs = dict(
      taus=tuple(float(t) for t in config.taus),
      seeds=tuple(range(config.seed, config.seed + config.num_seeds)),
      total_steps=config.total_steps,
      batch_size=config.input.batch_size,
      record_every=config.record_every,
      optimizer=optimizer,
  )
  return datasets, loss_specs, kwargs


def save_results(workdir: str, result: SweepResult, rows, config) -> list[str]:
  """Writes results.npz (curves), final.csv (per run), summary.csv, config.

  Returns:
    The written paths.
  """
  os.makedirs(workdir, exist_ok=True)
  paths = {name: os.path.join(workdir, name) for name in
           ("results.npz", "final.csv", "summary.csv", "config.json")}
  np.savez_compressed(
      paths["results.npz"],
      steps=result.steps, probs=result.probs, loss=result.loss,
      nonfinite_steps=result.nonfinite_steps,
      run_loss=np.array([r.loss for r in result.runs]),
      run_dataset=np.array([r.dataset for r in result.runs]),
      run_tau=np.array([r.tau for r in result.runs]),
      run_seed=np.array([r.seed for r in result.runs]),
  )
  k_max = result.probs.shape[-1]
  with open(paths["final.csv"], "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["loss", "dataset", "tau", "seed", "nonfinite_steps",
                     "final_loss"] + [f"p{i}" for i in range(k_max)])
    for i, r in enumerate(result.runs):
      writer.writerow([r.loss, r.dataset, r.tau, r.seed,
                       int(result.nonfinite_steps[i]), float(result.loss[i, -1])]
                      + [float(x) for x in result.probs[i, -1]])
  with open(paths["summary.csv"], "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["dataset", "loss", "tau", "num_seeds", "action",
                     "mean", "ci95", "closed_form", "note"])
    for row in rows:
      for a, (m, c) in enumerate(zip(row.mean, row.ci)):
        closed = "" if row.closed.policy is None else row.closed.policy[a]
        writer.writerow([row.dataset, row.loss, row.tau, row.num_seeds, a,
                         m, c, closed, row.closed.note])
  with open(paths["config.json"], "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return list(paths.values())


def main(argv: Sequence[str]) -> None:
  """Runs a bandit config: sweep, table beside closed forms, files, figures."""
  # Imported here: they import this module (types), and plotting pulls in
  # matplotlib, which library users of the runner do not need.
  from psipo_jax import bandit_analysis  # pylint: disable=g-import-not-at-top
  from psipo_jax import bandit_plots  # pylint: disable=g-import-not-at-top

  del argv
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir
  start = time.perf_counter()
  datasets, loss_specs, kwargs = sweep_from_config(config)
  by_name = {d.name: d for d in datasets}
  for fig_name, fig_cfg in config.figures.items():
    if fig_cfg.dataset not in by_name:
      raise ValueError(
          f"figures.{fig_name}.dataset = {fig_cfg.dataset!r} is not in"
          f" datasets {sorted(by_name)}."
      )
  num_runs = sum(
      len(kwargs["taus"]) * len(datasets)
      * (1 if s.is_population else len(kwargs["seeds"])) for s in loss_specs
  )
  print(f"Training {num_runs} runs × {kwargs['total_steps']} steps as one"
        " compiled program ...", flush=True)
  result = run_sweep(datasets, loss_specs, **kwargs)
  trained = time.perf_counter()
  print(f"  done in {trained - start:.1f} s (compilation included).")
  bad = np.flatnonzero(result.nonfinite_steps)
  if bad.size:
    print(f"WARNING: {bad.size} runs hit a non-finite loss or gradient:")
    for i in bad[:10]:
      r = result.runs[i]
      print(f"  {r.loss} on {r.dataset}, τ={r.tau}, seed {r.seed}:"
            f" {result.nonfinite_steps[i]} steps")
  rows = bandit_analysis.summarize(result, datasets, loss_specs)
  print(bandit_analysis.format_table(rows, datasets))
  written = save_results(workdir, result, rows, config)
  tabulated = time.perf_counter()
  figures = []
  for fig_name, fig_cfg in config.figures.items():
    figures += bandit_plots.plot_dataset(
        result, by_name[fig_cfg.dataset], loss_specs, title=fig_cfg.title,
        path_stem=os.path.join(workdir, "figures", fig_name),
    )
  copy_to = flags.FLAGS.copy_figures_to
  if copy_to:
    os.makedirs(copy_to, exist_ok=True)
    for path in figures:
      if path.endswith(".png"):
        shutil.copy(path, copy_to)
  print("\nResults: " + ", ".join(written))
  print("Figures: " + ", ".join(figures))
  if copy_to:
    print(f"PNG copies in {copy_to}/")
  done = time.perf_counter()
  print(f"Wall time after imports: {done - start:.1f} s (sweep"
        f" {trained - start:.1f} s, tables and files {tabulated - trained:.1f}"
        f" s, figures {done - tabulated:.1f} s).")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file(
      "config", None, "Bandit experiment config file (experiments/*.py).",
      lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "Where results and figures go.")
  flags.DEFINE_string(
      "copy_figures_to", None,
      "If set, also copy the PNG figures there (e.g. experiments/figures).",
  )
  flags.mark_flags_as_required(["config", "workdir"])
  # Run the package module's main, not this __main__ copy, so that every
  # class and the compiled program come from one module object.
  from psipo_jax import bandit  # pylint: disable=g-import-not-at-top
  app.run(bandit.main)
