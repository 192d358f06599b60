"""Closed-form optima and summary tables for bandit sweeps.

Every trained final policy is shown beside what theory says it should be:

* sampled IPO on a dataset of observed pairs: the exact minimiser of the
  least-squares problem in the logit differences
  (``psi.ipo_dataset_optimum``, Eq. 17);
* sampled DPO on such a dataset: whether a finite minimiser exists at all
  (``psi.dpo_divergent_pairs``) — it does not as soon as an observed edge of
  the win graph lies on no cycle, e.g. when an action never loses or never
  wins;
* population losses on a known preference matrix: the ΨPO optimum of Eq. 7
  (``psi.optimal_policy``) for the loss's Ψ.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from psipo_jax import psi
from psipo_jax import stats
from psipo_jax.bandit.runner import LossSpec, SweepResult
from psipo_jax.finite_actions import Dataset

ACTION_NAMES = "abcdefghijklmnopqrstuvwxyz"


def action_name(i: int) -> str:
  """y_a, y_b, … as in the paper; y26, y27, … beyond z."""
  return ACTION_NAMES[i] if i < len(ACTION_NAMES) else f"y{i}"


def format_pairs(pairs: np.ndarray, *, max_listed: int = 8) -> str:
  """ "a≻b, b≻c" for a few pairs; "1000 pairs: a≻b ×312, …" for many."""
  if len(pairs) <= max_listed:
    return ", ".join(f"{action_name(w)}≻{action_name(l)}" for w, l in pairs)
  unique, counts = np.unique(pairs, axis=0, return_counts=True)
  return f"{len(pairs)} pairs: " + ", ".join(
    f"{action_name(w)}≻{action_name(l)} ×{n}"
    for (w, l), n in zip(unique, counts)
  )


# The Ψ whose ΨPO optimum a population loss targets. DPO's population loss
# reaches the logit-Ψ optimum only when the preferences are Bradley–Terry.
_POPULATION_PSI = {
  "ipo_population": "identity",
  "ipo_sampled_population": "identity",
  "dpo_population": "logit",
}


@dataclasses.dataclass(frozen=True)
class ClosedForm:
  """What theory predicts for one (dataset, loss, τ).

  Attributes:
    policy: ``[K]`` the predicted limit, or None when there is none.
    note: how it was obtained, or why there is none.
  """

  policy: Optional[np.ndarray]
  note: str


def _dpo_note(dataset: Dataset) -> str:
  divergent = psi.dpo_divergent_pairs(dataset.pairs, dataset.num_actions)
  if not divergent:
    return "DPO: finite minimiser (every edge on a cycle), no closed form"
  compared = np.unique(dataset.pairs)
  never_lose = [a for a in compared if a not in dataset.pairs[:, 1]]
  never_win = [a for a in compared if a not in dataset.pairs[:, 0]]
  parts = [f"diverges along {format_pairs(np.array(divergent))}"]
  if never_lose:
    parts.append("never loses: " + ",".join(map(action_name, never_lose)))
  if never_win:
    parts.append("never wins: " + ",".join(map(action_name, never_win)))
  return "DPO: no finite minimiser; " + "; ".join(parts)


def closed_form(dataset: Dataset, loss: LossSpec, tau: float) -> ClosedForm:
  """The theoretical limit of training ``loss`` on ``dataset`` at ``tau``."""
  if loss.is_population:
    psi_name = _POPULATION_PSI.get(loss.name) or loss.option_dict.get(
      "psi", "identity"
    )
    try:
      policy = np.asarray(
        psi.optimal_policy(
          dataset.preference, dataset.pi_ref, dataset.mu, tau, psi=psi_name
        ),
        np.float64,
      )
    except ValueError as e:  # e.g. Ψ = ±∞ at a deterministic preference
      return ClosedForm(
        None, f"ΨPO optimum, Ψ = {psi_name}: not attained ({e})"
      )
    note = f"ΨPO optimum, Ψ = {psi_name} (Eq. 7)"
    if loss.name == "dpo_population":
      note += "; DPO reaches it only under Bradley–Terry"
    return ClosedForm(policy, note)
  if dataset.pairs is None:
    return ClosedForm(None, "no pairs")
  if loss.name == "ipo":
    optimum = psi.ipo_dataset_optimum(
      dataset.pairs, dataset.num_actions, dataset.pi_ref, tau
    )
    note = "IPO least squares on the pairs (Eq. 17)"
    if len(set(optimum.component.tolist())) > 1:
      # The data fix only ratios inside a connected component.
      note += "; disconnected actions keep their initial mass"
    return ClosedForm(np.asarray(optimum.policy, np.float64), note)
  if loss.name == "rebel":
    return _rebel_closed_form(dataset, tau)
  if loss.name == "dpo" or (
    loss.name == "cdpo" and not loss.option_dict.get("label_smoothing")
  ):
    return ClosedForm(None, _dpo_note(dataset))
  return ClosedForm(None, "no closed form")


def _connected(pairs: np.ndarray, num_actions: int) -> bool:
  """Whether the comparison graph of `pairs` links every action."""
  parent = list(range(num_actions))

  def root(a):
    while parent[a] != a:
      a = parent[a]
    return a

  for w, l in pairs:
    parent[root(int(w))] = root(int(l))
  return len({root(a) for a in range(num_actions)}) == 1


def _rebel_closed_form(dataset: Dataset, tau: float) -> ClosedForm:
  """π ∝ π_ref · exp(r/τ) (η = 1/τ) for Bradley–Terry rewards r.

  The runner feeds REBEL Δr = logit p*(w ≻ l); when these are r_w − r_l for
  one reward vector r and the pairs link every action, every pair's loss is
  0 exactly at log π − log π_ref = r/τ + const, the unique minimiser.
  """
  if dataset.preference is None:
    return ClosedForm(None, "REBEL: no preference matrix, no reward")
  p = np.asarray(dataset.preference, np.float64)
  off = ~np.eye(len(p), dtype=bool)
  if np.any((p[off] <= 0) | (p[off] >= 1)):
    return ClosedForm(None, "REBEL: a deterministic preference, no finite r")
  logit = np.log(p) - np.log1p(-p)
  rewards = logit[:, 0]  # r_i − r_0
  if not np.allclose(logit, rewards[:, None] - rewards[None, :], atol=1e-9):
    return ClosedForm(None, "REBEL: preference not Bradley–Terry")
  if not _connected(dataset.pairs, dataset.num_actions):
    return ClosedForm(None, "REBEL: pairs do not link every action")
  logits = np.log(dataset.pi_ref) + rewards / tau
  policy = np.exp(logits - logits.max())
  return ClosedForm(
    policy / policy.sum(), "REBEL optimum π_ref·exp(r/τ)/Z (η = 1/τ)"
  )


def mean_and_ci(values: np.ndarray, *, level: float = 0.95):
  """Mean over axis 0 and its Student-t half-width (see `stats.mean_and_ci`).

  With a single value the half-width is 0: here that is a population run,
  deterministic by construction.
  """
  return stats.mean_and_ci(values, level=level, single=0.0)


@dataclasses.dataclass
class SummaryRow:
  loss: str
  dataset: str
  tau: float
  num_seeds: int
  mean: np.ndarray  # [K] final π, mean over seeds
  ci: np.ndarray  # [K] 95% CI half-width
  closed: ClosedForm
  nonfinite_steps: int

  @property
  def max_abs_error(self) -> Optional[float]:
    if self.closed.policy is None:
      return None
    return float(np.max(np.abs(self.mean - self.closed.policy)))


def summarize(
  result: SweepResult,
  datasets: Sequence[Dataset],
  loss_specs: Sequence[LossSpec],
) -> list[SummaryRow]:
  """One row per (dataset, loss, τ): final probabilities beside theory."""
  by_label = {s.label: s for s in loss_specs}
  rows = []
  for dataset in datasets:
    k = dataset.num_actions
    for spec in loss_specs:
      taus = sorted(
        {
          r.tau
          for r in result.runs
          if r.loss == spec.label and r.dataset == dataset.name
        }
      )
      for tau in taus:
        idx = result.select(loss=spec.label, dataset=dataset.name, tau=tau)
        final = result.probs[idx, -1, :k]  # [S, K]
        mean, ci = mean_and_ci(final)
        rows.append(
          SummaryRow(
            loss=spec.label,
            dataset=dataset.name,
            tau=tau,
            num_seeds=len(idx),
            mean=mean,
            ci=ci,
            closed=closed_form(dataset, by_label[spec.label], tau),
            nonfinite_steps=int(result.nonfinite_steps[idx].sum()),
          )
        )
  return rows


def _fmt_policy(p: Optional[np.ndarray]) -> str:
  if p is None:
    return "—"
  return " ".join(f"{x:.4f}" for x in p)


def format_table(
  rows: Sequence[SummaryRow], datasets: Sequence[Dataset]
) -> str:
  """A plain-text table, one block per dataset."""
  lines = []
  by_name = {d.name: d for d in datasets}
  for name in dict.fromkeys(r.dataset for r in rows):
    d = by_name[name]
    width = 7 * d.num_actions
    actions = " ".join(f"{action_name(i):>6}" for i in range(d.num_actions))
    source = (
      f"pairs {format_pairs(d.pairs)}"
      if d.pairs is not None
      else "population only"
    )
    lines.append(f"\n== {name}: {source}; π_ref = {_fmt_policy(d.pi_ref)}")
    lines.append(
      f"{'loss':<22} {'τ':>5}  {'trained π  ' + actions:<{width + 11}}"
      f" {'±CI95':>6}  {'closed form':<{width}} {'|Δ|max':>7}  note"
    )
    for r in (r for r in rows if r.dataset == name):
      err = "—" if r.max_abs_error is None else f"{r.max_abs_error:.4f}"
      note = r.closed.note
      if r.nonfinite_steps:
        note = f"NON-FINITE in {r.nonfinite_steps} steps! " + note
      lines.append(
        f"{r.loss:<22} {r.tau:>5g}  {'':11}{_fmt_policy(r.mean):<{width}}"
        f" {float(r.ci.max()):>6.4f}  {_fmt_policy(r.closed.policy):<{width}}"
        f" {err:>7}  {note}"
      )
  return "\n".join(lines)
