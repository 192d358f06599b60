r"""KTO on a tiny language model, on the built-in text task (CPU, minutes).

The built-in task (`psipo_jax.data.text_task`, as in lm_ipo_tiny.py), read
as unpaired feedback (`input.name="unpaired"`): each pair becomes two
labelled examples, the right answer desirable and the mistake undesirable
(psipo_jax/data/unpaired.py), so the classes are balanced and
λ_D = λ_U = 1 sits in the paper's advised range λ_D·n_D / (λ_U·n_U) ∈
[1, 4/3]. A 4-layer, d = 64 decoder (`model.preset="tiny"`,
`num_layers=4`, byte tokenizer) trains with KTO (τ = β = 0.25, summed
log-probs) from the SFT run of experiments/lm_sft_tiny.py, the reference
being that initial policy; the pairs are lm_ipo_tiny's (its SFT run's
split, 40,000 training pairs); evaluation covers the whole held-out split
(400 pairs, 800 examples).

Command (repository root):

  python -m psipo_jax.main --config=experiments/lm_kto_tiny.py \
      --workdir=runs/lm_kto_tiny

`:runlocal` trains 20 steps (a smoke run); `:init=` starts from a random
policy instead of runs/lm_sft_tiny. Watch `eval/rewards/margins` (mean
reward of desirable minus undesirable held-out responses), `eval/loss` and
`kl` (z₀) in metrics.jsonl.
"""

import ml_collections

from experiments import common
from experiments import lm_ipo_tiny
from psipo_jax.data import unpaired

SFT_WORKDIR = "runs/lm_sft_tiny"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Args: arg: `runlocal` (a 20-step smoke run), `init=<workdir>` (default
  runs/lm_sft_tiny; `init=` for none)."""
  args = common.parse_arg(arg, runlocal=False, init=SFT_WORKDIR)
  # The IPO config's model, optimiser and trainer keys; KTO's input and loss.
  config = lm_ipo_tiny.get_config(f"runlocal={args.runlocal},init={args.init}")
  config.objective = "kto"
  config.input = unpaired.get_input_config()
  # The IPO config's pairs (the SFT run's split), each split in two.
  config.input.files = lm_ipo_tiny.task_files(args.runlocal)
  config.input.batch_size = 32  # global, in examples
  config.input.max_length = 32  # the longest record is 26 bytes
  config.input.max_prompt_length = 24
  config.input.seed = config.get_ref("seed")

  config.loss = ml_collections.ConfigDict()
  config.loss.tau = 0.25
  config.loss.desirable_weight = 1.0
  config.loss.undesirable_weight = 1.0
  config.loss.normalize = "sum"
  return config
