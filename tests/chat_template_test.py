"""Chat templates: our ids equal transformers' apply_chat_template ids.

A byte-level BPE tokenizer is trained locally with `tokenizers` (no hub),
wrapped and saved by transformers with each chat template, and read back
by transformers and by us from the same directory.
"""

import numpy as np
import pytest

from psipo_jax.data import chat_template as ct
from psipo_jax.data import tokenizers as tokenizers_lib

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIALS = [
  "<s>",
  "</s>",
  "<|im_start|>",
  "<|im_end|>",
  "<|start_header_id|>",
  "<|end_header_id|>",
  "<|eot_id|>",
  "<start_of_turn>",
  "<end_of_turn>",
]
TEMPLATES = {
  # Qwen2.5's shape: a default system prompt when there is none.
  "chatml": (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "{%- if not (message.role == 'system' and loop.first) %}\n"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content"
    " + '<|im_end|>' + '\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
  ),
  # Llama 3's shape: BOS from the tokenizer's special tokens, trimmed text.
  "llama3": (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
  ),
  # Gemma's shape: role renaming and raise_exception.
  "gemma": (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim"
    " + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
  ),
  # TRL-style assistant masking markers, which render their body unchanged.
  "generation": (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
  ),
  # Blocks without "-": trim_blocks and lstrip_blocks decide the text; tojson
  # must keep non-ASCII characters.
  "plain": (
    "{% for message in messages %}\n"
    "    {% if message.role == 'system' %}\n"
    "System: {{ message.content | tojson }}\n"
    "    {% else %}\n"
    "{{ message.role | capitalize }}: {{ message.content }}{{ eos_token }}\n"
    "    {% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "Assistant:{% endif %}"
  ),
}
CONVERSATIONS = [
  [
    {"role": "system", "content": "Tu es un assistant concis. Réponds vite."},
    {"role": "user", "content": "Wie heißt die Hauptstadt? 日本の首都は？"},
    {"role": "assistant", "content": "Tokyo (東京). ✅"},
    {"role": "user", "content": "  And a number: 42 😀  "},
    {"role": "assistant", "content": "Forty-two, naïvely.\n"},
  ],
  [
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How can I help — ça va?"},
  ],
  [
    {"role": "user", "content": "one"},
    {"role": "assistant", "content": "two"},
    {"role": "user", "content": "three, ελληνικά"},
    {"role": "assistant", "content": "four", "name": None},
  ],
]


def _corpus():
  text = (
    " ".join(m["content"] for c in CONVERSATIONS for m in c)
    + " the quick brown fox jumps over the lazy dog assistant user system"
  )
  return [text] * 20


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def model_dir(request, tmp_path_factory):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
    add_prefix_space=False
  )
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=SPECIALS,
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(_corpus(), trainer)
  hf = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>"
  )
  hf.chat_template = TEMPLATES[request.param]
  directory = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(directory)
  return request.param, str(directory)


def _hf_ids(hf, messages, **kwargs):
  out = hf.apply_chat_template(messages, tokenize=True, **kwargs)
  if hasattr(out, "keys"):
    out = out["input_ids"]
  return list(out)


def _conversations(name):
  if name == "gemma":  # no system role
    return [c[1:] if c[0]["role"] == "system" else c for c in CONVERSATIONS]
  return CONVERSATIONS


def test_rendered_ids_equal_transformers_and_the_final_turn_is_the_response(
  model_dir,
):
  name, directory = model_dir
  hf = transformers.AutoTokenizer.from_pretrained(directory)
  template = ct.ChatTemplate.from_model_dir(directory)
  tokenizer = tokenizers_lib.make_tokenizer(f"hf:{directory}/tokenizer.json")
  for messages in _conversations(name):
    text = template.render(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False)
    prompt, response = ct.encode_conversation(template, tokenizer, messages)
    assert np.concatenate([prompt, response]).tolist() == _hf_ids(hf, messages)
    assert prompt.tolist() == _hf_ids(
      hf, messages[:-1], add_generation_prompt=True
    )
    # The response is the final assistant turn only: its text, and none of
    # the earlier assistant turns.
    decoded = tokenizer.decode(response)
    assert messages[-1]["content"].strip() in decoded
    for earlier in messages[:-1]:
      assert earlier["content"].strip() not in decoded


