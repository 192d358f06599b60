"""Tests of Orbax save/restore, corrupt-checkpoint fallback and SIGTERM capture."""

import os
import pathlib
import signal

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from psipo_jax import checkpointing
from psipo_jax import sharding
from psipo_jax.models import TabularPolicy
from psipo_jax.train_state import TrainState


def _state_and_abstract(fsdp=False):
  model = TabularPolicy(jnp.linspace(-1.0, 1.0, 8))
  _, state = TrainState.create(
    model, optax.adam(0.1), rng=jax.random.PRNGKey(7)
  )
  mesh = sharding.make_mesh()
  shardings = sharding.state_shardings(mesh, state, fsdp=fsdp)
  state = jax.device_put(state, shardings)
  abstract = checkpointing.abstract_with_shardings(
    jax.eval_shape(lambda: state), shardings
  )
  return state, abstract


def _perturbed(state, delta):
  return state.replace(
    step=state.step + delta,
    params=jax.tree.map(lambda x: x + delta, state.params),
  )


def truncate_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  """Truncates the array data file of a checkpoint to half its size.

  `state/d/*` holds the arrays after Orbax merges the per-process OCDBT
  files (the `ocdbt.process_*` copies are no longer read).
  """
  (victim,) = (step_dir / "state" / "d").iterdir()
  with open(victim, "r+b") as f:
    f.truncate(victim.stat().st_size // 2)
  return victim


def test_round_trip_restores_state_data_and_shardings(tmp_path):
  state, abstract = _state_and_abstract(fsdp=True)
  ckpt = checkpointing.Checkpointer(tmp_path, max_to_keep=2)
  assert ckpt.restore(abstract) is None  # empty workdir
  for step in (1, 2, 3):
    ckpt.save(step, _perturbed(state, step), {"step": step})
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [2, 3]  # max_to_keep
  restored, data_state = ckpt.restore(abstract)
  ckpt.close()
  expected = jax.device_get(_perturbed(state, 3).replace(ref_params=None))
  chex.assert_trees_all_equal(jax.device_get(restored), expected)
  assert data_state == {"step": 3}
  assert (
    restored.params["logits"].sharding == abstract.params["logits"].sharding
  )


def test_unreadable_newest_checkpoint_falls_back_with_warning(tmp_path, caplog):
  state, abstract = _state_and_abstract()
  ckpt = checkpointing.Checkpointer(tmp_path, max_to_keep=3)
  for step in (10, 20):
    ckpt.save(step, _perturbed(state, step), {"step": step})
  ckpt.wait_until_finished()
  truncate_data_file(tmp_path / "checkpoints" / "20")
  with caplog.at_level("WARNING", logger="absl"):
    restored, data_state = ckpt.restore(abstract)
  assert data_state == {"step": 10}
  assert int(restored.step) == 10
  assert any(
    "step 20" in r.getMessage() and "unreadable" in r.getMessage()
    for r in caplog.records
  )
  # Moved aside, so that the run can save step 20 again.
  assert ckpt.all_steps() == [10]
  assert (tmp_path / "corrupt_checkpoints" / "20").is_dir()
  ckpt.save(20, _perturbed(state, 20), {"step": 20})
  ckpt.wait_until_finished()
  ckpt.close()


def test_a_transient_read_error_does_not_set_aside_a_good_checkpoint(
  tmp_path, monkeypatch
):
  """A read that fails once (a network filesystem's hiccup) is retried: the
  newest step restores and nothing is moved to corrupt_checkpoints/."""
  state, abstract = _state_and_abstract()
  ckpt = checkpointing.Checkpointer(tmp_path, max_to_keep=3)
  for step in (10, 20):
    ckpt.save(step, _perturbed(state, step), {"step": step})
  ckpt.wait_until_finished()
  real_restore, failures = ckpt._manager.restore, []

  def flaky_restore(step, *args, **kwargs):
    if step == 20 and not failures:
      failures.append(step)
      raise OSError("Input/output error (transient)")
    return real_restore(step, *args, **kwargs)

  monkeypatch.setattr(ckpt._manager, "restore", flaky_restore)
  monkeypatch.setattr(checkpointing, "_RETRY_PAUSE_SECONDS", 0.0)
  restored, data_state = ckpt.restore(abstract)
  assert (
    failures == [20] and data_state == {"step": 20} and int(restored.step) == 20
  )
  assert (
    ckpt.all_steps() == [10, 20]
    and not (tmp_path / "corrupt_checkpoints").exists()
  )
  ckpt.close()


def test_checkpoints_that_fit_no_longer_raise_and_are_kept(tmp_path):
  """A changed model shape makes every step unreadable: that must stop the
  run, not move the steps aside and start over at step 0."""
  state, _ = _state_and_abstract()
  ckpt = checkpointing.Checkpointer(tmp_path, max_to_keep=3)
  for step in (10, 20):
    ckpt.save(step, _perturbed(state, step), {"step": step})
  ckpt.wait_until_finished()
  model = TabularPolicy(jnp.linspace(-1.0, 1.0, 5))  # 5 actions, not 8
  _, other = TrainState.create(
    model, optax.adam(0.1), rng=jax.random.PRNGKey(7)
  )
  mesh = sharding.make_mesh()
  abstract = checkpointing.abstract_with_shardings(
    jax.eval_shape(lambda: other), sharding.state_shardings(mesh, other)
  )
  with pytest.raises(
    RuntimeError,
    match=r"No checkpoint .* could be restored \(steps \[20, 10\]\)",
  ):
    ckpt.restore(abstract)
  assert ckpt.all_steps() == [10, 20]
  assert not (tmp_path / "corrupt_checkpoints").exists()
  ckpt.close()


def test_reference_saved_once_and_restored(tmp_path):
  state, abstract = _state_and_abstract()
  ckpt = checkpointing.Checkpointer(tmp_path, max_to_keep=1)
  ckpt.save_reference(state.ref_params)
  restored = ckpt.restore_reference(abstract.ref_params)
  ckpt.close()
  chex.assert_trees_all_equal(
    jax.device_get(restored), jax.device_get(state.ref_params)
  )


def test_preemption_guard_turns_sigterm_into_a_flag():
  before = signal.getsignal(signal.SIGTERM)
  with checkpointing.PreemptionGuard() as guard:
    assert not guard.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.reached(2)
  assert signal.getsignal(signal.SIGTERM) is before
