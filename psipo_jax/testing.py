"""Checks that a pairwise loss behaves as every built-in loss does.

For a researcher's own pytest file: ``check_pairwise_loss`` runs, on a loss
function or a registered loss name, the battery of properties that
``tests/losses_test.py`` runs on our 19 losses, and raises
``LossPropertyError`` (an ``AssertionError``) naming the property and the
inputs that broke it. What it cannot know, the caller gives: the options to
test with, the closed-form derivative in h, which shift invariances the loss
claims. Golden values of the loss itself belong in the caller's test,
computed from an independent formula (NumPy).

  from psipo_jax import testing
  import my_losses  # registers "my_loss"

  def test_my_loss():
    testing.check_pairwise_loss(
        "my_loss", options={"margin": 0.3}, shift_invariance=("pair",),
        dloss_dh=lambda h, *, tau, margin: ...)

The properties, in the order they are checked (names as in ``PROPERTIES``):

* ``signature``: the registered-loss signature (``losses.register``'s rules),
  and the given options are options of the loss.
* ``shape``: the output is ``[B]`` for B = 1, 3, 8 (unreduced: no mean).
* ``unreduced``: each pair's loss is the same alone as inside the batch (not
  for ``batch_coupled`` losses, whose outputs are in rank order).
* ``jit_equals_eager``: ``jax.jit`` gives the eager values.
* ``traced_tau_and_options``: τ and the float options may be traced: under
  ``jit`` three values of (τ, options) trace once
  (``chex.assert_max_traces``) and match eager; ``vmap`` over a grid of them
  matches a loop, again without retracing.
* ``float32_maths``: float32 output for float32, bfloat16 and float16 inputs;
  no half-precision operation anywhere in the computation (its jaxpr);
  half-precision inputs give the float32 values of the rounded inputs, at
  every τ; float32 agrees with float64 (which float64 inputs give under
  x64) on random and extreme inputs.
* ``finite_at_extremes``: finite values and gradients, float32 and float64,
  for log-probs down to −2e4, margins |h| up to 3e4, ties (h = 0, also with
  extreme log-ratios), at every τ in ``taus`` (1e-3 … 1e3). With
  ``allow_inf`` (a loss unbounded above, like ``exponential``) values may be
  +inf and gradients infinite where |τh| > 50, but nothing may be NaN.
* ``check_grads``: ``jax.test_util.check_grads`` to order 2 in float64.
* ``shift_invariance``: unchanged when a constant is added to log-probs, in
  each of the ways listed in ``shift_invariance`` (``SHIFT_KINDS``):
  ``"all"``, the same constant added to all four; ``"log_ratio"``, added to
  a response's policy and reference log-probs together (the chosen pair, then
  the rejected pair), so the loss is a function of d_c and d_r; ``"pair"``,
  added to both responses' policy log-probs (and, separately, to both
  reference log-probs), so the loss is a function of h.
* ``reference_free``: the reference arguments may be None and are ignored.
* ``dloss_dh``: autodiff matches the caller's closed-form dℓ/dh:
  ∂ℓ/∂policy_chosen_logps = ∂ℓ/∂ref_rejected_logps = dℓ/dh and the other two
  are −dℓ/dh, in float64 at every τ in ``taus`` where |τh| ≤ 50 (beyond,
  a NumPy closed form may overflow); for a reference-free loss h = π_c − π_r
  and only the policy gradients are compared.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from psipo_jax import losses

PROPERTIES = (
  "signature",
  "shape",
  "unreduced",
  "jit_equals_eager",
  "traced_tau_and_options",
  "float32_maths",
  "finite_at_extremes",
  "check_grads",
  "shift_invariance",
  "reference_free",
  "dloss_dh",
)
SHIFT_KINDS = ("all", "log_ratio", "pair")
DEFAULT_TAUS = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3)

_ARG_NAMES = losses._LOGPS_ARG_NAMES  # pylint: disable=protected-access
_HALF = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
# Beyond this |τh| a loss with allow_inf may overflow.
_REPRESENTABLE_MARGIN = 50.0
_SHIFT = -3.7
# Distinct names keep chex's trace counters (keyed by stack and function
# name) apart between calls, without clearing anyone else's counters.
_TRACE_IDS = itertools.count()
# Suffixes of the temporary names of unregistered losses in bandit_optimum.
_TEMPORARY_IDS = itertools.count()


class LossPropertyError(AssertionError):
  """A loss failed a property of ``check_pairwise_loss``.

  Attributes:
    property: the name of the failed property (one of ``PROPERTIES``).
  """

  def __init__(self, message: str, prop: str | None = None):
    super().__init__(message)
    self.property = prop

  def __reduce__(self):
    return type(self), (str(self), self.property)


def random_logps(
  seed: int, batch: int = 16, scale: float = 3.0
) -> tuple[np.ndarray, ...]:
  """Four ``[batch]`` float64 arrays of log-probs, all ≤ −0.05 (seeded)."""
  rng = np.random.default_rng(seed)
  return tuple(-np.abs(rng.normal(size=batch) * scale) - 0.05 for _ in range(4))


def extreme_logps() -> tuple[np.ndarray, ...]:
  """Four ``[13]`` float64 arrays: margins |h| of 50 to 3e4, and ties.

  All log-probs are ≤ −0.5 (valid for losses of log-odds) and ≥ −2e4 − 1.
  """
  rows = [  # (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    (-1.0, -51.0, -2.0, -2.0),  # h = 50
    (-51.0, -1.0, -2.0, -2.0),  # h = −50
    (-0.5, -1e4 - 0.5, -2.0, -2.0),  # h = 1e4
    (-1e4 - 0.5, -0.5, -2.0, -2.0),  # h = −1e4
    (-3.0, -3.0, -2.0, -2.0),  # tie
    (-1e4, -1e4, -2.0, -2.0),  # tie, d_c = d_r ≈ −1e4
    (-0.5, -1e4 - 0.499, -2.0, -2.0),  # h ≈ 1e4
    (-2e4, -1e4, -2.0, -2.0),  # h = −1e4
    (-1e4, -1e4, -1e4, -1e4),  # tie, everything extreme
    (-0.5, -0.5, -1e4, -1e4),  # tie, d_c = d_r ≈ 1e4
    (-1e4, -1e4, -0.5, -0.5),  # tie, d_c = d_r ≈ −1e4
    (-0.5, -2e4 - 0.5, -1e4 - 0.5, -0.5),  # h = 3e4
    (-2e4 - 0.5, -0.5, -0.5, -1e4 - 0.5),  # h = −3e4
  ]
  return tuple(np.array(column) for column in zip(*rows))


def check_pairwise_loss(
  fn: str | Callable[..., jax.Array],
  *,
  options: Mapping[str, Any] | None = None,
  dloss_dh: Callable[..., np.ndarray] | None = None,
  reference_free: bool | None = None,
  batch_coupled: bool | None = None,
  shift_invariance: Sequence[str] | None = None,
  option_grid: Mapping[str, Sequence[float]] | None = None,
  taus: Sequence[float] = DEFAULT_TAUS,
  allow_inf: bool = False,
  skip: Collection[str] = (),
) -> None:
  """Checks the properties every pairwise loss must have (module docstring).

  Args:
    fn: a loss function with the registered-loss signature, or the name of a
      registered loss.
    options: keyword options to call the loss with (default: its defaults).
    dloss_dh: if given, the closed-form derivative in h, as
      ``dloss_dh(h, *, tau, **options) -> [B]`` on NumPy float64 arrays
      (``options`` are all the loss's options, defaults filled in); checked
      against autodiff to rtol 1e-9.
    reference_free: the loss ignores the reference log-probs. Default: as
      registered (``losses.REFERENCE_FREE``) if ``fn`` is registered, else
      False.
    batch_coupled: the loss couples the pairs of a batch, so the
      ``unreduced`` property is not checked. Default: as registered.
    shift_invariance: the ``SHIFT_KINDS`` the loss claims. Default
      ``("log_ratio",)`` (a function of the log-ratios) unless reference-free,
      then ``()``.
    option_grid: three values per float option, vmapped over together with
      three values of τ. Default: the given value, the default, and their
      midpoint.
    taus: the τ values to check at; the traced checks use the first, middle
      and last. Narrow them for a loss valid only on part of (0, ∞).
    allow_inf: the loss is unbounded above and may overflow to +inf at
      extreme margins (see ``finite_at_extremes``).
    skip: names of properties not to check.

  Raises:
    LossPropertyError: (an ``AssertionError``) for the first property that
      fails, naming it and the inputs that broke it.
    ValueError: for arguments of this function that make no sense (unknown
      property or shift kind, a bad option grid).

  Examples:
    >>> import jax
    >>> from psipo_jax import testing
    >>> # IPO passes, with its closed-form derivative 2(h − 1/(2τ)):
    >>> testing.check_pairwise_loss(
    ...     "ipo", shift_invariance=("all", "log_ratio", "pair"),
    ...     dloss_dh=lambda h, *, tau: 2 * (h - 1 / (2 * tau)))
    >>> def mean_dpo(policy_chosen_logps, policy_rejected_logps,
    ...              ref_chosen_logps, ref_rejected_logps, *, tau):
    ...   h = ((policy_chosen_logps - ref_chosen_logps)
    ...        - (policy_rejected_logps - ref_rejected_logps))
    ...   return jax.nn.softplus(-tau * h).mean()  # reduced: wrong
    >>> testing.check_pairwise_loss(mean_dpo)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    psipo_jax.testing.LossPropertyError: check_pairwise_loss(...mean_dpo): property 'shape' failed: returned shape () for inputs of shape (1,); ...
  """
  checker = _Checker(
    fn,
    options=options,
    dloss_dh=dloss_dh,
    reference_free=reference_free,
    batch_coupled=batch_coupled,
    shift_invariance=shift_invariance,
    option_grid=option_grid,
    taus=taus,
    allow_inf=allow_inf,
  )
  unknown = set(skip) - set(PROPERTIES)
  if unknown:
    raise ValueError(
      f"skip: unknown properties {sorted(unknown)}; valid: {PROPERTIES}."
    )
  for prop in PROPERTIES:
    if prop not in skip:
      checker.run(prop)


# ---------------------------------------------------------------------------
# The checks.


def _pair(args: Sequence[Any], i: int) -> str:
  """The inputs of pair ``i``, for messages."""
  values = [None if a is None else float(np.asarray(a)[i]) for a in args]
  text = ", ".join(f"{n}={v!r}" for n, v in zip(_ARG_NAMES, values))
  if None not in values:
    pc, pr, rc, rr = values
    text += f" (h={(pc - rc) - (pr - rr)!r})"
  return f"pair {i} [{text}]"


def _first_mismatch(got, want, rtol: float, atol: float) -> int | None:
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  ok = np.isclose(got, want, rtol=rtol, atol=atol) | (got == want)
  bad = np.flatnonzero(~ok)
  return int(bad[0]) if bad.size else None


def _half_precision_ops(jaxpr) -> list[str]:
  """``primitive -> dtype`` of every half-precision result, sub-jaxprs too."""
  found = []
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      dtype = getattr(var.aval, "dtype", None)
      if dtype in _HALF:
        found.append(f"{eqn.primitive.name} -> {jnp.dtype(dtype).name}")
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _half_precision_ops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _half_precision_ops(sub)
  return found


def _is_float_option(value: Any) -> bool:
  if isinstance(value, bool):
    return False
  return isinstance(value, float) or (
    isinstance(value, (np.ndarray, np.generic, jax.Array))
    and np.ndim(value) == 0
    and jnp.issubdtype(jnp.result_type(value), jnp.floating)
  )


class _Checker:
  """The state of one ``check_pairwise_loss`` call; one method a property."""

  def __init__(
    self,
    fn,
    *,
    options,
    dloss_dh,
    reference_free,
    batch_coupled,
    shift_invariance,
    option_grid,
    taus,
    allow_inf,
  ):
    name = fn if isinstance(fn, str) else None
    if name is None:
      name = next((k for k, v in losses.LOSSES.items() if v is fn), None)
    if isinstance(fn, str):
      fn = losses.get_loss(fn)
    self.fn = fn
    try:
      params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
      params = ()  # The signature property says why.
    # The loss's options and their defaults (keyword-only besides tau).
    self.defaults = {
      p.name: p.default
      for p in params
      if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "tau"
    }
    self.option_names = tuple(self.defaults)
    self.label = repr(name) if name else losses._describe(fn)  # pylint: disable=protected-access
    self.reference_free = (
      name in losses.REFERENCE_FREE
      if reference_free is None
      else reference_free
    )
    self.batch_coupled = (
      name in losses.BATCH_COUPLED if batch_coupled is None else batch_coupled
    )
    self.options = dict(options or {})
    self.dloss_dh = dloss_dh
    if shift_invariance is None:
      shift_invariance = () if self.reference_free else ("log_ratio",)
    if isinstance(shift_invariance, str):
      shift_invariance = (shift_invariance,)
    bad = set(shift_invariance) - set(SHIFT_KINDS)
    if bad:
      raise ValueError(
        f"shift_invariance: unknown kinds {sorted(bad)}; valid: {SHIFT_KINDS}."
      )
    self.shift_invariance = tuple(shift_invariance)
    self.taus = tuple(float(t) for t in taus)
    if not self.taus:
      raise ValueError("taus must not be empty.")
    self.traced_taus = (
      self.taus[0],
      self.taus[len(self.taus) // 2],
      self.taus[-1],
    )
    self.tau = self.traced_taus[1]
    self.allow_inf = allow_inf
    self.option_grid = dict(option_grid or {})
    for key, values in self.option_grid.items():
      if len(values) != len(self.traced_taus):
        raise ValueError(
          f"option_grid[{key!r}] must hold {len(self.traced_taus)} values"
          f" (one per traced tau), got {list(values)}."
        )

  def error(self, prop: str, detail: str) -> LossPropertyError:
    return LossPropertyError(
      f"check_pairwise_loss({self.label}): property {prop!r} failed: {detail}",
      prop,
    )

  def fail(self, prop: str, detail: str):
    raise self.error(prop, detail)

  def run(self, prop: str) -> None:
    if prop == "unreduced" and self.batch_coupled:
      return
    if prop == "reference_free" and not self.reference_free:
      return
    if prop == "dloss_dh" and self.dloss_dh is None:
      return
    try:
      getattr(self, "check_" + prop)()
    except LossPropertyError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise self.error(prop, f"the check raised {type(e).__name__}: {e}") from e

  def call(self, args, tau, options=None):
    options = self.options if options is None else options
    return self.fn(*args, tau=tau, **options)

  def inputs(self, seed, dtype=jnp.float32, **kwargs):
    return tuple(jnp.asarray(a, dtype) for a in random_logps(seed, **kwargs))

  def expect_close(self, prop, got, want, args, context, *, rtol, atol):
    i = _first_mismatch(got, want, rtol, atol)
    if i is not None:
      self.fail(
        prop,
        f"{context}: {float(np.asarray(got)[i])!r} vs"
        f" {float(np.asarray(want)[i])!r} at"
        f" {_pair(args, i)}.",
      )

  # -- signature and shape --------------------------------------------------

  def check_signature(self):
    try:
      names = losses._check_signature(  # pylint: disable=protected-access
        self.fn, reference_free=self.reference_free
      )
    except TypeError as e:
      self.fail("signature", str(e))
    unknown = sorted(set(self.options) - set(names))
    if unknown:
      self.fail(
        "signature",
        f"options {unknown} are not options of the loss; it takes"
        f" {list(names)}.",
      )

  def check_shape(self):
    for batch in (1, 3, 8):
      out = self.call(self.inputs(batch, batch=batch), self.tau)
      if np.shape(out) != (batch,):
        self.fail(
          "shape",
          f"returned shape {np.shape(out)} for inputs of shape ({batch},);"
          " a loss returns the unreduced per-pair losses [B] (the trainer"
          " reduces).",
        )

  def check_unreduced(self):
    args = self.inputs(17, batch=8)
    whole = self.call(args, self.tau)
    for i in range(8):
      alone = self.call(tuple(a[i : i + 1] for a in args), self.tau)
      if _first_mismatch(alone, whole[i : i + 1], 1e-6, 1e-7) is not None:
        self.fail(
          "unreduced",
          f"{_pair(args, i)} gives {float(alone[0])!r} alone but"
          f" {float(whole[i])!r} inside a batch of 8: each output must"
          " depend on its own pair only (register a loss that couples the"
          " batch with batch_coupled=True).",
        )

  def check_jit_equals_eager(self):
    args = self.inputs(4)
    jitted = jax.jit(lambda *a: self.call(a, self.tau))(*args)
    self.expect_close(
      "jit_equals_eager",
      jitted,
      self.call(args, self.tau),
      args,
      f"jit vs eager at tau={self.tau}",
      rtol=1e-6,
      atol=1e-7,
    )

  # -- tracing --------------------------------------------------------------

  def float_options(self) -> dict[str, list[float]]:
    """The grid of each float option: three values, one per traced τ."""
    defaults = self.defaults
    grid = {}
    for key in self.option_names:
      if key in self.option_grid:
        grid[key] = [float(v) for v in self.option_grid[key]]
        continue
      given = self.options.get(key, defaults[key])
      if _is_float_option(given) and _is_float_option(defaults[key]):
        given, default = float(given), float(defaults[key])
        grid[key] = [given, (given + default) / 2, default]
    return grid

  def check_traced_tau_and_options(self):
    prop = "traced_tau_and_options"
    args = self.inputs(15)
    grid = self.float_options()
    static = {k: v for k, v in self.options.items() if k not in grid}

    def point(tau, options):
      return self.call(args, tau, {**static, **options})

    def eager(i):
      return self.call(
        args,
        self.traced_taus[i],
        {**static, **{k: v[i] for k, v in grid.items()}},
      )

    def counted():
      def traced_point(tau, options):
        return point(tau, options)

      traced_point.__name__ = f"{self.label}_traced_{next(_TRACE_IDS)}"
      return chex.assert_max_traces(traced_point, n=1)

    def traced(call, what):
      try:
        return call()
      except AssertionError as e:
        if "is traced >" not in str(e):
          raise
        self.fail(
          prop,
          f"{what} traced more than once for values of (tau, options) of"
          " the same shape: each new value recompiles. Keep tau and options"
          " as arrays (no float(tau), Python branches or static jit"
          " arguments on them).",
        )
      except (
        jax.errors.ConcretizationTypeError,
        jax.errors.TracerArrayConversionError,
        jax.errors.TracerBoolConversionError,
        jax.errors.TracerIntegerConversionError,
        TypeError,
        ValueError,
      ) as e:
        self.fail(
          prop,
          f"{what}: the loss cannot take tau and options"
          f" {sorted(grid)} as traced arrays ({type(e).__name__}: {e})."
          " Sweeps trace and vmap over them, so a Python float(tau), a"
          " branch on its value or a static jit argument recompiles per"
          " value or fails.",
        )

    jitted = jax.jit(counted())
    for i, tau in enumerate(self.traced_taus):
      got = traced(
        lambda: jitted(  # pylint: disable=cell-var-from-loop
          jnp.float32(tau),
          {k: jnp.float32(v[i]) for k, v in grid.items()},
        ),
        "jit",
      )
      self.expect_close(
        prop,
        got,
        eager(i),
        args,
        f"jit with traced tau={tau}, options"
        f" { ({k: v[i] for k, v in grid.items()}) } vs eager",
        rtol=1e-6,
        atol=1e-7,
      )
    vmapped = jax.jit(jax.vmap(counted()))
    tau_grid = jnp.array(self.traced_taus, jnp.float32)
    option_arrays = {k: jnp.array(v, jnp.float32) for k, v in grid.items()}
    for order in (slice(None), slice(None, None, -1)):
      rows = traced(
        lambda: vmapped(  # pylint: disable=cell-var-from-loop
          tau_grid[order], {k: v[order] for k, v in option_arrays.items()}
        ),
        "jit(vmap) over tau and options",
      )
      for row, i in zip(rows, range(3)[order]):
        self.expect_close(
          prop,
          row,
          eager(i),
          args,
          f"vmap over tau and options, row tau={self.traced_taus[i]}, vs eager",
          rtol=1e-6,
          atol=1e-7,
        )

  # -- precision ------------------------------------------------------------

  def over_taus(self, f, dtype):
    """Rows ``(label, τ, f(τ))`` for every τ in ``taus``, eagerly.

    τ is rounded to float32 first, so that float32 and float64 runs see the
    same τ. (Eager calls are cheaper here than compiling: the primitives'
    compilations are shared by every loss and τ.)
    """
    taus = np.asarray(self.taus, np.float32).astype(dtype)
    return [
      (f"tau={t}", t, jax.tree.map(np.asarray, f(float(taus[k]))))
      for k, t in enumerate(self.taus)
    ]

  def output_dtype(self, args):
    return jax.eval_shape(lambda *a: self.call(a, self.tau), *args).dtype

  def check_float32_maths(self):
    prop = "float32_maths"
    extreme = tuple(jnp.asarray(a, jnp.float32) for a in extreme_logps())
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
      name = jnp.dtype(dtype).name
      args = tuple(a.astype(dtype) for a in extreme)
      if self.output_dtype(args) != jnp.float32:
        self.fail(
          prop,
          f"{name} inputs give a {self.output_dtype(args)} output; compute"
          " in float32 (promote half-precision inputs first, e.g. with"
          " losses.log_ratios).",
        )
      half = _half_precision_ops(
        jax.make_jaxpr(lambda *a: self.call(a, self.tau))(*args).jaxpr
      )
      if half:
        self.fail(
          prop,
          f"with {name} inputs the loss computes in half precision:"
          f" {', '.join(half[:5])}.",
        )
      if dtype == jnp.float32:
        continue
      rounded = tuple(a.astype(jnp.float32) for a in args)
      rows = self.over_taus(
        lambda t: (self.call(args, t), self.call(rounded, t)),  # pylint: disable=cell-var-from-loop
        jnp.float32,
      )
      for label, _, (got, want) in rows:
        self.expect_close(
          prop,
          got,
          want,
          args,
          f"{name} inputs vs float32 maths on the same (rounded) inputs at"
          f" {label}",
          rtol=1e-6,
          atol=0.0,
        )
    # float32 against float64 on the same inputs: random ones (to the
    # precision float32 allows) then extreme ones.
    random = self.inputs(7)
    args32 = tuple(jnp.concatenate(pair) for pair in zip(random, extreme))
    cut = len(random[0])
    with jax.enable_x64(True):
      args64 = tuple(a.astype(jnp.float64) for a in args32)
      for args, dtype in ((args32, jnp.float32), (args64, jnp.float64)):
        if self.output_dtype(args) != dtype:
          self.fail(
            prop,
            f"{jnp.dtype(dtype).name} inputs under jax_enable_x64 give a"
            f" {self.output_dtype(args)} output.",
          )
      got = self.over_taus(lambda t: self.call(args32, t), jnp.float32)
      want = self.over_taus(lambda t: self.call(args64, t), jnp.float64)
    for (label, _, got32), (_, _, got64) in zip(got, want):
      # Beyond float32's range only an overflow to the same inf is right.
      got64 = np.where(
        np.abs(got64) > np.finfo(np.float32).max,
        np.copysign(np.inf, got64),
        got64,
      )
      for part, (rtol, atol), what in (
        (slice(None, cut), (2e-5, 1e-5), "random inputs"),
        (slice(cut, None), (1e-4, 1e-4), "extreme inputs"),
      ):
        self.expect_close(
          prop,
          got32[part],
          got64[part],
          tuple(a[part] for a in args32),
          f"float32 vs float64 maths on {what} at {label}",
          rtol=rtol,
          atol=atol,
        )

  # -- extremes and gradients -----------------------------------------------

  def loss_and_grads(self, args):
    """τ ↦ (loss ``[B]``, its gradients wrt the four inputs)."""

    def f(tau):
      total = lambda *a: jnp.sum(self.call(a, tau))
      return self.call(args, tau), jax.grad(total, argnums=(0, 1, 2, 3))(*args)

    return f

  def check_finite_at_extremes(self):
    prop = "finite_at_extremes"
    for dtype in (jnp.float32, jnp.float64):
      with jax.enable_x64(dtype == jnp.float64):
        args = tuple(jnp.asarray(a, dtype) for a in extreme_logps())
        rows = self.over_taus(self.loss_and_grads(args), dtype)
      pc, pr, rc, rr = map(np.asarray, args)
      h = pc - pr if self.reference_free else (pc - rc) - (pr - rr)
      for label, tau, (values, grads) in rows:
        where = f"{jnp.dtype(dtype).name}, {label}"
        moderate = np.abs(tau * h) <= _REPRESENTABLE_MARGIN
        ok = np.isfinite(values) | (
          self.allow_inf & ~moderate & (values == np.inf)
        )
        if not ok.all():
          i = int(np.flatnonzero(~ok)[0])
          self.fail(
            prop, f"loss is {float(values[i])!r} ({where}) at {_pair(args, i)}."
          )
        for name, g in zip(_ARG_NAMES, grads):
          ok = np.isfinite(g) | (self.allow_inf & ~moderate & ~np.isnan(g))
          if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            self.fail(
              prop,
              f"d loss / d {name} is {float(g[i])!r} ({where})"
              f" at {_pair(args, i)}.",
            )

  def check_check_grads(self):
    tau = 0.7 if self.taus[0] <= 0.7 <= self.taus[-1] else self.tau
    with jax.enable_x64(True):
      args = self.inputs(11, jnp.float64, batch=6, scale=1.0)
      total = lambda *a: jnp.sum(self.call(a, tau))
      try:
        check_grads(total, args, order=2, modes=["rev"], atol=1e-5, rtol=1e-5)
      except AssertionError as e:
        inputs = ", ".join(
          f"{n}={np.asarray(a).tolist()}" for n, a in zip(_ARG_NAMES, args)
        )
        self.fail(
          "check_grads",
          f"autodiff vs finite differences (order 2, float64, tau={tau}) on"
          f" {inputs}: {e}",
        )

  # -- invariances ----------------------------------------------------------

  def check_shift_invariance(self):
    shifts = {
      "all": [(0, 1, 2, 3)],
      "log_ratio": [(0, 2), (1, 3)],
      "pair": [(0, 1), (2, 3)],
    }
    tau = 0.8 if self.taus[0] <= 0.8 <= self.taus[-1] else self.tau
    with jax.enable_x64(True):
      args = self.inputs(12, jnp.float64)
      base = self.call(args, tau)
      for kind in self.shift_invariance:
        for which in shifts[kind]:
          moved = tuple(
            a + _SHIFT if k in which else a for k, a in enumerate(args)
          )
          names = ", ".join(_ARG_NAMES[k] for k in which)
          self.expect_close(
            "shift_invariance",
            self.call(moved, tau),
            base,
            args,
            f"{kind!r}: adding {_SHIFT} to {names} changed the loss"
            f" (tau={tau}, float64)",
            rtol=1e-10,
            atol=1e-12,
          )

  def check_reference_free(self):
    pc, pr, rc, rr = self.inputs(13)
    base = np.asarray(self.call((pc, pr, rc, rr), self.tau))
    for refs, what in (
      ((None, None), "None"),
      ((rc + 1.0, rr - 2.0), "shifted values"),
    ):
      got = np.asarray(self.call((pc, pr) + refs, self.tau))
      if not np.array_equal(got, base):
        i = int(np.flatnonzero(got != base)[0])
        self.fail(
          "reference_free",
          f"reference log-probs {what} change the loss from"
          f" {float(base[i])!r} to {float(got[i])!r} at"
          f" {_pair((pc, pr, rc, rr), i)}.",
        )

  def check_dloss_dh(self):
    options = {**self.defaults, **self.options}
    with jax.enable_x64(True):
      args = self.inputs(5, jnp.float64)
      rows = self.over_taus(self.loss_and_grads(args), jnp.float64)
    pc, pr, rc, rr = map(np.asarray, args)
    h = pc - pr if self.reference_free else (pc - rc) - (pr - rr)
    signs = (1, -1) if self.reference_free else (1, -1, -1, 1)
    for label, tau, (_, grads) in rows:
      tau = float(np.float32(tau))  # The τ the loss saw.
      with np.errstate(over="ignore", invalid="ignore"):
        want = np.asarray(self.dloss_dh(h, tau=tau, **options), np.float64)
      # Where |τh| > 50 a closed form in NumPy may overflow (e^{τh} = inf,
      # 0·inf = NaN) though the loss is right; finite_at_extremes covers it.
      moderate = np.abs(tau * h) <= _REPRESENTABLE_MARGIN
      for name, g, sign in zip(_ARG_NAMES, grads, signs):
        self.expect_close(
          "dloss_dh",
          np.where(moderate, g, 0.0),
          np.where(moderate, sign * want, 0.0),
          args,
          f"autodiff d loss / d {name} vs {'−' if sign < 0 else ''}"
          f"dloss_dh(h) ({label}, float64)",
          rtol=1e-9,
          atol=1e-12,
        )


# ---------------------------------------------------------------------------
# Where a loss's optimum sits on a finite pair set.


@dataclasses.dataclass(frozen=True)
class BanditOptimum:
  """A loss trained on a finite pair set, against its exact minimiser.

  Attributes:
    loss: the loss's registered name (or the callable's ``__name__``).
    tau: τ.
    trained_policy: ``[K]`` π_θ after training with the bandit runner, the
      mean over ``seeds``.
    trained_policies: ``[S, K]`` the same, per seed.
    exact_policy: ``[K]`` the minimiser of the mean loss over the pairs, or
      None when there is no finite one (``finite`` is False).
    last_policy: ``[K]`` the exact optimiser's last iterate (the policy it
      was heading to when it stopped, also without a finite optimum).
    last_logits: ``[K]`` its θ (float64), in the gauge of θ₀ = log π_ref.
    gap: max |trained_policy − exact_policy| (NaN without a finite optimum).
    finite: the exact optimiser converged to a finite θ.
    status: ``"converged"``; ``"diverges"`` (no finite optimum: max θ − min θ
      passed ``max_logit_gap`` and the loss still falls along the last step's
      ray); ``"gap_exceeded"`` (passed ``max_logit_gap`` but the loss does
      not fall along the ray: perhaps a finite optimum beyond the bound); or
      ``"not_converged"`` (``max_iter`` steps, none of the above).
    diagnosis: one line saying which, with the numbers.
    iterations: Newton steps taken.
    exact_loss: the mean loss at the last iterate (float64).
    trained_loss: the mean loss at ``trained_policy``'s θ, per seed ``[S]``,
      evaluated as ``exact_loss`` is.
    nonfinite_steps: ``[S]`` training steps the runner dropped as non-finite.
  """

  loss: str
  tau: float
  trained_policy: np.ndarray
  trained_policies: np.ndarray
  exact_policy: np.ndarray | None
  last_policy: np.ndarray
  last_logits: np.ndarray
  gap: float
  finite: bool
  status: str
  diagnosis: str
  iterations: int
  exact_loss: float
  trained_loss: np.ndarray
  nonfinite_steps: np.ndarray


def bandit_optimum(
  fn: str | Callable[..., jax.Array],
  pairs: Any,
  pi_ref: Any,
  tau: float,
  *,
  options: Mapping[str, float] | None = None,
  num_actions: int | None = None,
  seeds: Sequence[int] = (0,),
  total_steps: int = 2_000,
  batch_size: int = 9,
  record_every: int = 100,
  optimizer: Any = None,
  max_iter: int = 200,
  xtol: float = 1e-9,
  max_logit_gap: float = 100.0,
  ray_scales: Sequence[float] = (1.0, 10.0, 100.0),
) -> BanditOptimum:
  r"""Trains a loss on a finite pair set and finds its exact minimiser there.

  Over a tabular policy π_θ = softmax(θ), θ ∈ ℝ^K, on the observed
  (winner, loser) pairs ``{(w_k, l_k)}``, the sampled objective of every
  loss is, in expectation over uniform mini-batches,

  .. math::
      L(θ) = \frac{1}{N} \sum_k ℓ(\log π_θ(w_k), \log π_θ(l_k),
        \log π_{ref}(w_k), \log π_{ref}(l_k); τ).

  Two things are computed: (1) what training gives — the bandit runner
  (:func:`psipo_jax.bandit.run_sweep`: Adam on mini-batches, θ₀ = log π_ref,
  the paper's protocol by default, §5.4 shortened to 2,000 steps); (2) the
  exact minimiser of L — Newton's method in float64 from the same θ₀, the
  minimum-norm step ``−H⁺g`` (so directions L does not see, like θ + c·1 or
  an action never compared, keep their θ₀, as in
  :func:`psipo_jax.psi.ipo_dataset_optimum`), a gradient step where that is
  not a descent direction (a non-convex L), Armijo backtracking. It stops
  when a step moves θ by at most ``xtol`` (converged: a finite optimum), or
  when max θ − min θ = log(max π / min π) exceeds ``max_logit_gap``: then,
  if L still falls at every ``θ + s·Δθ``, s ∈ ``ray_scales`` (Δθ the last
  step), L has no finite minimiser — it decreases along a ray, as DPO's does
  when some observed pair is never reversed (``psi.dpo_divergent_pairs``) —
  and the result is flagged rather than a number. For a non-convex loss it
  finds a local minimiser, the one Newton reaches from θ₀.

  Every protocol number is an argument; the defaults are the paper's
  (``experiments/common.py``), shortened.

  Args:
    fn: a registered loss name, or a function with the registered-loss
      signature (registered under a temporary name for the run, then
      unregistered).
    pairs: ``[N, 2]`` integer (winner, loser) actions.
    pi_ref: ``[K]`` reference policy, all > 0; None for uniform over
      ``num_actions``.
    tau: τ > 0.
    options: the loss's keyword options (numbers).
    num_actions: K; default ``len(pi_ref)``, or max action + 1 without
      ``pi_ref``.
    seeds: the runner's seeds (data orders); policies are averaged over them.
    total_steps: the runner's T.
    batch_size: the runner's B (pairs per step, drawn with replacement).
    record_every: the runner's E (only the last record is used).
    optimizer: a :class:`psipo_jax.bandit.OptimizerSpec`; default
      ``adam(learning_rate=0.01)``, the paper's.
    max_iter: Newton steps at most.
    xtol: convergence: max |Δθ| of a step.
    max_logit_gap: the largest log(max π / min π) a finite optimum may have;
      must be below 700, where float64 probabilities underflow. The default
      100 is beyond float32's range (e^{−100} < 1e−38, what the runner can
      represent); raise it for a loss whose optimum is that peaked (IPO's on
      D1 at τ < 2/300).
    ray_scales: step multiples at which L must still fall for ``"diverges"``.

  Returns:
    A :class:`BanditOptimum`.

  Examples:
    >>> from psipo_jax import testing
    >>> d1 = [(0, 1), (1, 2), (0, 2)]  # a ≻ b, b ≻ c, a ≻ c
    >>> ipo = testing.bandit_optimum("ipo", d1, [1/3, 1/3, 1/3], 1.0)
    >>> ipo.status, ipo.exact_policy.round(3), ipo.gap < 0.01
    ('converged', array([0.448, 0.321, 0.23 ]), True)
    >>> dpo = testing.bandit_optimum("dpo", d1, [1/3, 1/3, 1/3], 1.0)
    >>> dpo.finite, dpo.status, dpo.exact_policy is None
    (False, 'diverges', True)
  """
  # Imported here: the bandit runner imports the trainer's update core,
  # which check_pairwise_loss's users need not load.
  from psipo_jax import bandit  # pylint: disable=g-import-not-at-top

  options = dict(options or {})
  if not 0 < max_logit_gap < 700:
    raise ValueError(
      f"bandit_optimum: max_logit_gap must be in (0, 700); got {max_logit_gap}."
    )
  if not (isinstance(max_iter, int) and max_iter >= 1) or not xtol > 0:
    raise ValueError(
      f"bandit_optimum: need max_iter ≥ 1 and xtol > 0; got {max_iter}, {xtol}."
    )
  if not ray_scales or any(not s > 0 for s in ray_scales):
    raise ValueError(
      f"bandit_optimum: ray_scales must be positive; got {ray_scales}."
    )
  pairs_array = np.asarray(pairs)
  if num_actions is None:
    num_actions = (
      len(pi_ref)
      if pi_ref is not None
      else int(pairs_array.max()) + 1
      if pairs_array.size
      else 0
    )
  if pi_ref is None:
    pi_ref = np.full(num_actions, 1.0 / max(num_actions, 1))
  dataset = bandit.Dataset(
    "bandit_optimum",
    num_actions,
    np.asarray(pi_ref, np.float64),
    pairs=pairs_array,
  )  # Validates pairs and pi_ref, naming the culprit.
  if optimizer is None:
    optimizer = bandit.OptimizerSpec("adam", (("learning_rate", 0.01),))

  name, loss_fn, temporary = _registered(fn)
  try:
    spec = bandit.LossSpec(name, tuple(sorted(options.items())))
    sweep = bandit.run_sweep(
      [dataset],
      [spec],
      (float(tau),),
      tuple(seeds),
      total_steps=total_steps,
      batch_size=batch_size,
      record_every=record_every,
      optimizer=optimizer,
    )
  finally:
    if temporary:
      losses.unregister(name)
  trained = np.asarray(sweep.probs[:, -1, :num_actions], np.float64)  # [S, K]

  with jax.enable_x64(True):
    objective = _pair_set_objective(loss_fn, dataset, tau, options)
    exact = _newton(
      objective,
      np.log(dataset.pi_ref),
      max_iter=max_iter,
      xtol=xtol,
      max_logit_gap=max_logit_gap,
      ray_scales=ray_scales,
    )
    trained_loss = np.array(
      [float(objective(jnp.log(jnp.asarray(p)))[0]) for p in trained]
    )
  status, theta, iterations, value, detail = exact
  finite = status == "converged"
  theta = np.asarray(theta, np.float64)
  last_policy = np.exp(theta - theta.max())  # softmax in float64
  last_policy /= last_policy.sum()
  exact_policy = last_policy if finite else None
  mean_policy = trained.mean(axis=0)
  gap = float(np.abs(mean_policy - last_policy).max()) if finite else np.nan
  label = name if not temporary else getattr(fn, "__name__", "loss")
  diagnosis = {
    "converged": (
      f"{label} at tau={tau}: finite optimum after {iterations} Newton"
      f" steps (loss {value:.6g}); trained policy within {gap:.3g}."
    ),
    "diverges": (f"{label} at tau={tau}: no finite optimum: " + detail),
    "gap_exceeded": (
      f"{label} at tau={tau}: max θ − min θ passed max_logit_gap ="
      f" {max_logit_gap} but the loss does not keep falling along the"
      f" ray ({detail}); raise max_logit_gap to locate the optimum."
    ),
    "not_converged": (
      f"{label} at tau={tau}: Newton did not converge in {max_iter}"
      f" steps ({detail})."
    ),
  }[status]
  return BanditOptimum(
    loss=label,
    tau=float(tau),
    trained_policy=mean_policy,
    trained_policies=trained,
    exact_policy=exact_policy,
    last_policy=last_policy,
    last_logits=theta,
    gap=gap,
    finite=finite,
    status=status,
    diagnosis=diagnosis,
    iterations=iterations,
    exact_loss=value,
    trained_loss=trained_loss,
    nonfinite_steps=np.asarray(sweep.nonfinite_steps),
  )


def _registered(fn) -> tuple[str, Callable[..., jax.Array], bool]:
  """(name, function, registered here) for a loss name or function."""
  if isinstance(fn, str):
    return fn, losses.get_loss(fn), False
  for name, registered in losses.LOSSES.items():
    if registered is fn:
      return name, fn, False
  suffix = f"{getattr(fn, '__name__', 'loss')}_{next(_TEMPORARY_IDS)}"
  name = f"_bandit_optimum_{suffix}"
  return name, losses.register(name)(fn), True


def _pair_set_objective(loss_fn, dataset, tau, options):
  """jitted θ ↦ (L(θ), ∇L, ∇²L): the mean loss over the dataset's pairs."""
  winners = jnp.asarray(dataset.pairs[:, 0])  # [N]
  losers = jnp.asarray(dataset.pairs[:, 1])  # [N]
  log_ref = jnp.log(jnp.asarray(dataset.pi_ref, jnp.float64))  # [K]
  tau = jnp.asarray(tau, jnp.float64)

  def mean_loss(theta):  # [K]
    logp = jax.nn.log_softmax(theta)  # [K]
    return jnp.mean(
      loss_fn(
        logp[winners],
        logp[losers],
        log_ref[winners],
        log_ref[losers],
        tau=tau,
        **options,
      )
    )

  @jax.jit
  def value_grad_hessian(theta):
    value, grad = jax.value_and_grad(mean_loss)(theta)
    return value, grad, jax.hessian(mean_loss)(theta)

  return lambda theta: value_grad_hessian(jnp.asarray(theta, jnp.float64))


