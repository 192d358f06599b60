"""What a run optimises: the `loss.*` config block, validated once.

`LossConfig` is the training system's loss description; the vmapped sweep
runner's `bandit.LossSpec` checks its pairwise losses with the same
:func:`check_loss_options` and evaluates them with the same
:func:`pair_loss`, so a name or option that one path refuses the other
refuses too, with the same message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from psipo_jax import config_checks
from psipo_jax import losses as losses_lib

NORMALIZE_MODES = ("sum", "mean")
# Keys of the `loss` config block that are not options of the loss function
# (`module`: a user module to import first, which registers its losses).
LOSS_KEYS = tuple(sorted(losses_lib.RESERVED_OPTION_NAMES))


def check_loss_options(name: str, options: Mapping[str, Any]) -> None:
  """Raises ValueError naming `loss.name` or the `loss.<option>` at fault."""
  try:
    losses_lib.get_loss(name)
  except ValueError as e:
    raise ValueError(f"loss.name: {e}") from None
  valid = losses_lib.loss_option_names(name)
  for key in options:
    if key not in valid:
      close = config_checks.nearest(key, [*valid, *LOSS_KEYS])
      hint = f" (did you mean loss.{close}?)" if close else ""
      raise ValueError(
        f"loss.{key} is not an option of loss {name!r}{hint}; its options"
        f" are {list(valid)}"
      )


def pair_loss(
  name: str,
  policy_chosen_logps: jax.Array,
  policy_rejected_logps: jax.Array,
  ref_chosen_logps: jax.Array | None,
  ref_rejected_logps: jax.Array | None,
  *,
  tau: Any,
  options: Mapping[str, Any],
  fields: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
  """[B] per-pair losses of the registered loss `name`.

  τ and options may be traced. `fields` holds the [B] batch fields the loss
  declares (`losses.BATCH_FIELDS`); a declared field missing from it is an
  error naming the field and the keys given.
  """
  fields = fields or {}
  needed = losses_lib.BATCH_FIELDS.get(name, ())
  missing = [f for f in needed if f not in fields]
  if missing:
    raise ValueError(
      f"loss.name={name!r} reads the per-pair batch field"
      f" {', '.join(repr(f) for f in missing)}, which the data does not"
      f" have (batch fields: {sorted(fields)}); give it in the data"
      " files (e.g. a `margin` per record) or choose another loss."
    )
  return losses_lib.get_loss(name)(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau=tau,
    **options,
    **{f: fields[f] for f in needed},
  )


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """What the step optimises; built and validated from the `loss.*` config.

  Attributes:
    name: a key of `psipo_jax.losses.LOSSES`.
    tau: regularisation strength τ > 0 (`beta` in DPO papers).
    normalize: "sum" (plain sequence log-probs, as in the paper) or "mean"
      (averaged over response tokens, as TRL's `ipo`); applied identically to
      policy and reference.
    nll_weight: weight of the chosen responses' length-normalised NLL added
      to each pair's loss (0 disables it); TRL calls it ``rpo_alpha``.
    options: the loss function's own keyword options (e.g. label_smoothing).
  """

  name: str
  tau: float
  normalize: str = "sum"
  nll_weight: float = 0.0
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    check_loss_options(self.name, self.options)
    if (
      isinstance(self.tau, bool)
      or not isinstance(self.tau, (int, float))
      or (not self.tau > 0)
    ):
      raise ValueError(f"loss.tau must be a number > 0, got {self.tau!r}")
    if self.normalize not in NORMALIZE_MODES:
      raise ValueError(
        f"loss.normalize must be one of {NORMALIZE_MODES}, got"
        f" {self.normalize!r}"
      )
    if (
      isinstance(self.nll_weight, bool)
      or not isinstance(self.nll_weight, (int, float))
      or not self.nll_weight >= 0
    ):
      raise ValueError(f"loss.nll_weight must be >= 0, got {self.nll_weight}")

  @property
  def reference_free(self) -> bool:
    return self.name in losses_lib.REFERENCE_FREE

  @property
  def batch_coupled(self) -> bool:
    return self.name in losses_lib.BATCH_COUPLED

  @property
  def batch_fields(self) -> tuple[str, ...]:
    """The per-pair batch fields the loss reads (`losses.BATCH_FIELDS`)."""
    return losses_lib.BATCH_FIELDS.get(self.name, ())

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> LossConfig:
    """From the `loss` block; other keys are loss options (None = unset).

    `loss.module`, if set, is imported first (`losses.import_loss_module`),
    so that a loss it registers can be named by `loss.name`. Every process
    validates its config, so every process — each host, each sweep worker —
    imports it.
    """
    if config.get("module"):
      losses_lib.import_loss_module(config.get("module"))
    options = {
      k: v for k, v in config.items() if k not in LOSS_KEYS and v is not None
    }
    return cls(
      name=config.get("name"),
      tau=config.get("tau"),
      normalize=config.get("normalize", "sum"),
      nll_weight=config.get("nll_weight", 0.0),
      options=options,
    )

  def __call__(
    self,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    fields: Mapping[str, jax.Array] | None = None,
  ) -> jax.Array:
    """[B] per-pair losses with this config's τ and options; `fields`: the
    batch (or any mapping holding the loss's `batch_fields`)."""
    return pair_loss(
      self.name,
      policy_chosen_logps,
      policy_rejected_logps,
      ref_chosen_logps,
      ref_rejected_logps,
      tau=self.tau,
      options=self.options,
      fields=fields,
    )
