"""Hugging Face checkpoints in and out: config.json + safetensors <-> Transformer.

Supported `model_type`s (the decoder-only text models our transformer
computes exactly): llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text.
Their
config keys map to `TransformerConfig` fields in `config_from_hf` (sizes,
RMSNorm ε, RoPE θ and its "linear" / "llama3" rescaling, tied embeddings,
Qwen2's q/k/v biases, Qwen3's per-head q/k RMSNorm, sliding-window layers,
Gemma's √d embedding scale, (1 + w) RMSNorm and GeGLU; Gemma 3's output
norms, query_pre_attn_scalar and local RoPE θ on its sliding layers; Gemma
2's and 3's attention and final logit soft-capping). A key that would change the
computation in a way we do not implement (mixture-of-experts, a multimodal
tower, an o_proj/MLP bias, another RoPE rescaling, partial rotary, …) is
refused with an error naming it; nothing is silently ignored.

Tensors. `TENSORS` is the one table from our parameter paths to the HF
tensor names and layouts; HF stores `nn.Linear` weights [out, in] and per
layer, ours are [in, …out] and stacked on a leading layer axis.

Loading (`load_params`) is lazy: the safetensors files are memory-mapped
and, given the parameter shardings, every array is built by
`jax.make_array_from_callback`, which asks each host only for the slices
its own devices hold; the slice of every layer is cut from the mapped
tensor before it is copied (and cast to float32). A checkpoint larger than
one host's memory therefore loads onto a pod.

Export (`save`) writes config.json (in the layout of released checkpoints:
`rope_theta`, `rope_scaling`) and the tensors, in one model.safetensors or,
above `max_shard_bytes`, in numbered shards with an index, so that
`transformers.AutoModelForCausalLM.from_pretrained` loads it. Export is
checked: the written config.json is read back by `config_from_hf` and must
give our architecture again, so a model the family cannot express (e.g. q/k/v
biases as "llama") is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from psipo_jax.models import safetensors_io
from psipo_jax.models import transformer as tr

CONFIG_FILE = "config.json"
# Released checkpoints shard at 5 GB (transformers' default max_shard_size).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# Files besides the weights that tools reading the directory expect.
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "tokenizer.model",
  "chat_template.jinja",
  "generation_config.json",
)


@dataclasses.dataclass(frozen=True)
class Family:
  """What a `model_type` fixes about the architecture."""

  architecture: str  # the `architectures` entry of config.json
  qkv_bias: bool = False  # q/k/v biases always present (Qwen2)
  qk_norm: bool = False  # per-head q/k RMSNorm (Qwen3)
  gemma: bool = False  # √d embedding scale, (1 + w) RMSNorm
  sliding: str = "none"  # "none" | "all" (Mistral) | "qwen" | "gemma"
  # Gemma 2 and 3: attention/MLP output norms, query_pre_attn_scalar, logit
  # soft-capping; sliding layers every `sliding_pattern`-th layer but one.
  sandwich: bool = False
  sliding_pattern: int = 0
  local_rope: bool = False  # Gemma 3: sliding layers have their own RoPE θ


FAMILIES: dict[str, Family] = {
  "llama": Family("LlamaForCausalLM"),
  "mistral": Family("MistralForCausalLM", sliding="all"),
  "qwen2": Family("Qwen2ForCausalLM", qkv_bias=True, sliding="qwen"),
  "qwen3": Family("Qwen3ForCausalLM", qk_norm=True, sliding="qwen"),
  "gemma": Family("GemmaForCausalLM", gemma=True),
  "gemma2": Family(
    "Gemma2ForCausalLM",
    gemma=True,
    sliding="gemma",
    sandwich=True,
    sliding_pattern=2,
  ),
  "gemma3_text": Family(
    "Gemma3ForCausalLM",
    qk_norm=True,
    gemma=True,
    sliding="gemma",
    sandwich=True,
    sliding_pattern=6,
    local_rope=True,
  ),
}

# Config keys that announce a computation we do not implement, whenever
# they are set (truthy): refused, naming the key.
_REFUSED_KEYS = {
  "num_experts": "mixture-of-experts layers",
  "num_local_experts": "mixture-of-experts layers",
  "n_routed_experts": "mixture-of-experts layers",
  "num_experts_per_tok": "mixture-of-experts layers",
  "vision_config": "a multimodal (vision) tower",
  "audio_config": "a multimodal (audio) tower",
  "text_config": "a multimodal wrapper (point at its text model instead)",
  "mlp_bias": "biases in the MLP",
  "use_bidirectional_attention": "bidirectional attention",
}
# Keys only the Gemma 2/3 models read (transformers ignores them elsewhere,
# so elsewhere they are refused rather than applied).
_SANDWICH_KEYS = (
  "query_pre_attn_scalar",
  "attn_logit_softcapping",
  "final_logit_softcapping",
)
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}
# Tensors of old checkpoints that hold no parameter (recomputed buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _layout_to_hf_shape(layout: str, shape: tuple[int, ...]) -> tuple:
  """The HF shape of one layer's tensor whose shape in our model is `shape`."""
  if layout == "same":
    return shape
  if layout == "transpose":  # ours [in, out], HF [out, in]
    return shape[::-1]
  if layout == "out_heads":  # ours [d, heads, Dh], HF [heads·Dh, d]
    return (shape[1] * shape[2], shape[0])
  if layout == "in_heads":  # ours [heads, Dh, d], HF [d, heads·Dh]
    return (shape[2], shape[0] * shape[1])
  if layout == "heads":  # ours [heads, Dh], HF [heads·Dh]
    return (shape[0] * shape[1],)
  raise ValueError(layout)


