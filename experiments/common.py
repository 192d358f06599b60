"""What the experiment configs share: argument parsing and the paper's protocol.

`get_config(arg)` receives the text after the colon of
`--config=experiments/<file>.py:<arg>`; `parse_arg` turns it into typed
values (big_vision's `configs/common.py::parse_arg` style).
"""

from __future__ import annotations

import ml_collections

from psipo_jax import config_checks

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `"key=value,flag,..."` into the keys of `defaults`, typed like them.

  A bare name sets a boolean key to True (`runlocal` is `runlocal=True`).
  Values take the type of their default (bool, int, float or str).

  Examples:
    >>> args = parse_arg("loss=dpo,runlocal", loss="ipo", runlocal=False)
    >>> args.loss, args.runlocal
    ('dpo', True)
    >>> parse_arg(None, steps=10).steps
    10

  Raises:
    ValueError: an unknown key (naming the nearest valid one) or a value
      that does not parse as its default's type.
  """
  parsed = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(
        "config argument: "
        + config_checks.unknown_key_message(key, defaults).replace(
          "unknown config key", "unknown key"
        )
      )
    default = defaults[key]
    if isinstance(default, bool):
      text = text.strip().lower() if has_value else "true"
      if text not in _TRUE + _FALSE:
        raise ValueError(f"config argument {key}={text!r} is not a boolean")
      parsed[key] = text in _TRUE
    elif default is None or isinstance(default, str):
      parsed[key] = text
    else:
      try:
        parsed[key] = type(default)(text)
      except ValueError:
        raise ValueError(
          f"config argument {key}={text!r} is not a {type(default).__name__}"
        ) from None
  return ml_collections.ConfigDict(parsed)


def paper_protocol(*, runlocal: bool = False) -> ml_collections.ConfigDict:
  """The training protocol of Azar et al. §5.4, as a bandit config to extend.

  10 seeds from 0; 18,000 steps; probabilities recorded every 100 steps;
  mini-batches of 9 pairs; `optax.adam(learning_rate=0.01)`; losses DPO and
  IPO; τ ∈ {0.05, 0.1, 0.25, 0.5, 1, 2} (the paper does not print the τ of
  its figures; this grid spans greedy to near-π_ref); no datasets or figures
  yet. `runlocal` shortens it to 2,000 steps and 3 seeds.
  """
  config = ml_collections.ConfigDict(
    {
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
    }
  )
  # A module whose registered losses `losses` may name (None: built-ins only).
  config.loss_module = ml_collections.config_dict.placeholder(str)
  return config


def add_trainer_keys(
  config: ml_collections.ConfigDict, *, mesh: bool = False
) -> ml_collections.ConfigDict:
  """The training system's run keys (`psipo_jax.train`), at their defaults.

  Declared so that `--config.<key>=...` can set them on the command line;
  `mesh=True` adds the `mesh.data`, `mesh.fsdp`, `mesh.tensor` block (unset:
  every device on `data`; -1 takes the remaining devices).
  """
  placeholder = ml_collections.config_dict.placeholder
  if mesh:
    config.mesh = ml_collections.ConfigDict(
      {axis: placeholder(int) for axis in ("data", "fsdp", "tensor")}
    )
  # Another run's workdir whose newest policy is the reference (None: the
  # initial policy), or the policy's starting point (None: random init).
  config.reference_checkpoint = placeholder(str)
  config.init_checkpoint = placeholder(str)
  config.micro_batches = 1
  config.fsdp = False
  config.skip_nonfinite = False
  # Resuming a workdir under a config that computes something else is an
  # error unless this is True (the change is then recorded in the workdir).
  config.allow_config_change = False
  return config
