r"""Prints completions of a trained policy: the newest checkpoint of a run.

    python -m psipo_jax.sample --workdir=runs/lm_ipo_tiny \
        --prompt="sort: dcab =" [--prompt="reverse: abc =" ...] \
        [--max_new_tokens=32] [--temperature=1.0] [--top_k=0] [--top_p=1.0] \
        [--num_samples=1] [--seed=0] [--json] [--mesh=1,-1,1]

The model, tokenizer and parameters come from the run's config.json and
newest readable checkpoint, and prompts are encoded as the training
pipeline encodes them (`psipo_jax.trained_policy.Policy`). A completion
ends at the tokenizer's EOS or after `--max_new_tokens`;
`--temperature=0` is greedy (`psipo_jax.sampling`). `--mesh` splits a
policy too large for one device over several (FSDP and tensor
parallelism, the training rule table).

Each completion prints as one line, `[i.j] PROMPT -> COMPLETION` with its
token count and summed log-probability under the policy, or, with
`--json`, as one JSON object per line (prompt, sample, completion, tokens,
token_logps, logp, eos).
"""

from __future__ import annotations

import json
from typing import Any

from absl import flags

from psipo_jax import cli
from psipo_jax import config_checks
from psipo_jax import sharding
from psipo_jax.trained_policy import Policy


def _define_flags() -> dict[str, flags.FlagHolder]:
  """The command line's flags, defined only when this module is the program
  (other command-line modules define --workdir too, and tests import
  several of them into one process)."""
  holders = {
    "workdir": flags.DEFINE_string(
      "workdir", None, "A training run's directory (config.json, checkpoints/)."
    ),
    "prompt": flags.DEFINE_multi_string(
      "prompt", None, "Prompt text (repeatable)."
    ),
    "max_new_tokens": flags.DEFINE_integer(
      "max_new_tokens", 32, "Tokens per completion at most."
    ),
    "temperature": flags.DEFINE_float("temperature", 1.0, "0 for greedy."),
    "top_k": flags.DEFINE_integer(
      "top_k", 0, "Keep the k likeliest tokens; 0: all."
    ),
    "top_p": flags.DEFINE_float("top_p", 1.0, "Nucleus mass; 1: all."),
    "num_samples": flags.DEFINE_integer(
      "num_samples", 1, "Completions per prompt."
    ),
    "seed": flags.DEFINE_integer("seed", 0, "Sampling seed."),
    "mesh": flags.DEFINE_string(
      "mesh",
      None,
      "data,fsdp,tensor device counts (-1: the remaining devices), e.g."
      " 1,-1,1 to split the policy over every device (FSDP); default: every"
      " device on data, the policy replicated.",
    ),
    "json": flags.DEFINE_bool("json", False, "One JSON object per completion."),
  }
  flags.mark_flags_as_required(["workdir", "prompt"])
  return holders


def _line(index: int, result: dict[str, Any]) -> str:
  end = "EOS" if result["eos"] else "no EOS"
  return (
    f"[{index}.{result['sample']}] {result['prompt']!r} ->"
    f" {result['completion']!r}  ({len(result['tokens'])} tokens, {end},"
    f" log-prob {result['logp']:.3f})"
  )


def _mesh(spec: str | None):
  """The `--mesh=data,fsdp,tensor` mesh, or None (the default one)."""
  if spec is None:
    return None
  parts = spec.split(",")
  try:
    sizes = [int(p) for p in parts]
  except ValueError:
    sizes = None
  if sizes is None or len(sizes) != len(sharding.MESH_AXES):
    raise config_checks.UserError(
      f"--mesh={spec!r} must be three device counts data,fsdp,tensor (-1:"
      " the remaining devices), e.g. 1,-1,1"
    )
  return sharding.make_mesh(
    dict(zip(sharding.MESH_AXES, sizes)), prefix="--mesh: "
  )


def main(argv, holders):
  values = {name: holder.value for name, holder in holders.items()}
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  with cli.user_errors():
    policy = Policy(values["workdir"], mesh=_mesh(values["mesh"]))
    config = policy.sampling_config(
      max_new_tokens=values["max_new_tokens"],
      temperature=values["temperature"],
      top_k=values["top_k"],
      top_p=values["top_p"],
    )
  num_samples = values["num_samples"]
  try:
    results = policy.complete(
      values["prompt"], config, num_samples=num_samples, seed=values["seed"]
    )
  except config_checks.UserError as e:
    cli.fail(str(e))
  for row, result in enumerate(results):
    if values["json"]:
      print(json.dumps(result))
    else:
      print(_line(row // num_samples, result))


if __name__ == "__main__":
  _holders = _define_flags()
  cli.run(lambda argv: main(argv, _holders))
