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
      --all_steps --policies='ROOT/sweep/lm_oracle*/*'
  python -m psipo_jax.oracle_report --workdir=ROOT --out=experiments/figures

Every run keeps four checkpoints (`set_steps`), which `--all_steps`
evaluates for the learning curves; experiments/README.md ("Language model
with a known oracle") has the measured grid.

The same grid as ONE vmapped, jitted program in one process (the same
workdirs and files, so the evaluate stage reads them unchanged;
`psipo_jax.lm_grid`, benchmarks/lm_grid_speed.py):

  python -m psipo_jax.lm_grid --config=experiments/lm_oracle.py:root=ROOT \
      --root=ROOT/sweep

and every stage with that grid, the evaluation of every checkpoint, the
table and the figures, as one command (5 min 52 s on the 2-core CPU,
quiet; experiments/README.md):

  python -m psipo_jax.oracle_experiment --workdir=ROOT --stage=all \
      --grid=full --all_steps

Arguments: `root=DIR` (required), `loss=` (default ipo), `max_new_tokens=`
(the response cap the pairs were sampled with, default 10: it sets
max_length so that nothing is cut), `steps=` (training steps, default
200), `preset=` and `layers=` (the decoder: a `model.preset` and its
depth, default the 2-layer `tiny`; the SFT run at ROOT/sft must be the
same model), `runlocal` (30 steps), `tiny` (the
sweep: ipo, dpo × τ ∈ {0.1, 1}; by default ipo, dpo × τ ∈ {0.05, 0.1,
0.25, 0.5, 1} × seeds 0, 1, 2). Sizes are a CPU-minutes setting, not a tuned experiment.

Online IPO (`psipo_jax.online`): `online` samples the training pairs from
the policy as it trains instead of reading ROOT/pairs/train.jsonl (whose
prompts it uses), labelled by `oracle=` (default deterministic); `every=K`
(default 1) steps between refreshes, `mixture=β` (default 0: online IPO;
0 < β < 1: IPO-MD's geometric mixture with the reference; 1: the
reference). Evaluation is unchanged (ROOT/pairs/test.jsonl):

  python -m psipo_jax.main \
      --config=experiments/lm_oracle.py:root=ROOT,online \
      --workdir=ROOT/policies/online_ipo
"""

import os

import ml_collections

from experiments import common
from experiments import lm_ipo_tiny
from psipo_jax import sweeps
from psipo_jax.data import oracle_task


# The 2-layer `tiny` decoder, whatever depth the text-task configs use (the
# oracle task's words need no counting); the measured grid
# (experiments/README.md) ran at this size. The SFT stage uses it too.
NUM_LAYERS = 2


def _args(arg):
  return common.parse_arg(
    arg,
    root="",
    loss="ipo",
    max_new_tokens=10,
    runlocal=False,
    tiny=False,
    online=False,
    every=1,
    mixture=0.0,
    oracle="deterministic",
    steps=0,
    preset="tiny",
    layers=NUM_LAYERS,
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = _args(arg)
  if not args.root:
    raise ValueError(
      "experiments/lm_oracle.py needs root=DIR, the oracle experiment's"
      " workdir (e.g. --config=experiments/lm_oracle.py:root=runs/oracle)"
    )
  root = os.path.abspath(args.root)
  # `runlocal` there: the text task's small split (quick to write), as its
  # files are replaced by the pairs below; this config sets the steps.
  config = lm_ipo_tiny.get_config(
    f"runlocal=True,init={os.path.join(root, 'sft')},loss={args.loss}"
  )
  config.input.files = {
    split: os.path.join(root, "pairs", f"{split}.jsonl")
    for split in ("train", "test")
  }
  config.input.data_dir = os.path.join(root, "tfds")
  config.model.preset = args.preset  # vocab_size stays the byte tokenizer's
  config.model.num_layers = args.layers
  config.input.batch_size = 16
  # BOS + the longest prompt ("abcde ->") + the response cap: nothing is cut.
  longest_prompt = len(
    oracle_task.prompt_text("a" * oracle_task.MAX_PROMPT_LENGTH)
  )
  config.input.max_length = 1 + longest_prompt + args.max_new_tokens
  config.input.max_prompt_length = config.input.max_length - 1
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 0
  if args.online:  # Absent otherwise: offline runs' configs stay as they were.
    config.online = ml_collections.ConfigDict(
      dict(
        enabled=True,
        every=args.every,
        mixture=args.mixture,
        oracle=args.oracle,
        beta=1.0,
        pairs_per_prompt=1,
        max_new_tokens=args.max_new_tokens,
      )
    )
  return set_steps(config, args.steps or (30 if args.runlocal else 200))


def set_steps(
  config: ml_collections.ConfigDict, steps: int
) -> ml_collections.ConfigDict:
  """`steps` training steps with four checkpoints, all kept:
  `oracle_experiment --stage=evaluate --all_steps` evaluates each one for
  the learning curves of win rate and KL."""
  config.total_steps = steps
  config.log_every = max(1, steps // 20)
  config.eval_every = config.ckpt_every = max(1, steps // 4)
  config.keep_checkpoints = 5  # the 4 above and a last one when 4 ∤ steps
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
