r"""Which dataset is the paper's Figure 2?  D2, D3 as printed, and readings.

The paper (arXiv:2310.12036, §5.4) prints D3 = {(a,b), (b,a)} but says that
the pair (a,c) is unobserved and that DPO pushes the action without a
victory to 0. This config trains DPO and IPO on

* D2 = {(a,b), (b,c), (c,a)}: the cycle (discussed in the paper, not plotted);
* D3 = {(a,b), (b,a)}: as printed (y_c is never compared);
* D3_chain = {(a,b), (b,c)}: y_c has no victory, (a,c) unobserved;
* D3_tie = {(a,b), (b,a), (b,c)}: the printed pairs plus (b,c); y_c has no
  victory, (a,c) unobserved;

with the paper's protocol (Adam 0.01, 18,000 steps, batch 9, 10 seeds).
experiments/README.md states which reading reproduces the text.

Command (repository root; about 15 s on a shared 2-core CPU):

  python -m psipo_jax.bandit --config=experiments/bandit_d3_readings.py \
      --workdir=runs/d3_readings --copy_figures_to=experiments/figures
"""

from experiments import common


def get_config(arg=None):
  """Returns the config; ``arg`` "runlocal" runs 2,000 steps, 3 seeds."""
  config = common.paper_protocol(
    runlocal=common.parse_arg(arg, runlocal=False).runlocal
  )
  a, b, c = 0, 1, 2
  config.datasets = {
    "D2": {"pairs": [[a, b], [b, c], [c, a]]},
    "D3": {"pairs": [[a, b], [b, a]], "num_actions": 3},
    "D3_chain": {"pairs": [[a, b], [b, c]]},
    "D3_tie": {"pairs": [[a, b], [b, a], [b, c]]},
  }
  config.figures = {
    "d3_D2_cycle": {
      "dataset": "D2",
      "title": "D2 = {(a,b), (b,c), (c,a)} (cycle)",
    },
    "d3_printed": {"dataset": "D3", "title": "D3 as printed: {(a,b), (b,a)}"},
    "d3_chain": {"dataset": "D3_chain", "title": "Reading 1: {(a,b), (b,c)}"},
    "d3_tie": {
      "dataset": "D3_tie",
      "title": "Reading 2: {(a,b), (b,a), (b,c)}",
    },
  }
  return config
