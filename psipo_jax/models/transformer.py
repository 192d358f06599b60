"""Decoder-only transformer LM as a policy: Llama-shaped, Flax NNX.

Architecture (the shape shared by Llama 2/3, Mistral, Qwen2/3, SmolLM):
token embedding → L × [x + Attention(RMSNorm(x)); x + SwiGLU(RMSNorm(x))]
→ final RMSNorm → unembedding (tied to the embedding or separate). Attention
is grouped-query with an explicit head_dim, rotary positions (configurable
θ), optional q/k/v biases and optional per-head q/k RMSNorm
(`psipo_jax.models.layers`). No dropout: the policy is deterministic, and
the `rngs` of the policy contract is unused.

Sequences, padding and packing. A row's tokens belong to segments: ids
1, 2, … for the sequences it holds and 0 for padding. Attention allows
(query i, key j) iff j ≤ i AND segment(i) = segment(j); real tokens never see
padding or another sequence, and padding (its own segment) only sees
padding, so no softmax row is empty. Positions restart at 0 in every
segment. Inputs may carry `segment_ids` and `positions` ([N, T]); without
them both come from `attention_mask` (1 on real tokens), so a left-padded
row's first real token gets position 0, and left-padded, right-padded,
unpadded and packed rows give the same per-sequence log-probs.

Scoring. `__call__` returns `PolicyOutput(logps, num_tokens)`: the sum of
log p(token_t | tokens_<t) over response tokens (`loss_mask` = 1) and their
count. The last hidden states and the unembedding matrix go to
`psipo_jax.logprobs` ("chunked" by default: the LM head runs on response
positions only, in chunks, never holding [N, T, V] logits; "naive" is the
full-logits reference). Log-probs and all loss maths are float32.

Layers. The L blocks are created once under `nnx.vmap` (parameters stacked
on a leading `layers` axis) and run under `nnx.scan`, so tracing and
compile time do not grow with depth; `remat=True` rematerialises each block
in the backward pass (`jax.checkpoint` with `remat_policy`). Every parameter
names its logical axes (embed, heads, kv_heads, head_dim, mlp, vocab, and
layers for the stacked ones) in its NNX sharding metadata; see
`psipo_jax.models.layers` for the list a mesh rule table maps. Activations
name theirs too (`layers.RESIDUAL`, …): under a mesh (`sharding.constrain`)
rows stay on their data × fsdp devices, FSDP gathers the weights (the
embedding table and the LM head included) rather than the activations, and
the tensor axis splits heads, MLP hidden and vocabulary Megatron-style.

Model config keys (the `model.*` block; `name="transformer"`):

  preset               a name in PRESETS; the other keys override its fields
                       (None = keep the preset's value). Without a preset,
                       every size key is required.
  vocab_size, num_layers, embed_dim, num_heads, num_kv_heads, head_dim,
  mlp_dim              sizes (V, L, d, H, K, Dh, F)
  rope_theta           RoPE base θ
  norm_eps             RMSNorm epsilon
  tie_embeddings       unembedding = embedding transposed
  qkv_bias, qk_norm    attention options
  rope_scaling         "none" | "linear" | "llama3" frequency rescaling, with
  rope_scaling_factor, rope_low_freq_factor, rope_high_freq_factor,
  rope_original_max_positions   its parameters (`layers.RopeScaling`)
  sliding_window       W > 0: a query sees only the W most recent tokens
                       (itself included) on the sliding layers; 0: none
  layer_types          "" (every layer sliding when sliding_window > 0) or
                       one comma-separated "full"/"sliding" per layer
  embed_scale          multiply the embeddings by sqrt(d) (Gemma)
  norm_offset          RMSNorm gain = norm_offset + scale (Gemma: 1)
  mlp_activation       "silu" (SwiGLU) | "gelu_tanh" (GeGLU, Gemma)
  sandwich_norms       also RMSNorm the attention and MLP outputs before each
                       residual add (Gemma 3)
  query_pre_attn_scalar  scores scaled by 1/sqrt(this); 0: 1/sqrt(head_dim)
  rope_local_theta     > 0: the sliding layers' RoPE θ, unscaled (Gemma 3);
                       rope_theta and rope_scaling then apply to full layers
  attn_logit_softcap,  > 0: attention scores / final logits soft-capped to
  final_logit_softcap  cap · tanh(x / cap) (Gemma 2); 0: none
  init_std             std of the normal initialiser of every matrix
  dtype                compute dtype, "float32" | "bfloat16" (params stay float32)
  attention            `jax.nn.dot_product_attention` implementation: "xla"
                       (default, every backend) or "cudnn" (the fused cuDNN
                       kernel: NVIDIA GPUs, bfloat16/float16 only); both
                       honour the segment mask. One that cannot run here is
                       refused when the model is built, naming this key.
                       "blocked": our blockwise (flash-style) kernel in pure
                       JAX, every backend (models/blocked_attention.py):
                       skips the causally and segment-masked blocks that
                       the XLA path computes in full
  attention_block_size positions per query/key block of "blocked" (64, the
                       fastest on CPU in benchmarks/attention_speed.py)
  remat, remat_policy  per-block rematerialisation, and the
                       `jax.checkpoint_policies` name it uses (on
                       XLA:CPU with glibc's default malloc, scanned blocks
                       with "dots_saveable" give the `small` preset's
                       gradient in 0.76× the time without remat; with
                       transparent huge pages, psipo_jax/host_allocator.py,
                       remat is slower: BENCHMARKS.md, "Host memory
                       allocator on CPU")
  scan_layers          True: the blocks run under `nnx.scan` (compile time
                       flat in depth); False: one after another, unrolled
                       (compile time grows with L; on XLA:CPU the `small`
                       preset's gradient takes 0.85× the time, the `125m`
                       preset's step ≈ 1.4× the time: BENCHMARKS.md,
                       "Backward pass")
  logprobs             "chunked" | "naive"
  logprobs_chunk_size  positions per row in one LM-head chunk

Presets (sizes of public checkpoints of the same architecture, so that they
can be loaded later without a new model):

  tiny   V 256, L 2, d 64, H 4, K 2, Dh 16, F 128 — tests.
  small  V 4,096, L 4, d 256, H 4, K 2, Dh 64, F 688 — the CPU shape of the
         TRL comparison benchmark.
  125m   SmolLM2-135M: V 49,152, L 30, d 576, H 9, K 3, Dh 64, F 1,536, θ 1e5,
         tied; 134.5M parameters.
  1b     TinyLlama-1.1B: V 32,000, L 22, d 2,048, H 32, K 4, Dh 64, F 5,632,
         θ 1e4, untied; 1.10B parameters.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from psipo_jax import logprobs as logprobs_lib
from psipo_jax import sharding
from psipo_jax.models import layers
from psipo_jax.models.policy import PolicyOutput

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = (
  "nothing_saveable",
  "dots_saveable",
  "dots_with_no_batch_dims_saveable",
)
_SIZE_FIELDS = (
  "vocab_size",
  "num_layers",
  "embed_dim",
  "num_heads",
  "num_kv_heads",
  "head_dim",
  "mlp_dim",
)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Sizes and options of the decoder LM; see the module docstring for each key."""

  vocab_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  sliding_window: int = 0
  layer_types: str = ""
  embed_scale: bool = False
  norm_offset: float = 0.0
  mlp_activation: str = "silu"
  sandwich_norms: bool = False
  query_pre_attn_scalar: float = 0.0
  rope_local_theta: float = 0.0
  attn_logit_softcap: float = 0.0
  final_logit_softcap: float = 0.0
  init_std: float = 0.02
  dtype: str = "float32"
  attention: str = "xla"
  attention_block_size: int = 64  # see blocked_attention.DEFAULT_BLOCK_SIZE
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan_layers: bool = True
  logprobs: str = "chunked"
  logprobs_chunk_size: int = 128

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      kind = field.type if isinstance(field.type, str) else field.type.__name__
      ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float))
        and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
      }[kind]
      if not ok:
        raise ValueError(f"model.{field.name} must be a {kind}, got {value!r}")
      if kind == "float":
        object.__setattr__(self, field.name, float(value))
    for name in (*_SIZE_FIELDS, "logprobs_chunk_size", "attention_block_size"):
      if getattr(self, name) < 1:
        raise ValueError(
          f"model.{name} must be >= 1, got {getattr(self, name)}"
        )
    for name in ("rope_theta", "norm_eps", "init_std"):
      if not getattr(self, name) > 0:
        raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"model.num_heads={self.num_heads} must be a multiple of"
        f" model.num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(
        f"model.head_dim must be even for RoPE, got {self.head_dim}"
      )
    for name, choices in (
      ("dtype", tuple(DTYPES)),
      ("attention", layers.ATTENTION_CHOICES),
      ("remat_policy", REMAT_POLICIES),
      ("logprobs", logprobs_lib.IMPLEMENTATIONS),
      ("rope_scaling", layers.ROPE_SCALINGS),
      ("mlp_activation", tuple(layers.ACTIVATIONS)),
    ):
      if getattr(self, name) not in choices:
        raise ValueError(
          f"model.{name} must be one of {choices}, got {getattr(self, name)!r}"
        )

    if self.attention == "blocked":
      # The blockwise kernel takes the default 1/sqrt(Dh) scale and masks by
      # segment and causality only.
      for name in (
        "sliding_window",
        "query_pre_attn_scalar",
        "attn_logit_softcap",
      ):
        if getattr(self, name):
          raise ValueError(
            f"model.attention='blocked' does not implement model.{name}="
            f"{getattr(self, name)!r}; use model.attention='xla'"
          )
    for name in (
      "query_pre_attn_scalar",
      "rope_local_theta",
      "attn_logit_softcap",
      "final_logit_softcap",
    ):
      if getattr(self, name) < 0:
        raise ValueError(
          f"model.{name} must be >= 0, got {getattr(self, name)}"
        )
    if self.sliding_window < 0:
      raise ValueError(
        f"model.sliding_window must be >= 0, got {self.sliding_window}"
      )
    if self.rope_scaling != "none" and not self.rope_scaling_factor > 0:
      raise ValueError(
        f"model.rope_scaling_factor must be > 0, got {self.rope_scaling_factor}"
      )
    if self.rope_scaling == "llama3" and not (
      self.rope_high_freq_factor > self.rope_low_freq_factor
    ):
      raise ValueError(
        "model.rope_high_freq_factor must exceed model.rope_low_freq_factor"
        f" for llama3 scaling, got {self.rope_high_freq_factor} <="
        f" {self.rope_low_freq_factor}"
      )
    if self.layer_types:
      types = self.layer_types.split(",")
      bad = [t for t in types if t not in ("full", "sliding")]
      if bad or len(types) != self.num_layers:
        raise ValueError(
          "model.layer_types must list 'full' or 'sliding' for each of the"
          f" {self.num_layers} layers, got {self.layer_types!r}"
        )

  @property
  def compute_dtype(self) -> jnp.dtype:
    return DTYPES[self.dtype]

  @property
  def rope(self) -> layers.RopeScaling | None:
    if self.rope_scaling == "none":
      return None
    return layers.RopeScaling(
      kind=self.rope_scaling,
      factor=self.rope_scaling_factor,
      low_freq_factor=self.rope_low_freq_factor,
      high_freq_factor=self.rope_high_freq_factor,
      original_max_positions=self.rope_original_max_positions,
    )

  def layer_inv_freqs(self) -> np.ndarray | None:
    """[L, Dh/2] per-layer RoPE frequencies when sliding layers have their
    own θ (`rope_local_theta`); None when every layer shares them."""
    if not self.rope_local_theta:
      return None
    full = layers.rope_frequencies(self.head_dim, self.rope_theta, self.rope)
    local = layers.rope_frequencies(self.head_dim, self.rope_local_theta)
    return np.stack([local if w else full for w in self.layer_windows()])

  def layer_windows(self) -> list[int]:
    """Per layer, the sliding window (0: full attention)."""
    if not self.layer_types:
      return [self.sliding_window] * self.num_layers
    return [
      self.sliding_window if t == "sliding" else 0
      for t in self.layer_types.split(",")
    ]


