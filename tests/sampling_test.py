"""Tests of the KV-cached sampler against full recomputation by the transformer."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psipo_jax import hlo_collectives
from psipo_jax import sampling
from psipo_jax import sharding
from psipo_jax.models import transformer as tr

TINY = tr.PRESETS["tiny"]
# Prompts of different lengths in one batch (8 rows: one per fake device).
PROMPT_LENGTHS = (3, 7, 1, 5, 8, 2, 4, 6)
FULL_WIDTH = 24  # longest prompt + the most new tokens sampled below


@functools.lru_cache(maxsize=None)
def _model_parts(**overrides):
  """(graphdef, params) of a tiny model with every parameter perturbed, so
  that biases and norm scales matter and the logits are far from uniform."""
  model = tr.Transformer(
    dataclasses.replace(TINY, **overrides), rngs=nnx.Rngs(0)
  )
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [
    x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)
  ]
  return graphdef, nnx.to_pure_dict(jax.tree.unflatten(treedef, leaves))


def _prompts(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, TINY.vocab_size, size=n) for n in PROMPT_LENGTHS]


@functools.lru_cache(maxsize=None)
def _sampler(config, overrides, mesh):
  """One compiled sampler per settings (a new `make_sampler` compiles anew)."""
  graphdef, _ = _model_parts(**dict(overrides))
  return sampling.make_sampler(graphdef, config, mesh=mesh)


def _sample(config, overrides=(), seed=0, mesh=None):
  _, params = _model_parts(**dict(overrides))
  tokens, lengths = sampling.left_pad(_prompts(), pad_id=0)
  sampler = _sampler(config, overrides, mesh)
  return jax.device_get(sampler(params, tokens, lengths, jax.random.key(seed)))


@functools.lru_cache(maxsize=None)
def _full_logits_fn(overrides):
  graphdef, _ = _model_parts(**dict(overrides))
  return jax.jit(
    lambda params, inputs: nnx.merge(graphdef, params).logits(inputs)
  )


def _full_logits(overrides, sequences):
  """[N, T, V] logits of the full forward pass over RIGHT-padded rows (the
  sampler left-pads: the two layouts must agree)."""
  _, params = _model_parts(**dict(overrides))
  width = FULL_WIDTH  # one shape: one compile (causal: the padding is unseen)
  assert max(len(s) for s in sequences) <= width
  ids = np.zeros((len(sequences), width), np.int32)
  attention = np.zeros_like(ids)
  for row, s in enumerate(sequences):
    ids[row, : len(s)], attention[row, : len(s)] = s, 1
  return np.asarray(
    _full_logits_fn(overrides)(
      params, dict(input_ids=ids, attention_mask=attention)
    )
  )


def _greedy_by_recomputation(overrides, num_tokens, eos_id=None):
  """Each row's greedy continuation, the whole prefix re-run for every token."""
  sequences = [list(p) for p in _prompts()]
  done = [False] * len(sequences)
  for _ in range(num_tokens):
    logits = _full_logits(overrides, sequences)
    for row, s in enumerate(sequences):
      if not done[row]:
        s.append(int(np.argmax(logits[row, len(s) - 1])))
        done[row] = s[-1] == eos_id
  return [s[n:] for s, n in zip(sequences, PROMPT_LENGTHS)]


def _generated(out, row):
  return list(out.tokens[row][out.mask[row]])


OPTIONS = [
  (),
  (("qkv_bias", True), ("qk_norm", True), ("tie_embeddings", True)),
  (("num_kv_heads", 1), ("rope_theta", 500.0)),
]
OPTION_IDS = ["gqa", "bias-qknorm-tied", "mqa"]


@pytest.mark.parametrize("overrides", OPTIONS, ids=OPTION_IDS)
def test_greedy_kv_cached_tokens_equal_greedy_full_recomputation(overrides):
  out = _sample(
    sampling.SamplingConfig(max_new_tokens=12, temperature=0.0), overrides
  )
  expected = _greedy_by_recomputation(overrides, 12)
  for row in range(len(PROMPT_LENGTHS)):
    assert _generated(out, row) == expected[row], row
  assert out.mask.all() and (out.lengths == 12).all()


