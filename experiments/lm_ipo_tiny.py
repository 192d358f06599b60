r"""IPO on a tiny language model, on the built-in text task (CPU, minutes).

The built-in task (`psipo_jax.data.text_task`, generated locally on first
use into `~/.cache/psipo_jax/text_task/`, 40,000 training and 400 held-out
pairs): prompts ask to sort or reverse a short word or count a letter in
it; the chosen response is right, the rejected one a plausible mistake of
the same length. A 4-layer, d = 64 decoder (`model.preset="tiny"` with
`num_layers=4`, byte tokenizer) trains with IPO (τ = 0.25, 1,000 steps of
32 pairs) from the SFT run of experiments/lm_sft_tiny.py, which is also the
frozen reference, through the full training system: the memory-lean
response-only LM head, checkpoints, and evaluation over the whole held-out
split.

Command (repository root), after the SFT run:

  python -m psipo_jax.main --config=experiments/lm_ipo_tiny.py \
      --workdir=runs/lm_ipo_tiny

Measured (README "Train a language model with IPO"): 2 min 51 s on the
2-core CPU, quiet; `eval/rewards/accuracies` (held-out pairs with h > 0) 0.863 at step
200 → 0.96 at step 1,000 (sort 0.985, reverse 0.993, count 0.902), and the
IPO loss 3.10 → 0.90 (4.0 at h = 0, the start). `:runlocal` trains 20
steps (a smoke run). Watch `eval/rewards/accuracies` and `eval/loss` in
metrics.jsonl.
"""

import functools

import ml_collections

from experiments import common
from psipo_jax.data import get_input_config
from psipo_jax.data import text_task


SFT_WORKDIR = "runs/lm_sft_tiny"
# Training pairs of the full runs, SFT and IPO (and KTO, REBEL) alike: one
# generator stream cut once, so no held-out prompt is ever trained on. The
# 4,000 of text_task's default under-trained the SFT model (README).
TRAIN_PAIRS = 40_000
# Decoder depth on top of the `tiny` preset (d = 64, 4 heads): counting a
# letter needs the query letter moved next to the word first, and 2 or 3
# layers do not learn it (README "Train a language model with IPO").
NUM_LAYERS = 4


@functools.lru_cache
def _cached_task_files(num_train: int) -> tuple[tuple[str, str], ...]:
  # Generating 40,400 records takes seconds: once per process.
  return tuple(text_task.cached_files(num_train=num_train).items())


def task_files(runlocal: bool = False) -> dict[str, str]:
  """{split: path} of the built-in task: TRAIN_PAIRS training pairs, or for
  a `runlocal` smoke run text_task's default 4,000 (quick to generate; its
  held-out prompts are among a full SFT run's training prompts, so a smoke
  run from runs/lm_sft_tiny measures nothing)."""
  num_train = text_task.DEFAULT_NUM_TRAIN if runlocal else TRAIN_PAIRS
  return dict(_cached_task_files(num_train))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Args: arg: `runlocal` (a 20-step smoke run), `loss=<name>` (default
  ipo), `init=<workdir>` (default runs/lm_sft_tiny; `init=` for none)."""
  args = common.parse_arg(arg, loss="ipo", runlocal=False, init=SFT_WORKDIR)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 20 if args.runlocal else 1000

  config.input = get_input_config("preference_pairs")
  config.input.files = task_files(args.runlocal)  # {"train": ..., "test": ...}
  config.input.batch_size = 32  # global
  config.input.max_length = 32  # the longest record is 26 bytes
  config.input.max_prompt_length = 24
  config.input.seed = config.get_ref("seed")

  config.model = ml_collections.ConfigDict()
  config.model.name = "transformer"
  config.model.preset = "tiny"
  config.model.vocab_size = 259  # the byte tokenizer: 256 bytes + BOS, EOS, PAD
  config.model.num_layers = NUM_LAYERS

  config.loss = ml_collections.ConfigDict()
  config.loss.name = args.loss
  config.loss.tau = 0.25
  config.loss.normalize = "sum"
  config.loss.nll_weight = 0.0
  config.loss.module = ml_collections.config_dict.placeholder(str)

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 5e-4
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 5 if args.runlocal else 30
  config.optimizer.grad_clip_norm = 1.0

  common.add_trainer_keys(config, mesh=True)
  # The SFT run of experiments/lm_sft_tiny.py (its documented workdir) is the
  # initial policy and so the reference; "" starts from a random policy.
  config.init_checkpoint = args.init
  config.log_every = 10 if args.runlocal else 50
  config.eval_every = 20 if args.runlocal else 200
  config.ckpt_every = 20 if args.runlocal else 200
  config.keep_checkpoints = 2
  return config