PRESETS: dict[str, TransformerConfig] = {
  "tiny": TransformerConfig(
    vocab_size=256,
    num_layers=2,
    embed_dim=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=128,
  ),
  "small": TransformerConfig(
    vocab_size=4096,
    num_layers=4,
    embed_dim=256,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    mlp_dim=688,
  ),
  "125m": TransformerConfig(
    vocab_size=49152,
    num_layers=30,
    embed_dim=576,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    mlp_dim=1536,
    rope_theta=100_000.0,
    tie_embeddings=True,
  ),
  "1b": TransformerConfig(
    vocab_size=32000,
    num_layers=22,
    embed_dim=2048,
    num_heads=32,
    num_kv_heads=4,
    head_dim=64,
    mlp_dim=5632,
  ),
}


def param_count(config: TransformerConfig) -> int:
  """Number of parameters of `Transformer(config)`, embeddings included."""
  c = config
  q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  attention = 2 * c.embed_dim * q_out + 2 * c.embed_dim * kv_out
  if c.qkv_bias:
    attention += q_out + 2 * kv_out
  if c.qk_norm:
    attention += 2 * c.head_dim
  block = (
    attention + 3 * c.embed_dim * c.mlp_dim + 2 * c.embed_dim
  )  # + two norms
  if c.sandwich_norms:
    block += 2 * c.embed_dim
  embeddings = c.vocab_size * c.embed_dim * (1 if c.tie_embeddings else 2)
  return c.num_layers * block + embeddings + c.embed_dim  # + final norm


