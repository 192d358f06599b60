"""Per-sequence log-probs of a causal LM from its last hidden states.

A sequence model scores a response y given a prompt x by

    log π(y|x) = Σ_t mask_t · log softmax(h_t W)[label_t]

where h_t ([d]) is the last hidden state at position t, W ([d, V]) the
unembedding matrix, label_t the next token (input_ids[t + 1]) and mask_t = 1
iff that next token is a response token. Everything here takes hidden states,
W, labels and a mask, all aligned on the position t that PREDICTS:

    hidden  [N, T, d]    labels [N, T] int    mask [N, T] (bool or 0/1)

`next_token_targets` turns the data's token-aligned `input_ids` / `loss_mask`
(see `psipo_jax.data.encoding`) into these labels and mask.

Two paths compute the same [N, T] token log-probs (zero off the mask):

  * `token_logps_naive`: the reference; full [N, T, V] logits, float32
    log-softmax, ordinary autodiff (which keeps [N, T, V] buffers for the
    backward pass: ≈ 4 GB for N=16, T=1024, V=32,000).
  * `token_logps_chunked`: memory-lean; never holds [N, T, V] in the forward
    or the backward pass, and only scored positions reach the LM head.

Design of the lean path (a custom VJP around two `lax.while_loop`s):

  1. Per row, the scored positions are moved to the front by a stable sort of
     the mask (`order` [N, T]: position of the j-th scored token of each row,
     then the unscored positions). The sort is row-local, so a batch sharded
     over a data axis stays sharded without communication.
  2. The forward loop takes time chunks of `chunk_size` compacted slots per
     row: it gathers the chunk's hidden states ([N, C, d]), computes the
     chunk's logits ([N, C, V], float32) and their log-sum-exp, and writes
     the label log-probs back to their positions. The trip count is dynamic,
     ceil(max scored tokens in any row / C), so the LM head's compute scales
     with the number of response tokens, not with T; prompt positions are
     never multiplied by W (slots past a row's count are zeroed first, so
     even a non-finite prompt hidden state cannot leak in).
  3. The backward loop recomputes each chunk's logits, forms
     dlogits = g · (onehot(label) − softmax) in float32, and accumulates
     dhidden (scatter-add into [N, T, d]) and dW ([d, V], float32) chunk by
     chunk. Only the per-token log-sum-exp ([N, T]) is saved between passes.

  Peak memory is therefore the hidden states and W, their gradients, and one
  chunk of logits and its gradient ([N, C, V] each).

  Under a mesh (traced in `sharding.activation_sharding`, as the train and
  eval steps are) every per-row array is pinned to its rows' devices
  (`sharding.constrain`), the write-backs are scatters vmapped over rows
  (which the partitioner splits by row), and dW is accumulated per batch
  shard and reduced once after the loop: the loop itself communicates only
  what tensor parallelism over the vocabulary needs. `while_loop` cannot be
  reverse-differentiated by JAX itself; the custom VJP is what allows it.
  (Alternatives considered: `jax.checkpoint` over a `lax.scan` of chunks has
  a static trip count, so it would pay the LM head on every position, prompt
  included; compacting scored tokens across rows would waste less on uneven
  rows but needs communication when rows are sharded.)

`chunk_size` counts positions PER ROW: a chunk holds [rows, chunk_size, V]
logits, i.e. rows-per-device × chunk_size tokens on each device. It need not
divide T or the number of scored tokens.

Precision: the matmul runs in the inputs' dtype (bfloat16 hidden states and W
stay bfloat16) with float32 accumulation and float32 output; log-softmax,
log-probs, sums and dlogits are float32; dlogits is cast to the matmul dtype
for the two gradient matmuls (as autodiff of the naive path would), and both
gradients are accumulated in float32 then cast to their inputs' dtypes.
(float64 inputs, as in gradient checks under x64, keep float64 throughout.)
bfloat16 tolerance: against float32 maths on the same bf16-rounded inputs,
values differ by float32 rounding only; against float32 inputs, rounding h
and W to bf16 (unit roundoff 2⁻⁸) moves each logit z_v by at most
2⁻⁷ Σ_d |h_d W_dv|, hence each token log-prob (z_y − logsumexp z) by at most
2⁻⁶ max_v Σ_d |h_d W_dv| (tested); gradients carry a further relative 2⁻⁸
from dlogits in bf16.

Packing: rows holding several sequences carry `segment_ids` ([N, T], 1..S
for the sequences, 0 for padding); `segment_sums` turns token log-probs into
[N, S] sums and counts. `loss.normalize` ("sum" / "mean") is the train
step's business (`train_step._normalize`): this module returns sums and
token counts. A row (or segment) with no scored token gives 0 and count 0,
never NaN.
"""

