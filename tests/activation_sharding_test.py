"""Activation sharding constraints: what a sharded LM step sends between devices.

The partitioner is free to lay an activation out like the weights it meets;
`sharding.constrain` pins the model's activations so that, with the batch
split over data × fsdp, no device receives another's hidden states,
log-probs or logits: FSDP gathers weights, not activations, and tensor
parallelism reduces one residual stream of its own rows at a time. These
tests read the collectives (`hlo_collectives`) of the tiny preset's IPO
train step compiled for 8 fake CPU devices, built as
benchmarks/activation_sharding.py builds it (bf16 compute, AdamW, the
reference's log-probs in the batch).
"""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from psipo_jax import hlo_collectives
from psipo_jax import sharding

# (data, fsdp, tensor): pure data, pure FSDP, mixtures, pure tensor.
MESHES = [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]
_PAIRS = 8  # 16 rows: chosen and rejected
# Every size of the tiny preset (V 256, d 64, H 4, K 2, Dh 16, F 128, L 2)
# and of its shards is a power of two, so an array with a dimension that is a
# multiple of 3 · 8 = 24 tokens holds something per token: activations
# [rows, T, ...], flattened [rows · T, ...] and the LM head's chunks
# [rows · min(T, chunk), V] alike.
_LENGTH = 24


_BENCHMARK_SPEC = importlib.util.spec_from_file_location(
  "activation_sharding_benchmark",
  pathlib.Path(__file__).resolve().parents[1]
  / "benchmarks"
  / "activation_sharding.py",
)
bench = importlib.util.module_from_spec(_BENCHMARK_SPEC)
_BENCHMARK_SPEC.loader.exec_module(bench)


@functools.lru_cache(maxsize=None)
def _compiled_step_hlo(
  shape: tuple[int, int, int],
  chunk_size: int = _LENGTH,
  attention: str = "xla",
  packed: bool = False,
) -> str:
  """The tiny preset's IPO step (bf16 compute, precomputed reference) as the
  training system compiles it for `shape`."""
  step, state, axes = bench.abstract_step(
    "tiny", logprobs_chunk_size=chunk_size, attention=attention
  )
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
  compiled = bench.compile_step(
    mesh, step, state, axes, _PAIRS, _LENGTH, constrained=True, packed=packed
  )
  return compiled.as_text()


def _per_token(
  shape: tuple[int, int, int], attention: str = "xla", packed: bool = False
) -> list:
  hlo = _compiled_step_hlo(shape, attention=attention, packed=packed)
  return [
    c
    for c in hlo_collectives.collectives(hlo)
    if c.is_float and any(d % _LENGTH == 0 for d in c.shape)
  ]


@pytest.mark.parametrize(
  "shape", MESHES, ids=["x".join(map(str, s)) for s in MESHES]
)
def test_no_device_receives_activations_of_rows_it_does_not_hold(shape):
  data, fsdp, tensor = shape
  per_token = _per_token(shape)
  if tensor == 1:
    # Data parallelism and FSDP: only weights and their gradients move.
    assert not per_token, per_token
    return
  # Tensor parallelism reduces partial results of the device's own rows:
  # at most one residual stream, [rows per batch shard, T, d], at a time.
  rows = 2 * _PAIRS // (data * fsdp)
  largest = max(per_token, key=lambda c: c.size)
  assert largest.size <= rows * _LENGTH * 64, largest


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1)])
def test_blocked_attention_steps_send_no_activations_either(shape):
  # The blocked kernel's row loop runs per device (`sharding.per_device`).
  assert not _per_token(shape, attention="blocked")


@pytest.mark.parametrize("attention", ["xla", "blocked"])
def test_packed_steps_send_no_activations_either(attention):
  # Packed rows (several sequences per row, per-sequence sums) on FSDP.
  assert not _per_token((1, 8, 1), attention=attention, packed=True)


def test_the_lm_head_gradient_is_reduced_once_per_step_not_once_per_chunk():
  # Pure data parallelism: the LM head's [d, V] = [64, 256] gradient is summed
  # over the chunks of the log-prob loop on each device and all-reduced
  # after it. Inside loops only smaller arrays travel: one layer's weight
  # gradient at a time, from the backward pass of the layer scan. The step
  # is compiled with 3 chunks (chunk size 8 of T = 24).
  hlo = _compiled_step_hlo((8, 1, 1), chunk_size=8)
  in_loops = [
    c for c in hlo_collectives.collectives(hlo) if c.is_float and c.in_loop
  ]
  assert in_loops, "the layer scan's weight gradients should be reduced"
  assert all(c.size < 64 * 256 for c in in_loops), in_loops


def test_the_collective_reader_sees_the_tensor_parallel_reductions():
  # The (1, 1, 8) step must all-reduce partial residual streams (Megatron's
  # row-parallel matmuls); a reader that found nothing would pass the test
  # above vacuously.
  reduced = {c.shape for c in _per_token((1, 1, 8)) if c.op == "all-reduce"}
  assert (2 * _PAIRS * _LENGTH, 64) in reduced or (
    2 * _PAIRS,
    _LENGTH,
    64,
  ) in reduced, reduced


def test_constrain_pins_the_sharding_under_a_mesh_and_is_identity_without():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  names = ("activation_batch", "activation_length", "activation_mlp")
  x = jnp.arange(8 * 3 * 4, dtype=jnp.float32).reshape(8, 3, 4)
  assert sharding.constrain(x, names) is x
  assert sharding.batch_shards_in_context() == 1

  def f(x):
    assert sharding.batch_shards_in_context() == 4
    return sharding.constrain(x * 2, names)

  def traced(x):
    with sharding.activation_sharding(mesh):
      return f(x)

  y = jax.jit(traced)(jax.device_put(x, sharding.replicated(mesh)))
  assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
  np.testing.assert_array_equal(y, 2 * x)


def test_constrain_refuses_a_name_without_a_rule():
  mesh = sharding.make_mesh(dict(data=8))

  def traced(x):
    with sharding.activation_sharding(mesh):
      return sharding.constrain(x, ("activation_batch", "activation_lenght"))

  with pytest.raises(ValueError, match="activation_lenght"):
    jax.jit(traced)(jnp.zeros((8, 2)))


def test_the_benchmark_compares_constrained_and_unconstrained_steps(capsys):
  bench.main(["--preset=tiny", "--pairs=8", "--seq_len=24", "--meshes=1x8x1"])
  row = capsys.readouterr().out.strip().splitlines()[-1]
  assert row.split("|")[0].strip() == "1x8x1", row
  temps = row.split("|")[1].split("(")[0].split("/")
  constrained, unconstrained = (float(t) for t in temps)
  # The constraints exist to keep activations off the wire and out of
  # memory: never more than without them.
  assert 0 < constrained <= unconstrained, row
