"""Pairwise preference losses on per-sequence log-probabilities.

Every loss is a pure function with the signature

    fn(policy_chosen_logps, policy_rejected_logps,
       ref_chosen_logps, ref_rejected_logps, *, tau, **options) -> [B]

taking four ``[B]`` arrays of (summed or length-averaged) log-probabilities of
the chosen (preferred, ``y_w``) and rejected (``y_l``) responses under the
policy ``π`` and the frozen reference ``π_ref``, and returning the UNREDUCED
per-pair loss ``[B]``. Reduction (mean, weighting) is the trainer's job.
Options are keyword-only parameters with defaults; ``loss_option_names``
reads them off the signature, which is how configs are checked.

Notation used throughout (Azar et al., arXiv:2310.12036):

    d_c = log π(y_w) − log π_ref(y_w)        (chosen log-ratio)
    d_r = log π(y_l) − log π_ref(y_l)        (rejected log-ratio)
    h   = d_c − d_r                           (h_π(y_w, y_l) of the paper)
    z   = τ · h
    ε   = label_smoothing

Maths is done in float32 whatever the input precision (float64 when the
inputs are float64 under ``jax_enable_x64``), with ``log σ`` evaluated by
``jax.nn.log_sigmoid`` so that margins of ±1e4 give finite values and
gradients. Promotion cannot recover precision lost upstream: summed
log-probs of about −1e3 held in bfloat16 are already off by several nats, so
compute log-probs in float32 before calling. ``tau`` and every numeric option
may be traced arrays (the sweep machinery vmaps over them): values are
checked only where they are concrete, and a new value never forces a
recompilation.

The registry ``LOSSES`` maps names to losses; ``register`` adds one (the
built-in losses are registered through it too), and a loss defined in a
user's own module is usable by name wherever a built-in one is once that
module is imported (``import_loss_module``, config key ``loss.module``).
``psipo_jax.testing.check_pairwise_loss`` runs the checks our own losses pass.

Where a loss differs from Hugging Face TRL's loss of the same name, its
docstring says how.

Examples:
  >>> import jax.numpy as jnp
  >>> from psipo_jax import losses
  >>> "ipo" in losses.LOSSES and "dpo" in losses.LOSSES
  True
  >>> # One pair at a tie (h = 0): DPO is −log σ(0) = log 2, IPO is 1/(2τ)².
  >>> logps = jnp.array([-1.0])
  >>> print(losses.get_loss("dpo")(logps, logps, logps, logps, tau=0.1))
  [0.6931472]
  >>> print(losses.get_loss("ipo")(logps, logps, logps, logps, tau=0.1))
  [25.]
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Array = jax.Array
LossFn = Callable[..., Array]

LOSSES: dict[str, LossFn] = {}
# Losses whose value does not depend on the reference log-probs; they accept
# ``None`` for both reference arguments.
REFERENCE_FREE: set[str] = set()
# Losses that couple the batch (they sort it): their outputs are in rank
# order, not aligned with the input pairs, so per-pair weights cannot apply.
BATCH_COUPLED: set[str] = set()
# Per-pair batch fields a loss reads besides the log-probs, by loss name:
# each is a keyword-only parameter of the loss, defaulting to None, that the
# trainer fills with the batch's ``[B]`` array of that name (and refuses to
# run, naming the field, when the data has none). They are not options.
BATCH_FIELDS: dict[str, tuple[str, ...]] = {}
# Keys of the ``loss`` config block that are not options of the loss
# function (the trainer reads them itself), so no option may take their name.
RESERVED_OPTION_NAMES = frozenset(
  {"name", "module", "tau", "normalize", "nll_weight"}
)
# Names registered by this module; set once its definitions have run.
_BUILTIN_LOSSES: frozenset[str] = frozenset()

_LOGPS_ARG_NAMES = (
  "policy_chosen_logps",
  "policy_rejected_logps",
  "ref_chosen_logps",
  "ref_rejected_logps",
)
_SIGNATURE = (
  "fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,"
  " ref_rejected_logps, *, tau, **options)"
)
_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# ---------------------------------------------------------------------------
# The registry.


def _describe(fn: Any) -> str:
  """``module.qualname`` of a function, for error messages."""
  qualname = getattr(fn, "__qualname__", None) or repr(fn)
  module = getattr(fn, "__module__", None)
  return f"{module}.{qualname}" if module else qualname


def _check_signature(
  fn: Any, *, reference_free: bool, batch_fields: tuple[str, ...] = ()
) -> tuple[str, ...]:
  """Raises TypeError unless ``fn`` has the loss signature; returns options.

  The rules: exactly the four log-prob parameters, positional, in order;
  ``tau`` keyword-only without a default (a default would hide the config's
  τ); every other parameter keyword-only with a default; no ``*args`` or
  ``**kwargs`` (options must be declared so that configs can be checked
  against them); the reference parameters default to None exactly when the
  loss is reference-free (the trainer then passes None); each declared batch
  field is a keyword-only parameter defaulting to None.
  """
  what = f"Loss function {_describe(fn)}"
  if not callable(fn):
    raise TypeError(f"{what} is not callable.")
  try:
    params = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError) as e:
    raise TypeError(f"{what}: its signature cannot be read ({e}).") from None
  kind = inspect.Parameter
  for p in params:
    if p.kind in (kind.VAR_POSITIONAL, kind.VAR_KEYWORD):
      star = "*" if p.kind is kind.VAR_POSITIONAL else "**"
      raise TypeError(
        f"{what} takes {star}{p.name}; declare each option as a"
        " keyword-only parameter with a default instead, so that configs"
        f" can be checked against it. Expected {_SIGNATURE}."
      )
  positional = [
    p
    for p in params
    if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)
  ]
  names = tuple(p.name for p in positional)
  if names != _LOGPS_ARG_NAMES:
    raise TypeError(
      f"{what} takes the positional parameters ({', '.join(names)}); a"
      f" loss takes exactly ({', '.join(_LOGPS_ARG_NAMES)}), in that"
      f" order. Expected {_SIGNATURE}."
    )
  for p in positional[:2]:
    if p.default is not kind.empty:
      raise TypeError(f"{what}: {p.name} must not have a default.")
  for p in positional[2:]:
    if reference_free and p.default is not None:
      raise TypeError(
        f"{what} is registered with reference_free=True, so {p.name} must"
        " default to None (the trainer passes None when there is no"
        " reference model)."
      )
    if not reference_free and p.default is not kind.empty:
      raise TypeError(
        f"{what}: {p.name} has a default, but only a reference-free loss"
        " (register(..., reference_free=True)) may be called without"
        " reference log-probs."
      )
  keyword_only = {p.name: p for p in params if p.kind is kind.KEYWORD_ONLY}
  tau = keyword_only.pop("tau", None)
  if tau is None:
    raise TypeError(
      f"{what} has no keyword-only parameter tau. Expected {_SIGNATURE}."
    )
  if tau.default is not kind.empty:
    raise TypeError(
      f"{what}: tau must not have a default (the config's loss.tau is"
      " always passed)."
    )
  for field in batch_fields:
    p = keyword_only.pop(field, None)
    if p is None or p.default is not None:
      raise TypeError(
        f"{what} declares the batch field {field!r}, so it must take a"
        f" keyword-only parameter {field}=None (the trainer passes the"
        " batch's array)."
      )
  for p in keyword_only.values():
    if p.default is kind.empty:
      raise TypeError(
        f"{what}: option {p.name} needs a default value (options are"
        " optional config keys loss.<option>)."
      )
    if p.name in RESERVED_OPTION_NAMES:
      raise TypeError(
        f"{what}: option {p.name} clashes with the config key"
        f" loss.{p.name}; rename it (reserved:"
        f" {', '.join(sorted(RESERVED_OPTION_NAMES))})."
      )
  return tuple(keyword_only)


def _same_definition(a: Any, b: Any) -> bool:
  # A module executed again (importlib.reload, a retried import) defines new
  # function objects with the same module and qualified name; replacing the
  # old one is what the user means.
  return getattr(a, "__module__", None) == getattr(
    b, "__module__", None
  ) and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None)


def register(
  name: str,
  *,
  reference_free: bool = False,
  batch_coupled: bool = False,
  batch_fields: tuple[str, ...] = (),
) -> Callable[[LossFn], LossFn]:
  """Decorator adding a loss to ``LOSSES`` under ``name``; returns it as is.

  The function must have the signature of every loss,
  ``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
  ref_rejected_logps, *, tau, **options) -> [B]``: the four log-prob
  parameters positional and in that order, ``tau`` keyword-only without a
  default, each option keyword-only with a default (and not named like a
  ``loss.*`` config key: see ``RESERVED_OPTION_NAMES``). Options are then
  config keys ``loss.<option>``, and numeric ones may be swept (traced).

  Args:
    name: the loss's name in configs (``loss.name``); a Python identifier not
      already taken by a built-in or registered loss.
    reference_free: the loss ignores the reference log-probs; its two
      reference parameters must default to None. Recorded in
      ``REFERENCE_FREE``, so the trainer needs no reference model.
    batch_coupled: the loss couples the pairs of a batch (e.g. sorts them),
      so its outputs are not aligned with the input pairs. Recorded in
      ``BATCH_COUPLED``; the trainer then refuses per-pair weights and
      micro-batching.
    batch_fields: names of per-pair ``[B]`` batch fields the loss reads
      besides the log-probs (e.g. ``("margin",)``, a reward difference);
      each must be a keyword-only parameter defaulting to None. Recorded in
      ``BATCH_FIELDS``; the trainer passes ``batch[field]`` and stops with
      an error naming the field when the data lacks it. Not config options.

  Returns:
    A decorator that validates and registers the function.

  Raises:
    ValueError: ``name`` is not an identifier or is taken (re-running the
      same definition, as a module reload does, replaces it instead).
    TypeError: the function's signature is not a loss signature; the message
      names the function and the offending parameter.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from psipo_jax import losses
    >>> @losses.register("sigmoid_margin")
    ... def sigmoid_margin(policy_chosen_logps, policy_rejected_logps,
    ...                    ref_chosen_logps, ref_rejected_logps, *, tau,
    ...                    margin=0.0):
    ...   h = ((policy_chosen_logps - ref_chosen_logps)
    ...        - (policy_rejected_logps - ref_rejected_logps))
    ...   return jax.nn.sigmoid(margin - tau * h)
    >>> losses.loss_option_names("sigmoid_margin")
    ('margin',)
    >>> logps = jnp.array([-1.0, -2.0])  # h = 0 for both pairs: σ(0) = 1/2
    >>> print(losses.get_loss("sigmoid_margin")(logps, logps, logps, logps,
    ...                                         tau=0.1))
    [0.5 0.5]
    >>> _ = losses.unregister("sigmoid_margin")
    >>> @losses.register("dpo")  # doctest: +ELLIPSIS
    ... def my_dpo(policy_chosen_logps, policy_rejected_logps,
    ...            ref_chosen_logps, ref_rejected_logps, *, tau):
    ...   ...
    Traceback (most recent call last):
    ValueError: Cannot register ...my_dpo as loss 'dpo': that name is taken by the built-in loss psipo_jax.losses.dpo. ...
  """
  if not isinstance(name, str) or not _NAME_PATTERN.match(name):
    raise ValueError(
      f"Loss name {name!r} must be a Python identifier (letters, digits and"
      " _, not starting with a digit): it is the config value loss.name."
    )
  for flag, value in (
    ("reference_free", reference_free),
    ("batch_coupled", batch_coupled),
  ):
    if not isinstance(value, bool):
      raise TypeError(
        f"register({name!r}): {flag} must be a bool, got {value!r}."
      )
  if isinstance(batch_fields, str) or not all(
    isinstance(f, str) and _NAME_PATTERN.match(f) for f in batch_fields
  ):
    raise TypeError(
      f"register({name!r}): batch_fields must be a tuple of identifiers,"
      f" got {batch_fields!r}."
    )
  batch_fields = tuple(batch_fields)

  def decorator(fn: LossFn) -> LossFn:
    existing = LOSSES.get(name)
    builtin = name in _BUILTIN_LOSSES
    if existing is not None and not (
      existing is fn or (not builtin and _same_definition(existing, fn))
    ):
      raise ValueError(
        f"Cannot register {_describe(fn)} as loss {name!r}: that name is"
        f" taken by the {'built-in' if builtin else 'registered'} loss"
        f" {_describe(existing)}. Choose another name"
        + ("." if builtin else ", or call losses.unregister first.")
      )
    _check_signature(
      fn, reference_free=reference_free, batch_fields=batch_fields
    )
    LOSSES[name] = fn
    if batch_fields:
      BATCH_FIELDS[name] = batch_fields
    else:
      BATCH_FIELDS.pop(name, None)
    for names, flag in (
      (REFERENCE_FREE, reference_free),
      (BATCH_COUPLED, batch_coupled),
    ):
      if flag:
        names.add(name)
      else:
        names.discard(name)
    return fn

  return decorator


def unregister(name: str) -> LossFn:
  """Removes a loss added by ``register`` and returns it (e.g. after a test).

  Raises:
    ValueError: ``name`` is a built-in loss, or not registered.
  """
  if name in _BUILTIN_LOSSES:
    raise ValueError(f"{name!r} is a built-in loss; it cannot be unregistered.")
  if name not in LOSSES:
    added = sorted(set(LOSSES) - _BUILTIN_LOSSES)
    raise ValueError(
      f"No registered loss {name!r}; losses added by register:"
      f" {', '.join(added) if added else 'none'}."
    )
  REFERENCE_FREE.discard(name)
  BATCH_COUPLED.discard(name)
  BATCH_FIELDS.pop(name, None)
  return LOSSES.pop(name)


def get_loss(name: str) -> LossFn:
  """Returns the registered loss called ``name``.

  Raises:
    ValueError: if ``name`` is not registered; the message lists every valid
      name, the ones added by ``register`` included.

  Examples:
    >>> import jax.numpy as jnp
    >>> from psipo_jax import losses
    >>> dpo = losses.get_loss("dpo")
    >>> # h = (−1 − −2) − (−3 − −2) = 2, τ = 0.5: −log σ(1) = log(1 + e⁻¹).
    >>> loss = dpo(jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]),
    ...            jnp.array([-2.0]), tau=0.5)
    >>> bool(jnp.allclose(loss, jnp.log1p(jnp.exp(-1.0))))
    True
    >>> losses.get_loss("ipp")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: Unknown loss 'ipp'; valid names: ... dpo, ... ipo, ...
  """
  try:
    return LOSSES[name]
  except (KeyError, TypeError):
    raise ValueError(
      f"Unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}."
      " A loss of your own is registered when its module is imported"
      " (config key loss.module)."
    ) from None


def loss_option_names(name: str) -> tuple[str, ...]:
  """Names of the keyword options (besides ``tau``) that loss ``name`` takes.

  Examples:
    >>> from psipo_jax import losses
    >>> losses.loss_option_names("cdpo"), losses.loss_option_names("ipo")
    (('label_smoothing',), ())
  """
  params = inspect.signature(get_loss(name)).parameters.values()
  fields = BATCH_FIELDS.get(name, ())
  return tuple(
    p.name
    for p in params
    if p.kind is inspect.Parameter.KEYWORD_ONLY
    and p.name != "tau"
    and p.name not in fields
  )


def import_loss_module(module: str) -> types.ModuleType:
  """Imports the module that registers a user's losses (``loss.module``).

  Call it in every process before the config is validated (trainer, bandit
  runner, sweep workers, every host of a multi-host run), so that the losses
  the module registers are known by name there too. Importing a module
  twice runs it once.

  Args:
    module: a dotted module name importable from ``sys.path`` (e.g.
      ``"my_project.my_losses"``), or the path of a ``.py`` file, imported as
      a module named after the file (which must be the same path on every
      host).

  Returns:
    The module.

  Raises:
    ValueError: naming ``loss.module`` when the module or file does not exist
      (or another module of that name is already imported). An error raised
      while the module runs (a bad registration, a missing dependency)
      propagates unchanged, with a note naming ``loss.module``.
  """
  key = f"loss.module={module!r}"
  if not isinstance(module, str) or not module:
    raise ValueError(f"{key}: expected a module name or a .py file path.")
  if module.endswith(".py") or os.sep in module:
    return _import_file(module, key)
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name is not None and (
      module == e.name or module.startswith(e.name + ".")
    ):
      raise ValueError(
        f"{key}: no module named {e.name!r}. Put the directory that holds"
        " it on PYTHONPATH (in every process), or give the path of a .py"
        " file."
      ) from None
    _add_note(e, key)
    raise
  except Exception as e:
    _add_note(e, key)
    raise


def _import_file(path: str, key: str) -> types.ModuleType:
  """Imports the ``.py`` file ``path`` as module ``<file stem>``."""
  full = os.path.realpath(path)
  if not os.path.isfile(full):
    raise ValueError(f"{key}: no such file {full!r}.")
  name = os.path.splitext(os.path.basename(full))[0]
  if not name.isidentifier():
    raise ValueError(
      f"{key}: the file name {name!r} is not a Python identifier, so it"
      " cannot name a module; rename the file."
    )
  loaded = sys.modules.get(name)
  if loaded is not None:
    loaded_file = getattr(loaded, "__file__", None)
    if loaded_file and os.path.realpath(loaded_file) == full:
      return loaded
    raise ValueError(
      f"{key}: a different module named {name!r} is already imported"
      f" (from {loaded_file}); rename the file."
    )
  spec = importlib.util.spec_from_file_location(name, full)
  loaded = importlib.util.module_from_spec(spec)
  # In sys.modules before it runs, as `import` does, so that its functions
  # can be found by module name (pickling, dataclasses).
  sys.modules[name] = loaded
  try:
    spec.loader.exec_module(loaded)
  except BaseException as e:
    del sys.modules[name]
    _add_note(e, key)
    raise
  return loaded


def _add_note(error: BaseException, key: str) -> None:
  if hasattr(error, "add_note"):  # Python 3.11+
    error.add_note(f"(while importing the loss module, {key})")


# ---------------------------------------------------------------------------
# Input checks. They run at trace time on static shapes and dtypes, and on
# values only where those are concrete (never on tracers).


def _concrete_value(x: ArrayLike) -> np.ndarray | None:
  """Returns ``x`` as a NumPy array, or None if it is a tracer."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _option(
  name: str,
  value: ArrayLike,
  dtype: Any,
  *,
  low: float = -np.inf,
  high: float = np.inf,
  low_inclusive: bool = False,
  high_inclusive: bool = False,
) -> Array:
  """Returns the scalar option ``value`` cast to ``dtype``, checked if concrete.

  The range is checked AFTER the cast, so a value that rounds onto an
  excluded bound in float32 (ε = 0.4999999999 for ``robust``, τ = 1e-50) is
  rejected rather than turned into ±inf. NaN fails every range.
  """
  if value is None or isinstance(value, (str, bytes)):
    raise ValueError(f"{name} must be a real number; got {value!r}.")
  try:
    cast = jnp.asarray(value, dtype)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a real number; got {value!r}.") from None
  if cast.ndim != 0:
    raise ValueError(f"{name} must be a scalar; got shape {cast.shape}.")
  concrete = _concrete_value(cast)
  if concrete is not None:
    ok_low = concrete >= low if low_inclusive else concrete > low
    ok_high = concrete <= high if high_inclusive else concrete < high
    if not (ok_low and ok_high):
      interval = (
        ("[" if low_inclusive else "(")
        + f"{low}, {high}"
        + ("]" if high_inclusive else ")")
      )
      raise ValueError(
        f"{name} must lie in {interval} (in {jnp.dtype(dtype).name});"
        f" got {value}."
      )
  return cast