def test_rows_stop_at_eos_and_the_others_continue():
  free = _sample(sampling.SamplingConfig(max_new_tokens=12, temperature=0.0))
  eos = int(free.tokens[0, 3])  # row 0 emits it at step 3 (or earlier)
  out = _sample(
    sampling.SamplingConfig(
      max_new_tokens=12, temperature=0.0, eos_id=eos, pad_id=0
    )
  )
  expected = _greedy_by_recomputation((), 12, eos_id=eos)
  for row in range(len(PROMPT_LENGTHS)):
    got = _generated(out, row)
    assert got == expected[row], row
    stop = len(got)
    assert (out.tokens[row, stop:] == 0).all()
    assert (out.logps[row, stop:] == 0).all()
    assert out.lengths[row] == stop
  assert _generated(out, 0)[-1] == eos and out.lengths[0] <= 4
  assert out.lengths.max() > out.lengths[0]  # another row went on


def _sampled_sequences(out):
  return [list(p) + _generated(out, row) for row, p in enumerate(_prompts())]


def _positions_logits(out, overrides=()):
  """[(row, step, logits [V] that predicted the step's token)] by full forward."""
  logits = _full_logits(overrides, _sampled_sequences(out))
  return [
    (row, i, logits[row, PROMPT_LENGTHS[row] + i - 1])
    for row in range(len(PROMPT_LENGTHS))
    for i in range(int(out.lengths[row]))
  ]


def test_returned_logps_equal_the_full_forward_log_probs_of_the_tokens():
  config = sampling.SamplingConfig(
    max_new_tokens=10, temperature=0.8, top_k=20, eos_id=5
  )
  out = _sample(config, seed=3)
  graphdef, params = _model_parts()
  model = nnx.merge(graphdef, params)
  sequences = _sampled_sequences(out)
  width = max(len(s) for s in sequences)
  ids, loss_mask, attention = (
    np.zeros((len(sequences), width), np.int32) for _ in range(3)
  )
  for row, s in enumerate(sequences):
    ids[row, : len(s)], attention[row, : len(s)] = s, 1
    loss_mask[row, PROMPT_LENGTHS[row] : len(s)] = 1
  # The transformer's own scoring path (the memory-lean LM head).
  tokens, mask = model.token_logps(
    dict(input_ids=ids, loss_mask=loss_mask, attention_mask=attention)
  )
  for row in range(len(sequences)):
    scored = np.asarray(tokens[row])[np.asarray(mask[row])]
    np.testing.assert_allclose(
      out.logps[row][out.mask[row]], scored, rtol=1e-5, atol=1e-5
    )
  # The drawn distribution's log-probs: log-softmax of the filtered logits.
  for row, i, logits in _positions_logits(out):
    z = logits / 0.8
    kth = np.sort(z)[-20]
    z = np.where(z >= kth, z, -np.inf)
    z = z - z.max()
    drawn = z - np.log(np.exp(z).sum())
    token = out.tokens[row, i]
    np.testing.assert_allclose(
      out.sample_logps[row, i], drawn[token], rtol=1e-4, atol=1e-5
    )
  assert (out.logps[~out.mask] == 0).all()


def _allowed_top_k(logits, temperature, k):
  z = logits / temperature
  return set(np.flatnonzero(z >= np.sort(z)[-k]))


def _allowed_top_p(logits, temperature, p):
  """The smallest set of most probable tokens whose mass reaches p."""
  z = logits / temperature
  probs = np.exp(z - z.max())
  probs /= probs.sum()
  order = np.argsort(-probs)
  reach = np.searchsorted(
    np.cumsum(probs[order]), p
  )  # first index with mass >= p
  return set(order[: reach + 1])