def matmul_param_count(config: TransformerConfig) -> int:
  """Weights multiplied per token: every matrix of the blocks plus the LM head
  (once, tied or not); the embedding lookup, norms and biases excluded."""
  c = config
  q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  block = 2 * c.embed_dim * (q_out + kv_out) + 3 * c.embed_dim * c.mlp_dim
  return c.num_layers * block + c.embed_dim * c.vocab_size


def flops_per_token(config: TransformerConfig, seq_len: int) -> int:
  """Training FLOPs (forward + backward) per token at sequence length T.

      6 · N_matmul + 12 · L · H · Dh · T

  (Chowdhery et al. 2022, PaLM, App. B): 2 FLOPs per weight and token
  forward, twice that backward; the attention scores QKᵀ and the weighted
  sum of V add 2 · 2 · T · H · Dh per layer and token forward, ×3 with the
  backward pass. N_matmul is `matmul_param_count`. The full T × T score
  matrix is counted, as in PaLM's MFU (causal masking makes half of it
  unused), and the LM head is counted at every position (the chunked
  log-probs run it on response positions only, so they do less work than
  this counts).
  """
  c = config
  return (
    6 * matmul_param_count(c)
    + 12 * c.num_layers * c.num_heads * c.head_dim * seq_len
  )


class Block(nnx.Module):
  """Pre-norm residual block: attention then SwiGLU MLP."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    self.input_norm = layers.RMSNorm(
      c.embed_dim, axis_name="embed", eps=c.norm_eps, offset=c.norm_offset
    )
    self.attention = layers.Attention(
      embed_dim=c.embed_dim,
      num_heads=c.num_heads,
      num_kv_heads=c.num_kv_heads,
      head_dim=c.head_dim,
      rope_theta=c.rope_theta,
      qkv_bias=c.qkv_bias,
      qk_norm=c.qk_norm,
      norm_eps=c.norm_eps,
      implementation=c.attention,
      init_std=c.init_std,
      rngs=rngs,
      rope_scaling=c.rope,
      norm_offset=c.norm_offset,
      query_pre_attn_scalar=c.query_pre_attn_scalar,
      logit_softcap=c.attn_logit_softcap,
      block_size=c.attention_block_size,
    )
    self.post_attention_norm = layers.RMSNorm(
      c.embed_dim, axis_name="embed", eps=c.norm_eps, offset=c.norm_offset
    )
    self.mlp = layers.MLP(
      embed_dim=c.embed_dim,
      mlp_dim=c.mlp_dim,
      init_std=c.init_std,
      rngs=rngs,
      activation=c.mlp_activation,
    )
    self.sandwich_norms = c.sandwich_norms
    if c.sandwich_norms:
      norm = dict(axis_name="embed", eps=c.norm_eps, offset=c.norm_offset)
      self.attention_output_norm = layers.RMSNorm(c.embed_dim, **norm)
      self.mlp_output_norm = layers.RMSNorm(c.embed_dim, **norm)

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    inv_freq: jax.Array | None = None,
  ) -> jax.Array:
    """[N, T, d] -> [N, T, d]; see `layers.Attention` for the other args."""
    h = self.attention(self.input_norm(x), positions, mask, inv_freq)
    if self.sandwich_norms:
      h = self.attention_output_norm(h)
    x = x + h
    h = self.mlp(self.post_attention_norm(x))
    if self.sandwich_norms:
      h = self.mlp_output_norm(h)
    return sharding.constrain(x + h, layers.RESIDUAL)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """[N, T] per-token position within its segment (restarting at each change of id)."""
  t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)  # [T]
  starts = jnp.concatenate(
    [
      jnp.ones_like(segment_ids[:, :1], bool),
      segment_ids[:, 1:] != segment_ids[:, :-1],
    ],
    axis=1,
  )  # [N, T]
  start_index = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)  # [N, T]
  return t - start_index


def segments_and_positions(
  inputs: dict[str, jax.Array],
) -> tuple[jax.Array, jax.Array]:
  """Segment ids (0 = padding) and positions of the model inputs; see the module doc."""
  input_ids = inputs["input_ids"]
  attention_mask = inputs.get("attention_mask")
  segment_ids = inputs.get("segment_ids")
  if segment_ids is None:
    if attention_mask is None:
      segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    else:
      segment_ids = (attention_mask != 0).astype(jnp.int32)
  else:
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if attention_mask is not None:
      segment_ids = jnp.where(attention_mask != 0, segment_ids, 0)
  positions = inputs.get("positions")
  if positions is None:
    positions = positions_from_segments(segment_ids)
  return segment_ids, jnp.asarray(positions, jnp.int32)


def _layer_slice(stacked, layer: int):
  """Layer `layer` of the stacked blocks (or of a (blocks, per-layer arrays)
  pair): a Block whose parameters are the [L, ...] arrays' slices."""
  if isinstance(stacked, tuple):
    blocks, extras = stacked
    return _layer_slice(blocks, layer), jax.tree.map(lambda a: a[layer], extras)
  graphdef, state = nnx.split(stacked)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], state))