def _to_ours(layout: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """One layer's HF tensor as our layout: a view (no copy) of a mapped file."""
  if layout == "same":
    return x
  if layout == "transpose":
    return x.T
  # Splitting one axis of a transposed view is itself a view.
  return (x if layout == "heads" else x.T).reshape(shape)


def _to_hf(layout: str, x: np.ndarray) -> np.ndarray:
  """One layer's parameter in HF's layout (C order, for writing)."""
  hf_shape = _layout_to_hf_shape(layout, x.shape)
  if layout == "same":
    return x
  if layout == "heads":
    return x.reshape(hf_shape)
  if layout == "transpose":
    return np.ascontiguousarray(x.T)
  if layout == "out_heads":
    return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
  return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)  # in_heads


_L = "model.layers.{i}."
# Our parameter path (in `nnx.to_pure_dict` of the Param state) -> the HF
# tensor name ("{i}": the layer, for parameters stacked on the layer axis)
# and the layout mapping the two. One table for every family: they share
# the names; a row applies where the model has the parameter.
TENSORS: tuple[tuple[tuple[str, ...], str, str], ...] = (
  (("embed_tokens",), "model.embed_tokens.weight", "same"),
  (
    ("layers", "input_norm", "scale"),
    _L + "input_layernorm.weight",
    "same",
  ),
  (
    ("layers", "attention", "q_proj"),
    _L + "self_attn.q_proj.weight",
    "out_heads",
  ),
  (
    ("layers", "attention", "k_proj"),
    _L + "self_attn.k_proj.weight",
    "out_heads",
  ),
  (
    ("layers", "attention", "v_proj"),
    _L + "self_attn.v_proj.weight",
    "out_heads",
  ),
  (
    ("layers", "attention", "o_proj"),
    _L + "self_attn.o_proj.weight",
    "in_heads",
  ),
  (("layers", "attention", "q_bias"), _L + "self_attn.q_proj.bias", "heads"),
  (("layers", "attention", "k_bias"), _L + "self_attn.k_proj.bias", "heads"),
  (("layers", "attention", "v_bias"), _L + "self_attn.v_proj.bias", "heads"),
  (
    ("layers", "attention", "q_norm", "scale"),
    _L + "self_attn.q_norm.weight",
    "same",
  ),
  (
    ("layers", "attention", "k_norm", "scale"),
    _L + "self_attn.k_norm.weight",
    "same",
  ),
  (
    ("layers", "post_attention_norm", "scale"),
    _L + "post_attention_layernorm.weight",
    "same",
  ),
  (("layers", "mlp", "gate_proj"), _L + "mlp.gate_proj.weight", "transpose"),
  (("layers", "mlp", "up_proj"), _L + "mlp.up_proj.weight", "transpose"),
  (("layers", "mlp", "down_proj"), _L + "mlp.down_proj.weight", "transpose"),
  (
    ("layers", "attention_output_norm", "scale"),
    _L + "post_attention_layernorm.weight",
    "same",
  ),
  (
    ("layers", "mlp_output_norm", "scale"),
    _L + "post_feedforward_layernorm.weight",
    "same",
  ),
  (("final_norm", "scale"), "model.norm.weight", "same"),
  (("lm_head",), "lm_head.weight", "transpose"),
)