def _tau(tau: ArrayLike, dtype: Any) -> Array:
  return _option("tau", tau, dtype, low=0.0)


def _label_smoothing(
  value: ArrayLike,
  dtype: Any,
  *,
  high: float = 1.0,
  open_interval: bool = False,
  high_inclusive: bool = True,
) -> Array:
  return _option(
    "label_smoothing",
    value,
    dtype,
    low=0.0,
    high=high,
    low_inclusive=not open_interval,
    high_inclusive=high_inclusive and not open_interval,
  )


def _compute_dtype(dtype: Any) -> Any:
  # bfloat16/float16 inputs are promoted: half-precision log σ of large
  # margins loses every digit (a known NaN source in peer implementations).
  return jnp.promote_types(dtype, jnp.float32)


def _as_logps(
  arrays: tuple[ArrayLike | None, ...], names: tuple[str, ...]
) -> tuple[Array, ...]:
  """Validates equal-shape floating ``[B]`` inputs and casts them up."""
  out = []
  for name, x in zip(names, arrays):
    if x is None:
      raise ValueError(
        f"{name} is None, but this loss needs it (only"
        f" {sorted(REFERENCE_FREE)} are reference-free)."
      )
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(
        f"{name} must be a floating-point array of log-probs; got dtype"
        f" {x.dtype}."
      )
    if x.ndim != 1:
      raise ValueError(f"{name} must have shape [B]; got shape {x.shape}.")
    out.append(x)
  shapes = {name: x.shape for name, x in zip(names, out)}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"log-prob arrays must share one shape [B]; got {shapes}.")
  dtype = _compute_dtype(jnp.result_type(*out))
  return tuple(x.astype(dtype) for x in out)


