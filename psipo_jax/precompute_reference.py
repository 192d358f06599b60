r"""Runs the reference policy once over text splits and writes its log-probs.

    python -m psipo_jax.precompute_reference --config=FILE.py[:ARG] \
        --workdir=DIR [--split=train --split=test] [--config.k=v ...]

For every pair of each split (every split by default), the summed
log-probability of the chosen and the rejected response under the reference
policy, with their token counts, goes to `DIR/reference_logps/<split>.jsonl`
in the one format of `psipo_jax.data.reference_logps` (its header records
the token settings, so a run with other ones refuses the file). Then train
with the file instead of a reference on device:

    --config.input.ref_logps_file="{'train': 'DIR/reference_logps/train.jsonl',
                                    'test': 'DIR/reference_logps/test.jsonl'}"

and the run keeps no reference parameters (`state.ref_params` is None),
saving the reference's forward pass every step.

The reference is the run's own: `reference_checkpoint` if set, else
`init_checkpoint`, else the initial policy of `seed` — exactly the
reference an on-the-fly run of the same config uses. The work runs on the
run's own mesh (`mesh.*`, `fsdp`) over every device of every process
(`JAX_COORDINATOR_ADDRESS` ... as for `psipo_jax.main`), the reference's
parameters sharded as the run's would be, so a reference that needs FSDP
or tensor parallelism to fit is scored the same way; process 0 writes the
files.
"""

from __future__ import annotations


from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
from ml_collections import config_flags
import numpy as np
from flax import nnx
import tqdm

from psipo_jax import checkpointing
from psipo_jax import cli
from psipo_jax import config_checks
from psipo_jax import data
from psipo_jax import data_order
from psipo_jax import inputs
from psipo_jax import models
from psipo_jax import sharding
from psipo_jax import storage
from psipo_jax import train
from psipo_jax import train_step as train_step_lib
from psipo_jax.data import reference_logps
from psipo_jax.models import hf_checkpoint


def _define_flags() -> dict[str, flags.FlagHolder]:
  """The command line's flags, defined only when this module is the program
  (other command-line modules define --config and --workdir too, and tests
  import several of them into one process)."""
  holders = {
    "config": config_flags.DEFINE_config_file(
      "config", None, "Experiment config file.", lock_config=True
    ),
    "workdir": flags.DEFINE_string(
      "workdir", None, "Where reference_logps/<split>.jsonl go."
    ),
    "split": flags.DEFINE_multi_string(
      "split", None, "Split(s) to score (default: all)."
    ),
  }
  flags.mark_flags_as_required(["config", "workdir"])
  return holders


def reference_params(config, abstract_params, init_key):
  """The reference an on-the-fly run of `config` would hold, as a pure-dict
  tree built straight into the shardings that `abstract_params` (its
  `ShapeDtypeStruct`s) carry, so a reference that fits only split over
  devices is never whole on one."""
  shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
  for key in ("reference_checkpoint", "init_checkpoint"):
    if config.get(key):
      return train.load_params(key, config.get(key), abstract_params)
  if config.model.get("init_from_hf"):
    return hf_checkpoint.load_params(
      config.model.init_from_hf,
      hf_checkpoint.model_config(config.model),
      shardings,
    )

  def initial_policy():
    model = models.build_model(config.model, rngs=nnx.Rngs(init_key))
    return nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])

  return jax.jit(initial_policy, out_shardings=shardings)()


def load_reference(config, mesh):
  """(model graphdef, reference params on `mesh`), the parameters sharded as
  the run's own (`sharding.param_shardings`: the rule table on a
  data × fsdp × tensor mesh, `fsdp=True` on the one-axis one)."""
  init_key, _, _ = data_order.run_keys(config.seed)
  abstract_model = nnx.eval_shape(
    lambda: models.build_model(config.model, rngs=nnx.Rngs(init_key))
  )
  model_def, abstract_params = nnx.split(abstract_model, nnx.Param, ...)[:2]
  abstract_params = nnx.to_pure_dict(abstract_params)
  shardings = sharding.param_shardings(
    mesh,
    abstract_params,
    sharding.logical_axes(abstract_model),
    fsdp=config.get("fsdp", False),
  )
  params = reference_params(
    config,
    checkpointing.abstract_with_shardings(abstract_params, shardings),
    init_key,
  )
  return model_def, params


