r"""ΨPO training step of the 125m and 1b presets on one accelerator: MFU.

For each preset, in bfloat16 compute (float32 parameters and AdamW state):
the largest batch of pairs (from --batch_sizes, tried largest first) whose
compiled step fits the device's memory, then the step time over --steps
steps, response and total tokens per second, the peak device memory, and
the model-FLOPs utilisation

    MFU = flops_per_token(T) · tokens per step / step time / peak FLOP/s

with `transformer.flops_per_token` (6 · matmul weights + the attention
scores and values over the full T × T, PaLM's convention; the lean LM head
does less than this counts, so MFU is not flattered) and the chip's dense
bf16 peak (`PEAK_TFLOPS` by device kind, or --peak_tflops). The step is the
training system's own (`train_step.make_train_step`, IPO, τ = 0.1) with
the reference's log-probs precomputed in the batch (`state.ref_params` is
None), so every counted FLOP is the policy's forward and backward pass.
Rows are T = --seq_len tokens, the second half the response.

Usage (repository root, on a GPU or TPU host):

  PYTHONPATH=. python benchmarks/lm_device.py [--presets=125m,1b] \
      [--seq_len=1024] [--batch_sizes=64,32,16,8,4] [--steps=10] \
      [--attention=xla|cudnn] [--remat]

On CPU it runs as a smoke check (`--presets=tiny --batch_sizes=2
--peak_tflops=1`); its MFU figure means nothing there.
"""

import argparse
import time

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from psipo_jax import models
from psipo_jax.loss_config import LossConfig
from psipo_jax.models import transformer
from psipo_jax.train_state import TrainState
from psipo_jax.train_step import make_train_step

# Dense bf16 peak TFLOP/s per chip, from the vendors' data sheets (no
# sparsity), keyed by a substring of `jax.Device.device_kind`.
PEAK_TFLOPS = {
  "H100": 989.4,  # SXM; the PCIe card is 756
  "H200": 989.4,
  "A100": 312.0,
  "TPU v4": 275.0,
  "TPU v5 lite": 197.0,  # v5e
  "TPU v5p": 459.0,
  "TPU v6 lite": 918.0,  # Trillium (v6e)
}


def peak_tflops(device: jax.Device, given: float | None) -> float:
  if given is not None:
    return given
  for kind, tflops in PEAK_TFLOPS.items():
    if kind in device.device_kind:
      return tflops
  raise SystemExit(
    f"no peak FLOP/s known for {device.device_kind!r}: pass --peak_tflops"
  )


def random_pairs(pairs: int, seq_len: int, vocab: int, seed: int = 0):
  """Pairs of random token rows [pairs, seq_len], the second half of each
  the response (the benchmarks' shared synthetic batch)."""
  rng = np.random.default_rng(seed)
  batch = {}
  for side in ("chosen", "rejected"):
    batch[f"{side}_input_ids"] = rng.integers(
      3, vocab, (pairs, seq_len), dtype=np.int32
    )
    mask = np.zeros((pairs, seq_len), np.int32)
    mask[:, seq_len // 2 :] = 1
    batch[f"{side}_loss_mask"] = mask
    batch[f"{side}_attention_mask"] = np.ones((pairs, seq_len), np.int32)
  return batch


def make_batch(pairs: int, seq_len: int, vocab: int, seed: int = 0):
  """`random_pairs` with the reference's summed log-probs as precomputed
  constants."""
  batch = random_pairs(pairs, seq_len, vocab, seed)
  for side in ("chosen", "rejected"):
    batch[f"ref_{side}_logps"] = np.full((pairs,), -1.0 * seq_len, np.float32)
  return batch


def compiled_step(block, pairs, seq_len):
  """(jitted step, state, device batch, compiled) for `pairs` pairs."""
  model = models.build_model(block, rngs=nnx.Rngs(0))
  optimizer = optax.adamw(1e-5)
  graphdef, state = TrainState.create(
    model, optimizer, rng=jax.random.PRNGKey(0)
  )
  state = state.replace(ref_params=None)
  step = jax.jit(
    make_train_step(graphdef, LossConfig("ipo", tau=0.1), optimizer),
    donate_argnums=0,
  )
  batch = jax.device_put(make_batch(pairs, seq_len, models.vocab_size(block)))
  return step, state, batch, step.lower(state, batch).compile()


def compiled_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries of a compiled step, if XLA says."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    + stats.temp_size_in_bytes
    - stats.alias_size_in_bytes
  )


