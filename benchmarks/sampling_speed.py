r"""Tokens/s of the KV-cached sampler vs full recomputation per token.

The same transformer and the same batch of left-padded prompts (lengths
spread over [prompt_length / 2, prompt_length]) continue by greedy decoding
for `--new_tokens` tokens (no EOS stop, so both make every token), twice in
this one process:

  kv_cache    `psipo_jax.sampling.make_sampler`: one jitted program, the
              prompt prefilled once, then one token per step against the
              cache under `lax.while_loop`;
  recompute   for every new token, the full forward pass
              (`Transformer.logits`) over the whole prefix at its exact
              length (prompt + tokens so far), jitted per length, the
              argmax taken on device.

Compilation is excluded from both timings (each is run once before it is
timed: the recompute baseline then has compiled all its lengths), and
reported apart. Both must produce the same tokens; the script checks it.
The printed ratio is tokens/s of kv_cache over recompute, the median of
`--rounds` timed runs each.

Usage (repository root):

  PYTHONPATH=. python benchmarks/sampling_speed.py [--preset=small] \
      [--batch=8] [--prompt_length=32] [--new_tokens=128] [--rounds=3]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from psipo_jax import models
from psipo_jax import sampling
from psipo_jax import sharding


def _prompts(rng, batch, length, vocab):
  lengths = np.linspace(length // 2, length, batch).astype(int)
  return [rng.integers(3, vocab, size=n) for n in lengths]


def _recompute(forward, params, prompt_tokens, lengths, new_tokens):
  """Greedy tokens [N, M] by one full forward pass per token."""
  tokens = jnp.asarray(prompt_tokens)
  mask = jnp.asarray(
    np.arange(prompt_tokens.shape[1])[None]
    >= (prompt_tokens.shape[1] - lengths)[:, None],
    jnp.int32,
  )
  out = []
  for _ in range(new_tokens):
    nxt = forward(params, tokens, mask)  # [N]
    out.append(nxt)
    tokens = jnp.concatenate([tokens, nxt[:, None]], axis=1)
    mask = jnp.concatenate([mask, jnp.ones_like(mask[:, :1])], axis=1)
  return jax.block_until_ready(jnp.stack(out, axis=1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="small")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt_length", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()

  block = ml_collections.ConfigDict(
    {"name": "transformer", "preset": args.preset}
  )
  model = models.build_model(block, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  rng = np.random.default_rng(0)
  prompts = _prompts(
    rng, args.batch, args.prompt_length, model.config.vocab_size
  )
  prompt_tokens, lengths = sampling.left_pad(prompts, pad_id=0)
  mesh = sharding.make_mesh(jax.devices()[:1])
  config = sampling.SamplingConfig(
    max_new_tokens=args.new_tokens, temperature=0.0
  )
  sampler = sampling.make_sampler(graphdef, config, mesh=mesh)

  def kv_cache():
    out = sampler(params, prompt_tokens, lengths, jax.random.key(0))
    return jax.block_until_ready(out.tokens)

  @jax.jit
  def forward(params, tokens, mask):
    logits = nnx.merge(graphdef, params).logits(
      dict(input_ids=tokens, attention_mask=mask)
    )
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

  def recompute():
    return _recompute(forward, params, prompt_tokens, lengths, args.new_tokens)

  compile_s = {}
  for name, fn in (("kv_cache", kv_cache), ("recompute", recompute)):
    start = time.perf_counter()
    fn()
    compile_s[name] = time.perf_counter() - start
  times = {"kv_cache": [], "recompute": []}
  results = {}
  for _ in range(args.rounds):
    for name, fn in (("kv_cache", kv_cache), ("recompute", recompute)):
      start = time.perf_counter()
      results[name] = np.asarray(fn())
      times[name].append(time.perf_counter() - start)
  same = np.array_equal(results["kv_cache"], results["recompute"])
  tokens = args.batch * args.new_tokens
  rate = {k: tokens / float(np.median(v)) for k, v in times.items()}
  c = model.config
  print(
    f"preset={args.preset} (L={c.num_layers}, d={c.embed_dim},"
    f" V={c.vocab_size}), batch={args.batch}, prompts"
    f" {lengths.min()}..{lengths.max()} tokens, {args.new_tokens} new"
    f" tokens, greedy, {jax.devices()[0].platform}, rounds={args.rounds}"
  )
  for name in ("kv_cache", "recompute"):
    print(
      f"  {name:9s}  {rate[name]:10.1f} tokens/s  (median"
      f" {np.median(times[name]):.3f} s per batch; first run incl. compile"
      f" {compile_s[name]:.1f} s)"
    )
  print(f"  same tokens: {same}")
  print(
    f"  speed-up kv_cache / recompute: {rate['kv_cache'] / rate['recompute']:.1f}x"
  )
  if not same:
    raise SystemExit("the two decoders disagree: the KV cache is wrong")


if __name__ == "__main__":
  main()