class Transformer(nnx.Module):
  """Decoder-only LM obeying the policy contract (`psipo_jax.models`).

  Inputs: `input_ids` [N, T] int, `loss_mask` [N, T] (1 on response tokens,
  token-aligned; needed by `__call__` / `token_logps`), and optionally
  `attention_mask`, `segment_ids`, `positions` [N, T] (module docstring).
  Packed rows (data/packing.py) add `sequence_ids` [N, T] (the output slot
  of each token's sequence, −1 on padding) and `packed_row` [M]; `__call__`
  then returns M per-sequence sums instead of N per-row ones. Packed rows
  with shared prompts add `branch_ids` [N, T] (a key with branch b ≠ 0 is
  seen only by queries of branch b; data/packing.py, "Shared prompts").
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = config
    self.embed_tokens = layers.param(
      rngs, (c.vocab_size, c.embed_dim), ("vocab", "embed"), std=c.init_std
    )  # [V, d]

    @nnx.split_rngs(splits=c.num_layers)
    @nnx.vmap(
      in_axes=(0,),
      out_axes=0,
      transform_metadata={nnx.PARTITION_NAME: "layers"},
    )
    def stacked_blocks(rngs):
      return Block(c, rngs=rngs)

    self.layers = stacked_blocks(rngs)  # every parameter [L, ...]
    self.final_norm = layers.RMSNorm(
      c.embed_dim, axis_name="embed", eps=c.norm_eps, offset=c.norm_offset
    )
    if not c.tie_embeddings:
      self.lm_head = layers.param(
        rngs, (c.embed_dim, c.vocab_size), ("embed", "vocab"), std=c.init_std
      )  # [d, V]

  def hidden_states(self, inputs: dict[str, jax.Array]) -> jax.Array:
    """[N, T, d] last hidden states, after the final norm, in the compute dtype."""
    c = self.config
    dtype = c.compute_dtype
    segment_ids, positions = segments_and_positions(inputs)  # [N, T] each
    branch_ids = inputs.get("branch_ids")  # [N, T] shared prompts, or None
    # Causality is added by the attention kernel (is_causal=True).
    mask = (
      segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    )  # [N, 1, T, T]
    if branch_ids is not None:  # a key on a branch: the query's branch only
      branch_q = branch_ids[:, None, :, None]
      branch_k = branch_ids[:, None, None, :]
      mask = mask & ((branch_k == 0) | (branch_k == branch_q))
    if c.attention == "blocked":  # masks block by block from the ids
      mask = segment_ids if branch_ids is None else (segment_ids, branch_ids)
    # Under FSDP the table is gathered for the lookup (its rows stay split
    # over `tensor`), so each device looks up its own rows' tokens.
    table = sharding.constrain(self.embed_tokens[...], layers.TABLE)  # [V, d]
    x = jnp.take(table, inputs["input_ids"], axis=0).astype(dtype)
    if c.embed_scale:
      # Gemma rounds sqrt(d) to the compute dtype before multiplying.
      x = x * jnp.asarray(c.embed_dim**0.5, dtype)
    x = sharding.constrain(x, layers.RESIDUAL)  # [N, T, d]

    windows = c.layer_windows()
    inv_freqs = c.layer_inv_freqs()  # [L, Dh/2] or None
    if any(windows) or inv_freqs is not None:
      # A sliding layer also needs query - key < W (segments are contiguous,
      # so the index distance is the position distance); a full layer gets a
      # W beyond any distance. Windows (and per-layer RoPE frequencies) are
      # scanned with the layers.
      t = jnp.arange(mask.shape[-1])
      distance = (t[:, None] - t[None, :])[None, None]  # [1, 1, T, T]
      beyond = mask.shape[-1] + 1
      per_layer = {"window": jnp.array([w or beyond for w in windows])}  # [L]
      if inv_freqs is not None:
        per_layer["inv_freq"] = jnp.asarray(inv_freqs)
      xs = (self.layers, per_layer)

      def apply_block(x, block_and_extras):
        block, extras = block_and_extras
        return block(
          x,
          positions,
          mask & (distance < extras["window"]),
          extras.get("inv_freq"),
        )
    else:
      xs = self.layers

      def apply_block(x, block):
        return block(x, positions, mask)

    if c.remat:
      apply_block = nnx.remat(
        apply_block, policy=getattr(jax.checkpoint_policies, c.remat_policy)
      )
    if c.scan_layers:
      run_layers = nnx.scan(
        apply_block,
        in_axes=(nnx.Carry, 0),
        out_axes=nnx.Carry,
        transform_metadata={nnx.PARTITION_NAME: "layers"},
      )
      x = run_layers(x, xs)
    else:
      for layer in range(c.num_layers):
        x = apply_block(x, _layer_slice(xs, layer))
    return self.final_norm(x)  # [N, T, d]

  def unembedding(self) -> jax.Array:
    """[d, V] float32 LM-head matrix: the embedding transposed when tied."""
    if self.config.tie_embeddings:
      return self.embed_tokens[...].T
    return self.lm_head[...]

  def logits(self, inputs: dict[str, jax.Array]) -> jax.Array:
    """[N, T, V] float32 next-token logits at every position (sampling, tests)."""
    return logprobs_lib.softcap_logits(
      logprobs_lib.lm_logits(self.hidden_states(inputs), self._head()),
      self.config.final_logit_softcap,
    )

  def _head(self) -> jax.Array:
    # The LM-head matmul runs in the compute dtype like every other matmul;
    # under FSDP W is gathered once, before the log-prob loop's chunks.
    head = self.unembedding().astype(self.config.compute_dtype)  # [d, V]
    return sharding.constrain(head, layers.HEAD)

  def token_logps(
    self, inputs: dict[str, jax.Array]
  ) -> tuple[jax.Array, jax.Array]:
    """Next-token log-probs of response tokens, aligned on the predicting position.

    Returns:
      (token_logps [N, T] float32, mask [N, T] bool): position t holds
      log p(input_ids[t + 1] | tokens_≤t) where token t + 1 is a response
      token of t's segment, and 0 elsewhere.
    """
    segment_ids, _ = segments_and_positions(inputs)
    labels, mask = logprobs_lib.next_token_targets(
      inputs["input_ids"], inputs["loss_mask"], segment_ids
    )
    c = self.config
    tokens = logprobs_lib.token_logps(
      self.hidden_states(inputs),
      self._head(),
      labels,
      mask,
      implementation=c.logprobs,
      chunk_size=c.logprobs_chunk_size,
      softcap=c.final_logit_softcap,
    )
    return tokens, mask

  def segment_logps(
    self, inputs: dict[str, jax.Array], *, num_segments: int
  ) -> tuple[jax.Array, jax.Array]:
    """Per-sequence sums of packed rows: ([N, S], [N, S]) float32, column s for
    segment id s + 1 (see `logprobs.segment_sums`)."""
    tokens, mask = self.token_logps(inputs)
    segment_ids, _ = segments_and_positions(inputs)
    return logprobs_lib.segment_sums(
      tokens, mask, segment_ids, num_segments=num_segments
    )

  def __call__(
    self, inputs: dict[str, jax.Array], *, rngs: nnx.Rngs | None = None
  ) -> PolicyOutput:
    """Summed response log-probs per row and their token counts; for packed
    rows (`sequence_ids` given) per sequence, one per entry of `packed_row`
    (data/packing.py), in the order of the padded layout's rows."""
    del rngs  # no dropout: the policy is deterministic
    tokens, mask = self.token_logps(inputs)
    if "sequence_ids" in inputs:
      logps, num_tokens = logprobs_lib.sums_by_sequence(
        tokens,
        mask,
        inputs["sequence_ids"],
        num_sequences=inputs["packed_row"].shape[0],
      )
    else:
      logps, num_tokens = logprobs_lib.sequence_sums(tokens, mask)
    return PolicyOutput(logps=logps, num_tokens=num_tokens)