# --------------------------------------------------------------------------
# config.json -> TransformerConfig


def read_hf_config(model_dir: str) -> dict[str, Any]:
  """The parsed config.json of a model directory."""
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{model_dir} holds no {CONFIG_FILE}")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not JSON ({e})") from e


def _gemma3_rope_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
  """Gemma 3: full layers θ (default 1e6) and rescaling, sliding layers
  their own unscaled θ (`rope_local_base_freq`, default 1e4); transformers
  ≥ 5 writes both under rope_parameters per layer type."""
  params = hf.get("rope_parameters") or {}
  if "full_attention" in params or "sliding_attention" in params:
    full = params.get("full_attention") or {}
    local = params.get("sliding_attention") or {}
    local_key = "rope_parameters.sliding_attention"
  else:
    full = {
      "rope_theta": hf.get("rope_theta", 1_000_000.0),
      **(hf.get("rope_scaling") or {}),
    }
    local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    local_key = "rope_local_base_freq"
  if local.get("rope_type", "default") != "default":
    raise ValueError(
      f"{where}: {local_key}.rope_type={local['rope_type']!r} is not"
      " supported (only default on sliding layers)"
    )
  spec = dict(full)
  spec["rope_type"] = spec.pop("rope_type", None) or spec.pop("type", "default")
  fields = _rope_fields({"rope_parameters": spec}, where)
  fields["rope_local_theta"] = float(local.get("rope_theta", 10_000.0))
  return fields


def _rope_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
  """RoPE θ and rescaling from `rope_theta` + `rope_scaling` (released
  checkpoints) or `rope_parameters` (transformers ≥ 5)."""
  params = hf.get("rope_parameters") or {}
  key = "rope_parameters"
  if any(isinstance(v, dict) for v in params.values()):
    raise ValueError(
      f"{where}: {key} per layer type (RoPE θ differing between layers) is"
      " not supported"
    )
  theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
  spec = params
  if not params.get("rope_type") and hf.get("rope_scaling"):
    spec, key = hf["rope_scaling"], "rope_scaling"
  kind = spec.get("rope_type", spec.get("type")) or "default"
  fields: dict[str, Any] = {"rope_theta": float(theta)}
  if (
    spec.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1
  ):
    raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
  if kind == "default":
    return fields
  if kind not in ("linear", "llama3"):
    raise ValueError(
      f"{where}: {key}.rope_type={kind!r} is not supported (only default,"
      " linear and llama3)"
    )
  fields.update(rope_scaling=kind, rope_scaling_factor=float(spec["factor"]))
  if kind == "llama3":
    fields.update(
      rope_low_freq_factor=float(spec["low_freq_factor"]),
      rope_high_freq_factor=float(spec["high_freq_factor"]),
      rope_original_max_positions=int(spec["original_max_position_embeddings"]),
    )
  return fields


def _sliding_fields(
  hf: dict[str, Any], family: Family, num_layers: int, where: str
) -> dict[str, Any]:
  """sliding_window and layer_types as transformers applies them."""
  if family.sliding == "none":
    for key in ("sliding_window", "layer_types"):
      value = hf.get(key)
      if value and (key != "layer_types" or set(value) != {"full_attention"}):
        raise ValueError(
          f"{where}: {key}={value!r} is not part of this family's model"
        )
    return {}
  if family.sliding == "qwen" and not hf.get("use_sliding_window"):
    return {}  # transformers drops the window unless use_sliding_window
  window = hf.get("sliding_window") or 0
  if family.sliding == "gemma":
    window = hf.get("sliding_window", 4096) or 0
    if not window:
      raise ValueError(f"{where}: {hf['model_type']} needs a sliding_window")
  if not window:
    return {}
  types = hf.get("layer_types")
  if family.sliding == "all":
    if types and set(types) != {"sliding_attention"}:
      raise ValueError(f"{where}: layer_types is not supported for mistral")
    return {"sliding_window": int(window)}
  if types is None and family.sliding == "gemma":  # every P-th layer full
    pattern = hf.get("sliding_window_pattern", family.sliding_pattern)
    types = [
      "sliding_attention" if (i + 1) % pattern else "full_attention"
      for i in range(num_layers)
    ]
  if types is None:  # transformers' default for Qwen2/3
    first_sliding = hf.get("max_window_layers", 28)
    types = [
      "sliding_attention" if i >= first_sliding else "full_attention"
      for i in range(num_layers)
    ]
  bad = [t for t in types if t not in _LAYER_TYPES]
  if bad or len(types) != num_layers:
    raise ValueError(
      f"{where}: layer_types must list full_attention/sliding_attention for"
      f" each of the {num_layers} layers, got {types!r}"
    )
  return {
    "sliding_window": int(window),
    "layer_types": ",".join(_LAYER_TYPES[t] for t in types),
  }


