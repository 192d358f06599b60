"""The KV-cached forward pass of `transformer.Transformer`, for sampling.

It runs the transformer's own modules and parameters (`Block.input_norm`,
`Block.attention`'s projections, `Block.mlp`, ...) in an order that reads
and writes a cache of keys and values, so a sampler pays for one new token
per step instead of the whole prefix. Nothing here owns parameters: a
model trained (or loaded) as a `Transformer` decodes as it is. The sampler
(`psipo_jax.sampling`) tests it against full recomputation, so a change of
the transformer that this file does not follow fails there.

Layout: LEFT-PADDED rows. The cache has S slots per row; slot s of every
row is written at the same step (prompts end together at slot P − 1, and
generated tokens follow at P, P + 1, ...), so one `dynamic_update_slice`
serves the whole batch and no per-row index is gathered. A row with
`offset` padding slots gives its token at slot s the position s − offset:
exactly the position `transformer.segments_and_positions` gives a
left-padded row of the full forward pass, so both see the same inputs.

Attention rule (that of the full forward pass, with segments 1 = real and
0 = padding): a query at slot q sees key slot s iff s ≤ q and both are
real, or both are padding; padding queries' outputs are never used, and
seeing themselves keeps their softmax rows non-empty.

Shapes: L layers, N rows, S slots, t tokens fed at once (the prompt length
P at prefill, 1 per decode step), d = embed_dim, K key/value heads, Dh =
head_dim.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from psipo_jax import logprobs as logprobs_lib
from psipo_jax import sharding
from psipo_jax.models import layers
from psipo_jax.models import transformer

# Logical axes of the cache's [L, N, S, K, Dh] keys and values
# (`sharding.constrain`; its [N, S] `real` takes the second and third).
_CACHE_AXES = (
  None,
  "activation_batch",
  "activation_length",
  "activation_kv_heads",
  None,
)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, and which slots hold real tokens.

  Attributes:
    keys: [L, N, S, K, Dh] in the compute dtype, after RoPE.
    values: [L, N, S, K, Dh].
    real: [N, S] bool, slot holds a real (not padding) token; False on slots
      not yet written.
    offsets: [N] int32, padding slots at the left of each row (the position
      of slot s is s − offset).
    index: [] int32, the next slot to write.
  """

  keys: jax.Array
  values: jax.Array
  real: jax.Array
  offsets: jax.Array
  index: jax.Array

  @property
  def num_slots(self) -> int:
    return self.keys.shape[2]


# Options of `TransformerConfig` (Hugging Face families: Gemma, long-context
# RoPE, sliding windows) that this decode path does not implement yet; a
# model using one is refused rather than decoded wrongly.
_UNSUPPORTED_OPTIONS = (
  "rope_scaling",
  "sliding_window",
  "layer_types",
  "embed_scale",
  "sandwich_norms",
  "query_pre_attn_scalar",
  "rope_local_theta",
  "attn_logit_softcap",
  "final_logit_softcap",
)


def check_supported(config: transformer.TransformerConfig) -> None:
  """Raises ValueError naming the first `model.<option>` set to a value the
  KV-cached path does not implement."""
  defaults = {f.name: f.default for f in dataclasses.fields(config)}
  for name in _UNSUPPORTED_OPTIONS:
    value = getattr(config, name)
    if value != defaults[name]:
      raise ValueError(
        f"the KV-cached sampler does not implement model.{name}={value!r}"
        f" (supported: the default {defaults[name]!r}); this model can be"
        " trained and scored, not sampled from, yet"
      )


def init_cache(
  config: transformer.TransformerConfig,
  offsets: jax.Array,
  num_slots: int,
) -> KVCache:
  """An empty cache of `num_slots` slots for rows with `offsets` [N] padding."""
  n = offsets.shape[0]
  shape = (
    config.num_layers,
    n,
    num_slots,
    config.num_kv_heads,
    config.head_dim,
  )
  return KVCache(
    keys=jnp.zeros(shape, config.compute_dtype),
    values=jnp.zeros(shape, config.compute_dtype),
    real=jnp.zeros((n, num_slots), bool),
    offsets=jnp.asarray(offsets, jnp.int32),
    index=jnp.zeros((), jnp.int32),
  )


