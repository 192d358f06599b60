r"""SFT of the tiny language model on the built-in text task's chosen responses.

Stage 1 of the tiny language-model pipeline: the decoder of
experiments/lm_ipo_tiny.py (4 layers, d = 64, byte tokenizer) learns the
chosen (correct) responses of the task's 40,000 training pairs by
token-level NLL (`objective="sft"`, 3,000 steps of 32, AdamW 3e-3 cosine);
its workdir is then the initial policy and the reference of the IPO stage:

  python -m psipo_jax.main --config=experiments/lm_sft_tiny.py \
      --workdir=runs/lm_sft_tiny
  python -m psipo_jax.main --config=experiments/lm_ipo_tiny.py \
      --workdir=runs/lm_ipo_tiny

Measured (README "Train a language model with IPO"): 3 min 47 s on the
2-core CPU, quiet, generating the task included; held-out perplexity per response token 1.026, and the model ranks the
right answer above the mistake on 0.958 of held-out pairs (sort and reverse
1.00, count 0.87). Counting a letter needs all three of depth, data and
steps: 2 layers on the same data and steps leave count at 0.65, and 600
steps on 4,000 pairs at 0.63. `:runlocal` trains 20 steps. Watch
`eval/nll` and `eval/perplexity` (per response token, over the whole
held-out split) in metrics.jsonl.
"""

import ml_collections

from experiments import common
from experiments import lm_ipo_tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Args: arg: `runlocal` for a 20-step smoke run."""
  args = common.parse_arg(arg, runlocal=False)
  config = lm_ipo_tiny.get_config(f"runlocal={args.runlocal},init=")
  config.objective = "sft"
  del config["loss"]  # The NLL has no options.
  config.optimizer.learning_rate = 3e-3
  if not args.runlocal:
    config.total_steps = 3000
  return config