def config_from_hf(
  hf: dict[str, Any], *, where: str = CONFIG_FILE, **overrides: Any
) -> tr.TransformerConfig:
  """The TransformerConfig of a Hugging Face config.json (parsed).

  Args:
    hf: the config.json dict.
    where: the file, for error messages.
    **overrides: TransformerConfig fields that do not change the function
      (dtype, attention, remat, logprobs, …).

  Raises:
    ValueError: naming the config key of an unsupported model or feature.
  """
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise ValueError(
      f"{where}: model_type={model_type!r} is not supported; supported:"
      f" {sorted(FAMILIES)}"
    )
  family = FAMILIES[model_type]
  for key, what in _REFUSED_KEYS.items():
    if hf.get(key):
      raise ValueError(
        f"{where}: {key}={hf[key]!r} asks for {what}, which is not supported"
      )
  act_key = "hidden_activation" if hf.get("hidden_activation") else "hidden_act"
  act = hf.get(act_key, "silu")
  if act not in _ACTIVATIONS:
    raise ValueError(
      f"{where}: {act_key}={act!r} is not supported (only"
      f" {sorted(_ACTIVATIONS)})"
    )
  if hf.get("attention_bias") and not family.qkv_bias:
    raise ValueError(
      f"{where}: attention_bias=true (biases on q/k/v and o_proj) is not"
      " supported"
    )
  for key in _SANDWICH_KEYS:
    if hf.get(key) and not family.sandwich:
      raise ValueError(
        f"{where}: {key}={hf[key]!r} is not part of this family's model"
      )
  try:
    heads = hf["num_attention_heads"]
    embed_dim = hf["hidden_size"]
    num_layers = hf["num_hidden_layers"]
    fields: dict[str, Any] = dict(
      vocab_size=hf["vocab_size"],
      num_layers=num_layers,
      embed_dim=embed_dim,
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or embed_dim // heads,
      mlp_dim=hf["intermediate_size"],
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", family.gemma)),
      qkv_bias=family.qkv_bias,
      qk_norm=family.qk_norm,
      mlp_activation=_ACTIVATIONS[act],
    )
  except KeyError as e:
    raise ValueError(f"{where}: missing config key {e.args[0]!r}") from None
  if family.local_rope:
    fields.update(_gemma3_rope_fields(hf, where))
  else:
    fields.update(_rope_fields(hf, where))
  if family.sandwich:
    fields.update(
      sandwich_norms=True,
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
      attn_logit_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
      final_logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
    )
  fields.update(_sliding_fields(hf, family, num_layers, where))
  if family.gemma:
    fields.update(embed_scale=True, norm_offset=1.0)
  for key in overrides:
    if key in fields:
      raise ValueError(
        f"model.{key} is fixed by the checkpoint's {where}"
        f" ({key}={fields[key]!r}); leave it unset"
      )
  return tr.TransformerConfig(**fields, **overrides)


def read_config(model_dir: str, **overrides: Any) -> tr.TransformerConfig:
  """The TransformerConfig of a model directory's config.json."""
  return config_from_hf(
    read_hf_config(model_dir),
    where=os.path.join(model_dir, CONFIG_FILE),
    **overrides,
  )


# --------------------------------------------------------------------------
# Tensors


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, (*prefix, key)))
    else:
      out[(*prefix, key)] = value
  return out