@pytest.mark.parametrize(
  "top_k, top_p", [(5, 1.0), (0, 0.6), (8, 0.5)], ids=["k", "p", "k+p"]
)
def test_top_k_and_top_p_never_emit_a_token_outside_the_allowed_set(
  top_k, top_p
):
  temperature = 1.3  # flatter than the model: many tokens are likely
  config = sampling.SamplingConfig(
    max_new_tokens=16, temperature=temperature, top_k=top_k, top_p=top_p
  )
  outside_unfiltered = 0
  for seed in range(2):
    out = _sample(config, seed=seed)
    for row, i, logits in _positions_logits(out):
      token = int(out.tokens[row, i])
      allowed = set(range(TINY.vocab_size))
      if top_k:
        allowed &= _allowed_top_k(logits, temperature, top_k)
      if top_p < 1:
        # Top-p acts on the distribution left by top-k.
        z = np.where(
          np.isin(np.arange(len(logits)), list(allowed)), logits, -np.inf
        )
        allowed &= _allowed_top_p(z, temperature, top_p)
      assert token in allowed, (seed, row, i, token, sorted(allowed))
    # The same draws without the filters leave such sets (the test has teeth).
    free = _sample(
      sampling.SamplingConfig(max_new_tokens=16, temperature=temperature),
      seed=seed,
    )
    for row, i, logits in _positions_logits(free):
      allowed = set(range(TINY.vocab_size))
      if top_k:
        allowed &= _allowed_top_k(logits, temperature, top_k)
      if top_p < 1:
        allowed &= _allowed_top_p(logits, temperature, top_p)
      outside_unfiltered += int(free.tokens[row, i]) not in allowed
  assert outside_unfiltered > 0


def test_filters_keep_the_documented_sets_and_renormalise():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keep = lambda **kw: np.isfinite(
    sampling.filter_logits(
      logits, sampling.SamplingConfig(max_new_tokens=1, **kw)
    )
  )[0].tolist()
  assert keep(top_k=2) == [True, True, False, False]
  # Mass before the 2nd token 0.5 < 0.7, before the 3rd 0.8 >= 0.7.
  assert keep(top_p=0.7) == [True, True, False, False]
  assert keep(top_p=0.8) == [True, True, False, False]
  assert keep(top_p=0.81) == [True, True, True, False]
  assert keep(top_p=0.3) == [True, False, False, False]
  assert keep(top_k=3, top_p=0.9) == [True, True, True, False]
  # Draws follow the renormalised kept distribution (top-k 2: 0.625 / 0.375).
  n = 20_000
  config = sampling.SamplingConfig(max_new_tokens=1, top_k=2)
  tokens, _, drawn = sampling.choose(
    jnp.repeat(logits, n, axis=0), jax.random.key(0), config
  )
  freq = np.bincount(np.asarray(tokens), minlength=4) / n
  np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.015)
  np.testing.assert_allclose(
    np.exp(drawn), np.where(tokens == 0, 0.625, 0.375), rtol=1e-5
  )


def test_sharded_sampling_equals_one_device():
  config = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=50)
  one = _sample(config, seed=2, mesh=sharding.make_mesh(jax.devices()[:1]))
  # Training's 3-axis mesh: rows over data x fsdp, params by logical axes.
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  graphdef, params = _model_parts()
  axes = sharding.logical_axes(nnx.merge(graphdef, params))
  shardings = sharding.param_shardings(mesh, params, axes)
  sampler = sampling.make_sampler(
    graphdef, config, mesh=mesh, param_sharding=shardings
  )
  tokens, lengths = sampling.left_pad(_prompts(), pad_id=0)
  params = jax.device_put(params, shardings)
  assert not params["embed_tokens"].sharding.is_fully_replicated
  many = sampler(params, tokens, lengths, jax.random.key(2))
  assert many.tokens.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(many.tokens, one.tokens)
  np.testing.assert_allclose(many.logps, one.logps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 4, 1)])
def test_sharded_sampling_sends_weights_only(shape):
  # Rows over data x fsdp: each device decodes its own rows, so only weights
  # (FSDP's gathers) cross devices, in the prefill and in every decode step.
  # The tiny preset's weights have power-of-two sizes, and 24 prompts of
  # width 12 give every per-row or per-token array a factor 3.
  config = sampling.SamplingConfig(max_new_tokens=4, temperature=1.0)
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
  graphdef, params = _model_parts()
  shardings = sharding.param_shardings(
    mesh, params, sharding.logical_axes(nnx.merge(graphdef, params))
  )
  sampler = sampling.make_sampler(
    graphdef, config, mesh=mesh, param_sharding=shardings
  )
  rows = sharding.batch_sharding(mesh)
  compiled = sampler.jitted.lower(
    jax.device_put(params, shardings),
    jax.device_put(np.ones((24, 12), np.int32), rows),
    jax.device_put(np.full((24,), 12, np.int32), rows),
    jax.random.key(0),
  ).compile()
  sent = [
    c
    for c in hlo_collectives.collectives(compiled.as_text())
    if c.is_float and c.size % 3 == 0
  ]
  assert not sent, sent


