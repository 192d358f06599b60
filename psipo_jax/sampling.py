"""A jitted, KV-cached sampler for the transformer policy.

    sampler = sampling.make_sampler(model_def, SamplingConfig(
        max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0, eos_id=2))
    prompts, lengths = sampling.left_pad([ids_0, ids_1], pad_id=0)
    out = sampler(params, prompts, lengths, jax.random.key(0))
    out.tokens, out.logps, out.mask          # [N, max_new_tokens] each

Prompts are LEFT-PADDED to a common length P (`left_pad`); a row's first
real token gets position 0, as in the full forward pass of a left-padded
row (`psipo_jax.models.transformer`), so prompts of different lengths share
one batch and one compiled program. The prompt is prefilled in one pass,
then one token per step runs under `lax.while_loop` against the cache
(`psipo_jax.models.decoding`); the loop ends after `max_new_tokens` or as
soon as every row has emitted EOS.

Choosing each token from the float32 next-token logits z, in this order
(that of Hugging Face `generate`):
  temperature = 0   greedy: argmax z (top-k and top-p are then irrelevant);
  temperature T > 0 z / T;
  top_k = k > 0     only tokens whose logit is >= the k-th largest stay;
  top_p = p < 1     nucleus: the most probable tokens, in decreasing order
                    of probability (after temperature and top-k), up to and
                    including the first at which the cumulative probability
                    reaches p; then every token at least as probable as the
                    least probable one kept (so exact ties are all kept);
  then one draw from the softmax of what stays.

Returned log-probs (`SampleOutput.logps`) are the MODEL's: log π(y_t | x,
y_<t) = log_softmax(z)[y_t], before temperature and truncation, i.e. the
numbers that a full forward pass scores (`Transformer.token_logps`) and
that a KL(π‖π_ref) estimate from the policy's own samples needs (sample at
temperature 1 without top-k/top-p for an unbiased estimate). The log-prob
of the distribution actually drawn from is in `SampleOutput.sample_logps`.

After a row's EOS (which is kept, scored and masked in) the row emits
`pad_id` with log-prob 0 and mask 0. Sharding: as training, the rows split
over the mesh's `data` × `fsdp` axes (`sharding.batch_sharding`), the
parameters as given (`sharding.param_shardings` of the training state, or
replicated); the batch must then divide into the batch shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from psipo_jax import sharding
from psipo_jax.models import decoding


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample; see the module docstring for the order of the filters.

  Attributes:
    max_new_tokens: tokens generated per row at most (>= 1).
    temperature: 0 for greedy decoding, else > 0.
    top_k: keep the k most likely tokens; 0 keeps all.
    top_p: nucleus mass in (0, 1]; 1 keeps all.
    eos_id: the token that ends a row; None never stops early.
    pad_id: emitted after EOS.
  """

  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    if isinstance(self.max_new_tokens, bool) or not (
      isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1
    ):
      raise ValueError(
        f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}"
      )
    if not (np.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(
        f"temperature must be >= 0 (0: greedy), got {self.temperature!r}"
      )
    if isinstance(self.top_k, bool) or not (
      isinstance(self.top_k, int) and self.top_k >= 0
    ):
      raise ValueError(
        f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}"
      )
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p!r}")


class SampleOutput(NamedTuple):
  """Generated continuations of N prompts, M = max_new_tokens.

  Attributes:
    tokens: [N, M] int32, pad_id after EOS.
    logps: [N, M] float32, the model's log-probs of the tokens (module
      docstring), 0 where `mask` is 0.
    sample_logps: [N, M] float32, log-probs under the distribution drawn
      from (after temperature, top-k, top-p; 0 for greedy), 0 where `mask` is 0.
    mask: [N, M] bool, token generated (EOS included).
    lengths: [N] int32, generated tokens per row (`mask.sum(1)`).
  """

  tokens: jax.Array
  logps: jax.Array
  sample_logps: jax.Array
  mask: jax.Array
  lengths: jax.Array


