"""model.init_from_hf through the trainer: experiments/lm_ipo_hf.py:runlocal
on a tiny Llama that transformers builds, then export and reload."""

import json

import jax
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from experiments import lm_ipo_hf
from psipo_jax import export_hf
from psipo_jax import models
from psipo_jax import train
from psipo_jax.models import hf_checkpoint as hc

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def _tiny_model_dir(directory):
  """A 2-layer Llama (vocab 320) and a byte-level BPE tokenizer (< 320 ids)."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
    add_prefix_space=False
  )
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<pad>", "<s>", "</s>"],
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(["sort reverse count the letters of words"], trainer)
  transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
  ).save_pretrained(directory)
  config = transformers.LlamaConfig(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
  )
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(directory)
  return str(directory)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return _tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"))


def test_runlocal_starts_policy_and_reference_from_the_checkpoint(
  model_dir, tmp_path
):
  config = lm_ipo_hf.get_config(f"runlocal,hf={model_dir}")
  config.input.batch_size = 8
  state = train.train_and_evaluate(config, str(tmp_path / "run"))
  hf_params = hc.load_params(model_dir, hc.read_config(model_dir))
  # The reference is the checkpoint exactly; the policy moved away from it.
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
    state.ref_params,
    hf_params,
  )
  moved = jax.tree.map(
    lambda a, b: float(np.abs(np.asarray(a) - b).max()),
    state.params,
    hf_params,
  )
  assert max(jax.tree.leaves(moved)) > 0

  # The run's newest policy, exported (as the source's model_type, with its
  # tokenizer), loads in transformers with our logits.
  out = tmp_path / "exported"
  export_hf.export(str(tmp_path / "run"), str(out))
  assert (out / "tokenizer.json").exists()
  assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  model = models.build_model(config.model, rngs=nnx.Rngs(0))
  graphdef, params_state = nnx.split(model, nnx.Param)
  nnx.replace_by_pure_dict(params_state, state.params)
  model = nnx.merge(graphdef, params_state)
  ids = np.random.default_rng(0).integers(0, 300, size=(2, 10))
  ours = np.asarray(model.logits(dict(input_ids=ids)))
  with torch.no_grad():
    theirs = reloaded(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_init_from_hf_keys_are_checked(model_dir, tmp_path):
  block = ml_collections.ConfigDict(
    {"name": "transformer", "init_from_hf": model_dir, "remat": True}
  )
  assert hc.model_config(block).remat and models.vocab_size(block) == 320
  for key, value, message in (
    ("preset", "tiny", "model.preset and model.init_from_hf"),
    ("num_layers", 3, "model.num_layers is fixed by the checkpoint"),
    ("num_layrs", 3, "unknown config key model.num_layrs"),
  ):
    bad = ml_collections.ConfigDict(block.to_dict())
    bad[key] = value
    with pytest.raises(ValueError, match=message):
      hc.model_config(bad)
  block.init_from_hf = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="model.init_from_hf=.* is not a dir"):
    hc.model_config(block)
  config = lm_ipo_hf.get_config(f"runlocal,hf={model_dir}")
  config.init_checkpoint = str(tmp_path)
  with pytest.raises(ValueError, match="init_checkpoint and model.init_from_"):
    train.validate_config(config, str(tmp_path / "run"))


def test_accelerator_config_validates_and_needs_a_model(model_dir, tmp_path):
  config = lm_ipo_hf.get_config(f"hf={model_dir}")
  train.validate_config(config, str(tmp_path))
  assert config.model.dtype == "bfloat16" and config.model.remat
  assert config.input.tokenizer == f"hf:{model_dir}"
  with pytest.raises(ValueError, match="hf=<Hugging Face model directory>"):
    lm_ipo_hf.get_config("runlocal")
