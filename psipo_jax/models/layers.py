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

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psipo_jax import sharding
from psipo_jax.models import blocked_attention

# Logical axes of the activations (`sharding.constrain`): [N, T, d] residual
# stream, [N, T, H | K, Dh] query | key/value heads, [N, T, F] MLP hidden.
RESIDUAL = ("activation_batch", "activation_length", "activation_embed")
QUERY_HEADS = (
  "activation_batch",
  "activation_length",
  "activation_heads",
  None,
)
KV_HEADS = (
  "activation_batch",
  "activation_length",
  "activation_kv_heads",
  None,
)
MLP_HIDDEN = ("activation_batch", "activation_length", "activation_mlp")
# The embedding table [V, d] and the LM head [d, V] where they are used:
# whole over `fsdp` (gathered), the vocabulary over `tensor`.
TABLE = ("activation_vocab", "activation_embed")
HEAD = ("activation_embed", "activation_vocab")

# Attention implementations of `jax.nn.dot_product_attention`.
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
# RoPE frequency rescalings (`rope_frequencies`) and MLP gate activations.
ROPE_SCALINGS = ("none", "linear", "llama3")
ACTIVATIONS = {
  "silu": jax.nn.silu,
  # Gemma's GeGLU: tanh-approximated GELU (PyTorch's gelu_pytorch_tanh).
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """A rescaling of the RoPE frequencies for longer contexts.

  kind "linear" divides every frequency by `factor` (position
  interpolation); "llama3" divides the low frequencies (wavelength above
  original_max_positions / low_freq_factor) by `factor`, keeps the high ones
  (wavelength below original_max_positions / high_freq_factor) and blends in
  between, as Llama 3.1 does.
  """

  kind: str = "none"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_positions: int = 8192


def rope_frequencies(
  head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> np.ndarray:
  """[Dh/2] float32 inverse wavelengths θ^(−2i/Dh), rescaled by `scaling`."""
  half = head_dim // 2
  inv_freq = (1.0 / theta ** (np.arange(half) / half)).astype(np.float32)
  if scaling is None or scaling.kind == "none":
    return inv_freq
  if scaling.kind == "linear":
    return (inv_freq / scaling.factor).astype(np.float32)
  s = scaling
  wavelength = 2 * math.pi / inv_freq  # [Dh/2]
  low_freq_wavelength = s.original_max_positions / s.low_freq_factor
  high_freq_wavelength = s.original_max_positions / s.high_freq_factor
  scaled = np.where(
    wavelength > low_freq_wavelength, inv_freq / s.factor, inv_freq
  )
  smooth = (s.original_max_positions / wavelength - s.low_freq_factor) / (
    s.high_freq_factor - s.low_freq_factor
  )
  blended = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelength >= high_freq_wavelength) & (
    wavelength <= low_freq_wavelength
  )
  return np.where(medium, blended, scaled).astype(np.float32)


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


def project(x: jax.Array, kernel: jax.Array, *, in_dims: int = 1) -> jax.Array:
  """Contracts x's last `in_dims` axes with kernel's first ones, as one 2-D matmul.

  x [..., *kernel.shape[:in_dims]] -> [..., *kernel.shape[in_dims:]] in x's
  dtype (the kernel is cast to it). Why a 2-D matmul and not an einsum over
  [N, T, ...]: XLA:CPU gives the 3-D form's weight gradient a transposed
  copy of the activation gradient, fused into the elementwise backward
  (SwiGLU's) where it runs far below memory speed; on [N·T, d] rows the
  transposes go, and the `small` preset's gradient takes 0.82× the time
  (BENCHMARKS.md, "Backward pass"). Reshapes of contiguous axes are free.
  """
  w_in, w_out = kernel.shape[:in_dims], kernel.shape[in_dims:]
  lead = x.shape[: x.ndim - in_dims]
  rows = x.reshape(-1, math.prod(w_in))  # [N·T, prod(w_in)]
  y = rows @ kernel.astype(x.dtype).reshape(math.prod(w_in), -1)
  return y.reshape(*lead, *w_out)


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
  """y = x / sqrt(mean(x²) + eps) · (offset + scale) over the last axis
  (Zhang & Sennrich 2019).

  Statistics and the product in float32; the result in x's dtype. Gemma
  stores the scale as w with offset 1 (its checkpoints hold w, so storing w
  keeps import and export exact); the scale starts at 1 − offset, a unit gain.
  """

  def __init__(
    self, dim: int, *, axis_name: str, eps: float, offset: float = 0.0
  ):
    self.scale = param(None, (dim,), (axis_name,), fill=1.0 - offset)  # [dim]
    self.eps = eps
    self.offset = offset

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(
      jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps
    )
    scale = self.scale[...]
    if self.offset:
      scale = self.offset + scale
    return (x32 * inv_rms * scale).astype(x.dtype)


def apply_rope(
  x: jax.Array,
  positions: jax.Array,
  *,
  theta: float,
  inv_freq: np.ndarray | None = None,
) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), Llama's half-split layout.

  Channel i < Dh/2 pairs with channel i + Dh/2 and rotates by the angle
  position · θ^(−2i/Dh), which is the layout of Hugging Face Llama/Qwen
  checkpoints (`rotate_half`), not the interleaved one of the paper.

  Args:
    x: [N, T, heads, Dh].
    positions: [N, T] int, the token's position within its sequence.
    theta: base θ of the frequencies.
    inv_freq: [Dh/2] frequencies replacing θ's (`rope_frequencies`).

  Returns:
    [N, T, heads, Dh] in x's dtype; the rotation is computed in float32.
  """
  half = x.shape[-1] // 2
  if inv_freq is None:
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
    rope_scaling: RopeScaling | None = None,
    norm_offset: float = 0.0,
    query_pre_attn_scalar: float = 0.0,
    logit_softcap: float = 0.0,
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
      self.q_norm = RMSNorm(
        dh, axis_name="head_dim", eps=norm_eps, offset=norm_offset
      )
      self.k_norm = RMSNorm(
        dh, axis_name="head_dim", eps=norm_eps, offset=norm_offset
      )
    self.qkv_bias = qkv_bias
    self.qk_norm = qk_norm
    self.rope_theta = rope_theta
    self.rope_scaling = rope_scaling
    # Gemma 3 scales scores by 1/sqrt(query_pre_attn_scalar); 0: 1/sqrt(Dh).
    self.query_pre_attn_scalar = query_pre_attn_scalar
    # Gemma 2: scores -> cap · tanh(scores / cap) before the mask; 0: none.
    self.logit_softcap = logit_softcap
    self.implementation = implementation
    self.block_size = block_size  # of the "blocked" implementation only

  def _project(self, x, kernel, bias_name):
    y = project(x, kernel[...])  # [N, T, heads, Dh]
    if self.qkv_bias:
      y = y + getattr(self, bias_name)[...].astype(x.dtype)
    return y

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    inv_freq: jax.Array | None = None,
  ) -> jax.Array:
    """Args: x [N, T, d]; positions [N, T]; mask [N, 1, T, T] bool (query, key)
    pairs allowed besides causality, or for implementation "blocked" the
    [N, T] segment ids (0 = padding; the kernel masks block by block) or
    (segment ids, branch ids) (`blocked_attention`'s `branch_ids`);
    inv_freq [Dh/2], this layer's RoPE frequencies when layers differ (else
    from θ and the rescaling).
    Returns [N, T, d] in x's dtype."""
    c = sharding.constrain
    q = c(self._project(x, self.q_proj, "q_bias"), QUERY_HEADS)  # [N, T, H, Dh]
    k = c(self._project(x, self.k_proj, "k_bias"), KV_HEADS)  # [N, T, K, Dh]
    v = c(self._project(x, self.v_proj, "v_bias"), KV_HEADS)  # [N, T, K, Dh]
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    scaled = self.rope_scaling is not None and self.rope_scaling.kind != "none"
    if inv_freq is None and scaled:
      inv_freq = rope_frequencies(
        q.shape[-1], self.rope_theta, self.rope_scaling
      )
    q = apply_rope(q, positions, theta=self.rope_theta, inv_freq=inv_freq)
    k = apply_rope(k, positions, theta=self.rope_theta, inv_freq=inv_freq)
    # Softmax in float32 inside; GQA handled by the kernel (no repeated K/V).
    scale = (
      self.query_pre_attn_scalar**-0.5 if self.query_pre_attn_scalar else None
    )
    if self.logit_softcap:
      out = _softcapped_attention(
        q, k, v, mask, scale=scale, cap=self.logit_softcap
      )
      return self.output(out)
    if self.implementation == blocked_attention.NAME:
      # TransformerConfig refuses "blocked" with a score scale, soft-cap or
      # sliding window, which the kernel does not take.
      segments, branches = mask if isinstance(mask, tuple) else (mask, None)
      out = blocked_attention.blocked_attention(
        q, k, v, segments, branch_ids=branches, block_size=self.block_size
      )  # [N, T, H, Dh]
    else:
      out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        scale=scale,
        is_causal=True,
        implementation=self.implementation,
      )  # [N, T, H, Dh]
    return self.output(out)

  def output(self, heads: jax.Array) -> jax.Array:
    """[N, T, H, Dh] attention outputs -> [N, T, d] through o_proj."""
    heads = sharding.constrain(heads, QUERY_HEADS)
    return sharding.constrain(
      project(heads, self.o_proj[...], in_dims=2), RESIDUAL
    )