def log_ratios(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
) -> tuple[Array, Array]:
  """The log-ratios (d_c, d_r), each ``[B]``, of validated inputs.

  The first line of a loss of one's own: it checks the four inputs (floating
  ``[B]`` arrays of one shape, none None; errors name the argument) and
  computes in float32, or float64 for float64 inputs, as every built-in loss
  does.

  Returns:
    ``(d_c, d_r)`` with ``d_c = policy_chosen_logps − ref_chosen_logps`` and
    ``d_r = policy_rejected_logps − ref_rejected_logps``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from psipo_jax import losses
    >>> half = jnp.array([-1.0, -3.0], jnp.bfloat16)
    >>> d_c, d_r = losses.log_ratios(half, half, half - 1, half + 1)
    >>> d_c, d_r
    (Array([1., 1.], dtype=float32), Array([-1., -1.], dtype=float32))
  """
  pc, pr, rc, rr = _as_logps(
    (
      policy_chosen_logps,
      policy_rejected_logps,
      ref_chosen_logps,
      ref_rejected_logps,
    ),
    _LOGPS_ARG_NAMES,
  )
  return pc - rc, pr - rr


def _log_ratios_tau(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  tau: ArrayLike,
) -> tuple[Array, Array, Array]:
  """Returns (d_c ``[B]``, d_r ``[B]``, τ), validated, in the compute dtype."""
  d_c, d_r = log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  return d_c, d_r, _tau(tau, d_c.dtype)


