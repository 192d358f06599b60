r"""SFT of the tiny language model on the built-in text task's chosen responses.

Stage 1 of the tiny language-model pipeline: the decoder of
experiments/lm_ipo_tiny.py (2 layers, d = 64, byte tokenizer) learns the
chosen (correct) responses of the built-in text task by token-level NLL
(`objective="sft"`); its workdir is then the initial policy and the
reference of the IPO stage:

  python -m psipo_jax.main --config=experiments/lm_sft_tiny.py \
      --workdir=runs/lm_sft_tiny
  python -m psipo_jax.main --config=experiments/lm_ipo_tiny.py \
      --workdir=runs/lm_ipo_tiny

`:runlocal` trains 20 steps. Watch `eval/nll` and `eval/perplexity` (per
response token, over the whole held-out split) in metrics.jsonl.
"""

import ml_collections

from experiments import common
from experiments import lm_ipo_tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Args: arg: `runlocal` for a 20-step smoke run."""
  args = common.parse_arg(arg, runlocal=False)
  config = lm_ipo_tiny.get_config(
    "runlocal,init=" if args.runlocal else "init="
  )
  config.objective = "sft"
  del config["loss"]  # The NLL has no options.
  config.optimizer.learning_rate = 3e-3
  if not args.runlocal:
    config.total_steps = 600
  return config
