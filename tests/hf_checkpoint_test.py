"""Hugging Face checkpoints: our logits equal transformers', export round trips.

Every family's tiny model is built by transformers' own classes (float32),
its parameters all perturbed (norm gains and biases too, which start at
constants), and saved with `save_pretrained`; no network.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from psipo_jax import sharding
from psipo_jax.models import hf_checkpoint as hc
from psipo_jax.models import safetensors_io

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_SIZES = dict(
  vocab_size=96,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
)
_LLAMA3_ROPE = dict(
  rope_type="llama3",
  rope_theta=500_000.0,
  factor=8.0,
  low_freq_factor=1.0,
  high_freq_factor=4.0,
  original_max_position_embeddings=16,
)
# id -> (config class, its arguments); together they cover GQA / MHA / MQA,
# tied and untied embeddings, llama3 and linear RoPE scaling, q/k/v biases,
# q/k norm with a head_dim apart from d / H, sliding windows on all or some
# layers, and Gemma's embedding scale, (1 + w) norms and GeGLU.
FAMILIES = {
  "llama-gqa-untied-llama3rope": (
    "LlamaConfig",
    dict(_SIZES, rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=False),
  ),
  "llama-mha-tied-linearrope": (
    "LlamaConfig",
    dict(
      _SIZES,
      num_key_value_heads=4,
      tie_word_embeddings=True,
      rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=2.0),
    ),
  ),
  "mistral-sliding": (
    "MistralConfig",
    dict(_SIZES, head_dim=8, sliding_window=4, tie_word_embeddings=False),
  ),
  "qwen2-bias-tied-sliding-layer1": (
    "Qwen2Config",
    dict(
      _SIZES,
      tie_word_embeddings=True,
      use_sliding_window=True,
      sliding_window=3,
      max_window_layers=1,
    ),
  ),
  "qwen3-qknorm-mqa": (
    "Qwen3Config",
    dict(
      _SIZES,
      num_key_value_heads=1,
      head_dim=16,
      tie_word_embeddings=False,
    ),
  ),
  "gemma": (
    "GemmaConfig",
    dict(_SIZES, head_dim=16, hidden_act="gelu_pytorch_tanh"),
  ),
  "gemma2-softcap-sliding": (
    "Gemma2Config",
    dict(
      _SIZES,
      head_dim=16,
      sliding_window=4,
      query_pre_attn_scalar=24,
      # Small caps, so that the tanh is far from linear on these logits.
      attn_logit_softcapping=1.5,
      final_logit_softcapping=2.0,
    ),
  ),
  "gemma3-sliding-localrope-linear": (
    "Gemma3TextConfig",
    dict(
      _SIZES,
      head_dim=16,
      sliding_window=4,
      layer_types=["sliding_attention", "full_attention"],
      query_pre_attn_scalar=24,
      rope_parameters={
        "full_attention": {
          "rope_type": "linear",
          "factor": 2.0,
          "rope_theta": 1e6,
        },
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
      },
    ),
  ),
}


def _hf_model(name):
  kind, kwargs = FAMILIES[name]
  config = getattr(transformers, kind)(**kwargs)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config)
  model = model.float().eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  """(name, transformers model, its saved directory)."""
  name = request.param
  model = _hf_model(name)
  directory = tmp_path_factory.mktemp(name)
  model.save_pretrained(directory)
  return name, model, str(directory)


def _batch():
  """Three rows of 12: unpadded, left-padded by 5, right-padded by 3."""
  rng = np.random.default_rng(0)
  ids = rng.integers(0, _SIZES["vocab_size"], size=(3, 12))
  mask = np.ones((3, 12), np.int64)
  mask[1, :5] = 0
  mask[2, 9:] = 0
  ids = np.where(mask == 1, ids, 0)
  return ids, mask


def _hf_logits(model, ids, mask):
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      position_ids=torch.tensor(positions),
    )
  return out.logits.numpy()


def _our_logits(model, ids, mask):
  inputs = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  return np.asarray(nnx.jit(lambda m, x: m.logits(x))(model, inputs))


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_imported_logits_equal_transformers_on_a_padded_batch(family):
  _, hf_model, directory = family
  ids, mask = _batch()
  model = hc.load_model(directory)
  ours = _our_logits(model, ids, mask)
  theirs = _hf_logits(hf_model, ids, mask)
  real = mask == 1
  np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
  # The comparison is not vacuous: the logits spread well beyond 1e-4, and
  # each family feature that could go unseen on 12 tokens changes them.
  assert np.ptp(theirs[real]) > 1.0
  # The training path (log-probs of response tokens, chunked LM head) gives
  # transformers' log-softmax too.
  loss_mask = mask.copy()
  loss_mask[:, :6] = 0
  token_logps, scored = nnx.jit(lambda m, x: m.token_logps(x))(
    model,
    dict(
      input_ids=jnp.asarray(ids),
      attention_mask=jnp.asarray(mask),
      loss_mask=jnp.asarray(loss_mask),
    ),
  )
  log_probs = torch.log_softmax(torch.tensor(theirs), -1).numpy()
  expected = np.take_along_axis(log_probs[:, :-1], ids[:, 1:, None], -1)[..., 0]
  scored = np.asarray(scored)[:, :-1]
  assert scored.sum() > 10
  np.testing.assert_allclose(
    np.asarray(token_logps)[:, :-1][scored], expected[scored], atol=1e-4
  )
  c = model.config
  for feature, default in (
    ("sliding_window", 0),
    ("rope_scaling", "none"),
    ("rope_local_theta", 0.0),
    ("attn_logit_softcap", 0.0),
    ("final_logit_softcap", 0.0),
  ):
    if getattr(c, feature) != default:
      without = nnx.merge(
        nnx.graphdef(
          nnx.eval_shape(
            lambda: hc.tr.Transformer(
              dataclasses.replace(c, **{feature: default}), rngs=nnx.Rngs(0)
            )
          )
        ),
        nnx.state(model),
      )
      changed = np.abs(_our_logits(without, ids, mask) - theirs)[real]
      assert changed.max() > 1e-2, feature


def test_export_loads_in_transformers_with_the_same_logits(family, tmp_path):
  name, _, directory = family
  model = hc.load_model(directory)
  model_type = json.load(open(os.path.join(directory, "config.json")))[
    "model_type"
  ]
  # A small shard limit: several files and an index, as for a large model.
  files = hc.save(
    _params(model),
    model.config,
    str(tmp_path),
    model_type=model_type,
    max_shard_bytes=20_000,
  )
  assert len(files) > 1
  assert os.path.exists(tmp_path / safetensors_io.INDEX_FILE)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  ids, mask = _batch()
  real = mask == 1
  np.testing.assert_allclose(
    _hf_logits(reloaded, ids, mask)[real],
    _our_logits(model, ids, mask)[real],
    atol=1e-4,
    rtol=0,
  )


def test_import_of_export_is_bitwise_the_identity(family, tmp_path):
  _, _, directory = family
  model = hc.load_model(directory)
  params = _params(model)
  model_type = json.load(open(os.path.join(directory, "config.json")))[
    "model_type"
  ]
  hc.save(params, model.config, str(tmp_path), model_type=model_type)
  assert hc.read_config(str(tmp_path)) == model.config
  again = hc.load_params(str(tmp_path), model.config)
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
    params,
    again,
  )


def test_sharded_load_reads_each_devices_slice_and_equals_the_host_load(
  family, monkeypatch
):
  _, _, directory = family
  reads = []  # (first HF tensor name, the index read)
  real_reader = hc._slice_reader

  def spy(store, names, *args):
    read = real_reader(store, names, *args)
    return lambda index: reads.append((names[0], tuple(index))) or read(index)

  monkeypatch.setattr(hc, "_slice_reader", spy)
  config = hc.read_config(directory)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  abstract = nnx.eval_shape(lambda: hc.tr.Transformer(config, rngs=nnx.Rngs(0)))
  params_abstract = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  shardings = sharding.param_shardings(
    mesh, params_abstract, sharding.logical_axes(abstract)
  )
  loaded = hc.load_params(directory, config, shardings)
  sharded_reads = list(reads)
  host = hc.load_params(directory, config)

  def check(array, expected, want):
    assert isinstance(array, jax.Array) and array.sharding == want
    for shard in array.addressable_shards:
      np.testing.assert_array_equal(shard.data, expected[shard.index])

  jax.tree.map(check, loaded, host, shardings)
  # The q projection [L, d, H, Dh] is really split (fsdp on d, tensor on H
  # when H splits 4 ways), and the host read each device's slice once,
  # never the whole tensor.
  q = loaded["layers"]["attention"]["q_proj"]
  assert isinstance(q.sharding, NamedSharding)
  assert q.addressable_shards[0].data.shape[1] == config.embed_dim // 2
  q_reads = [
    i for n, i in sharded_reads if n == "model.layers.0.self_attn.q_proj.weight"
  ]
  distinct = {str(s.index) for s in q.addressable_shards}
  assert len(q_reads) == len(distinct) == len(set(map(str, q_reads))) > 1
  assert all(i[1] != slice(None) or i[2] != slice(None) for i in q_reads)


def test_bfloat16_checkpoint_loads_its_exact_values(tmp_path):
  hf_model = _hf_model("llama-gqa-untied-llama3rope").to(torch.bfloat16)
  hf_model.save_pretrained(tmp_path)
  params = hc.load_params(str(tmp_path), hc.read_config(str(tmp_path)))
  embed = hf_model.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(params["embed_tokens"], embed)
  q = hf_model.model.layers[1].self_attn.q_proj.weight.detach().float()
  q = q.numpy()
  np.testing.assert_array_equal(
    params["layers"]["attention"]["q_proj"][1], q.T.reshape(32, 4, 8)
  )


def _llama_config(**changes):
  config = transformers.LlamaConfig(**_SIZES).to_dict()
  config.update(changes)
  return config


@pytest.mark.parametrize(
  "changes, message",
  [
    (dict(model_type="mixtral"), "model_type='mixtral' is not supported"),
    (dict(num_local_experts=8), "num_local_experts=8 asks for mixture"),
    (dict(vision_config={"x": 1}), "vision_config"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (
      dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4)),
      "rope_parameters.rope_type='yarn'",
    ),
    (
      dict(rope_parameters=None, rope_scaling=dict(type="dynamic", factor=2)),
      "rope_scaling.rope_type='dynamic'",
    ),
    (dict(sliding_window=16), "sliding_window=16 is not part"),
    (
      dict(final_logit_softcapping=30.0),
      "final_logit_softcapping=30.0 is not part",
    ),
    (dict(hidden_size=None), "missing config key 'hidden_size'"),
  ],
)
def test_unsupported_config_keys_are_refused_by_name(changes, message):
  hf = _llama_config(**changes)
  hf = {k: v for k, v in hf.items() if v is not None or k not in changes}
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    hc.config_from_hf(hf)


def test_runtime_options_override_but_architecture_keys_are_fixed():
  hf = _llama_config()
  config = hc.config_from_hf(hf, dtype="bfloat16", remat=True)
  assert config.dtype == "bfloat16" and config.remat
  with pytest.raises(ValueError, match="model.embed_dim is fixed"):
    hc.config_from_hf(hf, embed_dim=64)


def test_missing_extra_and_misshapen_tensors_are_named(family, tmp_path):
  _, _, directory = family
  config = hc.read_config(directory)
  store = safetensors_io.SafetensorsDir(directory)
  tensors = {n: np.array(store.get(n)) for n in store.keys()}
  name = "model.layers.1.mlp.up_proj.weight"

  def write(tensors):
    for f in os.listdir(tmp_path):
      os.remove(tmp_path / f)
    safetensors_io.write_file(str(tmp_path / "model.safetensors"), tensors)

  write({k: v for k, v in tensors.items() if k != name})
  with pytest.raises(ValueError, match=f"tensor {name} .* is missing"):
    hc.load_params(str(tmp_path), config)
  write({**tensors, name: tensors[name][:-1]})
  with pytest.raises(ValueError, match=f"model.safetensors: tensor {name} has"):
    hc.load_params(str(tmp_path), config)
  extra = "model.layers.0.self_attn.o_proj.bias"
  write({**tensors, extra: np.zeros(32, np.float32)})
  with pytest.raises(ValueError, match=f"tensor {extra} is not used"):
    hc.load_params(str(tmp_path), config)


def test_export_refuses_what_the_family_cannot_express(family):
  name, _, directory = family
  config = hc.read_config(directory)
  target = "qwen3" if config.qkv_bias else "qwen2"
  with pytest.raises(ValueError, match="cannot express model.q"):
    hc.hf_config(config, target)