def _margin(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  tau: ArrayLike,
) -> Array:
  """Returns z = τ·h ``[B]``, validated, in the compute dtype."""
  d_c, d_r, tau = _log_ratios_tau(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau,
  )
  return tau * (d_c - d_r)


def _cdpo_of_logits(z: Array, label_smoothing: ArrayLike) -> Array:
  """−(1−ε) log σ(z) − ε log σ(−z), elementwise."""
  eps = _label_smoothing(label_smoothing, z.dtype)
  return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


# ---------------------------------------------------------------------------
# ΨPO losses of Azar et al.


@register("ipo")
def ipo(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
) -> Array:
  r"""Identity-preference optimisation (IPO), the sampled loss.

  Shapes: four ``[batch]`` inputs, ``[batch]`` output.

  .. math::
    \ell = \bigl(h - \tfrac{1}{2\tau}\bigr)^2

  with h = (π_c − π_ref,c) − (π_r − π_ref,r) in log space. τ is NOT multiplied
  into h; the regression target is 1/(2τ). This is the symmetrised form of
  ½[(h − 1/τ)² + h²] (both orderings of each pair) up to a constant.

  The paper's h uses plain (summed) sequence log-probs; TRL's
  ``loss_type="ipo"`` averages them over response tokens first. Use
  ``normalize="mean"`` in the trainer to match TRL: with summed log-probs the
  same τ sets a very different target.

  Args:
    policy_chosen_logps: ``[batch]`` log π(y_w).
    policy_rejected_logps: ``[batch]`` log π(y_l).
    ref_chosen_logps: ``[batch]`` log π_ref(y_w).
    ref_rejected_logps: ``[batch]`` log π_ref(y_l).
    tau: regularisation strength τ > 0 (scalar, may be traced).

  Returns:
    ``[batch]`` per-pair losses.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from psipo_jax import losses
    >>> # Pair 1: h = (−1 − −1.5) − (−2 − −1.5) = 1 = 1/(2τ), on target: 0.
    >>> # Pair 2: h = −1, (−1 − 1)² = 4.
    >>> losses.ipo(jnp.array([-1.0, -2.0]), jnp.array([-2.0, -1.0]),
    ...            jnp.array([-1.5, -1.5]), jnp.array([-1.5, -1.5]), tau=0.5)
    Array([0., 4.], dtype=float32)
    >>> # dℓ/dh = 2(h − 1/(2τ)): at h = 3, τ = 0.25 it is 2(3 − 2) = 2.
    >>> zero = jnp.zeros(1)
    >>> jax.grad(lambda pc: losses.ipo(pc, zero, zero, zero, tau=0.25).sum())(
    ...     jnp.array([3.0]))
    Array([2.], dtype=float32)

  References:
    Azar et al., arXiv:2310.12036, Eq. 17 and Algorithm 1.
  """
  d_c, d_r, tau = _log_ratios_tau(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau,
  )
  return jnp.square(d_c - d_r - 0.5 / tau)


