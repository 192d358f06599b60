"""The optax optimiser and learning-rate schedule of the `optimizer.*` config.

Keys: `name` (a key of `OPTIMIZERS`), `learning_rate`, `schedule`
("constant" | "cosine" | "linear": decay to 0 at `total_steps`),
`warmup_steps` (linear ramp from 0), `grad_clip_norm` (clip the global
gradient norm; None or 0 disables it); any other key is passed to the optax
constructor by name (e.g. `b1`, `b2`, `eps`, `weight_decay`, `momentum`).
With a constant schedule and no clipping the optimiser is exactly
`optax.<name>(learning_rate, **options)`.
"""

import inspect
from collections.abc import Callable

import ml_collections
import optax

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
  "adam": optax.adam,
  "adamw": optax.adamw,
  "sgd": optax.sgd,
  "lion": optax.lion,
  "adafactor": optax.adafactor,
}
SCHEDULES = ("constant", "cosine", "linear")
_OWN_KEYS = (
  "name",
  "learning_rate",
  "schedule",
  "warmup_steps",
  "grad_clip_norm",
)


def make_schedule(
  config: ml_collections.ConfigDict, total_steps: int
) -> optax.Schedule:
  """Warm-up then constant, cosine or linear decay of `optimizer.learning_rate`."""
  peak = config.learning_rate
  warmup = config.get("warmup_steps", 0) or 0
  kind = config.get("schedule", "constant")
  if kind not in SCHEDULES:
    raise ValueError(
      f"optimizer.schedule must be one of {SCHEDULES}, got {kind!r}"
    )
  if not 0 <= warmup < total_steps:
    raise ValueError(
      f"optimizer.warmup_steps={warmup} must lie in [0, total_steps={total_steps})"
    )
  decay_steps = total_steps - warmup
  decay = {
    "constant": lambda: optax.constant_schedule(peak),
    "cosine": lambda: optax.cosine_decay_schedule(peak, decay_steps),
    "linear": lambda: optax.linear_schedule(peak, 0.0, decay_steps),
  }[kind]()
  if warmup == 0:
    return decay
  return optax.join_schedules(
    [optax.linear_schedule(0.0, peak, warmup), decay], boundaries=[warmup]
  )


def make_optimizer(
  config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, learning-rate schedule) for the `optimizer` block."""
  if config.name not in OPTIMIZERS:
    raise ValueError(
      f"optimizer.name={config.name!r} is not one of {sorted(OPTIMIZERS)}"
    )
  if not config.learning_rate > 0:
    raise ValueError(
      f"optimizer.learning_rate must be > 0, got {config.learning_rate}"
    )
  constructor = OPTIMIZERS[config.name]
  valid = set(inspect.signature(constructor).parameters) - {"learning_rate"}
  options = {k: v for k, v in config.items() if k not in _OWN_KEYS}
  for key in options:
    if key not in valid:
      raise ValueError(
        f"optimizer.{key} is not an option of optax.{config.name}; its"
        f" options are {sorted(valid)}"
      )
  schedule = make_schedule(config, total_steps)
  constant = config.get(
    "schedule", "constant"
  ) == "constant" and not config.get("warmup_steps")
  optimizer = constructor(
    learning_rate=config.learning_rate if constant else schedule, **options
  )
  clip = config.get("grad_clip_norm")
  if clip:
    if clip < 0:
      raise ValueError(f"optimizer.grad_clip_norm must be >= 0, got {clip}")
    optimizer = optax.chain(optax.clip_by_global_norm(clip), optimizer)
  return optimizer, schedule
