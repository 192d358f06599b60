r"""KTO and REBEL beside IPO and DPO on D1 and the two-action example.

The paper's protocol (experiments/common.py: Adam 0.01, 18,000 steps,
mini-batches of 9 pairs, 10 seeds, uniform π_ref), an extra config beside
Figures 1–2 (experiments/paper_figures.py), for the two losses the paper's
critique of Bradley–Terry led to:

* REBEL (arXiv:2404.16767) regresses τ·h on each pair's reward difference;
  the runner reads it as logit p*(w ≻ l) from the dataset's preference
  matrix, so each dataset carries a Bradley–Terry matrix whose rewards
  agree with its pairs. Its optimum is π_ref·exp(r/τ)/Z (η = 1/τ).
* KTO (arXiv:2402.01306) labels each pair's winner desirable and its loser
  undesirable (TRL's unpairing), z₀ from the batch's own 18 actions.

Datasets:

* D1 = {(a,b), (b,c), (a,c)} (Figure 1), rewards r = (1, 0, −1).
* two_action = {(a,b)}: a always wins, the deterministic example of §5.3.1
  as a dataset. A deterministic preference has no finite Bradley–Terry
  reward, so REBEL is given r = (1, 0) (Δr = 1 on the only pair): its
  optimum σ(1/τ) is IPO's σ(1/(2τ)) at half the τ, as the algebra of
  `losses.rebel` says (IPO is REBEL with Δr = 1/2). The other losses see only
  the pairs.

Command (repository root):

  python -m psipo_jax.bandit --config=experiments/bandit_kto_rebel.py \
      --workdir=runs/bandit_kto_rebel --copy_figures_to=experiments/figures

``:runlocal`` runs 2,000 steps and 3 seeds. Results: experiments/README.md.
"""

import jax
import numpy as np

from experiments import common
from psipo_jax import psi


def _bradley_terry(rewards) -> list[list[float]]:
  with jax.enable_x64(True):
    matrix = psi.preference_from_bradley_terry(np.asarray(rewards, np.float64))
    return np.asarray(matrix, np.float64).tolist()


def get_config(arg=None):
  """Returns the config; ``arg``: ``runlocal``."""
  args = common.parse_arg(arg, runlocal=False)
  config = common.paper_protocol(runlocal=args.runlocal)
  config.losses = ("kto", "rebel", "ipo", "dpo")
  a, b, c = 0, 1, 2
  config.datasets = {
    "D1": {
      "pairs": [[a, b], [b, c], [a, c]],
      "preference": _bradley_terry([1.0, 0.0, -1.0]),
    },
    "two_action": {
      "pairs": [[a, b]],
      "preference": _bradley_terry([1.0, 0.0]),
    },
  }
  config.figures = {
    "kto_rebel_D1": {
      "dataset": "D1",
      "title": "KTO, REBEL, IPO, DPO on D1 = {(a,b), (b,c), (a,c)}",
    },
    "kto_rebel_two_action": {
      "dataset": "two_action",
      "title": "KTO, REBEL, IPO, DPO on {(a,b)}",
    },
  }
  return config