@register("dpo")
def dpo(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
) -> Array:
  r"""Direct preference optimisation: −log σ(τ h).

  Shapes: four ``[batch]`` inputs, ``[batch]`` output.

  .. math::
    \ell = -\log \sigma(\tau h)

  The ΨPO loss with Ψ = logit under Bradley–Terry (Azar et al. Prop. 1). τ is
  TRL's ``beta`` and multiplies h once. Arguments and result as in
  :func:`ipo`.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from psipo_jax import losses
    >>> # h = (0 − 0) − (−2 − 0) = 2 and τ = 0.5, so z = τh = 1 (τ applied
    >>> # once, not twice): −log σ(1) = log(1 + e⁻¹) ≈ 0.3133.
    >>> loss = losses.dpo(jnp.array([0.0]), jnp.array([-2.0]),
    ...                   jnp.array([0.0]), jnp.array([0.0]), tau=0.5)
    >>> bool(jnp.allclose(loss, jnp.log1p(jnp.exp(-1.0)))), loss.shape
    (True, (1,))
    >>> # dℓ/dh = −τ σ(−τh): at h = 0 it is −τ/2.
    >>> zero = jnp.zeros(1)
    >>> jax.grad(lambda pc: losses.dpo(pc, zero, zero, zero, tau=0.5).sum())(
    ...     zero)
    Array([-0.25], dtype=float32)

  References:
    Rafailov et al., arXiv:2305.18290, Eq. 7; Azar et al., arXiv:2310.12036,
    Eq. 4.
  """
  z = _margin(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau,
  )
  return -jax.nn.log_sigmoid(z)


@register("cdpo")
def cdpo(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
  label_smoothing: ArrayLike = 0.0,
) -> Array:
  r"""Conservative DPO: DPO with labels flipped with probability ε.

  Shapes: four ``[batch]`` inputs, ``[batch]`` output.

  .. math::
    \ell = -(1-\varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z),
    \quad z = \tau h

  Args:
    label_smoothing: ε ∈ [0, 1]; ε = 0 is DPO. TRL documents [0, 1/2]; past
      1/2 the loss prefers the rejected response.

  Examples:
    >>> import jax.numpy as jnp
    >>> from psipo_jax import losses
    >>> pc, pr = jnp.array([-1.0, -1.0]), jnp.array([-1.0, -9.0])
    >>> ref = jnp.array([-1.0, -1.0])  # pair 1 is a tie (h = 0), pair 2 h = 8
    >>> loss = losses.cdpo(pc, pr, ref, ref, tau=0.3, label_smoothing=0.2)
    >>> bool(jnp.isclose(loss[0], jnp.log(2.0)))  # log 2 at a tie, any ε
    True
    >>> # −0.8 log σ(2.4) − 0.2 log σ(−2.4):
    >>> bool(jnp.isclose(loss[1], 0.8 * jnp.log1p(jnp.exp(-2.4))
    ...                  + 0.2 * jnp.log1p(jnp.exp(2.4))))
    True
    >>> bool(jnp.allclose(losses.cdpo(pc, pr, ref, ref, tau=0.3),  # ε = 0
    ...                   losses.dpo(pc, pr, ref, ref, tau=0.3)))
    True

  References:
    Mitchell, "A note on DPO with noisy preferences" (2023); TRL
    ``loss_type="sigmoid"`` with ``label_smoothing``.
  """
  z = _margin(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau,
  )
  return _cdpo_of_logits(z, label_smoothing)


@register("robust")
def robust(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
  label_smoothing: ArrayLike = 0.0,
) -> Array:
  r"""Robust DPO: an unbiased DPO loss under label noise of rate ε.

  Shapes: four ``[batch]`` inputs, ``[batch]`` output.

  .. math::
    \ell = \frac{-(1-\varepsilon)\log\sigma(z) + \varepsilon\log\sigma(-z)}
                {1 - 2\varepsilon}

  Unbounded below as z → +∞ (the ε·log σ(−z) term), as in TRL.

  Args:
    label_smoothing: ε ∈ [0, 1/2).

  References:
    Chowdhury et al., "Provably Robust DPO", arXiv:2403.00409, Eq. 7.
  """
  z = _margin(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau,
  )
  eps = _label_smoothing(
    label_smoothing, z.dtype, high=0.5, high_inclusive=False
  )
  return (
    -(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)
  ) / (1.0 - 2.0 * eps)


@register("hinge")
def hinge(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
) -> Array:
  r"""SLiC hinge loss: max(0, 1 − τ h).

  Shapes: four ``[batch]`` inputs, ``[batch]`` output.

  References:
    Zhao et al., "SLiC-HF", arXiv:2305.10425, Eq. 1 (margin δ = 1/τ).
  """
  z = _margin(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau,
  )
  return jax.nn.relu(1.0 - z)


@register("exo_pair")
def exo_pair(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
  label_smoothing: ArrayLike = 1e-3,
) -> Array:
  r"""EXO (pairwise): reverse KL between the policy's and the labels' odds.

  Shapes: four ``[batch]`` inputs, ``[batch]`` output.

  .. math::
    \ell = \sigma(z)\bigl[\log\sigma(z) - \log(1-\varepsilon)\bigr]
         + \sigma(-z)\bigl[\log\sigma(-z) - \log\varepsilon\bigr]

  Args:
    label_smoothing: ε ∈ (0, 1), the smoothed label of the rejected response
      (default 1e-3). TRL silently replaces its ε = 0 default by 1e-3; here
      ε = 0 is an error, since log ε is infinite.

  References:
    Ji et al., "Towards Efficient Exact Optimization of Language Model
    Alignment", arXiv:2402.00856, Eq. 9 (K = 2).
  """
  z = _margin(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau,
  )
  eps = _label_smoothing(label_smoothing, z.dtype, open_interval=True)
  log_p, log_q = jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)
  # σ(z) = exp(log σ(z)): at z = −1e4 the term is 0 · (−1e4 − log(1 − ε)),
  # exactly 0 and not 0 · inf.
  return jnp.exp(log_p) * (log_p - jnp.log1p(-eps)) + jnp.exp(log_q) * (
    log_q - jnp.log(eps)
  )