def _unflatten(flat: dict[tuple, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


# With sandwich norms (Gemma 3) HF's post_attention_layernorm is the
# attention output's norm and our pre-MLP norm is its pre_feedforward one.
_SANDWICH_RENAMES = {
  ("layers", "post_attention_norm", "scale"): (
    _L + "pre_feedforward_layernorm.weight"
  ),
}


def _rows(shapes: dict[tuple, tuple]) -> Iterator[tuple[tuple, str, str]]:
  """The rows of TENSORS for the parameters the model has."""
  known = {row[0] for row in TENSORS}
  unknown = [p for p in shapes if p not in known]
  if unknown:
    raise ValueError(f"no Hugging Face name for parameter {unknown[0]}")
  sandwich = ("layers", "mlp_output_norm", "scale") in shapes
  for path, name, layout in TENSORS:
    if path in shapes:
      if sandwich:
        name = _SANDWICH_RENAMES.get(path, name)
      yield path, name, layout


def _hf_names(path: tuple, name: str, num_layers: int) -> list[str]:
  if path[0] == "layers":
    return [name.format(i=i) for i in range(num_layers)]
  return [name]


def param_shapes(config: tr.TransformerConfig) -> dict[tuple, tuple]:
  """Our parameter path -> shape, without building the model."""
  model = jax.eval_shape(lambda: _abstract_model(config))
  return {p: tuple(v.shape) for p, v in _flatten(model).items()}


def _abstract_model(config):
  from flax import nnx

  return nnx.to_pure_dict(
    nnx.state(tr.Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
  )


def load_params(
  model_dir: str,
  config: tr.TransformerConfig,
  shardings: Any = None,
) -> dict:
  """The checkpoint's parameters as our pure-dict parameter tree (float32).

  Args:
    model_dir: a directory with model.safetensors (or an index and shards).
    config: the model's config (`read_config(model_dir)`, maybe overridden
      in runtime options).
    shardings: None, or a tree of `jax.sharding.Sharding`s shaped like the
      parameters (`sharding.param_shardings`): then every array is built on
      its devices, each host reading only the slices its devices hold.

  Returns:
    The `nnx.to_pure_dict` tree of the Param state: NumPy arrays without
    shardings, `jax.Array`s with them.

  Raises:
    ValueError: a missing tensor, a tensor of another shape, or a tensor
      the model would not use, naming it and its file.
  """
  store = safetensors_io.SafetensorsDir(model_dir)
  shapes = param_shapes(config)
  flat_shardings = None if shardings is None else _flatten(shardings)
  used = set()
  flat = {}
  for path, name, layout in _rows(shapes):
    names = _hf_names(path, name, config.num_layers)
    stacked = path[0] == "layers"
    shape = shapes[path]
    layer_shape = shape[1:] if stacked else shape
    want = _layout_to_hf_shape(layout, layer_shape)
    for n in names:
      if n not in store.weight_map:
        raise ValueError(
          f"{model_dir}: tensor {n} (for parameter {'.'.join(path)}) is missing"
        )
      if store.shape(n) != want:
        raise ValueError(
          f"{store.where(n)}: tensor {n} has shape {store.shape(n)}, the"
          f" config.json asks for {want}"
        )
    used.update(names)
    read = _cached(_slice_reader(store, names, layout, layer_shape, stacked))
    if flat_shardings is None:
      flat[path] = read(tuple(slice(None) for _ in shape))
    else:
      flat[path] = jax.make_array_from_callback(
        shape, flat_shardings[path], read
      )
  if config.tie_embeddings:
    used.add("lm_head.weight")  # some tied checkpoints store the copy
  unused = [
    n
    for n in store.keys()
    if n not in used and not n.endswith(_IGNORED_SUFFIXES)
  ]
  if unused:
    raise ValueError(
      f"{store.where(unused[0])}: tensor {unused[0]} is not used by the"
      f" model that config.json describes (an unsupported feature?);"
      f" {len(unused)} unused in all"
    )
  return _unflatten(flat)


def _slice_reader(
  store: safetensors_io.SafetensorsDir,
  names: list[str],
  layout: str,
  layer_shape: tuple[int, ...],
  stacked: bool,
) -> Callable[[tuple], np.ndarray]:
  """index (a tuple of slices into our global shape) -> float32 block."""

  def read(index: tuple) -> np.ndarray:
    index = tuple(index)
    if not stacked:
      view = _to_ours(layout, store.get(names[0]), layer_shape)
      return np.asarray(view[index], np.float32)
    layers = range(len(names))[index[0]]
    rest = index[1:]
    return np.stack(
      [
        np.asarray(
          _to_ours(layout, store.get(names[i]), layer_shape)[rest], np.float32
        )
        for i in layers
      ]
    ).reshape(
      (len(layers), *_sliced_shape(layer_shape, rest))
    )  # keeps the shape when no layer is asked for

  return read


def _cached(read: Callable[[tuple], np.ndarray]) -> Callable:
  """`read`, reading each distinct slice once: devices holding the same
  slice (replicas) share one host copy while one parameter is built."""
  blocks: dict[tuple, np.ndarray] = {}

  def cached(index: tuple) -> np.ndarray:
    key = tuple(
      (s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index
    )
    if key not in blocks:
      blocks[key] = read(index)
    return blocks[key]

  return cached


def _sliced_shape(shape: tuple[int, ...], index: tuple) -> tuple[int, ...]:
  return tuple(len(range(n)[s]) for n, s in zip(shape, index))


# --------------------------------------------------------------------------
# Export


def hf_config(config: tr.TransformerConfig, model_type: str) -> dict:
  """The config.json of `config` as a `model_type` checkpoint.

  Raises:
    ValueError: the family cannot express the architecture (the field named).
  """
  if model_type not in FAMILIES:
    raise ValueError(
      f"model_type={model_type!r} is not supported; supported:"
      f" {sorted(FAMILIES)}"
    )
  c = config
  family = FAMILIES[model_type]
  hf: dict[str, Any] = {
    "architectures": [family.architecture],
    "model_type": model_type,
    "vocab_size": c.vocab_size,
    "hidden_size": c.embed_dim,
    "intermediate_size": c.mlp_dim,
    "num_hidden_layers": c.num_layers,
    "num_attention_heads": c.num_heads,
    "num_key_value_heads": c.num_kv_heads,
    "head_dim": c.head_dim,
    "hidden_act": {v: k for k, v in _ACTIVATIONS.items()}[c.mlp_activation],
    "rms_norm_eps": c.norm_eps,
    "rope_theta": c.rope_theta,
    "tie_word_embeddings": c.tie_embeddings,
    "attention_bias": c.qkv_bias and family.qkv_bias,
    "max_position_embeddings": max(
      c.rope_original_max_positions, c.sliding_window
    ),
    "torch_dtype": "float32",
  }
  if c.rope_scaling != "none":
    hf["rope_scaling"] = {
      "rope_type": c.rope_scaling,
      "factor": c.rope_scaling_factor,
    }
    if c.rope_scaling == "llama3":
      hf["rope_scaling"].update(
        low_freq_factor=c.rope_low_freq_factor,
        high_freq_factor=c.rope_high_freq_factor,
        original_max_position_embeddings=c.rope_original_max_positions,
      )
  if family.sandwich:
    hf["hidden_activation"] = hf["hidden_act"]
    scalar = c.query_pre_attn_scalar  # transformers wants an int here
    hf["query_pre_attn_scalar"] = int(scalar) if scalar.is_integer() else scalar
    hf["attn_logit_softcapping"] = c.attn_logit_softcap or None
    hf["final_logit_softcapping"] = c.final_logit_softcap or None
  if family.local_rope:
    hf["rope_local_base_freq"] = c.rope_local_theta
  windows = c.layer_windows()
  if family.sliding == "all":
    hf["sliding_window"] = c.sliding_window or None
  elif family.sliding == "gemma":
    hf["sliding_window"] = c.sliding_window
    hf["layer_types"] = [
      "sliding_attention" if w else "full_attention" for w in windows
    ]
  elif family.sliding == "qwen":
    hf["use_sliding_window"] = bool(any(windows))
    hf["sliding_window"] = c.sliding_window or None
    hf["max_window_layers"] = c.num_layers
    hf["layer_types"] = [
      "sliding_attention" if w else "full_attention" for w in windows
    ]
  elif any(windows):
    raise ValueError(
      f"model_type={model_type!r} has no sliding-window layers"
      f" (model.sliding_window={c.sliding_window})"
    )
  # The family must give back exactly our architecture.
  back = config_from_hf(hf, where=f"the {model_type} config.json")
  for field in dataclasses.fields(tr.TransformerConfig):
    mine, theirs = getattr(c, field.name), getattr(back, field.name)
    if field.name in _RUNTIME_FIELDS or mine == theirs:
      continue
    if (
      field.name == "layer_types" and c.layer_windows() == back.layer_windows()
    ):
      continue
    raise ValueError(
      f"model_type={model_type!r} cannot express model.{field.name}={mine!r}"
      f" (it would read back as {theirs!r})"
    )
  return hf


# Fields that do not change the function the model computes.
_RUNTIME_FIELDS = (
  "init_std",
  "dtype",
  "attention",
  "remat",
  "remat_policy",
  "scan_layers",
  "logprobs",
  "logprobs_chunk_size",
)


def _host_array(x: Any) -> np.ndarray:
  """The full value of a (possibly multi-host sharded) array, on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def hf_tensors(
  params: dict, config: tr.TransformerConfig, dtype: Any = np.float32
) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) for every tensor, in the table's order, lazily."""
  flat = _flatten(params)
  shapes = {p: tuple(np.shape(v)) for p, v in flat.items()}
  for path, name, layout in _rows(shapes):
    full = _host_array(flat[path])
    if path[0] == "layers":
      for i in range(config.num_layers):
        yield name.format(i=i), _to_hf(layout, full[i]).astype(dtype)
    else:
      yield name, _to_hf(layout, full).astype(dtype)


def save(
  params: dict,
  config: tr.TransformerConfig,
  out_dir: str,
  *,
  model_type: str,
  dtype: str = "float32",
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
  copy_tokenizer_from: str | None = None,
) -> list[str]:
  """Writes `params` as a Hugging Face model directory.

  Args:
    params: our parameter tree (`nnx.to_pure_dict` of the Param state).
    config: the model's config.
    out_dir: the directory to write (created).
    model_type: the family to write ("llama", "qwen2", …; `FAMILIES`).
    dtype: "float32" or "bfloat16" tensors.
    max_shard_bytes: above this the tensors go to several files + index.
    copy_tokenizer_from: a model directory whose tokenizer files (and
      generation_config.json) are copied beside the weights.

  Returns:
    The safetensors files written. In a multi-host run every process must
    call it (the arrays are gathered); only process 0 writes.
  """
  np_dtype = {"float32": np.float32, "bfloat16": safetensors_io.DTYPES["BF16"]}
  if dtype not in np_dtype:
    raise ValueError(f"dtype must be one of {sorted(np_dtype)}, got {dtype!r}")
  hf = hf_config(config, model_type)
  hf["torch_dtype"] = dtype
  tensors = hf_tensors(params, config, np_dtype[dtype])
  if jax.process_index() != 0:
    for _ in tensors:  # every process takes part in the gathers
      pass
    return []
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(hf, f, indent=2)
  names = safetensors_io.write_dir(
    out_dir,
    tensors,
    max_shard_bytes=max_shard_bytes,
    metadata={"format": "pt"},
  )
  if copy_tokenizer_from:
    for name in TOKENIZER_FILES:
      source = os.path.join(copy_tokenizer_from, name)
      if os.path.isfile(source):
        shutil.copyfile(source, os.path.join(out_dir, name))
  return names


def load_model(model_dir: str, **overrides: Any):
  """The Transformer of a model directory (host memory; tests and tools)."""
  from flax import nnx

  config = read_config(model_dir, **overrides)
  graphdef, state = nnx.split(
    nnx.eval_shape(lambda: tr.Transformer(config, rngs=nnx.Rngs(0)))
  )
  params = jax.tree.map(jnp.asarray, load_params(model_dir, config))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def model_config(block: Any) -> tr.TransformerConfig:
  """The TransformerConfig of a `model.*` block (`name="transformer"`).

  With `model.init_from_hf=DIR` the architecture is DIR's config.json and
  the block may set only options that keep the function (dtype, remat,
  attention, logprobs, …); without it, `transformer.config_from_model_block`.

  Raises:
    ValueError: naming the model.* key (unknown, or fixed by the checkpoint).
  """
  given = dict(block.items())
  directory = given.pop("init_from_hf", None)
  if not directory:
    return tr.config_from_model_block(given)
  given.pop("name", None)
  if given.pop("preset", None) is not None:
    raise ValueError(
      "model.preset and model.init_from_hf exclude each other (the"
      " checkpoint's config.json gives the sizes)"
    )
  fields = [f.name for f in dataclasses.fields(tr.TransformerConfig)]
  for key in given:
    if key not in fields:
      raise ValueError(
        f"unknown config key model.{key}; valid keys: init_from_hf, {fields}"
      )
  if not os.path.isdir(directory):
    raise ValueError(f"model.init_from_hf={directory!r} is not a directory")
  overrides = {k: v for k, v in given.items() if v is not None}
  return read_config(directory, **overrides)