import functools

import jax
import jax.numpy as jnp

from psipo_jax import sharding

IMPLEMENTATIONS = ("chunked", "naive")

# Logical axes of the lean path's arrays (`sharding.constrain`): under a
# mesh, every chunk stays on the devices of its rows, so no device gathers
# another's hidden states or log-probs.
_PER_POSITION = ("activation_batch", "activation_length")  # [N, T]
_PER_POSITION_VECTOR = (*_PER_POSITION, "activation_embed")  # [N, T | C, d]
_FLAT_VECTOR = ("activation_batch", "activation_embed")  # [N·C, d]
_FLAT_LOGITS = ("activation_batch", "activation_vocab")  # [N·C, V]
# [S, d, V]: one partial dW per batch shard
_PER_SHARD_HEAD = ("activation_batch", "activation_embed", "activation_vocab")


def next_token_targets(
  input_ids: jax.Array,
  loss_mask: jax.Array,
  segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Labels and mask aligned on the predicting position, from token-aligned data.

  Position t predicts token t + 1: `labels[:, t] = input_ids[:, t + 1]`, and
  it is scored iff token t + 1 is a response token (`loss_mask[:, t + 1]`)
  in the same segment as token t. The last position predicts nothing.

  Args:
    input_ids: [N, T] int token ids.
    loss_mask: [N, T], 1 iff the token is a response token.
    segment_ids: optional [N, T] int; a token is never scored from a
      position of another segment (its first token has no predecessor).

  Returns:
    (labels [N, T] int32, mask [N, T] bool).
  """
  n = input_ids.shape[0]
  labels = jnp.concatenate(
    [jnp.asarray(input_ids[:, 1:], jnp.int32), jnp.zeros((n, 1), jnp.int32)],
    axis=1,
  )  # [N, T]
  mask = jnp.concatenate(
    [loss_mask[:, 1:] != 0, jnp.zeros((n, 1), bool)], axis=1
  )  # [N, T]
  if segment_ids is not None:
    same = segment_ids[:, 1:] == segment_ids[:, :-1]  # [N, T-1]
    mask = mask & jnp.concatenate([same, jnp.zeros((n, 1), bool)], axis=1)
  return labels, mask


def _matmul_dtype(hidden: jax.Array, unembedding: jax.Array):
  return jnp.promote_types(hidden.dtype, unembedding.dtype)


def _maths_dtype(hidden: jax.Array, unembedding: jax.Array):
  """float32, or float64 for float64 inputs (gradient checks under x64)."""
  return jnp.promote_types(_matmul_dtype(hidden, unembedding), jnp.float32)


def lm_logits(hidden: jax.Array, unembedding: jax.Array) -> jax.Array:
  """[..., d] x [d, V] -> [..., V] float32 logits: the matmul in the inputs'
  (promoted) dtype, accumulated and returned in float32 (float64 under x64)."""
  dtype = _matmul_dtype(hidden, unembedding)
  return jnp.einsum(
    "...d,dv->...v",
    hidden.astype(dtype),
    unembedding.astype(dtype),
    preferred_element_type=_maths_dtype(hidden, unembedding),
  )


def softcap_logits(logits: jax.Array, cap: float) -> jax.Array:
  """cap · tanh(logits / cap) (Gemma 2's final soft-capping); cap 0: as is."""
  return cap * jnp.tanh(logits / cap) if cap else logits


def _label_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[..., V], [...] -> [...] logits of the labels (out-of-range ids clipped)."""
  return jnp.take_along_axis(logits, labels[..., None], axis=-1, mode="clip")[
    ..., 0
  ]


def _check_shapes(hidden, unembedding, labels, mask) -> None:
  if hidden.ndim != 3:
    raise ValueError(f"hidden must be [N, T, d], got shape {hidden.shape}")
  if unembedding.ndim != 2 or unembedding.shape[0] != hidden.shape[-1]:
    raise ValueError(
      f"unembedding must be [d, V] with d={hidden.shape[-1]}, got shape"
      f" {unembedding.shape}"
    )
  if labels.shape != hidden.shape[:2] or mask.shape != hidden.shape[:2]:
    raise ValueError(
      f"labels {labels.shape} and mask {mask.shape} must be [N, T] ="
      f" {hidden.shape[:2]}"
    )


def token_logps_naive(
  hidden: jax.Array,
  unembedding: jax.Array,
  labels: jax.Array,
  mask: jax.Array,
  *,
  softcap: float = 0.0,
) -> jax.Array:
  """Reference token log-probs through full [N, T, V] float32 logits.

  Args:
    hidden: [N, T, d] last hidden states (after the final norm).
    unembedding: [d, V] LM-head matrix.
    labels: [N, T] int next-token ids.
    mask: [N, T], nonzero where the position is scored.
    softcap: > 0: logits soft-capped (`softcap_logits`) before the softmax.

  Returns:
    [N, T] float32 log p(label_t | h_t) on the mask, 0 elsewhere.
  """
  _check_shapes(hidden, unembedding, labels, mask)
  logits = softcap_logits(lm_logits(hidden, unembedding), softcap)  # [N, T, V]
  # log softmax(z)[y] = z_y - logsumexp(z): the cross-entropy form, whose
  # autodiff keeps two [N, T, V] buffers (log_softmax then a gather keeps three).
  token_logps = _label_logits(
    logits, labels.astype(jnp.int32)
  ) - jax.nn.logsumexp(logits, axis=-1)  # [N, T]
  return jnp.where(mask != 0, token_logps, 0.0)


def _compact(mask: jax.Array, chunk_size: int):
  """Per-row order of positions (scored first), padded to whole chunks.

  Returns:
    order: [N, num_chunks * C] int32 positions; slots past T hold T (out of
      range: gathers clip, scatters drop).
    counts: [N] int32 scored positions per row.
    num_chunks: int32 scalar, ceil(max(counts) / C): the dynamic trip count.
  """
  n, t = mask.shape
  scored = mask != 0
  # Stable: scored positions keep their order, then the unscored ones.
  order = jnp.argsort(jnp.logical_not(scored), axis=1, stable=True).astype(
    jnp.int32
  )
  padded = -(-t // chunk_size) * chunk_size
  order = jnp.pad(
    order, ((0, 0), (0, padded - t)), constant_values=t
  )  # [N, Tp]
  counts = jnp.sum(scored, axis=1, dtype=jnp.int32)  # [N]
  num_chunks = (jnp.max(counts) + chunk_size - 1) // chunk_size
  return order, counts, num_chunks


def _chunk(order, counts, hidden, k, chunk_size):
  """Positions [N, C], validity [N, C] and hidden states [N·C, d] of chunk k."""
  positions = jax.lax.dynamic_slice_in_dim(
    order, k * chunk_size, chunk_size, axis=1
  )
  slots = k * chunk_size + jnp.arange(chunk_size, dtype=jnp.int32)  # [C]
  valid = slots[None, :] < counts[:, None]  # [N, C]
  h = jnp.take_along_axis(
    hidden, positions[..., None], axis=1, mode="clip"
  )  # [N, C, d]
  h = sharding.constrain(h, _PER_POSITION_VECTOR)
  # Unscored positions never reach the LM head, whatever their values.
  h = jnp.where(valid[..., None], h, jnp.zeros((), h.dtype))
  # Flat [N·C, d]: XLA keeps one [N·C, V] buffer per matmul this way, where the
  # 3-D einsums of the backward pass made it copy dlogits (measured on CPU).
  h = sharding.constrain(h.reshape(-1, h.shape[-1]), _FLAT_VECTOR)
  return positions, valid, h


def _scatter_rows(target, positions, values):
  """target[n, positions[n, j]] += values[n, j]; out-of-range positions dropped."""
  # vmapped, the scatter has the rows as a batching dimension, which the SPMD
  # partitioner splits; indexing by an explicit row index it cannot, and
  # gathers the whole [N, T, ...] target on every device.
  add = jax.vmap(lambda t, p, v: t.at[p].add(v, mode="drop"))
  names = _PER_POSITION if target.ndim == 2 else _PER_POSITION_VECTOR
  return sharding.constrain(add(target, positions, values), names)


def _chunked_forward(hidden, unembedding, labels, mask, chunk_size, softcap):
  n, t, _ = hidden.shape
  order, counts, num_chunks = _compact(mask, chunk_size)
  labels = labels.astype(jnp.int32)

  def body(carry):
    k, token_logps, lse = carry
    positions, valid, h = _chunk(order, counts, hidden, k, chunk_size)
    logits = softcap_logits(lm_logits(h, unembedding), softcap)  # [N·C, V]
    logits = sharding.constrain(logits, _FLAT_LOGITS)
    chunk_lse = jax.nn.logsumexp(logits, axis=-1).reshape(n, -1)  # [N, C]
    chunk_labels = jnp.take_along_axis(
      labels, positions, axis=1, mode="clip"
    )  # [N, C]
    chunk_logps = (
      _label_logits(logits, chunk_labels.reshape(-1)).reshape(n, -1) - chunk_lse
    )
    token_logps = _scatter_rows(
      token_logps, positions, jnp.where(valid, chunk_logps, 0.0)
    )
    lse = _scatter_rows(lse, positions, jnp.where(valid, chunk_lse, 0.0))
    return k + 1, token_logps, lse

  zeros = jnp.zeros((n, t), _maths_dtype(hidden, unembedding))
  _, token_logps, lse = jax.lax.while_loop(
    lambda carry: carry[0] < num_chunks, body, (jnp.int32(0), zeros, zeros)
  )  # [N, T], [N, T]
  return token_logps, (order, counts, num_chunks, lse)


def _chunked_backward(chunk_size, softcap, residuals, g):
  hidden, unembedding, labels, mask, order, counts, num_chunks, lse = residuals
  n = hidden.shape[0]
  dtype = _matmul_dtype(hidden, unembedding)
  acc = _maths_dtype(hidden, unembedding)
  w = unembedding.astype(dtype)
  labels = labels.astype(jnp.int32)
  g = jnp.where(
    mask != 0, g.astype(acc), 0.0
  )  # [N, T]; off-mask outputs are constant

  # dW sums over every row. Under a mesh that splits the rows S ways, each
  # shard accumulates its own partial sum ([S, d, V], split over the
  # shards), so that the loop adds chunk after chunk without communication
  # and the S sums are reduced once after it, not once per chunk; the price
  # is a [d, V / tensor] float32 sum per device, even where W is split over
  # `fsdp`.
  shards = sharding.batch_shards_in_context()
  shards = shards if n % shards == 0 else 1

  def body(carry):
    k, d_hidden, d_w = carry
    positions, valid, h = _chunk(order, counts, hidden, k, chunk_size)
    h = h.astype(dtype)
    logits = softcap_logits(lm_logits(h, w), softcap)  # [N·C, V], recomputed
    logits = sharding.constrain(logits, _FLAT_LOGITS)
    take = lambda x: jnp.take_along_axis(
      x, positions, axis=1, mode="clip"
    ).reshape(-1)
    chunk_g = jnp.where(valid.reshape(-1), take(g), 0.0)  # [N·C]
    probs = jnp.exp(logits - take(lse)[:, None])  # [N·C, V]
    onehot = jnp.arange(logits.shape[-1]) == take(labels)[:, None]  # [N·C, V]
    d_logits = chunk_g[:, None] * (onehot - probs)  # [N·C, V]
    if softcap:  # d(cap · tanh(z / cap))/dz = 1 - tanh²
      d_logits = d_logits * (1 - jnp.square(logits / softcap))
    d_logits = d_logits.astype(dtype)
    d_h = jnp.einsum("kv,dv->kd", d_logits, w, preferred_element_type=acc)
    d_w = d_w + jnp.einsum(
      "skd,skv->sdv",
      h.reshape(shards, -1, h.shape[-1]),
      d_logits.reshape(shards, -1, d_logits.shape[-1]),
      preferred_element_type=acc,
    )
    return (
      k + 1,
      _scatter_rows(d_hidden, positions, d_h.reshape(n, chunk_size, -1)),
      d_w,
    )

  init = (
    jnp.int32(0),
    jnp.zeros(hidden.shape, acc),
    sharding.constrain(
      jnp.zeros((shards, *unembedding.shape), acc), _PER_SHARD_HEAD
    ),
  )
  _, d_hidden, d_w = jax.lax.while_loop(
    lambda carry: carry[0] < num_chunks, body, init
  )
  return (
    d_hidden.astype(hidden.dtype),
    d_w.sum(axis=0).astype(unembedding.dtype),
    None,
    None,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked(hidden, unembedding, labels, mask, chunk_size, softcap):
  return _chunked_forward(
    hidden, unembedding, labels, mask, chunk_size, softcap
  )[0]


def _chunked_fwd(hidden, unembedding, labels, mask, chunk_size, softcap):
  token_logps, saved = _chunked_forward(
    hidden, unembedding, labels, mask, chunk_size, softcap
  )
  return token_logps, (hidden, unembedding, labels, mask, *saved)


_chunked.defvjp(_chunked_fwd, _chunked_backward)


def token_logps_chunked(
  hidden: jax.Array,
  unembedding: jax.Array,
  labels: jax.Array,
  mask: jax.Array,
  *,
  chunk_size: int,
  softcap: float = 0.0,
) -> jax.Array:
  """Memory-lean token log-probs: LM head on scored positions only, in chunks.

  Same values and gradients (w.r.t. `hidden` and `unembedding`) as
  `token_logps_naive`; see the module docstring for the algorithm and its
  memory. Reverse-mode differentiable (custom VJP), not forward-mode.

  Args:
    hidden: [N, T, d] last hidden states (after the final norm).
    unembedding: [d, V] LM-head matrix.
    labels: [N, T] int next-token ids.
    mask: [N, T], nonzero where the position is scored.
    chunk_size: positions per row in one chunk (static, >= 1); a chunk
      holds [N, chunk_size, V] float32 logits.
    softcap: as `token_logps_naive` (static).

  Returns:
    [N, T] float32 log p(label_t | h_t) on the mask, 0 elsewhere.
  """
  _check_shapes(hidden, unembedding, labels, mask)
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  chunk_size = min(chunk_size, hidden.shape[1])
  return _chunked(hidden, unembedding, labels, mask, chunk_size, float(softcap))


def token_logps(
  hidden: jax.Array,
  unembedding: jax.Array,
  labels: jax.Array,
  mask: jax.Array,
  *,
  implementation: str,
  chunk_size: int,
  softcap: float = 0.0,
) -> jax.Array:
  """[N, T] token log-probs by `implementation` ("chunked" or "naive"),
  logits soft-capped by `softcap` when > 0.

  `chunk_size` (positions per row per chunk) is used by "chunked" only.
  Per-row sums: `sequence_sums(token_logps(...), mask)`.
  """
  if implementation == "chunked":
    return token_logps_chunked(
      hidden, unembedding, labels, mask, chunk_size=chunk_size, softcap=softcap
    )
  if implementation == "naive":
    return token_logps_naive(hidden, unembedding, labels, mask, softcap=softcap)
  raise ValueError(
    f"log-prob implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
  )


def sequence_sums(
  token_logps: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Per-row sums: ([N] float32 Σ_t log-probs, [N] float32 scored-token counts)."""
  mask = mask != 0
  dtype = jnp.promote_types(token_logps.dtype, jnp.float32)
  return (
    jnp.sum(jnp.where(mask, token_logps, 0.0), axis=1, dtype=dtype),
    jnp.sum(mask, axis=1, dtype=jnp.float32),
  )


def segment_sums(
  token_logps: jax.Array,
  mask: jax.Array,
  segment_ids: jax.Array,
  *,
  num_segments: int,
) -> tuple[jax.Array, jax.Array]:
  """Per-segment sums for rows holding several sequences.

  Args:
    token_logps: [N, T] token log-probs (e.g. from `token_logps`).
    mask: [N, T], nonzero where the position is scored.
    segment_ids: [N, T] int, the segment of each PREDICTING position: 1..S
      for sequences, 0 for padding (never counted). With `next_token_targets`
      masking cross-segment positions, the input's own segment ids serve.
    num_segments: S, static; ids above S are not counted.

  Returns:
    (logps [N, S] float32, num_tokens [N, S] float32); column s holds
    segment id s + 1. A segment without scored tokens gives (0, 0).
  """
  ids = jnp.arange(1, num_segments + 1, dtype=jnp.int32)  # [S]
  member = (jnp.asarray(segment_ids, jnp.int32)[..., None] == ids) & (
    mask != 0
  )[..., None]  # [N, T, S]
  dtype = jnp.promote_types(token_logps.dtype, jnp.float32)
  # A where-sum, not a matmul: exact on every backend (TPU matmuls round).
  logps = jnp.sum(
    jnp.where(member, token_logps.astype(dtype)[..., None], 0.0), axis=1
  )  # [N, S]
  return logps, jnp.sum(member, axis=1, dtype=jnp.float32)


def sums_by_sequence(
  token_logps: jax.Array,
  mask: jax.Array,
  sequence_ids: jax.Array,
  *,
  num_sequences: int,
) -> tuple[jax.Array, jax.Array]:
  """Per-sequence sums of packed rows, by a global sequence index per token.

  Args:
    token_logps: [N, T] token log-probs (e.g. from `token_logps`).
    mask: [N, T], nonzero where the position is scored.
    sequence_ids: [N, T] int, the sequence of each PREDICTING position, in
      [0, num_sequences), negative on padding (the packed layout of
      data/packing.py; a scored position predicts a token of its own
      sequence, `next_token_targets`).
    num_sequences: M, static.

  Returns:
    (logps [M] float32, num_tokens [M] float32): a sequence that no scored
    position names gives (0, 0).
  """
  dtype = jnp.promote_types(token_logps.dtype, jnp.float32)
  scored = (mask != 0) & (sequence_ids >= 0)  # [N, T]
  # Unscored positions add 0 to a valid slot, so no index wraps or drops.
  ids = jnp.clip(jnp.asarray(sequence_ids, jnp.int32), 0, num_sequences - 1)
  values = jnp.where(scored, token_logps.astype(dtype), 0.0)
  logps = jax.ops.segment_sum(
    values.reshape(-1), ids.reshape(-1), num_segments=num_sequences
  )  # [M]
  counts = jax.ops.segment_sum(
    scored.reshape(-1).astype(jnp.float32),
    ids.reshape(-1),
    num_segments=num_sequences,
  )  # [M]
  return logps, counts