def left_pad(
  prompts: Sequence[Sequence[int] | np.ndarray],
  *,
  pad_id: int,
  length: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token id lists into ([N, P] int32 ids, [N] int32 lengths).

  Raises:
    ValueError: an empty prompt (nothing to condition on), or one longer than
      `length`, naming its index.
  """
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  for i, n in enumerate(lengths):
    if n == 0:
      raise ValueError(f"prompt {i} has no tokens; every prompt needs one")
  width = int(lengths.max()) if length is None else length
  out = np.full((len(prompts), width), pad_id, np.int32)
  for i, p in enumerate(prompts):
    if len(p) > width:
      raise ValueError(f"prompt {i} has {len(p)} tokens > length={width}")
    out[i, width - len(p) :] = np.asarray(p, np.int32)
  return out, lengths


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """[N, V] float32 logits -> the logits drawn from: temperature, top-k, top-p
  applied (removed tokens at -inf). Needs temperature > 0."""
  logits = logits / config.temperature
  if config.top_k and config.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]  # [N, 1]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if config.top_p < 1:
    probs = jax.nn.softmax(logits, axis=-1)  # [N, V]
    sorted_probs = -jnp.sort(-probs, axis=-1)  # [N, V] decreasing
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept = mass_before < config.top_p  # [N, V]; the first is always kept
    smallest = jnp.min(
      jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True
    )  # [N, 1]
    logits = jnp.where(probs >= smallest, logits, -jnp.inf)
  return logits


def choose(
  logits: jax.Array, key: jax.Array, config: SamplingConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Next tokens from [N, V] float32 logits.

  Returns:
    (tokens [N] int32, the model's log-probs [N], the log-probs under the
    distribution drawn from [N]).
  """
  model_logps = jax.nn.log_softmax(logits, axis=-1)  # [N, V]
  if config.temperature == 0:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    drawn_logps = jnp.zeros(tokens.shape, jnp.float32)
  else:
    filtered = filter_logits(logits, config)
    tokens = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    drawn_logps = jnp.take_along_axis(
      jax.nn.log_softmax(filtered, axis=-1), tokens[:, None], axis=-1
    )[:, 0]
  token_logps = jnp.take_along_axis(model_logps, tokens[:, None], axis=-1)[:, 0]
  return tokens, token_logps, drawn_logps


def mix_logits(logits: jax.Array, ref_logits: jax.Array, mixture: float):
  """[N, V] float32 logits of the token-level geometric mixture
  π^β(· | x, y_<t) ∝ π(· | x, y_<t)^(1−β) · π_ref(· | x, y_<t)^β, β = `mixture`
  (Nash-MD's regularised policy, Munos et al. 2023, sampled token by token);
  normalised, so they are also its log-probs."""
  mixed = (1.0 - mixture) * jax.nn.log_softmax(logits, axis=-1)
  mixed = mixed + mixture * jax.nn.log_softmax(ref_logits, axis=-1)
  return jax.nn.log_softmax(mixed, axis=-1)


def sample(
  model: nnx.Module,
  prompt_tokens: jax.Array,
  prompt_lengths: jax.Array,
  key: jax.Array,
  config: SamplingConfig,
  *,
  reference: nnx.Module | None = None,
  mixture: float = 0.0,
) -> SampleOutput:
  """Samples continuations of left-padded prompts (traceable; see make_sampler).

  Args:
    model: a `Transformer`.
    prompt_tokens: [N, P] int, left-padded (`left_pad`).
    prompt_lengths: [N] int, real tokens per row (1 <= length <= P).
    key: a PRNG key; step i draws with `fold_in(key, i)`.
    config: the sampling settings.
    reference: a second `Transformer` of the same vocabulary, decoded in
      lockstep (its own cache); then every token is drawn from the
      token-level geometric mixture of the two (`mix_logits`) and `logps`
      are the mixture's.
    mixture: β of the mixture (read only with a reference).

  Returns:
    SampleOutput.
  """
  n, p = prompt_tokens.shape
  m = config.max_new_tokens
  offsets = (p - jnp.asarray(prompt_lengths, jnp.int32)).astype(jnp.int32)
  decoders = (model,) if reference is None else (model, reference)

  def advance(tokens, caches):
    """Feeds tokens [N, t] to every decoder -> (next-token logits [N, V],
    caches)."""
    logits, written = [], []
    for decoder, cache in zip(decoders, caches):
      hidden, cache = decoding.forward(decoder, tokens, cache)
      written.append(cache)
      logits.append(decoding.next_token_logits(decoder, hidden[:, -1]))
    if reference is not None:
      logits = [mix_logits(*logits, mixture)]
    return logits[0], tuple(written)

  # The last generated token is never fed back: P + M - 1 slots suffice.
  caches = tuple(
    decoding.init_cache(d.config, offsets, p + m - 1) for d in decoders
  )
  logits, caches = advance(prompt_tokens, caches)  # [N, V]

  def emit(i, logits, done, out):
    """Chooses token i of every row; rows already done emit padding."""
    tokens, logps, drawn = choose(logits, jax.random.fold_in(key, i), config)
    live = ~done
    tokens = jnp.where(live, tokens, config.pad_id)
    out = dict(
      tokens=out["tokens"].at[:, i].set(tokens),
      logps=out["logps"].at[:, i].set(jnp.where(live, logps, 0.0)),
      sample_logps=out["sample_logps"]
      .at[:, i]
      .set(jnp.where(live, drawn, 0.0)),
      mask=out["mask"].at[:, i].set(live),
    )
    if config.eos_id is not None:
      done = done | (tokens == config.eos_id)
    return tokens, done, out

  out = dict(
    tokens=jnp.full((n, m), config.pad_id, jnp.int32),
    logps=jnp.zeros((n, m), jnp.float32),
    sample_logps=jnp.zeros((n, m), jnp.float32),
    mask=jnp.zeros((n, m), bool),
  )
  tokens, done, out = emit(0, logits, jnp.zeros((n,), bool), out)

  def cond(carry):
    i, _, done, _, _ = carry
    return (i < m) & ~jnp.all(done)

  def body(carry):
    i, tokens, done, caches, out = carry
    logits, caches = advance(tokens[:, None], caches)
    tokens, done, out = emit(i, logits, done, out)
    return i + 1, tokens, done, caches, out

  _, _, _, _, out = jax.lax.while_loop(
    cond, body, (jnp.int32(1), tokens, done, caches, out)
  )
  return SampleOutput(**out, lengths=out["mask"].sum(axis=1, dtype=jnp.int32))


def make_sampler(
  model_def: nnx.GraphDef,
  config: SamplingConfig,
  *,
  mesh: Mesh | None = None,
  param_sharding: object | None = None,
  mixture: float | None = None,
) -> Callable[..., SampleOutput]:
  """Compiles `(params, prompt_tokens, prompt_lengths, key) -> SampleOutput`.

  With `mixture=β` it compiles `(params, ref_params, prompt_tokens,
  prompt_lengths, key)` instead, drawing every token from the token-level
  geometric mixture of the policy and the reference (`mix_logits`; the
  reference's parameters sharded as the policy's).

  Args:
    model_def: the transformer's graph definition (`nnx.split(model,
      nnx.Param, ...)[0]`, or the training state's `model_def`).
    config: the sampling settings (static: one compile per config).
    mesh: the device mesh; None for the default one-axis `data` mesh over
      every device.
    param_sharding: the params' shardings (e.g. the training state's
      `params` shardings); None replicates them.
    mixture: β in [0, 1] of the geometric mixture, or None for the policy
      alone.

  `params` is the pure dict of `nnx.Param` values (`TrainState.params`).
  The program is traced under `sharding.activation_sharding(mesh)`: rows,
  KV cache and activations stay on their data × fsdp devices (key/value
  heads over `tensor` where it divides them), so FSDP gathers weights,
  never another device's rows. The compiled program is `sampler.jitted`.
  """
  mesh = sharding.make_mesh() if mesh is None else mesh
  rows = sharding.batch_sharding(mesh)
  if param_sharding is None:
    param_sharding = sharding.replicated(mesh)

  if mixture is not None and not 0 <= mixture <= 1:
    raise ValueError(f"mixture must be in [0, 1], got {mixture!r}")

  @sharding.traced_under(mesh)
  def run(*params_and_inputs):
    *params, prompt_tokens, prompt_lengths, key = params_and_inputs
    model, *reference = (nnx.merge(model_def, p) for p in params)
    return sample(
      model,
      prompt_tokens,
      prompt_lengths,
      key,
      config,
      reference=reference[0] if reference else None,
      mixture=mixture or 0.0,
    )

  param_shardings = (param_sharding,) * (1 if mixture is None else 2)
  jitted = jax.jit(
    run,
    in_shardings=(*param_shardings, rows, rows, sharding.replicated(mesh)),
    out_shardings=SampleOutput(rows, rows, rows, rows, rows),
  )
  shards = sharding.batch_shards(mesh)

  def sampler(*params_and_inputs) -> SampleOutput:
    *params, prompt_tokens, prompt_lengths, key = params_and_inputs
    if len(params) != len(param_shardings):
      raise TypeError(
        f"this sampler takes {len(param_shardings)} parameter tree(s)"
        " (policy, and reference with a mixture) before the prompts"
      )
    n = np.shape(prompt_tokens)[0]
    if n % shards:
      raise ValueError(
        f"{n} prompts do not split over the {shards} batch shards of the mesh"
        " (data x fsdp); pad the batch to a multiple"
      )
    lengths = np.asarray(prompt_lengths)
    width = np.shape(prompt_tokens)[1]
    if lengths.min() < 1 or lengths.max() > width:
      raise ValueError(
        f"prompt_lengths must be in [1, {width}] (the padded width), got"
        f" {lengths.min()}..{lengths.max()}"
      )
    return jitted(*params, prompt_tokens, prompt_lengths, key)

  sampler.jitted = jitted  # the compiled program, to lower and inspect
  return sampler
