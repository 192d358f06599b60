r"""Writes a run's newest policy as a Hugging Face model directory.

    python -m psipo_jax.export_hf --workdir=RUN --out=DIR \
        [--model_type=llama] [--dtype=bfloat16] [--max_shard_bytes=N]

The model is the one the run's recorded config.json describes; its newest
readable checkpoint's policy parameters become DIR's config.json and
safetensors (`psipo_jax.models.hf_checkpoint.save`), which
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads. A run
started with `model.init_from_hf=SRC` is written as SRC's model_type (an
explicit --model_type overrides it) and gets SRC's tokenizer files. One host
(the parameters are gathered on it).
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import flags
from flax import nnx

from psipo_jax import cli
from psipo_jax import config_checks
from psipo_jax import models
from psipo_jax import run_config
from psipo_jax import train
from psipo_jax.models import hf_checkpoint


def _define_flags() -> dict[str, flags.FlagHolder]:
  """The command line's flags, defined only when this module is the program
  (other command-line modules define --workdir too, and tests import several
  of them into one process)."""
  return {
    "workdir": flags.DEFINE_string("workdir", None, "The run's workdir."),
    "out": flags.DEFINE_string(
      "out", None, "The Hugging Face directory to write."
    ),
    "model_type": flags.DEFINE_string(
      "model_type", None, "llama, mistral, qwen2, qwen3 or gemma."
    ),
    "dtype": flags.DEFINE_enum(
      "dtype", "float32", ["float32", "bfloat16"], "Tensor dtype written."
    ),
    "max_shard_bytes": flags.DEFINE_integer(
      "max_shard_bytes",
      hf_checkpoint.DEFAULT_MAX_SHARD_BYTES,
      "Above this the tensors go to several files with an index.",
    ),
  }


def export(
  workdir: str,
  out_dir: str,
  *,
  model_type: str | None = None,
  dtype: str = "float32",
  max_shard_bytes: int = hf_checkpoint.DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
  """Exports `workdir`'s newest policy to `out_dir`; the files written.

  Raises:
    config_checks.UserError: no recorded config or checkpoint, or no
      model_type to write.
  """
  workdir = os.path.abspath(workdir)
  recorded = run_config.read(workdir)
  if recorded is None or "model" not in recorded:
    raise config_checks.UserError(
      f"--workdir={workdir!r} holds no config.json of a run"
    )
  block = ml_collections.ConfigDict(recorded["model"])
  source = block.get("init_from_hf")
  if model_type is None and source:
    model_type = hf_checkpoint.read_hf_config(source).get("model_type")
  if model_type is None:
    raise config_checks.UserError(
      "--model_type is required: the run did not start from a Hugging Face"
      f" checkpoint; one of {sorted(hf_checkpoint.FAMILIES)}"
    )
  config = hf_checkpoint.model_config(block)
  abstract = nnx.eval_shape(lambda: models.build_model(block, rngs=nnx.Rngs(0)))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract_params = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
    nnx.to_pure_dict(nnx.state(abstract, nnx.Param)),
  )
  params = train.load_params("--workdir", workdir, abstract_params)
  return hf_checkpoint.save(
    params,
    config,
    out_dir,
    model_type=model_type,
    dtype=dtype,
    max_shard_bytes=max_shard_bytes,
    copy_tokenizer_from=source or None,
  )


def main(argv, flag_holders):
  values = {name: holder.value for name, holder in flag_holders.items()}
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  if not values["workdir"] or not values["out"]:
    cli.fail("--workdir and --out are required")
  with cli.user_errors():
    files = export(
      values["workdir"],
      values["out"],
      model_type=values["model_type"],
      dtype=values["dtype"],
      max_shard_bytes=values["max_shard_bytes"],
    )
  print(f"Wrote {values['out']}: config.json, {', '.join(files)}")


if __name__ == "__main__":
  _holders = _define_flags()
  cli.run(lambda argv: main(argv, _holders))