def _newton(objective, theta, *, max_iter, xtol, max_logit_gap, ray_scales):
  """Damped minimum-norm Newton; returns (status, θ, steps, L, detail)."""
  armijo, backtracks = 1e-4, 60  # Textbook line-search constants.
  value, grad, hess = map(np.asarray, objective(theta))
  if not np.isfinite(value):
    raise ValueError(f"the loss is {float(value)} at θ₀ = log pi_ref.")
  for step_index in range(1, max_iter + 1):
    direction = -np.linalg.lstsq(hess, grad, rcond=None)[0]  # [K]
    slope = float(grad @ direction)
    if not (np.isfinite(slope) and slope < 0):
      direction, slope = -grad, -float(grad @ grad)
    if slope == 0.0:  # ∇L = 0 exactly: a stationary point.
      return "converged", theta, step_index - 1, float(value), ""
    size = 1.0
    for _ in range(backtracks):
      new_value = float(objective(theta + size * direction)[0])
      if np.isfinite(new_value) and new_value <= value + armijo * size * slope:
        break
      size /= 2
    else:
      # No decrease along a descent direction: θ is a minimiser to rounding.
      return "converged", theta, step_index - 1, float(value), ""
    delta = size * direction  # [K]
    theta = theta + delta
    value, grad, hess = map(np.asarray, objective(theta))
    if np.abs(delta).max() <= xtol:
      return "converged", theta, step_index, float(value), ""
    spread = float(theta.max() - theta.min())
    if spread > max_logit_gap:
      along = [float(objective(theta + s * delta)[0]) for s in ray_scales]
      falling = all(b < a for a, b in zip([float(value)] + along, along))
      numbers = (
        f"max θ − min θ = {spread:.4g} > max_logit_gap = {max_logit_gap}"
        f" after {step_index} Newton steps, and the loss still falls along"
        f" the last step's ray: {float(value):.4g} at θ, then "
        + ", ".join(f"{v:.4g}" for v in along)
        + f" at θ + {list(ray_scales)}·Δθ"
      )
      if falling:
        order = np.argsort(-theta)
        ranked = " > ".join(f"y{int(i)}" for i in order)
        return (
          "diverges",
          theta,
          step_index,
          float(value),
          (
            f"{numbers}; θ orders the actions {ranked}, π of all but the"
            " top action(s) → 0."
          ),
        )
      return "gap_exceeded", theta, step_index, float(value), numbers
  return (
    "not_converged",
    theta,
    max_iter,
    float(value),
    (
      f"last step moved θ by {float(np.abs(delta).max()):.3g} > xtol ="
      f" {xtol}; |∇L| = {float(np.abs(grad).max()):.3g}"
    ),
  )
