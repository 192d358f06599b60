r"""Figures 1 and 2 of Azar et al. (arXiv:2310.12036, §5.4), sampled DPO vs IPO.

Three actions y_a, y_b, y_c; π_θ = softmax(θ) started at a uniform π_ref;
Adam (learning rate 0.01), 18,000 steps, mini-batches of 9 pairs drawn
uniformly with replacement from the dataset; 10 seeds; mean and 95% CI.

* Figure 1, D1 = {(a,b), (b,c), (a,c)}: a total order. DPO goes greedy
  (π(y_a) → 1) for every τ; IPO stops at its closed form
  π ∝ (e^{2/(3τ)}, e^{1/(3τ)}, 1), close to π_ref for large τ.
* Figure 2, D3 as printed, {(a,b), (b,a)}: every loss leaves θ_c and
  θ_a + θ_b where they are, so nothing moves away from π_ref (see
  experiments/README.md).
* Figure 2 as described, D3' = {(a,b), (b,a), (b,c)}: y_c never wins and
  (a,c) is unobserved. DPO pushes π(y_c) to 0 for every τ; IPO keeps
  π ∝ (e^{1/(2τ)}, e^{1/(2τ)}, 1).

Command (repository root; about 15 s on a shared 2-core CPU, compilation and
figures included):

  python -m psipo_jax.bandit --config=experiments/paper_figures.py \
      --workdir=runs/paper_figures --copy_figures_to=experiments/figures

Variants: ``--config=experiments/paper_figures.py:printed`` runs D1 and the
printed D3 only (the 240-run sweep of benchmarks/bandit_benchmark.py);
``:runlocal`` runs 2,000 steps and 3 seeds.
"""

from experiments import common


def get_config(arg=None):
  """Returns the config; ``arg``: ``printed`` and/or ``runlocal``."""
  args = common.parse_arg(arg, printed=False, runlocal=False)
  config = common.paper_protocol(runlocal=args.runlocal)
  a, b, c = 0, 1, 2
  config.datasets = {
    "D1": {"pairs": [[a, b], [b, c], [a, c]]},
    "D3": {"pairs": [[a, b], [b, a]], "num_actions": 3},
  }
  config.figures = {
    "fig1_D1": {
      "dataset": "D1",
      "title": "Figure 1: D1 = {(a,b), (b,c), (a,c)}",
    },
    "fig2_D3_printed": {
      "dataset": "D3",
      "title": "Figure 2, D3 as printed: {(a,b), (b,a)}",
    },
  }
  if not args.printed:
    config.datasets["D3_described"] = {"pairs": [[a, b], [b, a], [b, c]]}
    config.figures["fig2_D3_described"] = {
      "dataset": "D3_described",
      "title": "Figure 2 as described: {(a,b), (b,a), (b,c)}; "
      "y_c never wins, (a,c) unobserved",
    }
  return config
