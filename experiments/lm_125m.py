r"""IPO on a 125M-parameter decoder (the `125m` preset), for an accelerator.

The Llama-style `125m` preset (30 layers, d = 576, 9 heads / 3 KV heads,
vocab 49,152, tied embeddings: the SmolLM2-135M shape, 134.5M parameters)
in bfloat16 compute with per-layer rematerialisation, IPO (τ = 0.1) with
AdamW and a cosine schedule. Data: the built-in text task by default, so the
command runs anywhere; point it at your own pairs and tokenizer:

  python -m psipo_jax.main --config=experiments/lm_125m.py --workdir=DIR \
      [--config.input.files="{'train': 'train.jsonl.gz', 'test': 'test.jsonl.gz'}"] \
      [--config.input.tokenizer=hf:/path/to/tokenizer.json] \
      [--config.init_checkpoint=SFT_WORKDIR] [--config.mesh.fsdp=-1]

`experiments/lm_1b.py` is the same at the `1b` preset. `:runlocal` keeps
the preset's width but 2 layers, float32 and 4 steps, for a CPU check of
the config (a few minutes on 2 cores). Expected on an accelerator: not yet
measured (no device run has been made with this config).
"""

import ml_collections

from experiments import common
from experiments import lm_ipo_tiny


def get_config(
  arg: str | None = None, *, preset: str = "125m"
) -> ml_collections.ConfigDict:
  """Args: arg: `runlocal` (CPU check), `init=<workdir>` (default none)."""
  args = common.parse_arg(arg, runlocal=False, init="")
  # `runlocal`: the built-in task's small split, quick to prepare.
  config = lm_ipo_tiny.get_config(f"runlocal={args.runlocal},init={args.init}")
  config.model = ml_collections.ConfigDict(
    {
      "name": "transformer",
      "preset": preset,
      "dtype": "bfloat16",
      "remat": True,
    }
  )
  config.input.batch_size = 64
  config.input.max_length = 64  # the built-in task; raise for real data
  config.loss.tau = 0.1
  config.optimizer.learning_rate = 1e-5
  config.total_steps = 2000
  config.optimizer.warmup_steps = 100
  config.log_every, config.eval_every, config.ckpt_every = 50, 500, 500
  if args.runlocal:
    config.model.num_layers = 2
    config.model.dtype = "float32"
    config.model.remat = False
    config.input.batch_size = 8
    config.total_steps = 4
    config.optimizer.warmup_steps = 0
    config.log_every = config.eval_every = config.ckpt_every = 4
  return config
