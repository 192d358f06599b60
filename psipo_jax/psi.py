"""Exact ΨPO on a finite action space.

Everything here is about one context x with K actions (responses) y_0 … y_{K-1}.
A preference matrix ``pref`` of shape ``[K, K]`` holds ``pref[i, j] = p*(y_i ≻ y_j)``;
the reference policy ``pi_ref``, the behaviour policy ``mu`` (which generates the
compared pairs) and any policy are 1-D arrays of shape ``[K]``; a trainable policy
is ``π = softmax(logits)``. ``tau > 0`` is the regularisation strength. With
these, the paper's population quantities are finite sums and can be computed
exactly:

* Ψ maps and ``g(y) = E_{y'~μ} Ψ(p*(y ≻ y'))``;
* the closed-form ΨPO optimum (Eq. 7) and the ΨPO objective (Eq. 6);
* the population IPO loss (Eq. 13), its sampled-label form (Eq. 16), the
  population DPO loss (Eq. 5) and the general-Ψ root-finding loss (Eq. 11);
* for a finite dataset of observed (winner, loser) pairs: the exact minimiser
  of the sampled IPO loss (Eq. 17) and whether DPO's sampled loss has a finite
  minimiser at all.

Conventions.

* **The diagonal of a preference matrix is not data.** Every function here
  reads ``p(y ≻ y) = 1/2`` whatever the caller stored there. This makes
  ``p(y ≻ y') + p(y' ≻ y) = 1`` hold for all pairs, including y = y', which is
  what the sums over ``y, y' ~ μ`` below need (e.g. ``E_{y~μ} p(y ≻ μ) = 1/2``
  and the constant gap between Eq. 16 and Eq. 13).
* **Actions outside Supp(π_ref) are outside the model.** Any π with
  ``KL(π ‖ π_ref) < ∞`` puts no mass on them, and ``h_π`` is undefined there,
  so the population losses drop every pair that involves one (a masked term,
  never a NaN), and the optimum gives them probability 0.
* Array functions are pure ``jnp`` and can be jitted / vmapped / differentiated;
  they compute in float32, or float64 when ``jax_enable_x64`` is on. Input
  checks that need values (``tau > 0``, a valid preference matrix, normalised
  distributions) run only when the values are concrete, so a traced ``tau``
  under ``jit`` or ``vmap`` is accepted and does not force a recompilation per
  value. Shape checks always run.
* The dataset functions (``preference_from_pairs``, ``ipo_dataset_optimum``,
  ``dpo_divergent_pairs``, ...) are host-side analyses of a concrete dataset
  (NumPy, float64) and are not jit-able.

Example, the two-action check of §5.3.1: y_0 always beats y_1, π_ref and μ
uniform. IPO's optimum is π*(y_0) = σ(1/(2τ)) for every τ, where the
population IPO loss is 0; DPO's optimum would be (1, 0).

  >>> import jax
  >>> import jax.numpy as jnp
  >>> from psipo_jax import psi
  >>> pref = psi.preference_from_ranking([0, 1])  # [[1/2, 1], [0, 1/2]]
  >>> uniform = jnp.array([0.5, 0.5])
  >>> pi = psi.optimal_policy(pref, uniform, uniform, tau=0.5)
  >>> bool(jnp.isclose(pi[0], jax.nn.sigmoid(1 / (2 * 0.5))))
  True
  >>> bool(psi.ipo_population_loss(jnp.log(pi), pref, uniform, uniform,
  ...                              tau=0.5) < 1e-10)
  True

Reference: M. G. Azar, M. Rowland, B. Piot, D. Guo, D. Calandriello, M. Valko,
R. Munos, "A General Theoretical Paradigm to Understand Learning from Human
Preferences", AISTATS 2024, arXiv:2310.12036. Equation numbers are the arXiv
version's.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Array = jax.Array
PsiLike = str | Callable[[Array], Array]

# ---------------------------------------------------------------------------
# Ψ maps: non-decreasing functions [0, 1] → ℝ ∪ {±∞} applied elementwise.


def identity(q: ArrayLike) -> Array:
  """Ψ(q) = q. ΨPO with this Ψ is IPO (paper §5)."""
  return jnp.asarray(q)


def logit(q: ArrayLike) -> Array:
  """Ψ(q) = log(q / (1 − q)), ±∞ at q ∈ {0, 1}.

  With a Bradley–Terry preference this Ψ makes ΨPO the KL-regularised RLHF
  objective, whose sampled form is DPO (paper Prop. 1).

  Examples:
    >>> import jax.numpy as jnp
    >>> from psipo_jax import psi
    >>> psi.logit(jnp.array([0.5, 1.0, 0.0]))  # log(q/(1−q))
    Array([  0.,  inf, -inf], dtype=float32)
  """
  q = jnp.asarray(q)
  # log1p(-q) keeps precision for q near 0; q = 1 gives +inf as it should.
  return jnp.log(q) - jnp.log1p(-q)


PSI_MAPS: dict[str, Callable[[Array], Array]] = {
  "identity": identity,
  "logit": logit,
}


def get_psi(psi: PsiLike) -> Callable[[Array], Array]:
  """Returns the Ψ map named ``psi`` in ``PSI_MAPS``, or ``psi`` if callable."""
  if callable(psi):
    return psi
  try:
    return PSI_MAPS[psi]
  except (KeyError, TypeError):
    raise ValueError(
      f"Unknown psi {psi!r}; valid names: {sorted(PSI_MAPS)}, or pass a"
      " callable Ψ: [0, 1] → ℝ."
    ) from None


# ---------------------------------------------------------------------------
# Input checks. Value checks run only on concrete values (see module docstring).


def _float(x: ArrayLike) -> Array:
  """x as the default float dtype: float64 under x64, float32 otherwise."""
  return jnp.asarray(x, dtype=jnp.result_type(float))


def _concrete(x: ArrayLike) -> np.ndarray | None:
  """x as a NumPy array, or None when x is a tracer (under jit, vmap, grad)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _check_tau(tau: ArrayLike) -> None:
  if np.ndim(tau) != 0:
    raise ValueError(f"tau must be a scalar, got shape {np.shape(tau)}.")
  value = _concrete(tau)
  if value is not None and not value > 0:  # `not >` also rejects NaN.
    raise ValueError(f"tau must be > 0, got tau={value}.")