def config_from_model_block(
  config: ml_collections.ConfigDict | dict[str, Any],
) -> TransformerConfig:
  """Validates the `model.*` block into a TransformerConfig.

  Raises:
    ValueError: naming `model.<key>` for an unknown key (with the nearest
      valid name), an unknown preset, a missing size or a bad value.
  """
  given = dict(config.items())
  given.pop("name", None)
  preset = given.pop("preset", None)
  fields = [f.name for f in dataclasses.fields(TransformerConfig)]
  valid = ["name", "preset", *fields]
  for key in given:
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=1)
      hint = f" (did you mean model.{close[0]}?)" if close else ""
      raise ValueError(
        f"unknown config key model.{key}{hint}; valid keys: {valid}"
      )
  overrides = {k: v for k, v in given.items() if v is not None}
  if preset is None:
    missing = [k for k in _SIZE_FIELDS if k not in overrides]
    if missing:
      raise ValueError(
        f"model.preset is not set, so model.{missing[0]} is required (missing:"
        f" {missing}); or choose a preset from {sorted(PRESETS)}"
      )
    return TransformerConfig(**overrides)
  if preset not in PRESETS:
    raise ValueError(f"model.preset={preset!r} is not one of {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[preset], **overrides)


def check_attention_available(c: TransformerConfig) -> None:
  """Raises ValueError naming `model.attention` when its implementation
  cannot run here (`layers.attention_unavailable`)."""
  reason = layers.attention_unavailable(
    c.attention,
    dtype=c.dtype,
    num_heads=c.num_heads,
    num_kv_heads=c.num_kv_heads,
    head_dim=c.head_dim,
    backend=jax.default_backend(),
  )
  if reason is not None:
    raise ValueError(
      f"model.attention={c.attention!r} is not available here (backend"
      f" {jax.default_backend()!r}, model.dtype={c.dtype!r}): {reason};"
      " use model.attention='xla'"
    )