def score_split(config, workdir, split, *, mesh, model_def, params) -> str:
  """Writes `workdir/reference_logps/<split>.jsonl`; returns its path."""
  section = inputs.dataset_section(config, workdir)
  with section.unlocked():
    section.return_ids = True
    section.ref_logps_file = None  # Scoring needs no previous file.
  cfg = data.parse_input_config(section)
  _, whole = inputs.whole_text_split(section, split)
  ids = whole.pop("id")
  batches = inputs.eval_batches(whole, config.input.batch_size, mesh)

  def score_batch(params, batch):
    out = nnx.merge(model_def, params)(
      train_step_lib.pair_inputs(batch), rngs=None
    )
    return out.logps, out.num_tokens  # [2B], [2B]: chosen rows, then rejected

  # Compiled as the train step's evaluation is: parameters in their
  # shardings, the batch over data × fsdp, activations pinned.
  score = sharding.jit_eval_step(
    score_batch, mesh, jax.tree.map(lambda x: x.sharding, params)
  )

  rows, position = [], 0
  for batch in tqdm.tqdm(
    batches,
    desc=f"reference log-probs of {split}",
    disable=jax.process_index() != 0,
  ):
    logps, tokens = score(params, sharding.global_batch(mesh, batch))
    logps, tokens = (
      np.asarray(multihost_utils.process_allgather(x, tiled=True))
      for x in (logps, tokens)
    )
    half = len(logps) // 2
    real = min(config.input.batch_size, len(ids) - position)  # the fill rows go
    for i in range(real):
      rows.append(
        {
          "id": str(ids[position + i]),
          "ref_chosen_logps": float(logps[i]),
          "ref_rejected_logps": float(logps[half + i]),
          "ref_chosen_tokens": int(tokens[i]),
          "ref_rejected_tokens": int(tokens[half + i]),
        }
      )
    position += real
  path = storage.join(workdir, "reference_logps", f"{split}.jsonl")
  if jax.process_index() == 0:
    storage.make_dirs(storage.join(workdir, "reference_logps"))
    reference_logps.write(
      path,
      rows,
      computed_with=reference_logps.settings_of(cfg),
      extra_header={"model": config.model.to_dict()},
    )
  return path


def precompute(config, workdir: str, splits=None) -> dict[str, str]:
  """Scores `splits` (default: every split of the dataset); {split: path}."""
  workdir = config_checks.writable_directory(workdir)
  if config.input.get("name") != "preference_pairs":
    raise ValueError(
      "precompute_reference scores text pairs: input.name must be 'preference_pairs'"
    )
  train.validate_config(config, workdir)
  mesh = sharding.make_mesh(config.get("mesh"), fsdp=config.get("fsdp", False))
  model_def, params = load_reference(config, mesh)
  available = inputs.text_splits(inputs.dataset_section(config, workdir))
  splits = splits or available
  unknown = [s for s in splits if s not in available]
  if unknown:
    raise ValueError(
      f"--split={unknown[0]!r} is not a split of the dataset: {available}"
    )
  paths = {}
  for split in splits:
    paths[split] = score_split(
      config, workdir, split, mesh=mesh, model_def=model_def, params=params
    )
    logging.info("Wrote %s.", paths[split])
  return paths


def main(argv, holders):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  sharding.initialize_distributed()
  config, workdir = holders["config"].value, holders["workdir"].value
  with cli.user_errors():
    config_checks.writable_directory(workdir)
    train.validate_config(config, storage.resolve(workdir))
  try:
    paths = precompute(config, workdir, holders["split"].value)
  except (data.DataError, config_checks.UserError) as e:
    cli.fail(str(e))
  if jax.process_index() == 0:
    files = ", ".join(f"'{s}': '{p}'" for s, p in paths.items())
    print(f'Train with: --config.input.ref_logps_file="{{{files}}}"')


if __name__ == "__main__":
  _holders = _define_flags()
  cli.run(lambda argv: main(argv, _holders))
