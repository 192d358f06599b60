"""Tests of the decoder-only transformer policy."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from psipo_jax import models
from psipo_jax import sharding
from psipo_jax import train_step as train_step_lib
from psipo_jax.models import transformer as tr
from psipo_jax.train_state import TrainState

TINY = tr.PRESETS["tiny"]


@functools.lru_cache(maxsize=None)
def _split_model(config):
  return nnx.split(tr.Transformer(config, rngs=nnx.Rngs(0)))


def _model(**overrides):
  """A fresh tiny model (built once per config: initialisation compiles per shape)."""
  return nnx.merge(*_split_model(dataclasses.replace(TINY, **overrides)))


def _perturb(model, seed=1, scale=0.3):
  """Random values for every parameter (biases and norm scales included),
  so that a test sees each one's effect."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [
    x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)
  ]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _sequences(seed=0):
  """Three (tokens, first response index) pairs of lengths 9, 6 and 16."""
  rng = np.random.default_rng(seed)
  return [
    (rng.integers(1, TINY.vocab_size, size=n), p)
    for n, p in ((9, 4), (6, 2), (16, 7))
  ]


def _row(tokens, prompt_len):
  loss_mask = np.zeros(len(tokens), np.int32)
  loss_mask[prompt_len:] = 1
  return loss_mask


def _padded(sequences, length, left):
  n = len(sequences)
  ids, loss, attention = (np.zeros((n, length), np.int32) for _ in range(3))
  for row, (tokens, p) in enumerate(sequences):
    span = (
      slice(length - len(tokens), length) if left else slice(0, len(tokens))
    )
    ids[row, span], loss[row, span], attention[row, span] = (
      tokens,
      _row(tokens, p),
      1,
    )
  return dict(input_ids=ids, loss_mask=loss, attention_mask=attention)


def _np_sequence_logps(model, tokens, prompt_len):
  """log π(response | prompt) of one sequence alone, by the NumPy forward below."""
  t = len(tokens)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  logits = _np_logits(
    params, model.config, tokens, np.ones(t, np.int32), np.arange(t)
  )
  logits -= logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return sum(log_probs[i - 1, tokens[i]] for i in range(max(prompt_len, 1), t))


def test_padded_left_padded_packed_and_unpadded_give_the_logps_of_each_sequence_alone():
  model = _perturb(_model(logprobs_chunk_size=3))
  sequences = _sequences()
  alone = [_np_sequence_logps(model, tokens, p) for tokens, p in sequences]
  call = nnx.jit(lambda model, inputs: model(inputs))

  # Rows of 16: sequences 0 and 1 right- (then left-) padded, sequence 2 unpadded.
  for left in (False, True):
    out = call(model, _padded(sequences, 16, left))
    np.testing.assert_allclose(out.logps, alone, rtol=1e-5)
    np.testing.assert_array_equal(
      out.num_tokens, [len(t) - p for t, p in sequences]
    )

  # All three sequences in one row of 32 (then padding), segment ids 1, 2, 3.
  pad = lambda x: np.pad(
    np.concatenate(x), (0, 32 - sum(len(t) for t, _ in sequences))
  )[None]
  packed = dict(
    input_ids=pad([t for t, _ in sequences]),
    loss_mask=pad([_row(*s) for s in sequences]),
    segment_ids=pad(
      [np.full(len(t), i + 1) for i, (t, _) in enumerate(sequences)]
    ),
  )
  segment_logps = nnx.jit(
    lambda model, inputs: model.segment_logps(inputs, num_segments=3)
  )
  logps, counts = segment_logps(model, packed)
  np.testing.assert_allclose(logps[0], alone, rtol=1e-5)
  np.testing.assert_array_equal(counts[0], [len(t) - p for t, p in sequences])


def test_positions_restart_at_first_real_token_and_each_segment():
  inputs = dict(
    input_ids=np.zeros((3, 6), np.int32),
    attention_mask=np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1] * 6]),
  )
  segments, positions = tr.segments_and_positions(inputs)
  np.testing.assert_array_equal(segments, inputs["attention_mask"])
  np.testing.assert_array_equal(positions[0, 2:], [0, 1, 2, 3])
  np.testing.assert_array_equal(positions[1, :4], [0, 1, 2, 3])
  np.testing.assert_array_equal(positions[2], np.arange(6))
  inputs["segment_ids"] = np.array([[1, 1, 1, 2, 2, 2]] * 3)
  segments, positions = tr.segments_and_positions(inputs)
  np.testing.assert_array_equal(segments[1], [1, 1, 1, 2, 0, 0])
  np.testing.assert_array_equal(positions[2], [0, 1, 2, 0, 1, 2])


