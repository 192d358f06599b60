"""Orbax checkpoints of a run: periodic async saves, exact resume, fallback.

Layout of a workdir:
  checkpoints/<step>/state   the TrainState minus `ref_params` (params,
                             opt_state, step, rng, skipped_updates)
  checkpoints/<step>/data    the data iterator's `get_state()` (JSON)
  reference/                 `ref_params`, written once per run
  corrupt_checkpoints/<step> checkpoints found unreadable, moved aside

Orbax's `CheckpointManager` does not fall back from an unreadable newest step
(its `latest_step()` still names it and `restore` raises), so `restore`
tries the steps newest first and warns for each one skipped. A step is
declared unreadable only after `READ_ATTEMPTS` tries with a pause between
them, so that a transient read error (a network filesystem's hiccup) does
not set aside a good newest checkpoint.
"""

import os
import signal
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from psipo_jax.train_state import Params, TrainState


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings`: Orbax restores straight into them."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    tree,
    shardings,
  )


# Tries of one step before it counts as unreadable, and the first pause
# between them (doubled each time).
READ_ATTEMPTS = 3
_RETRY_PAUSE_SECONDS = 0.25


class Checkpointer:
  """Saves and restores the train state and the data iterator's state.

  Args:
    workdir: the run's directory.
    max_to_keep: number of step checkpoints kept (older ones are deleted).
    async_save: write in a background thread; `save` returns once the arrays
      are copied off the devices, so the state can be donated right after.
    read_only: only restore (e.g. another run's checkpoints, read for a
      reference policy); unreadable steps are skipped but left in place.
  """

  def __init__(
    self,
    workdir: str | os.PathLike[str],
    *,
    max_to_keep: int,
    async_save: bool = True,
    read_only: bool = False,
  ):
    self._workdir = epath.Path(workdir)
    self._read_only = read_only
    self._manager = ocp.CheckpointManager(
      self._workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
      ),
    )

  @property
  def reference_dir(self) -> epath.Path:
    return self._workdir / "reference"

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(
    self, step: int, state: TrainState, data_state: dict[str, Any]
  ) -> None:
    """Starts saving `state` (without its reference) as checkpoint `step`."""
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state.replace(ref_params=None)),
        data=ocp.args.JsonSave(data_state),
      ),
      force=True,
    )

  def restore(
    self, abstract_state: TrainState
  ) -> tuple[TrainState, dict[str, Any]] | None:
    """Restores the newest readable checkpoint, or returns None if there is none.

    Args:
      abstract_state: the state's structure as ShapeDtypeStructs with their
        target shardings (`abstract_with_shardings`); `ref_params` is ignored.

    Returns:
      (state with ref_params=None, data iterator state), or None.
    """
    restored = self._restore_newest(
      ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state.replace(ref_params=None)),
        data=ocp.args.JsonRestore(),
      )
    )
    return None if restored is None else (restored.state, restored.data)

  def restore_params(
    self, abstract_params: Params, step: int | None = None
  ) -> Params | None:
    """The policy parameters alone of the newest readable checkpoint (or of
    checkpoint `step`, which must exist and be readable), or None.

    Reads another run's checkpoints whatever its optimiser was, e.g. to use
    its trained policy as this run's reference.
    """
    item = {"params": abstract_params}
    target = ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
        item=item,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True,
      )
    )
    if step is None:
      restored = self._restore_newest(target)
    elif step not in self.all_steps():
      raise ValueError(
        f"{self._workdir / 'checkpoints'} holds no step {step} (it holds"
        f" {self.all_steps()})"
      )
    else:
      restored, error = self._read(step, target)
      if error is not None:
        raise RuntimeError(f"checkpoint step {step} is unreadable: {error}")
    return None if restored is None else restored.state["params"]

  def _read(
    self, step: int, target: ocp.args.Composite
  ) -> tuple[Any, str | None]:
    """`(restored, None)`, or `(None, the last error)` after READ_ATTEMPTS tries."""
    pause = _RETRY_PAUSE_SECONDS
    for attempt in range(1, READ_ATTEMPTS + 1):
      try:
        return self._manager.restore(step, args=target), None
      except Exception as e:  # pylint: disable=broad-except
        error = f"{type(e).__name__}: {str(e)[:500]}"
      if attempt < READ_ATTEMPTS:
        logging.warning(
          "Reading checkpoint step %d failed (%.200s); retrying in %.2f s.",
          step,
          error,
          pause,
        )
        time.sleep(pause)
        pause *= 2
    return None, error

  def _restore_newest(self, target: ocp.args.Composite) -> Any:
    unreadable: list[tuple[int, str]] = []
    for step in reversed(self.all_steps()):
      restored, error = self._read(step, target)
      if error is not None:
        # Any lasting failure to read (truncated or missing files, bad
        # metadata) makes this step unusable; an older one may still be whole.
        logging.warning(
          "Checkpoint at step %d in %s is unreadable (%.300s); trying an"
          " older one.",
          step,
          self._workdir,
          error,
        )
        unreadable.append((step, error))
        continue
      # Only once an older step restores are the newer ones known to be
      # corrupt, rather than unreadable for a reason that hits every step.
      for bad_step, _ in unreadable:
        logging.warning(
          "Skipped unreadable checkpoint at step %d; resumed from step %d.",
          bad_step,
          step,
        )
        if not self._read_only:
          self._move_aside(bad_step)
      return restored
    if unreadable:
      # Every step failed: most likely the config changed (a parameter shape,
      # the optimiser) rather than every file going bad. Starting over would
      # silently discard the run, so stop and say so.
      step, error = unreadable[0]
      raise RuntimeError(
        f"No checkpoint in {self._workdir / 'checkpoints'} could be restored"
        f" (steps {[s for s, _ in unreadable]}); the newest, step {step},"
        f" failed with {error}. If the config changed (model shape,"
        " optimizer), use a new workdir."
      )
    return None

  def _move_aside(self, step: int) -> None:
    """Moves an unreadable step out of the manager's way (kept for inspection),
    so that a later save at the same step does not collide with it."""
    if jax.process_index() == 0:
      corrupt_dir = self._workdir / "corrupt_checkpoints"
      corrupt_dir.mkdir(parents=True, exist_ok=True)
      target = corrupt_dir / str(step)
      if target.exists():  # the same step went bad before
        target = corrupt_dir / f"{step}-{time.time_ns()}"
      (self._workdir / "checkpoints" / str(step)).rename(target)
    multihost_utils.sync_global_devices(f"psipo_jax_move_aside_{step}")
    self._manager.reload()

  def save_reference(self, ref_params: Params) -> None:
    """Writes the reference parameters once for the run (synchronously)."""
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(self.reference_dir, ref_params, force=True)
      checkpointer.wait_until_finished()

  def restore_reference(self, abstract_params: Params) -> Params:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(self.reference_dir, abstract_params)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


class PreemptionGuard:
  """Turns SIGTERM (a preemption notice) into a checkpoint at a step boundary.

  One process: a SIGTERM handler records the signal; `reached(step)` is then
  True at the next step boundary. Several processes: JAX's preemption
  service (started by `jax.distributed.initialize`) catches SIGTERM on any
  host and agrees with all hosts on a step to stop at, which
  `multihost_utils.reached_preemption_sync_point` reports; our own handler
  is not installed so as not to displace JAX's. Use as a context manager.
  """

  def __init__(self):
    self._received = threading.Event()
    self._previous_handler = None

  def __enter__(self) -> "PreemptionGuard":
    if (
      jax.process_count() == 1
      and threading.current_thread() is threading.main_thread()
    ):
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    logging.warning(
      "SIGTERM received: will checkpoint and stop after this step."
    )
    self._received.set()

  def reached(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step`; call at every step."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._received.is_set()