def _check_distribution(name: str, p: ArrayLike, num_actions: int) -> None:
  if np.shape(p) != (num_actions,):
    raise ValueError(
      f"{name} must have shape ({num_actions},) to match pref, got"
      f" {np.shape(p)}."
    )
  value = _concrete(p)
  if value is None:
    return
  value = value.astype(np.float64)
  bad = np.flatnonzero(~np.isfinite(value) | (value < 0))
  if bad.size:
    i = bad[0]
    raise ValueError(
      f"{name} must be a probability vector: {name}[{i}] = {value[i]}."
    )
  total = value.sum()
  if abs(total - 1) > 1e-5:
    raise ValueError(f"{name} must sum to 1, got sum({name}) = {total}.")


def validate_preference(pref: ArrayLike, *, atol: float = 1e-5) -> None:
  """Raises ``ValueError`` unless ``pref`` is a valid preference matrix.

  Valid means: square ``[K, K]``; every off-diagonal entry finite and in
  [0, 1]; ``pref[i, j] + pref[j, i] = 1`` (within ``atol``) for all i ≠ j. The
  diagonal is not checked: every function in this module reads it as 1/2.

  Args:
      pref: ``[K, K]`` with ``pref[i, j] = p(y_i ≻ y_j)``; must be concrete.
      atol: tolerance on ``pref + pref.T = 1``.

  Raises:
      ValueError: naming the first offending entry (i, j) and its value(s).

  Examples:
    >>> from psipo_jax import psi
    >>> psi.validate_preference([[0.5, 0.7], [0.3, 0.5]])  # valid: silent
    >>> psi.validate_preference([[0.5, 0.7], [0.4, 0.5]])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: pref[0, 1] + pref[1, 0] = 0.7 + 0.4 = 1.1 ≠ 1: ...
  """
  shape = np.shape(pref)
  if len(shape) != 2 or shape[0] != shape[1]:
    raise ValueError(f"pref must be a square [K, K] matrix, got shape {shape}.")
  value = _concrete(pref)
  if value is None:
    raise ValueError("validate_preference needs concrete values, not a tracer.")
  p = value.astype(np.float64)
  off_diagonal = ~np.eye(shape[0], dtype=bool)
  bad = np.argwhere(off_diagonal & ~((p >= 0) & (p <= 1)))  # NaN fails too.
  if bad.size:
    i, j = bad[0]
    raise ValueError(
      f"pref[{i}, {j}] = {p[i, j]} is not a probability in [0, 1]."
    )
  gap = np.abs(p + p.T - 1)
  bad = np.argwhere(off_diagonal & (gap > atol))
  if bad.size:
    i, j = bad[0]
    raise ValueError(
      f"pref[{i}, {j}] + pref[{j}, {i}] = {p[i, j]} + {p[j, i]} ="
      f" {p[i, j] + p[j, i]} ≠ 1: p(y_{i} ≻ y_{j}) and"
      f" p(y_{j} ≻ y_{i}) must sum to 1."
    )


def _check_problem(pref, pi_ref, mu, tau=None) -> int:
  """Checks a (pref, pi_ref, mu, tau) problem; returns K."""
  shape = np.shape(pref)
  if len(shape) != 2 or shape[0] != shape[1]:
    raise ValueError(f"pref must be a square [K, K] matrix, got shape {shape}.")
  if _concrete(pref) is not None:
    validate_preference(pref)
  num_actions = shape[0]
  if pi_ref is not None:
    _check_distribution("pi_ref", pi_ref, num_actions)
  _check_distribution("mu", mu, num_actions)
  if tau is not None:
    _check_tau(tau)
  return num_actions


# ---------------------------------------------------------------------------
# Preference matrices.


def with_half_diagonal(pref: ArrayLike) -> Array:
  """``pref`` with its diagonal set to 1/2, the value p(y ≻ y) always has."""
  pref = _float(pref)
  return jnp.where(jnp.eye(pref.shape[0], dtype=bool), 0.5, pref)


def preference_from_bradley_terry(rewards: ArrayLike) -> Array:
  """Bradley–Terry preferences ``pref[i, j] = σ(r_i − r_j)``.

  Args:
      rewards: ``[K]`` rewards r.

  Returns:
      ``[K, K]`` preference matrix (diagonal 1/2).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from psipo_jax import psi
    >>> pref = psi.preference_from_bradley_terry(jnp.array([1.0, 0.0]))
    >>> bool(jnp.isclose(pref[0, 1], jax.nn.sigmoid(1.0)))  # σ(r_0 − r_1)
    True
    >>> float(pref[0, 1] + pref[1, 0]), float(pref[0, 0])
    (1.0, 0.5)
  """
  rewards = _float(rewards)
  return jax.nn.sigmoid(rewards[:, None] - rewards[None, :])


def preference_from_ranking(ranking: Sequence[int]) -> Array:
  """Deterministic preference of a strict total order.

  Args:
      ranking: a permutation of ``range(K)``, best action first.

  Returns:
      ``[K, K]`` matrix with ``pref[i, j] = 1`` when i is ranked above j, 0 when
      below, 1/2 on the diagonal.

  Examples:
    >>> from psipo_jax import psi
    >>> psi.preference_from_ranking([2, 0, 1])  # y_2 best, then y_0, y_1
    Array([[0.5, 1. , 0. ],
           [0. , 0.5, 0. ],
           [1. , 1. , 0.5]], dtype=float32)
  """
  ranking = np.asarray(ranking)
  num_actions = ranking.shape[0]
  if ranking.ndim != 1 or sorted(ranking.tolist()) != list(range(num_actions)):
    raise ValueError(
      f"ranking must be a permutation of range(K), got {ranking.tolist()}."
    )
  position = np.empty(num_actions, dtype=np.int64)
  position[ranking] = np.arange(num_actions)
  pref = (position[:, None] < position[None, :]).astype(np.float64)
  return with_half_diagonal(pref)