def test_template_errors_and_a_conversation_not_ending_with_the_assistant(
  model_dir,
):
  name, directory = model_dir
  template = ct.ChatTemplate.from_model_dir(directory)
  tokenizer = tokenizers_lib.make_tokenizer(f"hf:{directory}/tokenizer.json")
  with pytest.raises(ValueError, match="must end with the assistant"):
    ct.encode_conversation(template, tokenizer, CONVERSATIONS[1][:1])
  if name == "gemma":
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="System role"):
      template.render(CONVERSATIONS[0])


def test_a_directory_without_a_template_is_named(tmp_path):
  with pytest.raises(ValueError, match=f"{tmp_path} has no chat template"):
    ct.ChatTemplate.from_model_dir(str(tmp_path))


def test_a_template_in_tokenizer_config_json_is_read(tmp_path):
  import json

  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps(
      {
        "bos_token": {"content": "<s>"},
        "chat_template": [
          {"name": "tool_use", "template": "unused"},
          {"name": "default", "template": TEMPLATES["llama3"]},
        ],
      }
    )
  )
  template = ct.ChatTemplate.from_model_dir(str(tmp_path))
  text = template.render(CONVERSATIONS[1], add_generation_prompt=True)
  assert text == (
    "<s><|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHi! How can I help —"
    " ça va?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
  )


def test_chat_records_through_the_pair_pipeline_give_transformers_ids(
  model_dir, tmp_path
):
  from psipo_jax.data import make_preference_iterator
  from psipo_jax.data.testing import experiment_config
  from psipo_jax.data.testing import write_jsonl

  name, directory = model_dir
  hf = transformers.AutoTokenizer.from_pretrained(directory)
  records = []
  for i, messages in enumerate(_conversations(name)):
    records.append(
      {
        "id": f"c{i}",
        "prompt": messages[:-1],
        "chosen": messages[-1:],
        "rejected": [{"role": "assistant", "content": f"No idea, {i}."}],
      }
    )
  write_jsonl(tmp_path / "chat.jsonl", records)
  config = experiment_config(
    data_dir=tmp_path / "tfds",
    files=str(tmp_path / "chat.jsonl"),
    layout="chat",
    tokenizer=f"hf:{directory}",
    chat_template=f"hf:{directory}",
    add_bos=False,
    append_eos=False,
    batch_size=1,
    max_length=160,
    max_prompt_length=128,
    return_ids=True,
  )
  rows = {}
  for batch in make_preference_iterator(config, "train", num_epochs=1):
    rows[str(batch["id"][0])] = {k: v[0] for k, v in batch.items()}
  assert len(rows) == len(records)
  for record in records:
    row = rows[record["id"]]
    prompt_ids = _hf_ids(hf, record["prompt"], add_generation_prompt=True)
    for side in ("chosen", "rejected"):
      real = row[f"{side}_attention_mask"] == 1
      ids = row[f"{side}_input_ids"][real].tolist()
      assert ids == _hf_ids(hf, record["prompt"] + record[side])
      mask = row[f"{side}_loss_mask"][real]
      # The loss mask covers the final assistant turn only.
      assert mask.tolist() == [0] * len(prompt_ids) + [1] * (
        len(ids) - len(prompt_ids)
      )


def test_a_model_template_config_is_checked(model_dir, tmp_path):
  from psipo_jax.data import config as config_lib
  from psipo_jax.data.testing import experiment_config

  _, directory = model_dir
  base = dict(
    data_dir=str(tmp_path / "tfds"),
    files=str(tmp_path / "x.jsonl"),
    chat_template=f"hf:{directory}",
    add_bos=False,
    append_eos=False,
  )
  config_lib.parse_input_config(experiment_config(**base))
  for key in ("add_bos", "append_eos"):
    with pytest.raises(ValueError, match=f"input.{key} must be False"):
      config_lib.parse_input_config(experiment_config(**{**base, key: True}))
  with pytest.raises(ValueError, match="input.chat_template='hf:.*no chat"):
    config_lib.parse_input_config(
      experiment_config(**{**base, "chat_template": f"hf:{tmp_path}"})
    )