def _attend(
  attention: layers.Attention,
  x: jax.Array,
  positions: jax.Array,
  mask: jax.Array,
  index: jax.Array,
  keys: jax.Array,
  values: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`layers.Attention.__call__` with this layer's cache [N, S, K, Dh].

  The new keys and values [N, t, K, Dh] go to slots index .. index + t − 1;
  the queries attend over all S slots under `mask` [N, 1, t, S].
  Returns (output [N, t, d], keys, values).
  """
  q = attention._project(x, attention.q_proj, "q_bias")  # [N, t, H, Dh]
  k = attention._project(x, attention.k_proj, "k_bias")  # [N, t, K, Dh]
  v = attention._project(x, attention.v_proj, "v_bias")  # [N, t, K, Dh]
  if attention.qk_norm:
    q, k = attention.q_norm(q), attention.k_norm(k)
  q = layers.apply_rope(q, positions, theta=attention.rope_theta)
  k = layers.apply_rope(k, positions, theta=attention.rope_theta)
  start = (0, index, 0, 0)
  keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), start)
  values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), start)
  # The XLA kernel whatever `attention.implementation`: one query row per
  # step against an explicit mask is not the shape cuDNN's fused kernel is for.
  out = jax.nn.dot_product_attention(
    q, keys, values, mask=mask, implementation="xla"
  )  # [N, t, H, Dh]
  out = attention.output(out)
  return out, keys, values


def forward(
  model: transformer.Transformer,
  tokens: jax.Array,
  cache: KVCache,
) -> tuple[jax.Array, KVCache]:
  """Feeds `tokens` [N, t] at slots cache.index .. index + t − 1.

  Slots before a row's offset are padding (their tokens are ignored); every
  later slot is a real token.

  Returns:
    (hidden states [N, t, d] after the final norm, in the compute dtype,
    the cache with the t slots written and `index` advanced by t).
  """
  c = model.config
  check_supported(c)
  t = tokens.shape[1]
  slots = cache.index + jnp.arange(t, dtype=jnp.int32)  # [t]
  real_new = slots[None, :] >= cache.offsets[:, None]  # [N, t]
  positions = jnp.maximum(slots[None, :] - cache.offsets[:, None], 0)  # [N, t]
  real = jax.lax.dynamic_update_slice(cache.real, real_new, (0, cache.index))
  key_slots = jnp.arange(cache.num_slots, dtype=jnp.int32)  # [S]
  causal = key_slots[None, :] <= slots[:, None]  # [t, S]
  same_kind = real_new[:, :, None] == real[:, None, :]  # [N, t, S]
  mask = (causal[None] & same_kind)[:, None]  # [N, 1, t, S]

  # Activations pinned as in `Transformer.hidden_states` (under a mesh).
  table = sharding.constrain(model.embed_tokens[...], layers.TABLE)  # [V, d]
  x = jnp.take(table, tokens, axis=0).astype(c.compute_dtype)
  x = sharding.constrain(x, layers.RESIDUAL)  # [N, t, d]
  block_def, block_state = nnx.split(model.layers)

  def layer(x, per_layer):
    state, keys, values = per_layer
    block = nnx.merge(block_def, state)
    out, keys, values = _attend(
      block.attention,
      block.input_norm(x),
      positions,
      mask,
      cache.index,
      keys,
      values,
    )
    x = x + out
    x = x + block.mlp(block.post_attention_norm(x))
    return sharding.constrain(x, layers.RESIDUAL), (keys, values)

  x, (keys, values) = jax.lax.scan(
    layer, x, (block_state, cache.keys, cache.values)
  )
  # Under a mesh the cache is split by rows like the batch, and by key/value
  # heads like the attention that writes it (`tensor`, where it divides
  # them), whatever XLA would choose.
  new_cache = cache.replace(
    keys=sharding.constrain(keys, _CACHE_AXES),
    values=sharding.constrain(values, _CACHE_AXES),
    real=sharding.constrain(real, _CACHE_AXES[1:3]),
    index=cache.index + t,
  )
  return model.final_norm(x), new_cache


def next_token_logits(
  model: transformer.Transformer, hidden: jax.Array
) -> jax.Array:
  """[N, d] last hidden states -> [N, V] float32 logits (the LM head)."""
  # The same LM head as `Transformer.logits`.
  return logprobs_lib.lm_logits(hidden, model._head())