@register("nca_pair")
def nca_pair(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
) -> Array:
  r"""NCA (pairwise): noise-contrastive alignment on absolute rewards.

  Shapes: four ``[batch]`` inputs, ``[batch]`` output.

  .. math::
    \ell = -\log\sigma(\tau d_c) - \tfrac12\log\sigma(-\tau d_c)
           - \tfrac12\log\sigma(-\tau d_r)

  References:
    Chen et al., "Noise Contrastive Alignment of Language Models with
    Explicit Rewards", arXiv:2402.05369, Eq. 11 (K = 2).
  """
  d_c, d_r, tau = _log_ratios_tau(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau,
  )
  return (
    -jax.nn.log_sigmoid(tau * d_c)
    - 0.5 * jax.nn.log_sigmoid(-tau * d_c)
    - 0.5 * jax.nn.log_sigmoid(-tau * d_r)
  )


@register("bco_pair")
def bco_pair(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
) -> Array:
  r"""BCO (pairwise): binary classification of chosen vs rejected rewards.

  Shapes: four ``[batch]`` inputs, ``[batch]`` output.

  .. math::
    \ell = -\log\sigma(\tau d_c) - \log\sigma(-\tau d_r)

  The reward-shift δ of the paper (a running mean, which TRL subtracts from
  both rewards) is omitted: it is state that belongs to a trainer, not to a
  pure kernel. TRL's value is reproduced by adding δ/τ to both reference
  log-probs.

  References:
    Jung et al., "Binary Classifier Optimization for Large Language Model
    Alignment", arXiv:2404.04656, Eq. 9 with δ = 0.
  """
  d_c, d_r, tau = _log_ratios_tau(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau,
  )
  return -jax.nn.log_sigmoid(tau * d_c) - jax.nn.log_sigmoid(-tau * d_r)


@register("sppo_hard")
def sppo_hard(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
) -> Array:
  r"""SPPO with hard labels: regress each log-ratio on ±1/(2τ).

  Shapes: four ``[batch]`` inputs, ``[batch]`` output.

  .. math::
    \ell = \bigl(d_c - \tfrac{1}{2\tau}\bigr)^2
         + \bigl(d_r + \tfrac{1}{2\tau}\bigr)^2

  References:
    Wu et al., "Self-Play Preference Optimization", arXiv:2405.00675, Eq. 4.4
    with the win probabilities replaced by hard labels 1 and 0.
  """
  d_c, d_r, tau = _log_ratios_tau(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau,
  )
  target = 0.5 / tau
  return jnp.square(d_c - target) + jnp.square(d_r + target)


@register("apo_zero")
def apo_zero(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
) -> Array:
  r"""APO-zero: raise the chosen likelihood, lower the rejected one.

  Shapes: four ``[batch]`` inputs, ``[batch]`` output.

  .. math::
    \ell = 1 - \sigma(\tau d_c) + \sigma(\tau d_r)

  For when the chosen responses are better than the policy's own outputs.

  References:
    D'Oosterlinck et al., "Anchored Preference Optimization",
    arXiv:2408.06266, Eq. 7.
  """
  d_c, d_r, tau = _log_ratios_tau(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau,
  )
  return 1.0 - jax.nn.sigmoid(tau * d_c) + jax.nn.sigmoid(tau * d_r)


@register("apo_down")
def apo_down(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
) -> Array:
  r"""APO-down: lower both likelihoods, the rejected one more.

  Shapes: four ``[batch]`` inputs, ``[batch]`` output.

  .. math::
    \ell = \sigma(\tau d_c) + 1 - \sigma(\tau h)

  For when the policy's own outputs are better than the chosen responses.

  References:
    D'Oosterlinck et al., "Anchored Preference Optimization",
    arXiv:2408.06266, Eq. 8.
  """
  d_c, d_r, tau = _log_ratios_tau(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau,
  )
  return jax.nn.sigmoid(tau * d_c) + 1.0 - jax.nn.sigmoid(tau * (d_c - d_r))


@register("discopop")
def discopop(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
  discopop_tau: ArrayLike = 0.05,
) -> Array:
  r"""DiscoPOP: the log-ratio modulated loss found by LLM-driven discovery.

  Shapes: four ``[batch]`` inputs, ``[batch]`` output.

  .. math::
    m = \sigma(z / t), \quad
    \ell = (1 - m)\,(-\log\sigma(z)) + m\,e^{-z}

  Args:
    discopop_tau: the temperature t > 0 of the mixing weight (default 0.05).

  References:
    Chris Lu et al., "Discovering Preference Optimization Algorithms with
    and for Large Language Models", arXiv:2406.08414, Eq. 5.
  """
  z = _margin(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau,
  )
  t = _option("discopop_tau", discopop_tau, z.dtype, low=0.0)
  # 1 − σ(z/t) = σ(−z/t), and m·e^{−z} = exp(log σ(z/t) − z): for very
  # negative z, m underflows while e^{−z} overflows; their product does not.
  return jax.nn.sigmoid(-z / t) * (-jax.nn.log_sigmoid(z)) + jnp.exp(
    jax.nn.log_sigmoid(z / t) - z
  )


def _aot(
  gap_a: Array, gap_b: Array, tau: ArrayLike, label_smoothing: ArrayLike
) -> Array:
  """cDPO on τ·(sort(gap_a) − sort(gap_b)), both sorted ascending over B."""
  delta = jnp.sort(gap_a) - jnp.sort(gap_b)  # [B], rank-paired
  return _cdpo_of_logits(_tau(tau, delta.dtype) * delta, label_smoothing)


