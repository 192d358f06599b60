r"""IPO from a pretrained Hugging Face checkpoint, for an accelerator.

The policy, and the frozen reference, start from a local Hugging Face model
directory (`model.init_from_hf`: config.json + safetensors, e.g. a
Qwen2.5-0.5B or Llama-3.2-1B download), whose tokenizer.json tokenises the
data (`input.tokenizer=hf:DIR`). bfloat16 compute with per-layer
rematerialisation, IPO (τ = 0.1), AdamW at 1e-6 with a cosine schedule, on
the built-in text task unless you point `input.files` at your pairs:

  python -m psipo_jax.main --config=experiments/lm_ipo_hf.py:hf=/models/Qwen2.5-0.5B \
      --workdir=DIR [--config.mesh.fsdp=-1] \
      [--config.input.files="{'train': 'train.jsonl.gz', 'test': 'test.jsonl.gz'}"]

Then write the trained policy back as a Hugging Face directory (see README
"Start from a pretrained model"). `:runlocal,hf=DIR` is a CPU check on a
tiny local model (tests/hf_experiment_test.py builds one with transformers):
float32, no remat, 4 steps. Expected on an accelerator: not yet measured (no
device run has been made with this config).
"""

import ml_collections

from experiments import common
from experiments import lm_ipo_tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Args: arg: `hf=<model dir>` (required), `runlocal` (CPU check)."""
  args = common.parse_arg(arg, hf="", runlocal=False)
  if not args.hf:
    raise ValueError(
      "config argument hf=<Hugging Face model directory> is required"
      " (--config=experiments/lm_ipo_hf.py:hf=/path/to/model)"
    )
  # `runlocal`: the built-in task's small split, quick to prepare.
  config = lm_ipo_tiny.get_config(f"runlocal={args.runlocal},init=")
  config.model = ml_collections.ConfigDict(
    {
      "name": "transformer",
      "init_from_hf": args.hf,
      "dtype": "bfloat16",
      "remat": True,
    }
  )
  config.input.tokenizer = f"hf:{args.hf}"
  config.input.batch_size = 64
  config.input.max_length = 64  # the built-in task; raise for real data
  config.input.max_prompt_length = 48
  config.loss.tau = 0.1
  config.optimizer.learning_rate = 1e-6
  config.optimizer.warmup_steps = 50
  config.total_steps = 1000
  config.log_every, config.eval_every, config.ckpt_every = 50, 250, 250
  if args.runlocal:
    config.model.dtype = "float32"
    config.model.remat = False
    config.input.batch_size = 8
    config.total_steps = 4
    config.optimizer.warmup_steps = 0
    config.optimizer.learning_rate = 1e-3
    config.log_every = config.eval_every = config.ckpt_every = 4
  return config
