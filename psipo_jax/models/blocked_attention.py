"""Blockwise (flash-style) attention in pure JAX: `model.attention="blocked"`.

The same attention as the XLA path of `layers.Attention` — grouped-query,
scores scaled by 1/sqrt(Dh), softmax in float32, and (query i, key j)
allowed iff j ≤ i AND segment(i) = segment(j) AND segment(i) ≠ 0 (DESIGN:
causal AND same segment AND not padding; with `branch_ids`, also
branch(j) = 0 OR branch(j) = branch(i): the shared prompts of
data/packing.py) — computed without ever holding
the [N, H, T, T] scores: query blocks × key blocks of `block_size`
positions with an online softmax (running max and sum, Milakov &
Gimelshein 2018; Dao et al. 2022, FlashAttention), and a custom VJP that
recomputes each block's scores from q, k, v, the output and the row
log-sum-exp (Dao 2023, FlashAttention-2). Memory: O(N · T · H · Dh) for
inputs, outputs and gradients, plus O(block²) scores at a time.

Block skipping. A (query block, key block) pair is computed only if some
pair in it can be allowed: the key block does not start after the query
block ends (causality), and the ranges [min, max] of the blocks' non-padding
segment ids overlap. For every (row, query block) the kernel iterates only
from the first to the last such key block (a `while_loop` with those
bounds) and skips the ones in between that fail the test (`lax.cond`). A
block that is all padding is never computed. The row and query-block loop
is sequential (a `fori_loop`), not vectorised: under `vmap` a `cond`
becomes a select and a `while_loop` runs to the longest row, which would
lose the skipping on packed rows whose segment layouts differ.

Padding. Segment id 0 marks padding; a padding query sees no key, so its
output is 0 and its gradients are 0 (the XLA path lets padding attend to
padding; those outputs are never read by a real token, so log-probs and
parameter gradients agree). T need not be a multiple of `block_size`:
the kernel pads to one with segment 0 and slices the result; a block is
never longer than T.

Positions are not needed: causality is by index within the row, as the XLA
path's `is_causal=True`, which within a contiguous segment is causality by
position.

Sharding: the row loop reads rows with dynamic slices, which the
partitioner cannot split: left to it, a batch sharded over devices would be
gathered and every device would compute every row (correct, tested, but not
parallel). So under a mesh (traced in `sharding.activation_sharding`, as
the train and eval steps are) the kernel runs per device through
`sharding.per_device` (a `shard_map`): each device attends its own rows,
and its own key/value heads where the `tensor` axis divides them (tested:
one device's values and gradients; no float array but the loss crosses
devices). The kernel is meant for the CPU runs where the XLA path's T²
work dominates (BENCHMARKS.md, "Blocked attention").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from psipo_jax import sharding

# The `model.attention` value that selects this kernel.
NAME = "blocked"
DEFAULT_BLOCK_SIZE = 64  # fastest on CPU (BENCHMARKS.md)


def _block_ranges(segments: jax.Array, block: int) -> tuple[jax.Array, ...]:
  """Per-block min and max of the non-padding segment ids.

  Args:
    segments: [N, T] int32, T a multiple of `block`, 0 = padding.

  Returns:
    (lo [N, nb], hi [N, nb]) int32; a block of padding only gets lo > hi.
  """
  n, t = segments.shape
  s = segments.reshape(n, t // block, block)
  big = jnp.iinfo(jnp.int32).max
  lo = jnp.min(jnp.where(s != 0, s, big), axis=-1)
  hi = jnp.max(jnp.where(s != 0, s, -1), axis=-1)
  return lo, hi


def _branch_ranges(branches, block: int):
  """(min [N, nb], max [N, nb]) branch id per block; None without branches."""
  if branches is None:
    return None
  n, t = branches.shape
  b = branches.reshape(n, t // block, block)
  return jnp.min(b, axis=-1), jnp.max(b, axis=-1)


def _needed_key_blocks(lo, hi, row, qb, branch_ranges=None):
  """[nb] bool: key blocks that row `row`'s query block `qb` may attend to
  (same block size for queries and keys, so causality is kb ≤ qb). With
  branch ranges, a key block all on one branch b ≠ 0 is not needed by a
  query block all on one other branch (a shared pair's rejected response
  never sees its chosen one)."""
  nb = lo.shape[1]
  kb = jnp.arange(nb)
  q_lo, q_hi = lo[row, qb], hi[row, qb]
  overlap = (lo[row] <= q_hi) & (q_lo <= hi[row])  # [nb]
  needed = overlap & (kb <= qb) & (q_lo <= q_hi)
  if branch_ranges is not None:
    b_lo, b_hi = branch_ranges[0][row], branch_ranges[1][row]  # [nb]
    q_one = b_lo[qb] == b_hi[qb]  # the query block on one branch
    k_one = (b_lo == b_hi) & (b_lo != 0)  # key blocks on one branch ≠ 0
    needed = needed & ~(q_one & k_one & (b_lo != b_lo[qb]))
  return needed


def _first_last(needed):
  """(first, last + 1) indices of True in [nb] bool; (0, 0) if none."""
  nb = needed.shape[0]
  any_needed = jnp.any(needed)
  first = jnp.argmax(needed)
  last = nb - 1 - jnp.argmax(needed[::-1])
  return (
    jnp.where(any_needed, first, 0),
    jnp.where(any_needed, last + 1, 0),
  )


def _block_mask(seg_q, seg_k, branch_q, branch_k, qb, kb, block):
  """[bq, bk] bool: allowed (query, key) pairs of one block pair (branches
  None: no branch rule)."""
  iq = qb * block + jnp.arange(block)
  ik = kb * block + jnp.arange(block)
  mask = (
    (iq[:, None] >= ik[None, :])
    & (seg_q[:, None] == seg_k[None, :])
    & (seg_q[:, None] != 0)
  )
  if branch_q is not None:
    mask = mask & (
      (branch_k[None, :] == 0) | (branch_k[None, :] == branch_q[:, None])
    )
  return mask


def _block_ids(segments, branches, row, start, block):
  """(segment ids [block], branch ids [block] or None) of one block."""
  seg = _slice_rows(segments, row, start, block)
  if branches is None:
    return seg, None
  return seg, _slice_rows(branches, row, start, block)


def _slice_rows(x, row, start, size):
  """x[row, start:start + size] for x [N, T, ...]."""
  idx = (row, start) + (0,) * (x.ndim - 2)
  return jax.lax.dynamic_slice(x, idx, (1, size) + x.shape[2:])[0]


def _prepare(q, k, v, segments, branches, block_size):
  """Pads T to a multiple of the block and splits heads into [K, G] groups.

  Returns (q [N, Tp, K, G, D], k, v [N, Tp, K, D], segments [N, Tp],
  branches [N, Tp] or None, block).
  """
  n, t, h, d = q.shape
  kv = k.shape[2]
  block = min(block_size, t)
  pad = -t % block
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    segments = jnp.pad(segments, ((0, 0), (0, pad)))  # 0: padding
    if branches is not None:
      branches = jnp.pad(branches, ((0, 0), (0, pad)))
  q = q.reshape(n, t + pad, kv, h // kv, d)
  return q, k, v, segments, branches, block


def _forward(q, k, v, segments, branches, block):
  """Blocked forward on prepared inputs.

  Args:
    q: [N, Tp, K, G, D]; k, v: [N, Tp, K, D]; segments: [N, Tp] int32;
      branches: [N, Tp] int32 or None.

  Returns:
    (out [N, Tp, K, G, D] in q's dtype, lse [N, K, G, Tp] float32: the log of
    each query's softmax normaliser with the max included, 0 for a query
    that sees no key).
  """
  n, tp, kv, g, d = q.shape
  nb = tp // block
  scale = 1.0 / jnp.sqrt(jnp.float32(d))
  lo, hi = _block_ranges(segments, block)
  branch_ranges = _branch_ranges(branches, block)

  def query_block(i, carry):
    out, lse = carry
    row, qb = i // nb, i % nb
    q_blk = _slice_rows(q, row, qb * block, block).astype(jnp.float32)
    seg_q, branch_q = _block_ids(segments, branches, row, qb * block, block)
    needed = _needed_key_blocks(lo, hi, row, qb, branch_ranges)
    first, stop = _first_last(needed)

    def attend(kb, state):
      m, l, acc = state  # [K, G, bq], [K, G, bq], [K, G, bq, D]
      k_blk = _slice_rows(k, row, kb * block, block).astype(jnp.float32)
      v_blk = _slice_rows(v, row, kb * block, block).astype(jnp.float32)
      seg_k, branch_k = _block_ids(segments, branches, row, kb * block, block)
      mask = _block_mask(seg_q, seg_k, branch_q, branch_k, qb, kb, block)
      s = jnp.einsum("qkgd,skd->kgqs", q_blk, k_blk) * scale
      s = jnp.where(mask, s, -jnp.inf)  # [K, G, bq, bk]
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      # A row with nothing visible yet keeps m = -inf; subtracting 0 there
      # keeps exp() at 0 instead of exp(-inf + inf) = NaN.
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.exp(s - m_safe[..., None])  # masked entries: exp(-inf) = 0
      correction = jnp.exp(m - m_safe)
      l = l * correction + jnp.sum(p, axis=-1)
      acc = acc * correction[..., None] + jnp.einsum("kgqs,skd->kgqd", p, v_blk)
      return m_new, l, acc

    def step(state):
      kb, inner = state
      inner = jax.lax.cond(
        needed[kb], lambda s: attend(kb, s), lambda s: s, inner
      )
      return kb + 1, inner

    init = (
      jnp.full((kv, g, block), -jnp.inf, jnp.float32),
      jnp.zeros((kv, g, block), jnp.float32),
      jnp.zeros((kv, g, block, d), jnp.float32),
    )
    _, (m, l, acc) = jax.lax.while_loop(
      lambda s: s[0] < stop, step, (first, init)
    )
    # l = 0 exactly when the query saw no key; `!=` (not `>`) keeps a NaN
    # from the inputs a NaN in the output instead of hiding it as 0.
    seen = l != 0
    o_blk = jnp.where(
      seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0
    )
    lse_blk = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    o_blk = jnp.transpose(o_blk, (2, 0, 1, 3)).astype(out.dtype)
    out = jax.lax.dynamic_update_slice(
      out, o_blk[None], (row, qb * block, 0, 0, 0)
    )
    lse = jax.lax.dynamic_update_slice(
      lse, lse_blk[None], (row, 0, 0, qb * block)
    )
    return out, lse

  out = jnp.zeros(q.shape, q.dtype)
  lse = jnp.zeros((n, kv, g, tp), jnp.float32)
  return jax.lax.fori_loop(0, n * nb, query_block, (out, lse))


def _backward(q, k, v, segments, branches, out, lse, d_out, block):
  """FlashAttention-2 backward on prepared inputs, one pass over the same
  block pairs as the forward.

  Returns (dq [N, Tp, K, G, D], dk, dv [N, Tp, K, D]) float32.
  """
  n, tp, kv, g, d = q.shape
  nb = tp // block
  scale = 1.0 / jnp.sqrt(jnp.float32(d))
  lo, hi = _block_ranges(segments, block)
  branch_ranges = _branch_ranges(branches, block)
  # D_i = sum_d dO_i · O_i = sum_j P_ij dP_ij, the softmax's Jacobian term.
  delta = jnp.einsum(
    "ntkgd,ntkgd->nkgt",
    d_out.astype(jnp.float32),
    out.astype(jnp.float32),
  )  # [N, K, G, Tp]

  def row_grads(row, carry):
    # Per-row accumulators: the inner loops update [Tp, ...] arrays of one
    # row, not of the batch, so a copy XLA may make per update costs O(T),
    # not O(N · T).
    def query_block(qb, row_carry):
      dq, dk, dv = row_carry  # [Tp, K, G, D], [Tp, K, D], [Tp, K, D]
      start = qb * block
      q_blk = _slice_rows(q, row, start, block).astype(jnp.float32)
      do_blk = _slice_rows(d_out, row, start, block).astype(jnp.float32)
      seg_q, branch_q = _block_ids(segments, branches, row, start, block)
      lse_blk = jax.lax.dynamic_slice(
        lse, (row, 0, 0, start), (1, kv, g, block)
      )[0]  # [K, G, bq]
      delta_blk = jax.lax.dynamic_slice(
        delta, (row, 0, 0, start), (1, kv, g, block)
      )[0]
      needed = _needed_key_blocks(lo, hi, row, qb, branch_ranges)
      first, stop = _first_last(needed)

      def attend(kb, state):
        dq_blk, dk, dv = state
        k_blk = _slice_rows(k, row, kb * block, block).astype(jnp.float32)
        v_blk = _slice_rows(v, row, kb * block, block).astype(jnp.float32)
        seg_k, branch_k = _block_ids(segments, branches, row, kb * block, block)
        mask = _block_mask(seg_q, seg_k, branch_q, branch_k, qb, kb, block)
        s = jnp.einsum("qkgd,skd->kgqs", q_blk, k_blk) * scale
        # Masked entries are 0 by the where (no exp of a large number there).
        p = jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)
        dp = jnp.einsum("qkgd,skd->kgqs", do_blk, v_blk)
        ds = p * (dp - delta_blk[..., None]) * scale  # [K, G, bq, bk]
        dq_blk = dq_blk + jnp.einsum("kgqs,skd->qkgd", ds, k_blk)
        dk_part = jnp.einsum("kgqs,qkgd->skd", ds, q_blk)
        dv_part = jnp.einsum("kgqs,qkgd->skd", p, do_blk)
        at = kb * block
        dk = jax.lax.dynamic_update_slice_in_dim(
          dk, jax.lax.dynamic_slice_in_dim(dk, at, block) + dk_part, at, 0
        )
        dv = jax.lax.dynamic_update_slice_in_dim(
          dv, jax.lax.dynamic_slice_in_dim(dv, at, block) + dv_part, at, 0
        )
        return dq_blk, dk, dv

      def step(state):
        kb, inner = state
        inner = jax.lax.cond(
          needed[kb], lambda s: attend(kb, s), lambda s: s, inner
        )
        return kb + 1, inner

      init = (jnp.zeros((block, kv, g, d), jnp.float32), dk, dv)
      _, (dq_blk, dk, dv) = jax.lax.while_loop(
        lambda s: s[0] < stop, step, (first, init)
      )
      dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_blk, start, 0)
      return dq, dk, dv

    row_zeros = (
      jnp.zeros(q.shape[1:], jnp.float32),
      jnp.zeros(k.shape[1:], jnp.float32),
      jnp.zeros(v.shape[1:], jnp.float32),
    )
    dq_row, dk_row, dv_row = jax.lax.fori_loop(0, nb, query_block, row_zeros)
    return tuple(
      jax.lax.dynamic_update_index_in_dim(full, part, row, 0)
      for full, part in zip(carry, (dq_row, dk_row, dv_row))
    )

  zeros = (
    jnp.zeros(q.shape, jnp.float32),
    jnp.zeros(k.shape, jnp.float32),
    jnp.zeros(v.shape, jnp.float32),
  )
  return jax.lax.fori_loop(0, n, row_grads, zeros)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, segments, branches, block):
  out, _ = _forward(q, k, v, segments, branches, block)
  return out


def _attention_fwd(q, k, v, segments, branches, block):
  out, lse = _forward(q, k, v, segments, branches, block)
  return out, (q, k, v, segments, branches, out, lse)


def _attention_bwd(block, residuals, d_out):
  q, k, v, segments, branches, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, segments, branches, out, lse, d_out, block)
  grads = dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
  return (*grads, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  segment_ids: jax.Array,
  *,
  branch_ids: jax.Array | None = None,
  block_size: int = DEFAULT_BLOCK_SIZE,
) -> jax.Array:
  """Causal, segment-masked grouped-query attention, blockwise.

  Args:
    q: [N, T, H, Dh] queries (float32 or bfloat16; maths in float32).
    k, v: [N, T, K, Dh] keys and values, H a multiple of K.
    segment_ids: [N, T] int, 1, 2, ... per sequence, 0 on padding.
    branch_ids: optional [N, T] int: a key of branch b ≠ 0 is seen only by
      queries of branch b (shared prompts, data/packing.py); None: no rule.
    block_size: positions per query and key block (capped at T).

  Returns:
    [N, T, H, Dh] in q's dtype; 0 at padding queries. Differentiable in q,
    k and v (custom VJP, the same block skipping).
  """
  n, t, h, d = q.shape
  if k.shape != v.shape or k.shape[:2] != (n, t) or k.shape[3] != d:
    raise ValueError(
      f"blocked_attention: k {k.shape} and v {v.shape} must be [N, T, K, Dh]"
      f" matching q {q.shape}"
    )
  if h % k.shape[2]:
    raise ValueError(
      f"blocked_attention: {h} query heads are not a multiple of"
      f" {k.shape[2]} key/value heads"
    )
  if segment_ids.shape != (n, t):
    raise ValueError(
      f"blocked_attention: segment_ids {segment_ids.shape} must be [N, T] ="
      f" {(n, t)}"
    )
  if branch_ids is not None and branch_ids.shape != (n, t):
    raise ValueError(
      f"blocked_attention: branch_ids {branch_ids.shape} must be [N, T] ="
      f" {(n, t)}"
    )
  if block_size < 1:
    raise ValueError(
      f"model.attention_block_size must be >= 1, got {block_size}"
    )
  segments = jnp.asarray(segment_ids, jnp.int32)
  branches = None if branch_ids is None else jnp.asarray(branch_ids, jnp.int32)
  qp, kp, vp, segments, branches, block = _prepare(
    q, k, v, segments, branches, block_size
  )
  # Under a mesh every device runs the row loop on its own rows (and its
  # key/value heads, where `tensor` divides them).
  rows = ("activation_batch", "activation_length")
  kv_heads = (*rows, "activation_kv_heads", None)  # [N, Tp, K, D]
  grouped = (*kv_heads, None)  # [N, Tp, K, G, D]
  out = sharding.per_device(
    lambda q, k, v, s, b: _attention(q, k, v, s, b, block),
    in_names=(grouped, kv_heads, kv_heads, rows, rows),
    out_names=grouped,
  )(qp, kp, vp, segments, branches)  # [N, Tp, K, G, D]
  return out.reshape(n, -1, h, d)[:, :t]