def run_preset(args, preset, device, peak):
  block = ml_collections.ConfigDict(
    {
      "name": "transformer",
      "preset": preset,
      "dtype": "bfloat16",
      "attention": args.attention,
      "remat": args.remat,
    }
  )
  config = transformer.config_from_model_block(block)
  limit = (device.memory_stats() or {}).get("bytes_limit")
  for pairs in args.batch_sizes:
    try:
      step, state, batch, compiled = compiled_step(block, pairs, args.seq_len)
    except Exception as e:  # pylint: disable=broad-except
      if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e).lower():
        print(f"  {preset}: {pairs} pairs do not compile in memory")
        continue
      raise
    need = compiled_bytes(compiled)
    if limit is not None and need is not None and need > limit:
      print(
        f"  {preset}: {pairs} pairs need {need / 2**30:.1f} GiB >"
        f" {limit / 2**30:.1f} GiB"
      )
      # This attempt's state and batch leave the device before the next
      # (smaller) attempt builds its own: at 1b the state alone is 13 GB.
      del step, state, batch, compiled
      continue
    try:
      state, metrics = step(state, batch)  # warm-up
      jax.block_until_ready(metrics)
      start = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
    except Exception as e:  # pylint: disable=broad-except
      if "RESOURCE_EXHAUSTED" in str(e):
        print(f"  {preset}: {pairs} pairs ran out of memory")
        del step, state, batch, compiled
        continue
      raise
    seconds = (time.perf_counter() - start) / args.steps
    if not np.isfinite(float(metrics["loss"])):
      raise SystemExit(f"{preset}: non-finite loss {metrics['loss']}")
    tokens = 2 * pairs * args.seq_len  # chosen + rejected rows
    flops = transformer.flops_per_token(config, args.seq_len) * tokens
    # XLA's figure is this step's; the allocator's peak is the process's
    # since start, so it includes any larger batch tried before this one.
    peak_bytes = (device.memory_stats() or {}).get("peak_bytes_in_use")
    memory = ", ".join(
      text
      for text in (
        need and f"{need / 2**30:.1f} GiB by XLA's memory analysis",
        peak_bytes and f"{peak_bytes / 2**30:.1f} GiB process peak in use",
      )
      if text
    )
    print(
      f"  {preset}: {transformer.param_count(config) / 1e6:.1f}M params,"
      f" {pairs} pairs x {args.seq_len} tokens ({tokens} tokens/step):"
      f" {seconds * 1e3:.1f} ms/step, {tokens / seconds:,.0f} tokens/s"
      f" ({tokens / 2 / seconds:,.0f} response tokens/s),"
      f" {memory or 'memory not reported'},"
      f" MFU {flops / seconds / (peak * 1e12):.1%}"
    )
    return
  print(f"  {preset}: no batch of {args.batch_sizes} fits")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="125m,1b")
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument(
    "--batch_sizes",
    default="64,32,16,8,4,2,1",
    type=lambda s: sorted({int(x) for x in s.split(",")}, reverse=True),
  )
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--attention", default="xla")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--peak_tflops", type=float, default=None)
  args = parser.parse_args()

  device = jax.devices()[0]
  peak = peak_tflops(device, args.peak_tflops)
  print(
    f"{device.device_kind} ({jax.default_backend()}), peak {peak} bf16"
    f" TFLOP/s; attention {args.attention}, remat {args.remat}; jax"
    f" {jax.__version__}"
  )
  with jax.default_device(device):
    for preset in args.presets.split(","):
      run_preset(args, preset, device, peak)


if __name__ == "__main__":
  main()
