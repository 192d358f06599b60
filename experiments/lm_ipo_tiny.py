r"""IPO on a tiny language model, on the built-in text task (CPU, minutes).

The built-in task (`psipo_jax.data.text_task`, generated locally on first
use into `~/.cache/psipo_jax/text_task/`): prompts ask to sort or reverse a
short word or count a letter in it; the chosen response is right, the
rejected one a plausible mistake of the same length. A 2-layer, d = 64
decoder (`model.preset="tiny"`, byte tokenizer) trains with IPO (τ = 0.25)
from its random initialisation, the reference being that initialisation,
through the full training system: the memory-lean response-only LM head,
checkpoints, and evaluation over the whole held-out split (400 pairs).

Command (repository root):

  python -m psipo_jax.main --config=experiments/lm_ipo_tiny.py \
      --workdir=runs/lm_ipo_tiny

`:runlocal` trains 20 steps (a smoke run). Watch `eval/rewards/accuracies`
(the fraction of held-out pairs with h > 0) and `eval/loss` in
metrics.jsonl.
"""

import ml_collections

from experiments import common
from psipo_jax.data import get_input_config
from psipo_jax.data import text_task


SFT_WORKDIR = "runs/lm_sft_tiny"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Args: arg: `runlocal` (a 20-step smoke run), `loss=<name>` (default
  ipo), `init=<workdir>` (default runs/lm_sft_tiny; `init=` for none)."""
  args = common.parse_arg(arg, loss="ipo", runlocal=False, init=SFT_WORKDIR)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 20 if args.runlocal else 600

  config.input = get_input_config("preference_pairs")
  config.input.files = text_task.cached_files()  # {"train": ..., "test": ...}
  config.input.batch_size = 32  # global
  config.input.max_length = 32  # the longest record is 26 bytes
  config.input.max_prompt_length = 24
  config.input.seed = config.get_ref("seed")

  config.model = ml_collections.ConfigDict()
  config.model.name = "transformer"
  config.model.preset = "tiny"
  config.model.vocab_size = 259  # the byte tokenizer: 256 bytes + BOS, EOS, PAD

  config.loss = ml_collections.ConfigDict()
  config.loss.name = args.loss
  config.loss.tau = 0.25
  config.loss.normalize = "sum"
  config.loss.nll_weight = 0.0
  config.loss.module = ml_collections.config_dict.placeholder(str)

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 5 if args.runlocal else 30
  config.optimizer.grad_clip_norm = 1.0

  common.add_trainer_keys(config)
  # The SFT run of experiments/lm_sft_tiny.py (its documented workdir) is the
  # initial policy and so the reference; "" starts from a random policy.
  config.init_checkpoint = args.init
  config.log_every = 10 if args.runlocal else 50
  config.eval_every = 20 if args.runlocal else 200
  config.ckpt_every = 20 if args.runlocal else 200
  config.keep_checkpoints = 2
  return config
