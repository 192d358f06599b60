r"""ΨPO on oracle-labelled samples of the tiny LM (the known-oracle task).

The `train` stage of `python -m psipo_jax.oracle_experiment` as a config
file, so that the loss × τ × seed grid runs through the sweep machinery.
It reads what the earlier stages wrote in ROOT (the experiment's workdir):
the pairs ROOT/pairs/{train,test}.jsonl (sampled from the SFT policy and
labelled by the oracle) and the SFT run ROOT/sft, which is the initial
policy and the reference. The model is experiments/lm_ipo_tiny.py's.

  python -m psipo_jax.oracle_experiment --workdir=ROOT --stage=data
  python -m psipo_jax.oracle_experiment --workdir=ROOT --stage=sft
  python -m psipo_jax.oracle_experiment --workdir=ROOT --stage=pairs
  launch/sweep.py --config=experiments/lm_oracle.py:root=ROOT \
      --root=ROOT/sweep --parallel=2
  python -m psipo_jax.oracle_experiment --workdir=ROOT --stage=evaluate \
      --policies='ROOT/sweep/lm_oracle*/*'

The same grid as ONE vmapped, jitted program in one process (the same
workdirs and files, so the evaluate stage reads them unchanged;
`psipo_jax.lm_grid`, benchmarks/lm_grid_speed.py):

  python -m psipo_jax.lm_grid --config=experiments/lm_oracle.py:root=ROOT \
      --root=ROOT/sweep

Arguments: `root=DIR` (required), `loss=` (default ipo), `max_new_tokens=`
(the response cap the pairs were sampled with, default 10: it sets
max_length so that nothing is cut), `runlocal` (30 steps), `tiny` (the
sweep: ipo, dpo × τ ∈ {0.1, 1}; by default ipo, dpo × τ ∈ {0.05, 0.1,
0.25, 0.5, 1} × seeds 0, 1, 2). Sizes are a CPU-minutes setting, not a tuned experiment.
"""

import os

import ml_collections

from experiments import common
from experiments import lm_ipo_tiny
from psipo_jax import sweeps
from psipo_jax.data import oracle_task


def _args(arg):
  return common.parse_arg(
    arg, root="", loss="ipo", max_new_tokens=10, runlocal=False, tiny=False
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = _args(arg)
  if not args.root:
    raise ValueError(
      "experiments/lm_oracle.py needs root=DIR, the oracle experiment's"
      " workdir (e.g. --config=experiments/lm_oracle.py:root=runs/oracle)"
    )
  root = os.path.abspath(args.root)
  config = lm_ipo_tiny.get_config(
    f"runlocal={args.runlocal},init={os.path.join(root, 'sft')},"
    f"loss={args.loss}"
  )
  config.input.files = {
    split: os.path.join(root, "pairs", f"{split}.jsonl")
    for split in ("train", "test")
  }
  config.input.data_dir = os.path.join(root, "tfds")
  config.input.batch_size = 16
  # BOS + the longest prompt ("abcde ->") + the response cap: nothing is cut.
  longest_prompt = len(
    oracle_task.prompt_text("a" * oracle_task.MAX_PROMPT_LENGTH)
  )
  config.input.max_length = 1 + longest_prompt + args.max_new_tokens
  config.input.max_prompt_length = config.input.max_length - 1
  config.total_steps = 30 if args.runlocal else 200
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 0
  steps = config.total_steps
  config.log_every = config.eval_every = config.ckpt_every = steps
  return config


def get_sweep(arg: str | None = None):
  if _args(arg).tiny:
    return sweeps.product(
      sweeps.sweep("loss.name", ["ipo", "dpo"]),
      sweeps.sweep("loss.tau", [0.1, 1.0]),
    )
  return sweeps.product(
    sweeps.sweep("loss.name", ["ipo", "dpo"]),
    sweeps.sweep("loss.tau", [0.05, 0.1, 0.25, 0.5, 1.0]),
    sweeps.sweep("seed", range(3)),
  )