def rock_paper_scissors(*, win_prob: float = 1.0) -> Array:
  """Cyclic preference over (rock, paper, scissors) = actions (0, 1, 2).

  Paper beats rock, scissors beat paper, rock beats scissors, each with
  probability ``win_prob``; no action is best, so no Bradley–Terry model fits.

  Returns:
      ``[3, 3]`` preference matrix.
  """
  if not 0 <= win_prob <= 1:
    raise ValueError(f"win_prob must be in [0, 1], got {win_prob}.")
  beats = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], dtype=np.float64)
  return _float(0.5 + (win_prob - 0.5) * beats)


class EmpiricalPreference(NamedTuple):
  """Win rates from observed comparisons (``preference_from_pairs``).

  Attributes:
      pref: ``[K, K]`` empirical ``p(y_i ≻ y_j)``; 1/2 where unobserved.
      observed: ``[K, K]`` bool, True where i and j were compared (symmetric,
          False on the diagonal).
      wins: ``[K, K]`` total weight of comparisons that i won against j.
  """

  pref: Array
  observed: Array
  wins: Array


def validate_pairs(
  pairs: ArrayLike, num_actions: int, weights: ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Validated ([N, 2] int64 pairs, [N] float64 weights) of a dataset.

  Raises ValueError naming the first bad entry: an action index outside
  [0, num_actions), an action compared with itself, a negative or non-finite
  weight.
  """
  if not isinstance(num_actions, (int, np.integer)) or num_actions < 1:
    raise ValueError(
      f"num_actions must be a positive int, got {num_actions!r}."
    )
  pairs = np.asarray(pairs)
  if pairs.size == 0:
    pairs = pairs.reshape(0, 2)
  if pairs.ndim != 2 or pairs.shape[1] != 2:
    raise ValueError(
      f"pairs must have shape [N, 2] (winner, loser), got {pairs.shape}."
    )
  if pairs.size and not np.issubdtype(pairs.dtype, np.integer):
    raise ValueError(
      f"pairs must hold integer action indices, got {pairs.dtype}."
    )
  pairs = pairs.astype(np.int64)
  outside = np.flatnonzero(((pairs < 0) | (pairs >= num_actions)).any(axis=1))
  if outside.size:
    k = outside[0]
    raise ValueError(
      f"pairs[{k}] = {tuple(pairs[k].tolist())} has an action index outside"
      f" [0, {num_actions})."
    )
  self_pairs = np.flatnonzero(pairs[:, 0] == pairs[:, 1])
  if self_pairs.size:
    k = self_pairs[0]
    raise ValueError(
      f"pairs[{k}] = {tuple(pairs[k].tolist())} compares an action with itself."
    )
  if weights is None:
    weights = np.ones(pairs.shape[0])
  weights = np.asarray(weights, dtype=np.float64)
  if weights.shape != (pairs.shape[0],):
    raise ValueError(
      f"weights must have shape ({pairs.shape[0]},) like pairs, got"
      f" {weights.shape}."
    )
  bad = np.flatnonzero(~np.isfinite(weights) | (weights < 0))
  if bad.size:
    k = bad[0]
    raise ValueError(f"weights[{k}] = {weights[k]} must be finite and >= 0.")
  return pairs, weights


def _win_matrix(pairs, weights, num_actions) -> np.ndarray:
  """[K, K] float64: total weight of the pairs that i won against j."""
  wins = np.zeros((num_actions, num_actions))
  np.add.at(wins, (pairs[:, 0], pairs[:, 1]), weights)
  return wins


def preference_from_pairs(
  pairs: ArrayLike, num_actions: int, *, weights: ArrayLike | None = None
) -> EmpiricalPreference:
  """Empirical preference matrix from observed (winner, loser) pairs.

  ``pref[i, j] = wins[i, j] / (wins[i, j] + wins[j, i])``, the (weighted) win
  rate of i against j over the comparisons of the unordered pair {i, j}. A pair
  never compared gets 1/2 — no evidence either way — and ``observed`` says
  which entries are data. The result satisfies ``validate_preference``.

  Args:
      pairs: ``[N, 2]`` integer (winner, loser) action indices.
      num_actions: K.
      weights: optional ``[N]`` non-negative weight per pair (default 1).

  Returns:
      ``EmpiricalPreference(pref, observed, wins)``.

  Examples:
    >>> from psipo_jax import psi
    >>> # y_0 beat y_1 twice and lost once; y_2 was never compared.
    >>> emp = psi.preference_from_pairs([(0, 1), (0, 1), (1, 0)], 3)
    >>> round(float(emp.pref[0, 1]), 6), float(emp.pref[0, 2])
    (0.666667, 0.5)
    >>> bool(emp.observed[0, 1]), bool(emp.observed[0, 2])
    (True, False)
  """
  pairs, weights = validate_pairs(pairs, num_actions, weights)
  wins = _win_matrix(pairs, weights, num_actions)
  total = wins + wins.T
  observed = total > 0
  pref = np.where(observed, wins / np.where(observed, total, 1.0), 0.5)
  return EmpiricalPreference(
    pref=with_half_diagonal(pref),
    observed=jnp.asarray(observed),
    wins=_float(wins),
  )


# ---------------------------------------------------------------------------
# Expectations under μ.


def preference_against(pref: ArrayLike, mu: ArrayLike) -> Array:
  """``p(y ≻ μ) = E_{y'~μ} p(y ≻ y')`` for every y.

  Args:
      pref: ``[K, K]`` preference matrix (diagonal read as 1/2).
      mu: ``[K]`` distribution of the opponent y'.

  Returns:
      ``[K]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from psipo_jax import psi
    >>> pref = psi.preference_from_ranking([0, 1])  # y_0 always wins
    >>> # p(y_0 ≻ μ) = ½·½ + ½·1, p(y_1 ≻ μ) = ½·0 + ½·½ under uniform μ.
    >>> psi.preference_against(pref, jnp.array([0.5, 0.5]))
    Array([0.75, 0.25], dtype=float32)
  """
  _check_problem(pref, None, mu)
  return _preference_against(pref, mu)


def _preference_against(pref, mu) -> Array:
  return with_half_diagonal(pref) @ _float(mu)


def psi_expectation(
  pref: ArrayLike, mu: ArrayLike, psi: PsiLike = "identity"
) -> Array:
  """``g(y) = E_{y'~μ} Ψ(p(y ≻ y'))`` for every y (Eq. 7 and 11).

  Opponents outside Supp(μ) are skipped, so an infinite Ψ value against an
  action μ never plays does not turn into 0·∞ = NaN.

  Args:
      pref: ``[K, K]`` preference matrix (diagonal read as 1/2).
      mu: ``[K]`` distribution of the opponent y'.
      psi: a name in ``PSI_MAPS`` or a callable Ψ.

  Returns:
      ``[K]``; may hold ±∞ for an unbounded Ψ with deterministic preferences.

  Examples:
    >>> import jax.numpy as jnp
    >>> from psipo_jax import psi
    >>> pref = psi.preference_from_ranking([0, 1])
    >>> mu = jnp.array([0.5, 0.5])
    >>> psi.psi_expectation(pref, mu, "identity")  # = p(y ≻ μ)
    Array([0.75, 0.25], dtype=float32)
    >>> psi.psi_expectation(pref, mu, "logit")  # logit(1) = ∞ against y_1
    Array([ inf, -inf], dtype=float32)
    >>> # A μ that never plays y_1 skips it: only logit(1/2) = 0 is left.
    >>> psi.psi_expectation(pref, jnp.array([1.0, 0.0]), "logit")
    Array([  0., -inf], dtype=float32)
  """
  _check_problem(pref, None, mu)
  return _psi_expectation(pref, mu, get_psi(psi))


def _psi_expectation(pref, mu, psi_fn) -> Array:
  mu = _float(mu)
  played = (mu > 0)[None, :]  # [1, K]
  # Skipped entries are evaluated at Ψ(1/2), which is finite, so Ψ's
  # infinities there reach neither the value nor the gradient.
  values = psi_fn(jnp.where(played, with_half_diagonal(pref), 0.5))  # [K, K]
  return values @ mu


# ---------------------------------------------------------------------------
# The ΨPO optimum.


def _check_attained(g: Array, pi_ref: Array) -> None:
  """Raises if the concrete ``g`` makes the ΨPO optimum unattained."""
  g, pi_ref = _concrete(g), _concrete(pi_ref)
  if g is None or pi_ref is None:
    return
  support = pi_ref > 0
  bad = np.flatnonzero(support & ~(g < np.inf))  # +inf or NaN
  if bad.size:
    y = bad[0]
    raise ValueError(
      f"The ΨPO optimum is not attained: g(y_{y}) = E_{{y'~μ}}"
      f" Ψ(p(y_{y} ≻ y')) = {g[y]} (Ψ is infinite at a deterministic"
      " preference, e.g. the logit Ψ with p = 0 or 1). Use a bounded Ψ such"
      " as 'identity' (IPO) or a preference strictly inside (0, 1)."
    )
  if not np.any(support & (g > -np.inf)):
    raise ValueError(
      "The ΨPO objective is −∞ for every policy: g(y) = −∞ on all of"
      " Supp(pi_ref)."
    )


def optimal_policy(
  pref: ArrayLike,
  pi_ref: ArrayLike,
  mu: ArrayLike,
  tau: ArrayLike,
  psi: PsiLike = "identity",
) -> Array:
  """The maximiser of the ΨPO objective (Eq. 7).

  .. math::
      π^*(y) ∝ π_{ref}(y) \\exp(τ^{-1} g(y)),\\quad
      g(y) = E_{y'∼μ}[Ψ(p^*(y ≻ y'))].

  Computed as ``softmax(log π_ref + g / τ)``; entries with ``π_ref(y) = 0``
  stay exactly 0, and so do entries with ``g(y) = −∞`` (y loses surely to an
  action μ plays): any mass there would make the objective −∞.

  If ``g(y) = +∞`` (or undefined) for some y in Supp(π_ref) the supremum is
  not attained. With concrete inputs that raises ``ValueError``; under
  ``jit``/``vmap`` it cannot, and the result is NaN instead.

  Args:
      pref: ``[K, K]``, ``pref[i, j] = p*(y_i ≻ y_j)``; diagonal read as 1/2.
      pi_ref: ``[K]`` reference policy.
      mu: ``[K]`` behaviour policy (the opponent distribution).
      tau: scalar regularisation strength, > 0.
      psi: a name in ``PSI_MAPS`` or a callable Ψ.

  Returns:
      ``[K]`` the optimal policy π*.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from psipo_jax import psi
    >>> # Two actions, y_0 always preferred, uniform π_ref and μ (§5.3.1):
    >>> # g = (3/4, 1/4), so π*(y_0) = σ((g_0 − g_1)/τ) = σ(1/(2τ)).
    >>> pref = psi.preference_from_ranking([0, 1])
    >>> uniform = jnp.array([0.5, 0.5])
    >>> for tau in (0.1, 0.5, 2.0):
    ...   pi = psi.optimal_policy(pref, uniform, uniform, tau)
    ...   print(bool(jnp.isclose(pi[0], jax.nn.sigmoid(1 / (2 * tau)))))
    True
    True
    True
    >>> # With Ψ = logit and Bradley–Terry rewards r, π* = softmax(log π_ref
    >>> # + r/τ) (RLHF's optimum, Prop. 1):
    >>> r = jnp.array([1.0, 0.0])
    >>> bt = psi.preference_from_bradley_terry(r)
    >>> pi = psi.optimal_policy(bt, uniform, uniform, 1.0, psi="logit")
    >>> bool(jnp.allclose(pi, jax.nn.softmax(r)))
    True
  """
  _check_problem(pref, pi_ref, mu, tau)
  g = _psi_expectation(pref, mu, get_psi(psi))  # [K]
  pi_ref = _float(pi_ref)
  _check_attained(g, pi_ref)
  support = pi_ref > 0
  log_ref = jnp.log(jnp.where(support, pi_ref, 1.0))
  return jax.nn.softmax(jnp.where(support, log_ref + g / tau, -jnp.inf))


def psipo_objective(
  policy: ArrayLike,
  pref: ArrayLike,
  pi_ref: ArrayLike,
  mu: ArrayLike,
  tau: ArrayLike,
  psi: PsiLike = "identity",
) -> Array:
  """The ΨPO objective (Eq. 6) of a policy, to be maximised.

  .. math::
      E_{y∼π, y'∼μ}[Ψ(p^*(y ≻ y'))] − τ\\,KL(π ‖ π_{ref})
      = \\sum_y π(y) g(y) − τ \\sum_y π(y) \\log(π(y) / π_{ref}(y)).

  Its maximum is ``τ log Σ_y π_ref(y) exp(g(y)/τ)``, reached at
  ``optimal_policy`` (Gibbs variational principle). It is −∞ when π puts mass
  outside Supp(π_ref).

  Args:
      policy: ``[K]`` a distribution π.
      pref, pi_ref, mu, tau, psi: as in ``optimal_policy``.

  Returns:
      Scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> from psipo_jax import psi
    >>> pref = psi.preference_from_ranking([0, 1])
    >>> uniform, tau = jnp.array([0.5, 0.5]), 0.5
    >>> best = psi.optimal_policy(pref, uniform, uniform, tau)
    >>> value = psi.psipo_objective(best, pref, uniform, uniform, tau)
    >>> # The maximum τ log Σ π_ref exp(g/τ), with g = (3/4, 1/4):
    >>> bool(jnp.isclose(value, tau * jnp.log(0.5 * jnp.exp(1.5)
    ...                                       + 0.5 * jnp.exp(0.5))))
    True
    >>> # π_ref itself has no KL penalty and earns E_{π_ref} g = 1/2.
    >>> psi.psipo_objective(uniform, pref, uniform, uniform, tau)
    Array(0.5, dtype=float32)
  """
  num_actions = _check_problem(pref, pi_ref, mu, tau)
  _check_distribution("policy", policy, num_actions)
  policy, pi_ref = _float(policy), _float(pi_ref)
  g = _psi_expectation(pref, mu, get_psi(psi))
  reward = jnp.sum(jnp.where(policy > 0, policy * g, 0.0))
  kl = jnp.sum(
    jax.scipy.special.xlogy(policy, policy)
    - jax.scipy.special.xlogy(policy, pi_ref)
  )
  return reward - tau * kl


# ---------------------------------------------------------------------------
# Population losses over pairs y, y' ~ μ.


def _pairwise_log_ratio(logits, pi_ref, mu):
  """(h, weight): ``h[y, y'] = h_π(y, y')`` and ``weight[y, y'] = μ(y)μ(y')``.

  Pairs touching an action outside Supp(π_ref) get weight 0 and h = 0, so no
  −∞ − (−∞) enters a value or a gradient.
  """
  logits, pi_ref, mu = _float(logits), _float(pi_ref), _float(mu)
  support = pi_ref > 0  # [K]
  log_ratio = jnp.where(
    support,
    jax.nn.log_softmax(logits) - jnp.log(jnp.where(support, pi_ref, 1.0)),
    0.0,
  )  # [K]: log π(y) − log π_ref(y)
  h = log_ratio[:, None] - log_ratio[None, :]  # [K, K]
  weight = jnp.where(
    support[:, None] & support[None, :], jnp.outer(mu, mu), 0.0
  )
  return h, weight


def _check_loss_inputs(logits, pref, pi_ref, mu, tau) -> None:
  num_actions = _check_problem(pref, pi_ref, mu, tau)
  if np.shape(logits) != (num_actions,):
    raise ValueError(
      f"logits must have shape ({num_actions},) to match pref, got"
      f" {np.shape(logits)}."
    )


def _regression_loss(logits, pi_ref, mu, tau, target_score) -> Array:
  """Σ μ(y)μ(y') (h_π(y, y') − (s(y) − s(y'))/τ)² for a score s: [K]."""
  h, weight = _pairwise_log_ratio(logits, pi_ref, mu)
  target = (target_score[:, None] - target_score[None, :]) / tau  # [K, K]
  residual = jnp.where(weight > 0, h - target, 0.0)  # masks ∞ targets too
  return jnp.sum(weight * jnp.square(residual))


def ipo_population_loss(
  logits: ArrayLike,
  pref: ArrayLike,
  pi_ref: ArrayLike,
  mu: ArrayLike,
  tau: ArrayLike,
) -> Array:
  """The population IPO loss (Eq. 13) of ``π = softmax(logits)``.

  .. math::
      L(π) = \\sum_{y, y'} μ(y) μ(y')
          \\left(h_π(y, y')
            − \\frac{p^*(y ≻ μ) − p^*(y' ≻ μ)}{τ}\\right)^2.

  Its minimiser is ``optimal_policy(pref, pi_ref, mu, tau, "identity")``,
  where it is exactly 0; it is unique when Supp(μ) = Supp(π_ref) (Theorem 2).
  Note τ divides the target and does not multiply h. Pairs involving an
  action outside Supp(π_ref) are dropped (see the module docstring).

  Args:
      logits: ``[K]`` policy logits.
      pref: ``[K, K]`` preference matrix (diagonal read as 1/2).
      pi_ref: ``[K]`` reference policy.
      mu: ``[K]`` behaviour policy generating the pairs.
      tau: scalar > 0.

  Returns:
      Scalar loss.

  Examples:
    >>> import jax.numpy as jnp
    >>> from psipo_jax import psi
    >>> pref = psi.preference_from_ranking([0, 1])
    >>> uniform, tau = jnp.array([0.5, 0.5]), 0.5
    >>> # Uniform π: h = 0 and the target (p(y≻μ) − p(y'≻μ))/τ is ±1 on the
    >>> # two mixed pairs, each of weight 1/4: L = 2 · ¼ · 1² = ½.
    >>> psi.ipo_population_loss(jnp.zeros(2), pref, uniform, uniform, tau)
    Array(0.5, dtype=float32)
    >>> best = psi.optimal_policy(pref, uniform, uniform, tau)
    >>> bool(psi.ipo_population_loss(jnp.log(best), pref, uniform, uniform,
    ...                              tau) < 1e-10)
    True
  """
  _check_loss_inputs(logits, pref, pi_ref, mu, tau)
  return _regression_loss(
    logits, pi_ref, mu, tau, _preference_against(pref, mu)
  )


def psi_regression_loss(
  logits: ArrayLike,
  pref: ArrayLike,
  pi_ref: ArrayLike,
  mu: ArrayLike,
  tau: ArrayLike,
  psi: PsiLike = "identity",
) -> Array:
  """The root-finding loss of general ΨPO with a known preference (Eq. 11).

  .. math::
      L_Ψ(π) = \\sum_{y, y'} μ(y) μ(y')
          \\left(h_π(y, y') − \\frac{g(y) − g(y')}{τ}\\right)^2,\\quad
      g(y) = E_{y'∼μ}[Ψ(p^*(y ≻ y'))].

  Zero exactly at ``optimal_policy(..., psi)``. With ``psi="identity"``,
  ``g(y) = p*(y ≻ μ)`` and this is ``ipo_population_loss``. With
  ``psi="logit"`` and a Bradley–Terry preference σ(r_i − r_j),
  ``g(y) = r(y) − E_μ r`` for every μ, so the minimiser is the RLHF optimum
  π_ref·exp(r/τ).

  Raises:
      ValueError: with concrete inputs, if g is infinite on an action in
          Supp(μ) ∩ Supp(π_ref) (no finite minimiser).

  Returns:
      Scalar loss.

  Examples:
    >>> import jax.numpy as jnp
    >>> from psipo_jax import psi
    >>> bt = psi.preference_from_bradley_terry(jnp.array([1.0, 0.0, -1.0]))
    >>> uniform = jnp.ones(3) / 3
    >>> # Zero at the RLHF optimum softmax(r/τ) (uniform π_ref), τ = 0.5:
    >>> logits = jnp.array([1.0, 0.0, -1.0]) / 0.5
    >>> loss = psi.psi_regression_loss(logits, bt, uniform, uniform, 0.5,
    ...                                psi="logit")
    >>> bool(loss < 1e-10)
    True
  """
  _check_loss_inputs(logits, pref, pi_ref, mu, tau)
  g = _psi_expectation(pref, mu, get_psi(psi))
  concrete = _concrete(g), _concrete(pi_ref), _concrete(mu)
  if all(x is not None for x in concrete):
    g_value, pi_ref_value, mu_value = concrete
    played = (pi_ref_value > 0) & (mu_value > 0)
    bad = np.flatnonzero(played & ~np.isfinite(g_value))
    if bad.size:
      y = bad[0]
      raise ValueError(
        f"g(y_{y}) = E_{{y'~μ}} Ψ(p(y_{y} ≻ y')) = {g_value[y]}: Ψ is"
        " infinite on the data, so the regression target is infinite"
        " and the loss has no finite minimiser."
      )
  return _regression_loss(logits, pi_ref, mu, tau, g)


def ipo_sampled_population_loss(
  logits: ArrayLike,
  pref: ArrayLike,
  pi_ref: ArrayLike,
  mu: ArrayLike,
  tau: ArrayLike,
) -> Array:
  """The expected sampled-label IPO loss (Eq. 15/16).

  Pairs y, y' ~ μ are drawn, and a label ``I ~ Bernoulli(p*(y ≻ y'))`` says
  whether y won:

  .. math::
      \\sum_{y, y'} μ(y) μ(y') \\left[p^*(y ≻ y') (h_π(y, y') − τ^{-1})^2
          + (1 − p^*(y ≻ y')) h_π(y, y')^2\\right].

  It differs from ``ipo_population_loss`` (Eq. 13) by a constant in π, so both
  have the same minimiser. The proof uses ``p(y ≻ y') + p(y' ≻ y) = 1`` for
  all pairs including y = y' (hence the diagonal = 1/2 convention) and holds
  when Supp(μ) ⊆ Supp(π_ref).

  Args:
      logits, pref, pi_ref, mu, tau: as in ``ipo_population_loss``.

  Returns:
      Scalar loss.

  Examples:
    >>> import jax.numpy as jnp
    >>> from psipo_jax import psi
    >>> pref = psi.preference_from_ranking([0, 1])
    >>> uniform, tau = jnp.array([0.5, 0.5]), 0.5
    >>> def gap(logits):  # Eq. 16 − Eq. 13: the same for every policy
    ...   return (psi.ipo_sampled_population_loss(logits, pref, uniform,
    ...                                           uniform, tau)
    ...           - psi.ipo_population_loss(logits, pref, uniform, uniform,
    ...                                     tau))
    >>> bool(jnp.isclose(gap(jnp.zeros(2)), gap(jnp.array([3.0, -1.0]))))
    True
  """
  _check_loss_inputs(logits, pref, pi_ref, mu, tau)
  h, weight = _pairwise_log_ratio(logits, pi_ref, mu)
  p = with_half_diagonal(pref)
  per_pair = p * jnp.square(h - 1.0 / tau) + (1.0 - p) * jnp.square(h)
  return jnp.sum(weight * per_pair)


def dpo_population_loss(
  logits: ArrayLike,
  pref: ArrayLike,
  pi_ref: ArrayLike,
  mu: ArrayLike,
  tau: ArrayLike,
) -> Array:
  """The expected DPO loss (Eq. 5) over labelled pairs drawn from μ.

  .. math::
      \\sum_{y, y'} μ(y) μ(y')\\, p^*(y ≻ y') \\,(−\\log σ(τ\\, h_π(y, y'))).

  With a Bradley–Terry preference σ(r_i − r_j) and Supp(μ) = Supp(π_ref) every
  unordered pair's term is minimised at τ h_π(y, y') = r(y) − r(y'), so the
  minimiser is π_ref·exp(r/τ). With a deterministic preference (some
  p* ∈ {0, 1}) there is in general no finite minimiser: the loss keeps
  decreasing as the winner's log-ratio grows (paper §4.2).

  Args:
      logits, pref, pi_ref, mu, tau: as in ``ipo_population_loss``.

  Returns:
      Scalar loss.

  Examples:
    >>> import jax.numpy as jnp
    >>> from psipo_jax import psi
    >>> pref = psi.preference_from_ranking([0, 1])
    >>> uniform = jnp.array([0.5, 0.5])
    >>> # h = 0 everywhere: log 2 · Σ μμ p* = log 2 · ¼ (½ + 1 + 0 + ½).
    >>> loss = psi.dpo_population_loss(jnp.zeros(2), pref, uniform, uniform,
    ...                                0.5)
    >>> bool(jnp.isclose(loss, 0.5 * jnp.log(2.0)))
    True
    >>> # Deterministic preference, θ = (t, 0): the loss is
    >>> # ¼[log 2 + log(1 + e^{−τt})], falling towards ¼ log 2 as t → ∞
    >>> # without reaching it: no finite minimiser.
    >>> for t in (0.0, 10.0, 100.0):
    ...   loss = psi.dpo_population_loss(jnp.array([t, 0.0]), pref, uniform,
    ...                                  uniform, 0.5)
    ...   want = 0.25 * (jnp.log(2.0) + jnp.log1p(jnp.exp(-0.5 * t)))
    ...   print(bool(jnp.isclose(loss, want)), round(float(loss), 4))
    True 0.3466
    True 0.175
    True 0.1733
  """
  _check_loss_inputs(logits, pref, pi_ref, mu, tau)
  h, weight = _pairwise_log_ratio(logits, pi_ref, mu)
  p = with_half_diagonal(pref)
  return jnp.sum(weight * p * -jax.nn.log_sigmoid(tau * h))


# ---------------------------------------------------------------------------
# Finite datasets of observed (winner, loser) pairs. Host-side, NumPy float64.


def comparison_components(
  pairs: ArrayLike, num_actions: int, *, weights: ArrayLike | None = None
) -> np.ndarray:
  """Connected components of the (undirected) comparison graph.

  Nodes are actions; i and j are joined when some pair with positive weight
  compares them. A never-compared action is its own component.

  Returns:
      ``[K]`` int labels, numbered 0, 1, ... in order of each component's
      smallest action.

  Examples:
    >>> from psipo_jax import psi
    >>> psi.comparison_components([(0, 1), (3, 2)], 5)
    array([0, 0, 1, 1, 2])
  """
  pairs, weights = validate_pairs(pairs, num_actions, weights)
  wins = _win_matrix(pairs, weights, num_actions)
  adjacent = (wins + wins.T) > 0
  labels = np.full(num_actions, -1, dtype=np.int64)
  next_label = 0
  for start in range(num_actions):
    if labels[start] >= 0:
      continue
    frontier = [start]
    labels[start] = next_label
    while frontier:
      node = frontier.pop()
      for other in np.flatnonzero(adjacent[node] & (labels < 0)):
        labels[other] = next_label
        frontier.append(other)
    next_label += 1
  return labels


class IPODatasetOptimum(NamedTuple):
  """Result of ``ipo_dataset_optimum``.

  Attributes:
      logits: ``[K]`` minimiser θ of the sampled IPO loss closest to the init.
      policy: ``[K]`` softmax(logits).
      component: ``[K]`` int labels from ``comparison_components``. The data
          determine π(i)/π(j) exactly when ``component[i] == component[j]``; the
          whole policy is determined only if all labels are equal.
  """

  logits: Array
  policy: Array
  component: np.ndarray


def ipo_dataset_optimum(
  pairs: ArrayLike,
  num_actions: int,
  pi_ref: ArrayLike,
  tau: float,
  *,
  weights: ArrayLike | None = None,
  init_logits: ArrayLike | None = None,
) -> IPODatasetOptimum:
  """Exact minimiser of the sampled IPO loss (Eq. 17) on a finite dataset.

  Over a tabular policy π = softmax(θ), with pairs drawn uniformly from the
  dataset ``{(w_k, l_k)}``, Eq. 17 is (up to the normalisation Σ w_k)

  .. math::
      L(θ) = \\sum_k w_k
        \\left(θ_{w_k} − θ_{l_k} − c_k − \\frac{1}{2τ}\\right)^2,
      \\quad c_k = \\log π_{ref}(w_k) − \\log π_{ref}(l_k),

  (the log-normaliser of softmax cancels in the difference). This is weighted
  least squares on the comparison graph: with incidence rows B_k = e_{w_k} −
  e_{l_k}, the minimisers solve ``Lap θ = Bᵀ W b``, ``Lap = Bᵀ W B`` the graph
  Laplacian, ``b_k = c_k + 1/(2τ)``. Only logit differences inside a
  connected component are pinned down; the offset of each component (its
  mass relative to the other components) is not. Of all minimisers we return
  the one closest to ``init_logits`` in Euclidean norm,

  .. math::
      θ = θ_0 + Lap^{+} Bᵀ W (b − B θ_0),

  i.e. each component keeps the sum of its init logits and a never-compared
  action keeps its init logit. This is exactly where gradient descent (also
  with momentum, or L-BFGS) started at θ_0 converges: its steps are
  combinations of gradients, which lie in range(Bᵀ) ⊥ null(Lap). Adam's
  per-coordinate scaling does not have this property.

  Example: D = {(a, b), (b, c), (a, c)} with uniform π_ref gives
  θ = (2, 1, 0)/(3τ) + const, π ∝ (e^{2/(3τ)}, e^{1/(3τ)}, 1) (see Examples).

  Args:
      pairs: ``[N, 2]`` integer (winner, loser) action indices.
      num_actions: K.
      pi_ref: ``[K]`` reference policy; must be > 0 on every compared action.
      tau: regularisation strength > 0 (concrete).
      weights: optional ``[N]`` non-negative weights per pair (default 1).
      init_logits: ``[K]`` θ_0, finite on compared actions. Defaults to
          ``log π_ref`` (−∞ where π_ref = 0, which then stays −∞).

  Returns:
      ``IPODatasetOptimum(logits, policy, component)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from psipo_jax import psi
    >>> tau = 0.5
    >>> opt = psi.ipo_dataset_optimum([(0, 1), (1, 2), (0, 2)], 3,
    ...                               jnp.ones(3) / 3, tau)
    >>> # θ_0 − θ_1 = θ_1 − θ_2 = 1/(3τ) = 2/3:
    >>> bool(jnp.allclose(jnp.diff(opt.logits), -1 / (3 * tau)))
    True
    >>> opt.component  # one comparison graph: the whole policy is pinned
    array([0, 0, 0])
  """
  pairs, weights = validate_pairs(pairs, num_actions, weights)
  _check_tau(tau)
  _check_distribution("pi_ref", pi_ref, num_actions)
  pi_ref = np.asarray(pi_ref, dtype=np.float64)
  compared = pairs[weights > 0]
  bad = np.flatnonzero((pi_ref[compared] == 0).any(axis=1))
  if bad.size:
    k = np.flatnonzero(weights > 0)[bad[0]]
    raise ValueError(
      f"pairs[{k}] = {tuple(pairs[k].tolist())} compares an action with"
      " pi_ref = 0, where h_π is undefined."
    )
  with np.errstate(divide="ignore"):
    log_ref = np.log(pi_ref)
  if init_logits is None:
    init = log_ref
  else:
    init = np.asarray(init_logits, dtype=np.float64)
    if init.shape != (num_actions,):
      raise ValueError(
        f"init_logits must have shape ({num_actions},), got {init.shape}."
      )
    if not np.isfinite(init[compared]).all():
      raise ValueError("init_logits must be finite on every compared action.")

  winners, losers = compared[:, 0], compared[:, 1]
  w = weights[weights > 0]
  target = log_ref[winners] - log_ref[losers] + 1.0 / (2.0 * float(tau))  # [N]
  residual = target - (init[winners] - init[losers])  # [N]
  rhs = np.zeros(num_actions)  # Bᵀ W residual
  np.add.at(rhs, winners, w * residual)
  np.add.at(rhs, losers, -w * residual)
  wins = _win_matrix(compared, w, num_actions)
  laplacian = np.diag((wins + wins.T).sum(axis=1)) - (wins + wins.T)
  # Minimum-norm least squares = Lap⁺ rhs, which lies in range(Lap).
  step = np.linalg.lstsq(laplacian, rhs, rcond=None)[0]
  # Project out the null space (component indicators) exactly, so rounding
  # cannot shift a component's offset away from the init's.
  component = comparison_components(compared, num_actions, weights=w)
  sizes = np.bincount(component)
  step -= (np.bincount(component, weights=step) / sizes)[component]
  logits = _float(init + step)
  return IPODatasetOptimum(
    logits=logits, policy=jax.nn.softmax(logits), component=component
  )


def dpo_divergent_pairs(
  pairs: ArrayLike, num_actions: int, *, weights: ArrayLike | None = None
) -> list[tuple[int, int]]:
  """Observed (winner, loser) edges along which DPO's sampled loss diverges.

  DPO's sampled loss on a dataset, Σ_k w_k softplus(−τ(θ_{w_k} − θ_{l_k} −
  c_k)), has a finite minimiser over θ iff no direction d has
  d_{w_k} ≥ d_{l_k} for every pair and > for some (logistic-regression
  separability). In the win graph (edge w → l per observed pair) such a d
  exists iff some edge lies on no directed cycle: for an edge u → v off every
  cycle, d = indicator{actions that reach u} works; conversely on a cycle every
  such d is constant. So DPO has a finite minimiser iff every edge lies inside
  a strongly connected component of the win graph — stricter than "every
  action both wins and loses" (two 3-cycles joined by one edge fail it).
  Along a returned edge the optimum pushes π(loser)/π(winner) → 0, whatever τ
  and π_ref (finite offsets c_k do not matter).

  Args:
      pairs: ``[N, 2]`` integer (winner, loser) action indices.
      num_actions: K.
      weights: optional ``[N]`` weights; zero-weight pairs are ignored.

  Returns:
      Sorted distinct (winner, loser) edges that lie on no directed cycle;
      empty iff DPO's sampled loss has a finite minimiser.

  Examples:
    >>> from psipo_jax import psi
    >>> psi.dpo_divergent_pairs([(0, 1), (1, 2), (2, 0)], 3)  # one cycle
    []
    >>> # y_3 only ever loses, so DPO drives π(y_3) → 0 along (0, 3):
    >>> psi.dpo_divergent_pairs([(0, 1), (1, 2), (2, 0), (0, 3)], 4)
    [(0, 3)]
  """
  pairs, weights = validate_pairs(pairs, num_actions, weights)
  beats = _win_matrix(pairs, weights, num_actions) > 0  # edge i → j
  reach = beats.copy()  # transitive closure (Floyd–Warshall, boolean)
  for k in range(num_actions):
    reach |= reach[:, k : k + 1] & reach[k : k + 1, :]
  off_cycle = beats & ~reach.T  # edge i → j with no path j → i
  return [(int(i), int(j)) for i, j in np.argwhere(off_cycle)]


def dataset_has_finite_dpo_optimum(
  pairs: ArrayLike, num_actions: int, *, weights: ArrayLike | None = None
) -> bool:
  """Whether DPO's sampled loss on the dataset has a finite minimiser.

  True iff every observed (winner, loser) edge lies on a directed cycle of the
  win graph; see ``dpo_divergent_pairs`` for the proof and the culprits.

  Examples:
    >>> from psipo_jax import psi
    >>> psi.dataset_has_finite_dpo_optimum([(0, 1)], 2)  # §4.2: one pair
    False
    >>> psi.dataset_has_finite_dpo_optimum([(0, 1), (1, 0)], 2)
    True
  """
  return not dpo_divergent_pairs(pairs, num_actions, weights=weights)
