"""`model.attention`: every implementation that can run on this machine gives
the XLA one's attention and log-probs on packed rows (segment ids honoured);
one that cannot is refused naming the key.

Which implementations ran is in the test ids and the skip reasons
(`pytest -rs`): on a CPU machine only "xla" runs and "cudnn" is skipped with
the compiler's own reason.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from psipo_jax import models
from psipo_jax.models import layers

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64  # shapes the fused kernels accept


def _unavailable(implementation, dtype):
  return layers.attention_unavailable(
    implementation,
    dtype=dtype,
    num_heads=HEADS,
    num_kv_heads=KV_HEADS,
    head_dim=HEAD_DIM,
    backend=jax.default_backend(),
  )


# The dtype each implementation is compared in: cuDNN's fused kernel takes
# half precision only.
_DTYPES = {"xla": "float32", "cudnn": "bfloat16"}
_TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}


def _segments():
  """[2, 128] segment ids: row 0 packs 3 sequences then padding; row 1 one."""
  t = 128
  row0 = np.concatenate(
    [np.full(40, 1), np.full(50, 2), np.full(30, 3), np.zeros(8)]
  )
  row1 = np.concatenate([np.full(100, 1), np.zeros(t - 100)])
  return np.stack([row0, row1]).astype(np.int32)


def _reference_attention(q, k, v, segments):
  """NumPy float64 attention: causal AND same segment, GQA by repetition."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  scores = np.einsum("nthd,nshd->nhts", q, k) / np.sqrt(q.shape[-1])
  t = q.shape[1]
  allowed = (segments[:, None, :, None] == segments[:, None, None, :]) & (
    np.tril(np.ones((t, t), bool))[None, None]
  )
  scores = np.where(allowed, scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("nhts,nshd->nthd", weights, v)


def _qkv(dtype):
  rng = np.random.default_rng(0)
  shapes = [(2, 128, HEADS, HEAD_DIM)] + [(2, 128, KV_HEADS, HEAD_DIM)] * 2
  return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


def _attend(implementation, q, k, v, segments):
  mask = jnp.asarray(segments[:, None, :, None] == segments[:, None, None, :])
  return jax.jit(
    lambda q, k, v, m: jax.nn.dot_product_attention(
      q, k, v, mask=m, is_causal=True, implementation=implementation
    )
  )(q, k, v, mask)


def test_xla_attention_equals_the_masked_softmax_formula():
  q, k, v = _qkv("float32")
  segments = _segments()
  got = _attend("xla", q, k, v, segments)
  want = _reference_attention(q, k, v, segments)
  real = segments != 0  # padding rows attend among themselves: not compared
  np.testing.assert_allclose(
    np.asarray(got)[real], want[real], rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize(
  "implementation",
  [i for i in layers.ATTENTION_IMPLEMENTATIONS if i != "xla"],
)
def test_each_available_implementation_equals_xla(implementation):
  dtype = _DTYPES[implementation]
  reason = _unavailable(implementation, dtype)
  if reason is not None:
    pytest.skip(
      f"{implementation} is not available on this machine"
      f" ({jax.default_backend()}): {reason}"
    )
  q, k, v = _qkv(dtype)
  segments = _segments()
  real = segments != 0
  got = np.asarray(_attend(implementation, q, k, v, segments), np.float32)
  want = np.asarray(_attend("xla", q, k, v, segments), np.float32)
  tol = _TOLERANCE[dtype]
  np.testing.assert_allclose(got[real], want[real], rtol=tol, atol=tol)

  # And through the whole model on a packed row: the same log-probs.
  def logps(attention):
    config = ml_collections.ConfigDict(
      {
        "name": "transformer",
        "preset": "tiny",
        "vocab_size": 259,
        "num_heads": HEADS,
        "num_kv_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "dtype": dtype,
        "attention": attention,
      }
    )
    model = models.build_model(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    inputs = {
      "input_ids": rng.integers(0, 259, segments.shape).astype(np.int32),
      "loss_mask": (segments != 0).astype(np.int32),
      "segment_ids": segments,
    }
    call = nnx.jit(lambda m, x: m.segment_logps(x, num_segments=3))
    return np.asarray(call(model, inputs)[0])

  np.testing.assert_allclose(
    logps(implementation), logps("xla"), rtol=tol, atol=tol * 100
  )


def test_xla_is_the_default_and_always_available():
  assert _unavailable("xla", "float32") is None
  config = ml_collections.ConfigDict({"name": "transformer", "preset": "tiny"})
  assert models.transformer.config_from_model_block(config).attention == "xla"


@pytest.mark.parametrize("implementation", layers.ATTENTION_IMPLEMENTATIONS)
def test_an_unavailable_implementation_is_refused_naming_the_key(
  implementation,
):
  # float32 as configured by default: cuDNN refuses it even on a GPU.
  reason = _unavailable(implementation, "float32")
  if reason is None:
    pytest.skip(f"{implementation} runs here in float32")
  config = ml_collections.ConfigDict(
    {
      "name": "transformer",
      "preset": "tiny",
      "num_heads": HEADS,
      "num_kv_heads": KV_HEADS,
      "head_dim": HEAD_DIM,
      "attention": implementation,
    }
  )
  with pytest.raises(
    ValueError,
    match=rf"model.attention='{implementation}' is not available here.*"
    r"use model.attention='xla'",
  ):
    models.build_model(config, rngs=nnx.Rngs(0))


def test_an_unknown_implementation_names_the_choices():
  config = ml_collections.ConfigDict(
    {"name": "transformer", "preset": "tiny", "attention": "flash"}
  )
  with pytest.raises(ValueError, match=r"model.attention must be one of"):
    models.build_model(config, rngs=nnx.Rngs(0))
