r"""KTO: Kahneman–Tversky optimisation on unpaired binary feedback.

KTO (Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic
Optimization", arXiv:2402.01306) learns from single responses labelled
desirable or undesirable, not from pairs, so it is not a pairwise loss of
``psipo_jax.losses``: it is its own objective of the train step
(``objective="kto"``), with its own batch layout and metrics.

Per example (x, y) with r = log π(y|x) − log π_ref(y|x) (summed log-probs,
or length-averaged with ``loss.normalize="mean"``) and τ the paper's β:

    desirable:    λ_D · (1 − σ(τ (r − z₀)))
    undesirable:  λ_U · (1 − σ(τ (z₀ − r)))

(the paper's L_KTO = E[λ_y − v(x, y)]). The reference point z₀ estimates
KL(π ‖ π_ref) from mismatched prompt/completion pairs of the same batch:

    z₀ = max(0, mean_i [log π(y_j(i) | x_i) − log π_ref(y_j(i) | x_i)]),

under ``stop_gradient``.

How z₀ is estimated, in the paper and in TRL, and which we follow:

* Paper (its implementation notes): z₀ is the batch mean of the log-ratio of
  inputs matched with unrelated outputs of the same batch, clamped at 0, and
  not back-propagated through.
* TRL (``KTOTrainer``): the mismatched pairs are made by shifting the
  completions of each batch by one, x_i with y_{i−1} (``_get_kl_dataset``);
  the mean is taken per (micro-)batch on each device, then averaged over
  devices (``gather_for_metrics(kl).mean().clamp(min=0)``), detached. Under
  gradient accumulation each micro-batch thus gets its own z₀.
* Here: TRL's shift over the GLOBAL batch (the data builds row i's
  mismatched pair from x_i and y_{i−1}, i − 1 the row before it in the
  global batch, on whichever process that row is), and the paper's
  batch: z₀ is one mean over the WHOLE global batch of an optimiser step —
  all devices, all micro-batches — computed once before the gradient
  (``Objective.prepare``), so it does not change with the device count or
  ``micro_batches``. With unit weights it is the plain mean; with per-example
  ``weight`` it is the weighted mean (rows of weight 0, e.g. the filler rows
  of the last evaluation batch, do not count).

Batch layout (``[B, ...]`` arrays, one row per example):
  ``completion_<name>`` (sequences: ``completion_input_ids``,
  ``completion_loss_mask``, ...; finite actions: ``completion``, action
  indices) — the labelled response; ``kl_<name>`` / ``kl`` — row i's
  mismatched pair (prompt of row i, completion of row i−1); ``label`` [B]
  (1 or True: desirable); optional ``weight`` [B].

Metrics (weighted means over the batch): ``loss``, ``kl`` (z₀ as used),
``rewards/desirable`` and ``rewards/undesirable`` (mean τ·r over each
class; NaN when the batch has none of that class), ``rewards/margins``
(their difference), ``logps/desirable``, ``logps/undesirable`` and
``desirable_fraction``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.typing import ArrayLike

from psipo_jax import config_checks
from psipo_jax import train_step
from psipo_jax.models import PolicyOutput

Array = jax.Array

# The batch key of z₀ once `prepare` has computed it (one value per row).
REFERENCE_POINT = "kto_reference_point"
COMPLETION = "completion"
KL = "kl"
LABEL = "label"
NORMALIZE_MODES = ("sum", "mean")
# Keys of the `loss` block with objective="kto".
LOSS_KEYS = (
  "name",
  "tau",
  "normalize",
  "desirable_weight",
  "undesirable_weight",
)


# ---------------------------------------------------------------------------
# The kernels.


def reference_point(
  policy_kl_logps: ArrayLike,
  ref_kl_logps: ArrayLike,
  weight: ArrayLike | None = None,
) -> Array:
  r"""KTO's z₀: the clamped mean log-ratio of mismatched pairs, no gradient.

  Shapes: two ``[batch]`` inputs (and ``weight`` ``[batch]``), scalar output.

  .. math::
    z_0 = \max\Bigl(0, \frac{\sum_i w_i\,(\log\pi(y'_i|x_i)
          - \log\pi_{ref}(y'_i|x_i))}{\sum_i w_i}\Bigr)

  Args:
    policy_kl_logps: ``[batch]`` log π of each mismatched pair (x_i, y'_i).
    ref_kl_logps: ``[batch]`` log π_ref of the same pairs.
    weight: optional ``[batch]`` non-negative weights (default 1).

  Returns:
    ``[]`` z₀ ≥ 0, under ``stop_gradient``, in float32 or wider.
  """
  policy = jnp.asarray(policy_kl_logps)
  dtype = jnp.promote_types(policy.dtype, jnp.float32)
  log_ratio = policy.astype(dtype) - jnp.asarray(ref_kl_logps, dtype)  # [B]
  if weight is None:
    mean = jnp.mean(log_ratio)
  else:
    weight = jnp.asarray(weight, dtype)  # [B]
    mean = jnp.sum(weight * log_ratio) / jnp.sum(weight)
  return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_loss(
  policy_logps: ArrayLike,
  ref_logps: ArrayLike,
  desirable: ArrayLike,
  z0: ArrayLike,
  *,
  tau: ArrayLike,
  desirable_weight: ArrayLike = 1.0,
  undesirable_weight: ArrayLike = 1.0,
) -> Array:
  r"""Per-example KTO losses.

  Shapes: ``[batch]`` log-probs and labels, scalar z₀, ``[batch]`` output.

  .. math::
    \ell_i = \begin{cases}
      \lambda_D\,\bigl(1 - \sigma(\tau(r_i - z_0))\bigr)
        & y_i \text{ desirable}\\
      \lambda_U\,\bigl(1 - \sigma(\tau(z_0 - r_i))\bigr) & \text{otherwise}
    \end{cases}, \quad r_i = \log\pi(y_i|x_i) - \log\pi_{ref}(y_i|x_i)

  Args:
    policy_logps: ``[batch]`` log π(y|x).
    ref_logps: ``[batch]`` log π_ref(y|x).
    desirable: ``[batch]`` bool (or 0/1) labels.
    z0: the reference point (:func:`reference_point`); a scalar or
      ``[batch]``.
    tau: τ > 0, the paper's β (scalar, may be traced).
    desirable_weight: λ_D > 0.
    undesirable_weight: λ_U > 0. The paper advises
      λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3] for n_D desirable and n_U undesirable
      examples.

  Returns:
    ``[batch]`` losses, each in [0, λ].

  Examples:
    >>> import jax.numpy as jnp
    >>> from psipo_jax import kto
    >>> # r = 0 = z₀: 1 − σ(0) = 1/2 for either label, times its weight.
    >>> zero = jnp.zeros(2)
    >>> kto.kto_loss(zero, zero, jnp.array([True, False]), 0.0, tau=0.1,
    ...              undesirable_weight=2.0)
    Array([0.5, 1. ], dtype=float32)

  References:
    Ethayarajh et al., arXiv:2402.01306 (L_KTO; TRL cites it as Eq. 7);
    TRL ``KTOTrainer.kto_loss``.
  """
  policy = jnp.asarray(policy_logps)
  dtype = jnp.promote_types(policy.dtype, jnp.float32)
  r = policy.astype(dtype) - jnp.asarray(ref_logps, dtype)  # [B]
  tau = _positive("tau", tau, dtype)
  lam_d = _positive("desirable_weight", desirable_weight, dtype)
  lam_u = _positive("undesirable_weight", undesirable_weight, dtype)
  desirable = jnp.asarray(desirable).astype(bool)  # [B]
  if desirable.shape != r.shape:
    raise ValueError(
      f"desirable must have the log-probs' shape {r.shape}; got"
      f" {desirable.shape}"
    )
  z = tau * (r - jnp.asarray(z0, dtype))  # [B]
  # 1 − σ(x) = σ(−x), without the cancellation of 1 − σ(x) near 1.
  return jnp.where(
    desirable, lam_d * jax.nn.sigmoid(-z), lam_u * jax.nn.sigmoid(z)
  )


def _positive(name: str, value: Any, dtype: Any) -> Array:
  cast = jnp.asarray(value, dtype)
  if cast.ndim != 0:
    raise ValueError(f"{name} must be a scalar; got shape {cast.shape}")
  if not isinstance(cast, jax.core.Tracer) and not bool(cast > 0):
    raise ValueError(f"{name} must be > 0; got {value}")
  return cast


# ---------------------------------------------------------------------------
# The config.


@dataclasses.dataclass(frozen=True)
class KTOConfig:
  """The `loss.*` block of `objective="kto"`.

  Attributes:
    tau: τ > 0 (the paper's β).
    desirable_weight: λ_D > 0.
    undesirable_weight: λ_U > 0.
    normalize: "sum" (summed log-probs, as the paper and TRL) or "mean".
  """

  tau: float
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0
  normalize: str = "sum"

  name = "kto"
  # What the trainer asks of any loss config.
  reference_free = False
  batch_coupled = False
  batch_fields = ()

  def __post_init__(self):
    for key in ("tau", "desirable_weight", "undesirable_weight"):
      value = getattr(self, key)
      if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0
      ):
        raise ValueError(f"loss.{key} must be a number > 0, got {value!r}")
    if self.normalize not in NORMALIZE_MODES:
      raise ValueError(
        f"loss.normalize must be one of {NORMALIZE_MODES}, got"
        f" {self.normalize!r}"
      )

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> KTOConfig:
    """From the `loss` block; refuses keys KTO does not read."""
    if config is None:
      raise ValueError("objective='kto' needs a loss block (loss.tau, ...)")
    config_checks.check_keys(config, LOSS_KEYS, prefix="loss.")
    name = config.get("name", "kto")
    if name not in ("kto", None):
      raise ValueError(
        f"objective='kto' trains the KTO loss; loss.name={name!r} must be"
        " 'kto' or unset"
      )
    values = {
      k: config.get(k)
      for k in ("tau", "desirable_weight", "undesirable_weight", "normalize")
      if config.get(k) is not None
    }
    if "tau" not in values:
      raise ValueError("loss.tau must be set (KTO's β)")
    return cls(**values)


# ---------------------------------------------------------------------------
# The objective of the train step (psipo_jax.train_step.Objective).


def side_inputs(batch: Any, side: str) -> dict[str, Array]:
  """The model inputs of one side: `<side>_<name>` -> `<name>`, `<side>` ->
  `action` (finite actions)."""
  inputs = {}
  for key, value in batch.items():
    if key == side:
      inputs["action"] = value
    elif key.startswith(side + "_"):
      inputs[key[len(side) + 1 :]] = value
  if not inputs:
    raise ValueError(
      f"objective='kto' reads {side!r} / {side}_* inputs (an unpaired"
      f" input); the batch has {sorted(batch)}"
    )
  return inputs


def _logps(out: PolicyOutput, mode: str) -> Array:
  logps = out.logps.astype(jnp.float32)
  return logps / out.num_tokens if mode == "mean" else logps


def _weight(batch: Any, like: Array) -> Array:
  weight = batch.get("weight")
  return (jnp.ones_like(like) if weight is None else weight).astype(jnp.float32)


def make_objective(model_def: nnx.GraphDef, config: KTOConfig):
  """The train step's `Objective` for KTO (see the module docstring)."""

  def score(params, inputs):
    return nnx.merge(model_def, params)(inputs, rngs=None)

  def prepare(params, ref_params, batch):
    """z₀ over the whole (global) batch; drops the mismatched rows."""
    if ref_params is None:
      raise ValueError(
        "objective='kto' needs the reference model in the state (KTO has"
        " no precomputed-reference input)"
      )
    kl_inputs = side_inputs(batch, KL)
    policy = _logps(score(params, kl_inputs), config.normalize)  # [B]
    reference = _logps(score(ref_params, kl_inputs), config.normalize)
    z0 = reference_point(policy, reference, _weight(batch, policy))  # []
    out = {
      k: v for k, v in batch.items() if k != KL and not k.startswith(KL + "_")
    }
    out[REFERENCE_POINT] = jnp.broadcast_to(z0, policy.shape)  # [B]
    return out

  def terms(params, ref_params, batch, rngs):
    inputs = side_inputs(batch, COMPLETION)
    policy_out: PolicyOutput = nnx.merge(model_def, params)(inputs, rngs=rngs)
    policy = _logps(policy_out, config.normalize)  # [B]
    reference = jax.lax.stop_gradient(
      _logps(score(ref_params, inputs), config.normalize)
    )  # [B]
    if LABEL not in batch:
      raise ValueError(
        f"objective='kto' needs the per-example field 'label'; the batch"
        f" has {sorted(batch)}"
      )
    desirable = batch[LABEL].astype(bool)  # [B]
    z0 = batch[REFERENCE_POINT]  # [B], one value
    per_example = kto_loss(
      policy,
      reference,
      desirable,
      z0,
      tau=config.tau,
      desirable_weight=config.desirable_weight,
      undesirable_weight=config.undesirable_weight,
    )  # [B]
    weight = _weight(batch, per_example)  # [B]
    rewards = config.tau * (policy - reference)  # [B]
    d = desirable.astype(jnp.float32)
    u = 1.0 - d
    per_example_metrics = {
      "kl": z0,
      "desirable_fraction": d,
      # Class sums: `finalize` divides them by the class fractions.
      "rewards/desirable": d * rewards,
      "rewards/undesirable": u * rewards,
      "logps/desirable": d * policy,
      "logps/undesirable": u * policy,
    }
    metric_sums = {
      k: jnp.sum(weight * v) for k, v in per_example_metrics.items()
    }
    empty = jnp.sum(policy_out.num_tokens == 0)
    return jnp.sum(weight * per_example), (jnp.sum(weight), metric_sums, empty)

  def finalize(metrics):
    d = metrics["desirable_fraction"]
    u = 1.0 - d
    out = dict(metrics)
    for key, fraction in (
      ("rewards/desirable", d),
      ("logps/desirable", d),
      ("rewards/undesirable", u),
      ("logps/undesirable", u),
    ):
      # NaN when the batch holds no example of the class: no mean exists.
      out[key] = jnp.where(
        fraction > 0,
        metrics[key] / jnp.where(fraction > 0, fraction, 1.0),
        jnp.nan,
      )
    out["rewards/margins"] = (
      out["rewards/desirable"] - out["rewards/undesirable"]
    )
    return out

  return train_step.Objective(terms=terms, finalize=finalize, prepare=prepare)