@register("aot", batch_coupled=True)
def aot(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
  label_smoothing: ArrayLike = 0.0,
) -> Array:
  r"""Alignment via optimal transport (paired).

  Shapes: four ``[batch]`` inputs, ``[batch]`` output. The output is in the
  order of the sorted gaps, NOT aligned with the input pairs, so per-pair
  weights do not apply; only its mean is meaningful.

  .. math::
    \delta_k = \mathrm{sort}(\pi_c - \pi_r)_k
             - \mathrm{sort}(\pi_{ref,c} - \pi_{ref,r})_k, \quad
    \ell_k = \mathrm{cDPO}_\varepsilon(\tau\,\delta_k)

  The policy's margin distribution is made to dominate the reference's
  (first-order stochastic dominance) by matching quantiles. The sort runs
  over the batch passed in (with gradient accumulation, over each
  micro-batch; TRL sorts per device); with B = 1 this is cDPO. Drop padded
  pairs before the call. Same as TRL's ``loss_type="aot"``.

  References:
    Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal
    Transport", arXiv:2406.05882.
  """
  pc, pr, rc, rr = _as_logps(
    (
      policy_chosen_logps,
      policy_rejected_logps,
      ref_chosen_logps,
      ref_rejected_logps,
    ),
    _LOGPS_ARG_NAMES,
  )
  return _aot(pc - pr, rc - rr, tau, label_smoothing)


@register("aot_unpaired", batch_coupled=True)
def aot_unpaired(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
  label_smoothing: ArrayLike = 0.0,
) -> Array:
  r"""Alignment via optimal transport (unpaired).

  Shapes: four ``[batch]`` inputs, ``[batch]`` output, in sorted order (see
  :func:`aot`).

  .. math::
    \delta_k = \mathrm{sort}(d_c)_k - \mathrm{sort}(d_r)_k, \quad
    \ell_k = \mathrm{cDPO}_\varepsilon(\tau\,\delta_k)

  The chosen log-ratio distribution is made to dominate the rejected one,
  which does not need the responses to be paired. TRL calls this loss
  ``"aot_pair"``.

  References:
    Melnyk et al., arXiv:2406.05882 (the unpaired setting).
  """
  pc, pr, rc, rr = _as_logps(
    (
      policy_chosen_logps,
      policy_rejected_logps,
      ref_chosen_logps,
      ref_rejected_logps,
    ),
    _LOGPS_ARG_NAMES,
  )
  return _aot(pc - rc, pr - rr, tau, label_smoothing)


# ---------------------------------------------------------------------------
# Convex-surrogate (GPO) family: f(τ·h) for a convex f (Tang et al. 2024).


@register("exponential")
def exponential(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
) -> Array:
  r"""GPO exponential loss: e^{−τh}.

  Shapes: four ``[batch]`` inputs, ``[batch]`` output.

  Unbounded: for τh below about −88 (float32) or −709 (float64) the true
  value is not representable and the result is +inf, never NaN; the trainer's
  non-finite check stops or skips such a step.

  References:
    Tang et al., "Generalized Preference Optimization", arXiv:2402.05749,
    Table 1.
  """
  z = _margin(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau,
  )
  return jnp.exp(-z)


@register("truncated_quadratic")
def truncated_quadratic(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
) -> Array:
  r"""GPO truncated quadratic loss: max(0, 1 − τh)².

  Shapes: four ``[batch]`` inputs, ``[batch]`` output.

  References:
    Tang et al., arXiv:2402.05749, Table 1.
  """
  z = _margin(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau,
  )
  return jnp.square(jax.nn.relu(1.0 - z))


@register("savage")
def savage(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
) -> Array:
  r"""GPO Savage loss: 1 / (1 + e^{τh})² = σ(−τh)².

  Shapes: four ``[batch]`` inputs, ``[batch]`` output.

  References:
    Tang et al., arXiv:2402.05749, Table 1; Masnadi-Shirazi & Vasconcelos
    (2008).
  """
  z = _margin(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau,
  )
  return jnp.square(jax.nn.sigmoid(-z))


# ---------------------------------------------------------------------------
# Losses that read a per-pair batch field besides the log-probs.


@register("rebel", batch_fields=("margin",))
def rebel(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  tau: ArrayLike,
  margin: ArrayLike | None = None,
) -> Array:
  r"""REBEL: regress τ·h onto the pair's reward difference.

  Shapes: four ``[batch]`` log-prob inputs and ``margin`` ``[batch]``,
  ``[batch]`` output.

  .. math::
    \ell = \bigl(\tau h - (r(x, y_w) - r(x, y_l))\bigr)^2

  REBEL's step size η is 1/τ (its loss is ((1/η)·h − Δr)², the reference
  taking π_old's place offline): the minimiser of the population loss over
  pairs from a μ with full support is π ∝ π_ref · exp(r/τ), the KL-regularised
  optimum at strength τ. The reward difference Δr = r(x, y_w) − r(x, y_l)
  is the batch field ``margin`` (the data pipeline's per-pair ``margin``,
  kept when the files give one or give each response's reward,
  ``chosen_reward`` and ``rejected_reward``; the trainer refuses data
  without it, and the pipeline files in which only some records give it).

  Relation to IPO, as far as the algebra goes: for a constant Δr = 1/2,
  ℓ = (τh − 1/2)² = τ² (h − 1/(2τ))², which is τ² times IPO's sampled loss
  (Azar et al. Eq. 17). So IPO is REBEL with every reward difference set to
  1/2, up to the constant factor τ²: the same minimisers, REBEL's gradients
  τ² times IPO's. Beyond that the algebra says nothing: IPO's 1/(2τ) comes
  from its sampled labels (the midpoint of the targets 1/τ and 0 of a pair's
  two orderings, Eq. 16), REBEL's Δr from a reward given with the pair.

  Args:
    policy_chosen_logps: ``[batch]`` log π(y_w).
    policy_rejected_logps: ``[batch]`` log π(y_l).
    ref_chosen_logps: ``[batch]`` log π_ref(y_w).
    ref_rejected_logps: ``[batch]`` log π_ref(y_l).
    tau: τ = 1/η > 0 (scalar, may be traced).
    margin: ``[batch]`` reward differences r(x, y_w) − r(x, y_l), finite
      (concrete values are checked). Required: None is an error.

  Returns:
    ``[batch]`` per-pair losses.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from psipo_jax import losses
    >>> # h = (−1 − −2) − (−3 − −2) = 2, τ = 0.5: τh = 1; Δr = 0.25.
    >>> pc, pr = jnp.array([-1.0]), jnp.array([-3.0])
    >>> ref = jnp.array([-2.0])
    >>> losses.rebel(pc, pr, ref, ref, tau=0.5, margin=jnp.array([0.25]))
    Array([0.5625], dtype=float32)
    >>> # dℓ/dh = 2τ(τh − Δr) = 2 · 0.5 · 0.75.
    >>> jax.grad(lambda pc: losses.rebel(pc, pr, ref, ref, tau=0.5,
    ...                                  margin=jnp.array([0.25])).sum())(pc)
    Array([0.75], dtype=float32)

  References:
    Gao et al., "REBEL: Reinforcement Learning via Regressing Relative
    Rewards", arXiv:2404.16767, Eq. 2 (π_old = π_ref).
  """
  z = _margin(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau,
  )
  reward_difference = _batch_field("rebel", "margin", margin, z)
  return jnp.square(z - reward_difference)


