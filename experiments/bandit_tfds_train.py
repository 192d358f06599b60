r"""IPO on the paper's dataset D1, read from disk through TFDS and Grain.

Azar et al. (arXiv:2310.12036, §5.3): three actions a, b, c = 0, 1, 2, a
uniform reference policy, and the observed preferences D1 = {(a, b), (b, c),
(a, c)} (winner first). Here D1 is written as a `bandit_preferences` TFDS
dataset (array_record) in `input.data_dir` (default <workdir>/tfds) and
trained through the same Grain pipeline a language-model run uses; the
pipeline's position is part of every checkpoint, so a resumed run continues
with exactly the batches an uninterrupted one would see. Model, loss and
optimiser are those of experiments/bandit_train.py (tabular softmax policy
started at log π_ref, IPO with τ = 0.1, Adam 0.01); `loss=dpo` and
`runlocal` are passed through to it.

Command (about 15 s on a 2-core laptop CPU, mostly start-up, compilation and
the first preparation of the dataset; `runlocal`: 200 steps):

  python -m psipo_jax.main --config=experiments/bandit_tfds_train.py \
      --workdir=/tmp/bandit_tfds_ipo [--config.loss.tau=1.0] \
      [--config.input.data_dir=/data/tfds]

Expected result: IPO's minimiser on D1 is θ = (2, 1, 0)/(3τ) + const, i.e.
π ∝ (e^{2/(3τ)}, e^{1/(3τ)}, 1) (`psipo_jax.psi.ipo_dataset_optimum`),
(0.964, 0.034, 0.001) for τ = 0.1: IPO keeps mass on b and c although a
beats both in the data. In metrics.jsonl, eval `h` (the mean of h over the
three pairs) settles at 4/(9τ) = 4.444 and the loss at 1/(36τ²) = 2.778
(measured: both from step ~900 on, grad_norm < 1e-3). A batch of 24 pairs
is exactly 8 passes over the 3 pairs of D1 (the stream shuffles each pass),
so every step's gradient is the full-dataset gradient.
"""

import ml_collections

from experiments import bandit_train
from psipo_jax import data

# D1 of §5.3.2 over (a, b, c) = (0, 1, 2), as (winner, loser).
D1 = ((0, 1), (1, 2), (0, 2))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Args: arg: as experiments/bandit_train.py (`loss=<name>`, `runlocal`)."""
  config = bandit_train.get_config(arg)
  # Every key this dataset reads, documented in psipo_jax/data/config.py.
  config.input = data.get_input_config("bandit_preferences")
  config.input.pairs = D1
  config.input.num_actions = config.model.num_actions
  config.input.batch_size = 24  # global; a multiple of 3 pairs and of 8 devices
  config.input.seed = config.get_ref(
    "seed"
  )  # --config.seed also reseeds the data order
  # input.data_dir stays None: the trainer prepares D1 in <workdir>/tfds.
  return config
