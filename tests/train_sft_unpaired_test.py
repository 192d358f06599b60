"""SFT on a plain prompt/completion file (input.name="unpaired")."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import lm_sft_tiny
from psipo_jax import inputs
from psipo_jax import models
from psipo_jax import sharding
from psipo_jax import train
from psipo_jax import train_step
from psipo_jax.data import text_task
from psipo_jax.data import unpaired


def _pair_config(tmp_path, *, total_steps=4):
  config = lm_sft_tiny.get_config("runlocal")
  config.input.files = text_task.cached_files(
    num_train=64, num_test=20, cache_dir=str(tmp_path / "cache")
  )
  config.input.batch_size = 16
  config.total_steps = total_steps
  config.optimizer.warmup_steps = 0
  config.log_every = config.eval_every = config.ckpt_every = total_steps
  return config


def _write_completions(pair_file, out_file, *, with_rejected_as_false=False):
  """The chosen responses of a pair file as {"prompt", "completion"} records
  (TRL's prompt-completion format); optionally the rejected ones too,
  labelled false, with the chosen ones labelled true."""
  with open(pair_file) as f:
    pairs = [json.loads(line) for line in f]
  with open(out_file, "w") as f:
    for pair in pairs:
      record = {"prompt": pair["prompt"], "completion": pair["chosen"]}
      if with_rejected_as_false:
        f.write(json.dumps({**record, "label": True}) + "\n")
        record = {
          "prompt": pair["prompt"],
          "completion": pair["rejected"],
          "label": False,
        }
      f.write(json.dumps(record) + "\n")
  return str(out_file)


def _unpaired_config(tmp_path, pair_config, **write_options):
  config = _pair_config(tmp_path, total_steps=pair_config.total_steps)
  section = unpaired.get_input_config()
  for key in ("batch_size", "max_length", "max_prompt_length", "tokenizer"):
    section[key] = pair_config.input[key]
  section.files = {
    split: _write_completions(
      path, tmp_path / f"{split}.jsonl", **write_options
    )
    for split, path in pair_config.input.files.items()
  }
  config.input = section
  return config


def _held_out_nll(config, workdir, params_seed=0):
  """(Σ weighted NLL, Σ weighted tokens) of one fixed model over the whole
  held-out split, as the input kind of `config` batches it."""
  mesh = sharding.make_mesh(config.get("mesh"))
  _, batches = inputs.build(config, mesh, jax.random.PRNGKey(0), workdir)
  model = models.build_model(config.model, rngs=nnx.Rngs(params_seed))
  model_def, params = nnx.split(model)
  nll = tokens = 0.0
  for batch in batches:
    nll_sum, (token_sum, _, _) = train_step._sft_terms(
      model_def, params, None, batch, None
    )
    nll, tokens = nll + float(nll_sum), tokens + float(token_sum)
  return nll, tokens


def test_a_completion_file_scores_exactly_the_chosen_responses(tmp_path):
  """The held-out NLL of one model over the split, token for token, is the
  same whether the split is a pair file (its chosen side) or the
  prompt/completion file of those chosen responses: same tokens, same
  masks, same exact weighting of the last padded batch."""
  pairs = _pair_config(tmp_path)
  completions = _unpaired_config(tmp_path, pairs)
  train.validate_config(completions, str(tmp_path / "run_c"))
  want = _held_out_nll(pairs, str(tmp_path / "run_p"))
  got = _held_out_nll(completions, str(tmp_path / "run_c"))
  assert got[1] == want[1] > 0  # the same response tokens
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  # Labelled false examples are skipped for SFT: the same tokens again.
  labelled = _unpaired_config(tmp_path, pairs, with_rejected_as_false=True)
  got = _held_out_nll(labelled, str(tmp_path / "run_l"))
  assert got[1] == want[1]
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)


def test_sft_trains_on_a_completion_file(tmp_path):
  pairs = _pair_config(tmp_path, total_steps=8)
  config = _unpaired_config(tmp_path, pairs)
  config.log_every = 1
  state = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert state.ref_params is None  # SFT keeps no reference.
  lines = [
    json.loads(line)
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  ]
  train_lines = [l for l in lines if l["split"] == "train"]
  (eval_line,) = [l for l in lines if l["split"] == "eval"]
  assert train_lines[-1]["nll"] < train_lines[0]["nll"]
  assert np.isclose(eval_line["perplexity"], np.exp(eval_line["nll"]))


def test_kto_still_requires_labels(tmp_path):
  pairs = _pair_config(tmp_path)
  config = _unpaired_config(tmp_path, pairs)
  config.objective = "kto"
  with pytest.raises(Exception, match=r"train\.jsonl.*'label' is missing"):
    inputs.build(
      config,
      sharding.make_mesh(config.get("mesh")),
      jax.random.PRNGKey(0),
      str(tmp_path / "run"),
    )