def _batch_field(loss: str, name: str, value: ArrayLike | None, like: Array):
  """The ``[B]`` batch field ``name`` as floats of ``like``'s dtype, checked."""
  if value is None:
    raise ValueError(
      f"loss {loss!r} needs the per-pair batch field {name!r}; the batch has"
      " none (give it in the data files)."
    )
  value = jnp.asarray(value)
  if not jnp.issubdtype(value.dtype, jnp.number) or jnp.issubdtype(
    value.dtype, jnp.complexfloating
  ):
    raise ValueError(f"{name} must be a real array; got dtype {value.dtype}.")
  if value.shape != like.shape:
    raise ValueError(
      f"{name} must have the log-probs' shape {like.shape}; got {value.shape}."
    )
  concrete = _concrete_value(value)
  if concrete is not None and not np.all(np.isfinite(concrete)):
    raise ValueError(f"{name} must be finite; got {concrete}.")
  return value.astype(like.dtype)


# ---------------------------------------------------------------------------
# Reference-free losses. The reference arguments are accepted (and may be
# None) so that every registered loss has one signature.


def _policy_logps(
  policy_chosen_logps: ArrayLike, policy_rejected_logps: ArrayLike
) -> tuple[Array, Array]:
  return _as_logps(
    (policy_chosen_logps, policy_rejected_logps), _LOGPS_ARG_NAMES[:2]
  )


@register("simpo", reference_free=True)
def simpo(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike | None = None,
  ref_rejected_logps: ArrayLike | None = None,
  *,
  tau: ArrayLike,
  gamma: ArrayLike = 0.5,
) -> Array:
  r"""SimPO: a reference-free margin loss on length-averaged log-probs.

  Shapes: two ``[batch]`` policy inputs (reference inputs ignored),
  ``[batch]`` output.

  .. math::
    \ell = -\log\sigma\bigl(\tau(\pi_c - \pi_r) - \gamma\bigr)

  Meant for ``normalize="mean"`` log-probs (τ is SimPO's β).

  Args:
    gamma: the target reward margin γ itself (default 0.5, as TRL's
      ``simpo_gamma``); SimPO's own code sets ``gamma_beta_ratio`` = γ/β.

  Examples:
    >>> import jax.numpy as jnp
    >>> from psipo_jax import losses
    >>> # τ(π_c − π_r) = 2 · (−1 − −1.25) = 0.5 = γ: −log σ(0) = log 2.
    >>> loss = losses.simpo(jnp.array([-1.0]), jnp.array([-1.25]), tau=2.0)
    >>> bool(jnp.allclose(loss, jnp.log(2.0)))
    True

  References:
    Meng et al., "SimPO", arXiv:2405.14734, Eq. 6.
  """
  del ref_chosen_logps, ref_rejected_logps  # Reference-free.
  pc, pr = _policy_logps(policy_chosen_logps, policy_rejected_logps)
  return -jax.nn.log_sigmoid(
    _tau(tau, pc.dtype) * (pc - pr) - _option("gamma", gamma, pc.dtype)
  )


def _log_odds(logp: Array) -> Array:
  """log(p / (1 − p)) from log p < 0, via log(1 − e^{log p}) = log(−expm1)."""
  # Under jit the `< 0` check cannot run, and float32 log_softmax returns
  # exactly 0 for a very confident response; clamping to −tiny keeps the
  # gradient finite there and changes no value below −tiny.
  logp = jnp.minimum(logp, -jnp.finfo(logp.dtype).tiny)
  return logp - jnp.log(-jnp.expm1(logp))


@register("orpo", reference_free=True)
def orpo(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike | None = None,
  ref_rejected_logps: ArrayLike | None = None,
  *,
  tau: ArrayLike,
) -> Array:
  r"""ORPO's odds-ratio term (the SFT term is added by the trainer).

  Shapes: two ``[batch]`` policy inputs (reference inputs ignored),
  ``[batch]`` output.

  .. math::
    \ell = -\tau \log\sigma\bigl(\mathrm{lo}(\pi_c) - \mathrm{lo}(\pi_r)\bigr),
    \quad \mathrm{lo}(p) = p - \log(1 - e^{p})

  Inputs are length-averaged log-probs, which must be < 0 (a probability of
  one has infinite odds): concrete inputs ≥ 0 raise; traced ones are clamped
  to −tiny so that a log-prob of exactly 0 from a float32 log-softmax keeps a
  finite gradient. τ plays ORPO's λ (TRL's ``beta``).

  References:
    Hong et al., "ORPO: Monolithic Preference Optimization without Reference
    Model", arXiv:2403.07691, Eq. 6-7.
  """
  del ref_chosen_logps, ref_rejected_logps  # Reference-free.
  pc, pr = _policy_logps(policy_chosen_logps, policy_rejected_logps)
  for name, x in zip(_LOGPS_ARG_NAMES[:2], (pc, pr)):
    concrete = _concrete_value(x)
    if concrete is not None and not np.all(concrete < 0):
      raise ValueError(
        f"orpo needs {name} < 0 (mean log-probs of a response); got"
        f" max {concrete.max()}."
      )
  return -_tau(tau, pc.dtype) * jax.nn.log_sigmoid(
    _log_odds(pc) - _log_odds(pr)
  )


_BUILTIN_LOSSES = frozenset(LOSSES)