def _softcapped_attention(q, k, v, mask, *, scale, cap):
  """Causal GQA attention with soft-capped scores (no fused kernel has it).

  q [N, T, H, Dh], k and v [N, T, K, Dh], mask [N, 1, T, T] -> [N, T, H, Dh]
  in q's dtype; scores, cap and softmax in float32.
  """
  n, t, h, dh = q.shape
  groups = h // k.shape[2]
  q = q.reshape(n, t, k.shape[2], groups, dh)  # query head i -> kv head i // G
  scores = jnp.einsum(
    "nqkgd,nskd->nkgqs", q, k, preferred_element_type=jnp.float32
  )  # [N, K, G, T, T]
  scores = scores * (dh**-0.5 if scale is None else scale)
  scores = cap * jnp.tanh(scores / cap)
  causal = jnp.tril(jnp.ones((t, t), bool))
  allowed = (mask & causal)[:, :, None]  # [N, 1, 1, T, T]
  scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("nkgqs,nskd->nqkgd", probs, v)  # [N, T, K, G, Dh]
  return out.reshape(n, t, h, dh)


class MLP(nnx.Module):
  """Gated feed-forward (Shazeer 2020): down(act(gate(x)) · up(x)); SwiGLU
  with act = silu, GeGLU (Gemma) with the tanh GELU."""

  def __init__(
    self,
    *,
    embed_dim: int,
    mlp_dim: int,
    init_std: float,
    rngs: nnx.Rngs,
    activation: str = "silu",
  ):
    self.activation = activation
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
    gate = sharding.constrain(project(x, self.gate_proj[...]), MLP_HIDDEN)
    up = sharding.constrain(project(x, self.up_proj[...]), MLP_HIDDEN)
    hidden = ACTIVATIONS[self.activation](gate) * up  # [N, T, F]
    return sharding.constrain(project(hidden, self.down_proj[...]), RESIDUAL)
