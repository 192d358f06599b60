"""Building blocks of the decoder LM: RMSNorm, rotary positions, attention, MLP.

Shapes: N rows, T positions, d = embed_dim, H query heads, K key/value heads,
Dh = head_dim, F = mlp_dim. Parameters are float32 and computations run in
the `dtype` they are given (float32 or bfloat16); normalisation statistics,
rotary angles and the attention softmax are float32 whatever that dtype.

Every parameter names its axes in NNX sharding metadata (`out_sharding`,
logical names, not mesh axes; eager sharding off, so building a model needs
no mesh). The names, mapped to mesh axes by one rule table elsewhere:

  embed     d, the residual stream          vocab     V
  heads     H, query heads                  kv_heads  K, key/value heads
  head_dim  Dh                              mlp       F
  layers    the stacked-layer axis (added by the layer stack, see transformer.py)

`nnx.get_partition_spec(nnx.state(model))` lists them per parameter.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from psipo_jax.models import blocked_attention

# Attention implementations of `jax.nn.dot_product_attention`.
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
# `model.attention` choices: those, and our blockwise kernel (pure JAX).
ATTENTION_CHOICES = (*ATTENTION_IMPLEMENTATIONS, blocked_attention.NAME)


@functools.lru_cache(maxsize=None)
def attention_unavailable(
  implementation: str,
  *,
  dtype: str,
  num_heads: int,
  num_kv_heads: int,
  head_dim: int,
  backend: str,
) -> str | None:
  """Why `implementation` cannot run this attention here, or None if it can.

  Honest by construction: it compiles (without running) the very call
  `Attention` makes — grouped-query heads, a [N, 1, T, T] segment mask and
  causality — for these sizes and dtype on the default backend, and reports
  the error if compilation fails (cuDNN: no GPU or no cuDNN, float32, an
  unsupported head size...). `backend` is part of the cache key only.
  """
  del backend
  if implementation in ("xla", blocked_attention.NAME):
    return None  # XLA's attention and the pure-JAX kernel compile everywhere.
  t = 128  # a length every fused kernel takes; the real T is checked at jit
  q = jax.ShapeDtypeStruct((1, t, num_heads, head_dim), jnp.dtype(dtype))
  kv = jax.ShapeDtypeStruct((1, t, num_kv_heads, head_dim), jnp.dtype(dtype))
  mask = jax.ShapeDtypeStruct((1, 1, t, t), jnp.bool_)
  attend = functools.partial(
    jax.nn.dot_product_attention, is_causal=True, implementation=implementation
  )
  try:
    jax.jit(attend).lower(q, kv, kv, mask=mask).compile()
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
  return None


def param(
  rngs: nnx.Rngs | None,
  shape: Sequence[int],
  axes: Sequence[str],
  *,
  std: float | None = None,
  fill: float = 0.0,
) -> nnx.Param:
  """A float32 parameter N(0, std²) (or constant `fill` if std is None) named by `axes`."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {shape}")
  if std is None:
    value = jnp.full(shape, fill, jnp.float32)
  else:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x²) + eps) · scale over the last axis (Zhang & Sennrich 2019).

  Statistics and the product in float32; the result in x's dtype.
  """

  def __init__(self, dim: int, *, axis_name: str, eps: float):
    self.scale = param(None, (dim,), (axis_name,), fill=1.0)  # [dim]
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(
      jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps
    )
    return (x32 * inv_rms * self.scale[...]).astype(x.dtype)


def apply_rope(
  x: jax.Array, positions: jax.Array, *, theta: float
) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), Llama's half-split layout.

  Channel i < Dh/2 pairs with channel i + Dh/2 and rotates by the angle
  position · θ^(−2i/Dh), which is the layout of Hugging Face Llama/Qwen
  checkpoints (`rotate_half`), not the interleaved one of the paper.

  Args:
    x: [N, T, heads, Dh].
    positions: [N, T] int, the token's position within its sequence.
    theta: base θ of the frequencies.

  Returns:
    [N, T, heads, Dh] in x's dtype; the rotation is computed in float32.
  """
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [Dh/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [N, T, Dh/2]
  sin = jnp.sin(angles)[:, :, None, :]  # [N, T, 1, Dh/2]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(
    x.astype(jnp.float32), 2, axis=-1
  )  # [N, T, heads, Dh/2] each
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary positions.

  H query heads share K key/value heads in groups of H/K (Ainslie et al.
  2023; K = H is multi-head, K = 1 multi-query attention). Optional biases on
  the q/k/v projections (Qwen2) and RMSNorm of each query and key head before
  the rotation (Qwen3, OLMo 2). Scores are scaled by 1/sqrt(Dh).
  """

  def __init__(
    self,
    *,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    rope_theta: float,
    qkv_bias: bool,
    qk_norm: bool,
    norm_eps: float,
    implementation: str,
    init_std: float,
    rngs: nnx.Rngs,
    block_size: int = blocked_attention.DEFAULT_BLOCK_SIZE,
  ):
    d, h, k, dh = embed_dim, num_heads, num_kv_heads, head_dim
    self.q_proj = param(
      rngs, (d, h, dh), ("embed", "heads", "head_dim"), std=init_std
    )
    self.k_proj = param(
      rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), std=init_std
    )
    self.v_proj = param(
      rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), std=init_std
    )
    self.o_proj = param(
      rngs, (h, dh, d), ("heads", "head_dim", "embed"), std=init_std
    )
    if qkv_bias:
      self.q_bias = param(None, (h, dh), ("heads", "head_dim"))
      self.k_bias = param(None, (k, dh), ("kv_heads", "head_dim"))
      self.v_bias = param(None, (k, dh), ("kv_heads", "head_dim"))
    if qk_norm:
      self.q_norm = RMSNorm(dh, axis_name="head_dim", eps=norm_eps)
      self.k_norm = RMSNorm(dh, axis_name="head_dim", eps=norm_eps)
    self.qkv_bias = qkv_bias
    self.qk_norm = qk_norm
    self.rope_theta = rope_theta
    self.implementation = implementation
    self.block_size = block_size  # of the "blocked" implementation only

  def _project(self, x, kernel, bias_name):
    y = jnp.einsum("ntd,dhk->nthk", x, kernel[...].astype(x.dtype))
    if self.qkv_bias:
      y = y + getattr(self, bias_name)[...].astype(x.dtype)
    return y

  def __call__(
    self, x: jax.Array, positions: jax.Array, mask: jax.Array
  ) -> jax.Array:
    """Args: x [N, T, d]; positions [N, T]; mask [N, 1, T, T] bool (query, key)
    pairs allowed besides causality, or for implementation "blocked" the
    [N, T] segment ids (0 = padding; the kernel masks block by block).
    Returns [N, T, d] in x's dtype."""
    q = self._project(x, self.q_proj, "q_bias")  # [N, T, H, Dh]
    k = self._project(x, self.k_proj, "k_bias")  # [N, T, K, Dh]
    v = self._project(x, self.v_proj, "v_bias")  # [N, T, K, Dh]
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions, theta=self.rope_theta)
    k = apply_rope(k, positions, theta=self.rope_theta)
    # Softmax in float32 inside; GQA handled by the kernel (no repeated K/V).
    if self.implementation == blocked_attention.NAME:
      out = blocked_attention.blocked_attention(
        q, k, v, mask, block_size=self.block_size
      )  # [N, T, H, Dh]
    else:
      out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, implementation=self.implementation
      )  # [N, T, H, Dh]
    return jnp.einsum("nthk,hkd->ntd", out, self.o_proj[...].astype(x.dtype))


class MLP(nnx.Module):
  """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) · up(x))."""

  def __init__(
    self, *, embed_dim: int, mlp_dim: int, init_std: float, rngs: nnx.Rngs
  ):
    self.gate_proj = param(
      rngs, (embed_dim, mlp_dim), ("embed", "mlp"), std=init_std
    )
    self.up_proj = param(
      rngs, (embed_dim, mlp_dim), ("embed", "mlp"), std=init_std
    )
    self.down_proj = param(
      rngs, (mlp_dim, embed_dim), ("mlp", "embed"), std=init_std
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """[N, T, d] -> [N, T, d] in x's dtype."""
    gate = x @ self.gate_proj[...].astype(x.dtype)  # [N, T, F]
    up = x @ self.up_proj[...].astype(x.dtype)  # [N, T, F]
    return (jax.nn.silu(gate) * up) @ self.down_proj[...].astype(x.dtype)
