"""In-memory preference pairs over a finite action space, sampled by step.

The finite-action (bandit) experiments of Azar et al. (arXiv:2310.12036,
§5.3) train on a small dataset of observed pairs (y_w, y_l). Minibatch s is a
pure function of (data_key, s), so any step's batch can be regenerated: a
resumed run continues with exactly the batches an uninterrupted run would
have seen, and the vmapped runner (psipo_jax.bandit) trains on the same
pairs:

    indices_s = data_order.minibatch_indices(data_key, s, batch_size=B,
                                             dataset_size=num_pairs)   # [B]
    chosen_s, rejected_s = pairs[indices_s, 0], pairs[indices_s, 1]

i.e. B pairs drawn uniformly with replacement from the list (counter-based
Threefry-2x32, one definition shared with the runner), steps s = 0, 1, 2, ... The iterator offers `get_state()` / `set_state()` like a Grain
`DatasetIterator`, so checkpointing treats both alike.
"""

import hashlib
import math

import jax
import numpy as np

from psipo_jax import data_order


# Jitted once per (batch_size): eagerly, the Threefry hash runs op by op and
# costs about 100× more than the tabular train step it feeds.
_minibatch_indices = jax.jit(
  data_order.minibatch_indices, static_argnames="batch_size"
)


def sample_indices(
  data_key: jax.Array, step: int, *, num_pairs: int, batch_size: int
) -> np.ndarray:
  """[batch_size] indices into the pair list for step `step` (see module doc)."""
  return np.asarray(
    _minibatch_indices(
      data_key, step, batch_size=batch_size, dataset_size=num_pairs
    )
  )


class PairSampler:
  """Iterator over minibatches {"chosen": [b], "rejected": [b]} of action indices.

  Every process draws the same global batch of `batch_size` pairs and yields
  only its own `rows`, so the data order does not depend on the number of
  processes.
  """

  def __init__(
    self,
    pairs: np.ndarray,
    *,
    batch_size: int,
    data_key: jax.Array,
    rows: slice = slice(None),
  ):
    self._pairs = pairs  # [P, 2]
    self._batch_size = batch_size
    self._data_key = data_key
    self._rows = rows
    self._step = 0  # index of the next batch
    # What the data order depends on; a checkpoint of another order is refused.
    digest = hashlib.sha256(np.asarray(pairs, np.int32).tobytes())
    digest.update(np.asarray(data_order.raw_key(data_key)).tobytes())
    digest.update(str(batch_size).encode())
    self._fingerprint = digest.hexdigest()[:16]

  def __iter__(self) -> "PairSampler":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    indices = sample_indices(
      self._data_key,
      self._step,
      num_pairs=len(self._pairs),
      batch_size=self._batch_size,
    )[self._rows]  # [b]
    self._step += 1
    return {
      "chosen": self._pairs[indices, 0],
      "rejected": self._pairs[indices, 1],
    }

  def get_state(self) -> dict[str, int | str]:
    return {"step": self._step, "fingerprint": self._fingerprint}

  def set_state(self, state: dict[str, int | str]) -> None:
    """Continues at `state`'s step; refuses the state of another data order.

    Raises:
      ValueError: `state` was saved by a sampler with other pairs, batch
        size or data key (seed).
    """
    saved = state.get("fingerprint")
    if saved is not None and saved != self._fingerprint:
      raise ValueError(
        "the checkpoint's data position belongs to another data order"
        " (input.pairs, input.batch_size or seed differ from the run that"
        " saved it)"
      )
    self._step = int(state["step"])


def all_pairs_batch(
  pairs: np.ndarray, *, multiple: int
) -> dict[str, np.ndarray]:
  """Every observed pair equally often, in a batch whose size divides by `multiple`.

  The list is tiled multiple / gcd(P, multiple) times, so means over the batch
  are exact means over the dataset. Used as the evaluation batch.
  """
  repeats = multiple // math.gcd(len(pairs), multiple)
  tiled = np.tile(pairs, (repeats, 1))  # [P * repeats, 2]
  return {"chosen": tiled[:, 0], "rejected": tiled[:, 1]}