def test_bad_inputs_name_the_culprit():
  with pytest.raises(ValueError, match="prompt 1 has no tokens"):
    sampling.left_pad([[3], []], pad_id=0)
  with pytest.raises(ValueError, match="prompt 0 has 3 tokens > length=2"):
    sampling.left_pad([[3, 4, 5]], pad_id=0, length=2)
  for kwargs, match in [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=1, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=1, top_k=-2), "top_k"),
    (dict(max_new_tokens=1, top_p=0.0), "top_p"),
  ]:
    with pytest.raises(ValueError, match=match):
      sampling.SamplingConfig(**kwargs)
  graphdef, params = _model_parts()
  sampler = sampling.make_sampler(
    graphdef, sampling.SamplingConfig(max_new_tokens=2)
  )
  tokens, lengths = sampling.left_pad(_prompts()[:3], pad_id=0)
  with pytest.raises(ValueError, match="3 prompts do not split over the 8"):
    sampler(params, tokens, lengths, jax.random.key(0))


@pytest.mark.parametrize(
  "overrides, key",
  [
    (dict(embed_scale=True), "embed_scale"),
    (dict(final_logit_softcap=30.0), "final_logit_softcap"),
    (dict(sliding_window=4, layer_types="sliding,full"), "sliding_window"),
  ],
)
def test_options_the_cache_does_not_implement_are_refused_by_name(
  overrides, key
):
  """A model option the KV-cached path would ignore (and so decode wrongly)
  is refused, naming the model key."""
  graphdef, params = _model_parts(**overrides)
  sampler = sampling.make_sampler(
    graphdef, sampling.SamplingConfig(max_new_tokens=2)
  )
  tokens, lengths = sampling.left_pad(_prompts(), pad_id=0)
  with pytest.raises(ValueError, match=rf"does not implement model\.{key}="):
    sampler(params, tokens, lengths, jax.random.key(0))


def test_a_reference_makes_every_token_a_draw_from_the_geometric_mixture():
  """With `mixture=β` each token comes from, and is scored by,
  log_softmax((1 − β) log π + β log π_ref) of the two full forward passes."""
  beta = 0.3
  graphdef, params = _model_parts()
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  ref_params = jax.tree.unflatten(
    treedef,
    [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)],
  )
  config = sampling.SamplingConfig(max_new_tokens=6, eos_id=5)
  sampler = sampling.make_sampler(graphdef, config, mixture=beta)
  tokens, lengths = sampling.left_pad(_prompts(), pad_id=0)
  out = jax.device_get(
    sampler(params, ref_params, tokens, lengths, jax.random.key(2))
  )
  with pytest.raises(TypeError, match="2 parameter tree"):
    sampler(params, tokens, lengths, jax.random.key(2))
  sequences = _sampled_sequences(out)
  ids = np.zeros((len(sequences), FULL_WIDTH), np.int32)
  attention = np.zeros_like(ids)
  for row, s in enumerate(sequences):
    ids[row, : len(s)], attention[row, : len(s)] = s, 1
  inputs = dict(input_ids=ids, attention_mask=attention)
  logps = [
    jax.nn.log_softmax(_full_logits_fn(())(p, inputs), axis=-1)
    for p in (params, ref_params)
  ]  # [N, T, V] each
  mixed = np.asarray(
    jax.nn.log_softmax((1 - beta) * logps[0] + beta * logps[1], axis=-1)
  )
  policy = np.asarray(logps[0])
  gaps = []
  for row in range(len(PROMPT_LENGTHS)):
    for i in range(int(out.lengths[row])):
      at = PROMPT_LENGTHS[row] + i - 1
      token = out.tokens[row, i]
      np.testing.assert_allclose(
        out.logps[row, i], mixed[row, at, token], rtol=1e-4, atol=1e-4
      )
      gaps.append(abs(out.logps[row, i] - policy[row, at, token]))
  assert max(gaps) > 0.05  # the mixture is not the policy alone
