r"""IPO on a 1.1B-parameter decoder (the `1b` preset), for an accelerator.

experiments/lm_125m.py at the `1b` preset (22 layers, d = 2,048, 32 heads /
4 KV heads, vocab 32,000: the TinyLlama-1.1B shape, 1.10B parameters); the
same keys, commands and `:runlocal` CPU check (2 layers of that width).

  python -m psipo_jax.main --config=experiments/lm_1b.py --workdir=DIR \
      [--config.mesh.fsdp=-1]
"""

from experiments import lm_125m


def get_config(arg=None):
  """Args: arg: as experiments/lm_125m.py (`runlocal`, `init=<workdir>`)."""
  return lm_125m.get_config(arg, preset="1b")
