r"""REBEL on a tiny language model, on the built-in text task (CPU, minutes).

REBEL regresses τ·h onto each pair's reward difference, read from the
`margin` field of the data. The built-in task (`psipo_jax.data.text_task`)
has no rewards, so this config writes a copy of its files with a known one:

    r(x, y) = −(fraction of the answer's characters that y gets wrong),

so the right answer scores 0 and margin = r(chosen) − r(rejected) is the
fraction of characters (after the leading space) where the mistake differs
from it: 1/2 for a swapped adjacent pair in a 4-letter word, 1 for a wrong
count digit. A 4-layer, d = 64 decoder (`model.preset="tiny"`,
`num_layers=4`, byte tokenizer) trains with REBEL (τ = 1/η = 0.25, summed
log-probs) from the SFT run of experiments/lm_sft_tiny.py, the reference
being that initial policy; the pairs are lm_ipo_tiny's (its SFT run's
split, 40,000 training pairs); evaluation covers the whole held-out split
(400 pairs).

Command (repository root):

  python -m psipo_jax.main --config=experiments/lm_rebel_tiny.py \
      --workdir=runs/lm_rebel_tiny

`:runlocal` trains 20 steps; `:init=` starts from a random policy. Watch
`eval/loss` and `eval/rewards/accuracies` in metrics.jsonl.
"""

import json
import os

import ml_collections

from experiments import common
from experiments import lm_ipo_tiny

SFT_WORKDIR = "runs/lm_sft_tiny"


def reward_difference(chosen: str, rejected: str) -> float:
  """r(chosen) − r(rejected) for r = −(fraction of wrong characters).

  The text task's chosen response is the right answer and the rejected one
  has its length (both start with a space, which is not scored).
  """
  answer, mistake = chosen[1:], rejected[1:]
  if len(answer) != len(mistake) or not answer:
    raise ValueError(f"unequal or empty responses {chosen!r}, {rejected!r}")
  wrong = sum(a != b for a, b in zip(answer, mistake))
  return wrong / len(answer)


def with_reward_margins(files: dict[str, str]) -> dict[str, str]:
  """Copies of the text task's files with `margin` set; returns {split: path}.

  Written beside the originals (in `rebel_margin/`), rewritten only when
  their content would change (a prepared dataset stays valid).
  """
  out = {}
  for split, path in files.items():
    out_dir = os.path.join(os.path.dirname(path), "rebel_margin")
    os.makedirs(out_dir, exist_ok=True)
    lines = []
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        record["margin"] = reward_difference(
          record["chosen"], record["rejected"]
        )
        lines.append(json.dumps(record, sort_keys=True) + "\n")
    data = "".join(lines).encode()
    target = os.path.join(out_dir, os.path.basename(path))
    if not (os.path.exists(target) and open(target, "rb").read() == data):
      tmp = f"{target}.tmp{os.getpid()}"
      with open(tmp, "wb") as f:
        f.write(data)
      os.replace(tmp, target)
    out[split] = target
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Args: arg: `runlocal` (a 20-step smoke run), `init=<workdir>` (default
  runs/lm_sft_tiny; `init=` for none)."""
  args = common.parse_arg(arg, runlocal=False, init=SFT_WORKDIR)
  # The IPO config (τ = 0.25, sum log-probs) with REBEL's loss and margins.
  config = lm_ipo_tiny.get_config(
    f"loss=rebel,runlocal={args.runlocal},init={args.init}"
  )
  config.input.files = with_reward_margins(config.input.files)
  return config
