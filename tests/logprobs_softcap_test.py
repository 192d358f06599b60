"""Soft-capped logits (Gemma 2/3's final_logit_softcapping) in the log-probs.

The chunked path's hand-written backward must carry the tanh's derivative:
its values and gradients equal the naive path's (autodiff) and a float64
finite-difference check.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from psipo_jax import logprobs

N, T, D, V = 3, 9, 8, 17
CAP = 1.5  # small against logits of size ~3, so the tanh is far from linear


def _inputs(seed=0, counts=(4, 9, 1)):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(N, T, D)).astype(np.float32)
  w = rng.normal(size=(D, V)).astype(np.float32)
  labels = rng.integers(0, V, size=(N, T)).astype(np.int32)
  mask = np.zeros((N, T), bool)
  for row, count in enumerate(counts):
    mask[row, rng.choice(T, size=count, replace=False)] = True
  return hidden, w, labels, mask


def _numpy_token_logps(hidden, w, labels, mask, cap):
  logits = np.einsum("ntd,dv->ntv", hidden.astype(np.float64), w)
  logits = cap * np.tanh(logits / cap)
  logits -= logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
  return np.where(mask, picked, 0.0)


def _fn(name, chunk_size=4):
  if name == "naive":
    return lambda *a: logprobs.token_logps_naive(*a, softcap=CAP)
  return lambda *a: logprobs.token_logps_chunked(
    *a, chunk_size=chunk_size, softcap=CAP
  )


def _loss(token_fn, labels, mask):
  def loss(hidden, w):
    sums, _ = logprobs.sequence_sums(token_fn(hidden, w, labels, mask), mask)
    return jnp.sum(jnp.sin(sums) + 0.1 * sums**2)

  return loss


@pytest.mark.parametrize("name", ["naive", "chunked"])
def test_softcapped_token_logps_equal_numpy(name):
  hidden, w, labels, mask = _inputs()
  got = _fn(name)(hidden, w, labels, mask)
  want = _numpy_token_logps(hidden, w, labels, mask, CAP)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  uncapped = _numpy_token_logps(hidden, w, labels, mask, 1e9)
  assert np.abs(want - uncapped).max() > 0.1  # the cap matters here


@pytest.mark.parametrize("chunk_size", [3, 9])
def test_softcapped_chunked_gradients_equal_naive(chunk_size):
  hidden, w, labels, mask = _inputs()
  grad = lambda fn: jax.jit(jax.grad(_loss(fn, labels, mask), argnums=(0, 1)))
  lean = grad(_fn("chunked", chunk_size))(hidden, w)
  naive = grad(_fn("naive"))(hidden, w)
  for a, b in zip(lean, naive):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert np.abs(naive[1]).max() > 0.1


def test_softcapped_chunked_gradients_pass_float64_check():
  hidden, w, labels, mask = _inputs()
  with jax.enable_x64(True):
    check_grads(
      _loss(_fn("chunked", 2), labels, mask),
      (hidden.astype(np.float64), w.astype(np.float64)),
      order=1,
      modes=["rev"],
      atol=1e-6,
      rtol=1e-6,
    )