# ---------- An independent NumPy forward pass (float64, layers unrolled) ----------


def _np_rmsnorm(x, scale, eps):
  return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * scale


def _np_rope(x, positions, theta):  # x [T, heads, Dh]
  dh = x.shape[-1]
  freqs = 1.0 / theta ** (np.arange(0, dh, 2) / dh)  # [Dh/2]
  angle = positions[:, None] * freqs  # [T, Dh/2]
  cos = np.concatenate([np.cos(angle)] * 2, -1)[:, None]
  sin = np.concatenate([np.sin(angle)] * 2, -1)[:, None]
  rotate_half = np.concatenate([-x[..., dh // 2 :], x[..., : dh // 2]], -1)
  return x * cos + rotate_half * sin


def _np_logits(params, c, tokens, segments, positions):
  """One row: tokens/segments/positions [T] -> logits [T, V]."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  t = len(tokens)
  x = p["embed_tokens"][tokens]
  allowed = np.tril(np.ones((t, t), bool)) & (
    segments[:, None] == segments[None, :]
  )
  group = c.num_heads // c.num_kv_heads
  for layer in range(c.num_layers):
    lp = jax.tree.map(lambda a: a[layer], p["layers"])
    att = lp["attention"]
    h = _np_rmsnorm(x, lp["input_norm"]["scale"], c.norm_eps)
    q = np.einsum("td,dhk->thk", h, att["q_proj"])
    k = np.einsum("td,dhk->thk", h, att["k_proj"])
    v = np.einsum("td,dhk->thk", h, att["v_proj"])
    if c.qkv_bias:
      q, k, v = q + att["q_bias"], k + att["k_bias"], v + att["v_bias"]
    if c.qk_norm:
      q = _np_rmsnorm(q, att["q_norm"]["scale"], c.norm_eps)
      k = _np_rmsnorm(k, att["k_norm"]["scale"], c.norm_eps)
    q, k = (
      _np_rope(q, positions, c.rope_theta),
      _np_rope(k, positions, c.rope_theta),
    )
    k, v = (
      np.repeat(k, group, axis=1),
      np.repeat(v, group, axis=1),
    )  # query head i uses kv head i // group
    scores = np.einsum("thk,shk->hts", q, k) / np.sqrt(c.head_dim)
    scores = np.where(allowed, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + np.einsum("hts,shk,hkd->td", probs, v, att["o_proj"])
    h = _np_rmsnorm(x, lp["post_attention_norm"]["scale"], c.norm_eps)
    gate, up = h @ lp["mlp"]["gate_proj"], h @ lp["mlp"]["up_proj"]
    x = x + (gate / (1 + np.exp(-gate)) * up) @ lp["mlp"]["down_proj"]
  x = _np_rmsnorm(x, p["final_norm"]["scale"], c.norm_eps)
  head = p["embed_tokens"].T if c.tie_embeddings else p["lm_head"]
  return x @ head


@pytest.mark.parametrize(
  "options",
  [
    {},
    dict(qkv_bias=True, qk_norm=True, tie_embeddings=True),
    dict(num_kv_heads=1, rope_theta=500.0),
    dict(num_kv_heads=4),
  ],
  ids=["gqa", "bias-qknorm-tied", "mqa", "mha"],
)
def test_scanned_model_equals_unrolled_numpy_forward(options):
  model = _perturb(_model(**options))
  config = model.config
  # Row 0 unpadded; row 1 left-padded; row 2 two packed segments then padding.
  rng = np.random.default_rng(0)
  ids = rng.integers(0, config.vocab_size, size=(3, 10)).astype(np.int32)
  inputs = dict(
    input_ids=ids,
    attention_mask=np.array([[1] * 10, [0, 0, 0] + [1] * 7, [1] * 8 + [0, 0]]),
    segment_ids=np.array([[1] * 10, [1] * 10, [1] * 5 + [2] * 3 + [0, 0]]),
  )
  got = model.logits(inputs)
  segments, positions = tr.segments_and_positions(inputs)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for row in range(3):
    real = np.asarray(segments[row]) > 0
    expected = _np_logits(
      params,
      config,
      ids[row],
      np.asarray(segments[row]),
      np.asarray(positions[row]),
    )
    np.testing.assert_allclose(
      got[row][real], expected[real], rtol=2e-4, atol=2e-4
    )


def test_causal_and_segment_masks():
  model = _perturb(_model())
  ids = np.arange(1, 13, dtype=np.int32)[None]
  segment_ids = np.array([[1] * 7 + [2] * 5])
  logits = nnx.jit(
    lambda model, ids: model.logits(
      dict(input_ids=ids, segment_ids=segment_ids)
    )
  )
  base = logits(model, ids)
  future = ids.copy()
  future[0, 5] += 1  # a later token of segment 1
  changed = logits(model, future)
  np.testing.assert_array_equal(changed[0, :5], base[0, :5])
  assert not np.allclose(changed[0, 5:7], base[0, 5:7])
  np.testing.assert_allclose(
    changed[0, 7:], base[0, 7:], atol=1e-6
  )  # segment 2 cannot see it
  other = ids.copy()
  other[0, 9] += 1  # segment 2 only: segment 1 unchanged
  np.testing.assert_array_equal(logits(model, other)[0, :9], base[0, :9])


# ---------- Options, configuration and sizes ----------


def _batch(seed=0, n=4, t=16):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, TINY.vocab_size, size=(n, t)).astype(np.int32)
  loss_mask = np.zeros((n, t), np.int32)
  loss_mask[:, t // 2 :] = 1
  return dict(input_ids=ids, loss_mask=loss_mask)  # unpadded: no attention mask


def _logps_and_grads(model, inputs):
  """Jitted value_and_grad of the summed policy log-probs w.r.t. the params."""
  graphdef, params = nnx.split(model, nnx.Param)

  def total(params):
    return jnp.sum(nnx.merge(graphdef, params)(inputs).logps)

  return jax.jit(jax.value_and_grad(total))(params)


@functools.lru_cache(maxsize=None)
def _reference_grads(**overrides):
  """`_logps_and_grads` of the perturbed tiny model on `_batch()`, once per config."""
  return _logps_and_grads(_perturb(_model(**overrides)), _batch())


def _assert_same(a, b, rtol):
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(
      x, y, rtol=rtol, atol=rtol * np.abs(y).max()
    ),
    a[1],
    b[1],
  )


@pytest.mark.parametrize("chunk_size", [3, 128])
def test_chunked_and_naive_model_logps_and_gradients_agree(chunk_size):
  # 8 scored positions per row: chunks of 3 do not divide them; 128 > T.
  _assert_same(
    _reference_grads(logprobs_chunk_size=chunk_size),
    _reference_grads(logprobs="naive"),
    rtol=1e-4,
  )


@pytest.mark.parametrize(
  "policy", ["nothing_saveable", "dots_with_no_batch_dims_saveable"]
)
def test_remat_on_equals_off(policy):
  _assert_same(
    _reference_grads(remat=True, remat_policy=policy),
    _reference_grads(logprobs_chunk_size=128),
    rtol=1e-5,
  )


@pytest.mark.parametrize(
  "options",
  [
    {},
    # Per-layer windows and RoPE frequencies are sliced with the blocks.
    dict(sliding_window=4, layer_types="sliding,full", rope_local_theta=100.0),
    dict(remat=True),  # each unrolled block rematerialised
  ],
)
def test_unrolled_layers_equal_scanned(options):
  _assert_same(
    _reference_grads(scan_layers=False, **options),
    _reference_grads(**options),
    rtol=1e-5,
  )


def test_policy_gradient_is_finite_and_reaches_every_parameter():
  value, grads = _logps_and_grads(
    _perturb(_model(qkv_bias=True, qk_norm=True)), _batch()
  )
  assert np.isfinite(value)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(g).all() and np.abs(g).max() > 0, path


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  inputs = _batch()
  bf16 = _perturb(_model(dtype="bfloat16"))
  assert all(
    p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param))
  )
  assert (
    nnx.eval_shape(lambda m: m.hidden_states(inputs), bf16).dtype
    == jnp.bfloat16
  )
  value16, grads16 = _logps_and_grads(bf16, inputs)
  value32, grads32 = _reference_grads(logprobs_chunk_size=128)
  # 32 response tokens in all; bf16 activations move each log-prob by < 0.1 here.
  np.testing.assert_allclose(value16, value32, atol=32 * 0.1)
  for g16, g32 in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32)):
    assert g16.dtype == jnp.float32 and np.isfinite(g16).all()
    g16, g32 = np.ravel(g16), np.ravel(g32)
    cosine = g16 @ g32 / np.linalg.norm(g16) / np.linalg.norm(g32)
    assert cosine > 0.99, cosine  # measured 0.994-0.9997 per parameter


def test_tied_embeddings_share_the_embedding_matrix():
  tied, untied = _model(tie_embeddings=True), _model()
  assert not hasattr(tied, "lm_head") and hasattr(untied, "lm_head")
  np.testing.assert_array_equal(tied.unembedding(), tied.embed_tokens[...].T)
  np.testing.assert_array_equal(untied.unembedding(), untied.lm_head[...])
  assert (
    tr.param_count(untied.config) - tr.param_count(tied.config)
    == TINY.vocab_size * TINY.embed_dim
  )


def test_qk_norm_and_bias_options_change_the_outputs():
  inputs = _batch()
  logits = nnx.jit(lambda model: model.logits(inputs))
  base = logits(_model())
  assert not np.allclose(logits(_model(qk_norm=True)), base, atol=1e-6)
  with_bias = _model(qkv_bias=True)
  np.testing.assert_allclose(
    logits(with_bias), base, atol=1e-6
  )  # biases start at 0
  with_bias.layers.attention.k_bias[...] += 1.0
  with_bias.layers.attention.v_bias[...] += 1.0
  assert not np.allclose(logits(with_bias), base, atol=1e-6)


_OPTIONS = [{}, dict(tie_embeddings=True, qkv_bias=True, qk_norm=True)]


@pytest.mark.parametrize("preset", sorted(tr.PRESETS))
@pytest.mark.parametrize("options", _OPTIONS, ids=["default", "all-options"])
def test_param_count_equals_the_built_model(preset, options):
  config = dataclasses.replace(tr.PRESETS[preset], **options)
  abstract = nnx.eval_shape(lambda: tr.Transformer(config, rngs=nnx.Rngs(0)))
  params = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert sum(int(np.prod(p.shape)) for p in params) == tr.param_count(config)


def test_preset_sizes_are_the_documented_ones():
  assert round(tr.param_count(tr.PRESETS["125m"]) / 1e6, 1) == 134.5
  assert round(tr.param_count(tr.PRESETS["1b"]) / 1e9, 2) == 1.10
  assert TINY.embed_dim <= 64 and TINY.num_layers == 2


def test_flops_per_token_counts_matmul_weights_and_attention():
  model = _model()
  c = model.config
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  # Every matrix of the layer stack (ndim > 2: [L, ...] with two or more axes).
  block_weights = sum(
    x.size for x in jax.tree.leaves(state["layers"]) if x.ndim > 2
  )
  matmul = block_weights + c.embed_dim * c.vocab_size
  t = 128
  attention = c.num_layers * 3 * (2 * 2 * t * c.num_heads * c.head_dim)
  assert tr.flops_per_token(c, t) == 6 * matmul + attention


def test_parameters_carry_logical_axis_names():
  names = {"embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers"}
  state = nnx.state(
    _model(qkv_bias=True, qk_norm=True, tie_embeddings=False), nnx.Param
  )
  for path, variable in jax.tree_util.tree_leaves_with_path(
    state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  ):
    axes = variable.get_metadata()["out_sharding"]
    assert len(axes) == variable[...].ndim and set(axes) <= names, (path, axes)
    assert (axes[0] == "layers") == (path[0].key == "layers"), path
  assert state["embed_tokens"].get_metadata()["out_sharding"] == (
    "vocab",
    "embed",
  )
  assert state["lm_head"].get_metadata()["out_sharding"] == ("embed", "vocab")


def test_trace_size_does_not_grow_with_depth():
  inputs = _batch()

  def num_equations(num_layers):
    config = dataclasses.replace(TINY, num_layers=num_layers)
    model = nnx.eval_shape(lambda: tr.Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(inputs).logps)(
      params
    )
    return len(jaxpr.jaxpr.eqns)

  assert num_equations(2) == num_equations(5)


def test_batch_sharded_over_eight_devices_equals_one_device():
  # The chunked log-probs sort, loop and scatter row by row: a batch split
  # over a data axis must give the same values and gradients.
  inputs = _batch(n=8)
  inputs["loss_mask"][3, 12:] = 0  # rows with different response lengths
  model = _perturb(_model(logprobs_chunk_size=3))
  one = _logps_and_grads(model, inputs)
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 8
  sharded = jax.device_put(inputs, NamedSharding(mesh, PartitionSpec("data")))
  eight = _logps_and_grads(model, sharded)
  _assert_same(eight, one, rtol=1e-5)


# ---------- The registry, the config block and the train step ----------


def _model_block(**keys):
  return ml_collections.ConfigDict(
    {"name": "transformer", "preset": "tiny", **keys}
  )


def test_build_model_through_the_registry():
  model = models.build_model(
    _model_block(rope_theta=500, dtype=None), rngs=nnx.Rngs(0)
  )
  assert isinstance(model, models.Transformer)
  assert model.config == dataclasses.replace(
    TINY, rope_theta=500.0
  )  # None keeps the preset
  out = nnx.eval_shape(lambda model, inputs: model(inputs), model, _batch())
  assert out.logps.shape == out.num_tokens.shape == (4,)


@pytest.mark.parametrize(
  "keys, message",
  [
    (dict(num_layer=3), r"model\.num_layer .*did you mean model\.num_layers"),
    (dict(preset="7b"), r"model\.preset"),
    (dict(num_heads=3), r"model\.num_heads=3 .* model\.num_kv_heads=2"),
    (dict(head_dim=15), r"model\.head_dim"),
    (dict(dtype="float16"), r"model\.dtype"),
    (dict(attention="flash"), r"model\.attention"),
    (dict(logprobs="fused"), r"model\.logprobs"),
    (dict(logprobs_chunk_size=0), r"model\.logprobs_chunk_size"),
    (dict(remat="yes"), r"model\.remat"),
    (dict(remat_policy="all"), r"model\.remat_policy"),
    (dict(scan_layers=1), r"model\.scan_layers"),
    (dict(embed_dim=64.0), r"model\.embed_dim"),
  ],
)
def test_bad_model_keys_are_named(keys, message):
  with pytest.raises(ValueError, match=message):
    models.build_model(_model_block(**keys), rngs=nnx.Rngs(0))


def test_sizes_are_required_without_a_preset():
  block = ml_collections.ConfigDict(dict(name="transformer", vocab_size=32))
  with pytest.raises(ValueError, match=r"model\.num_layers is required"):
    models.build_model(block, rngs=nnx.Rngs(0))
  full = {f: getattr(TINY, f) for f in tr._SIZE_FIELDS}
  model = models.build_model(
    ml_collections.ConfigDict(dict(name="transformer", **full)),
    rngs=nnx.Rngs(0),
  )
  assert model.config == TINY


def test_one_ipo_train_step_on_the_transformer():
  model = _model()
  optimizer = optax.adam(1e-2)
  graphdef, state = TrainState.create(
    model, optimizer, rng=jax.random.key_data(jax.random.key(0))
  )
  side = _batch(n=4)
  other = _batch(seed=1, n=4)
  batch = {
    "chosen_input_ids": side["input_ids"],
    "rejected_input_ids": other["input_ids"],
    "chosen_loss_mask": side["loss_mask"],
    "rejected_loss_mask": other["loss_mask"],
    "chosen_attention_mask": np.ones_like(side["input_ids"]),
    "rejected_attention_mask": np.ones_like(other["input_ids"]),
  }
  loss_config = train_step_lib.LossConfig(name="ipo", tau=0.1)
  step = jax.jit(
    train_step_lib.make_train_step(graphdef, loss_config, optimizer)
  )
  new_state, metrics = step(state, batch)
  assert np.isfinite(metrics["loss"]) and metrics["update_skipped"] == 0
  assert metrics["empty_responses"] == 0
  changed = jax.tree.map(
    lambda a, b: bool(np.any(a != b)), new_state.params, state.params
  )
  assert all(jax.tree.leaves(changed))
  jax.tree.map(
    np.testing.assert_array_equal, new_state.ref_params, state.ref_params
  )
