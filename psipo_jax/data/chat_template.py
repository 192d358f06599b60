"""A model's chat template, rendered as transformers renders it (Jinja).

A Hugging Face model directory holds its chat template in
`chat_template.jinja` or under "chat_template" in `tokenizer_config.json`
(a string, or a list of {"name", "template"} of which "default" is used).
`ChatTemplate.render` gives the same text as transformers'
`tokenizer.apply_chat_template(..., tokenize=False)`: the same sandboxed
Jinja environment (trim_blocks, lstrip_blocks, loop controls, the
`raise_exception`, `strftime_now` and non-escaping `tojson` helpers), the
tokenizer's named special tokens (bos_token, eos_token, …) as variables,
and messages with None-valued keys dropped. Tokenising that text without
adding special tokens (the template writes them) gives transformers' ids.

`encode_conversation` splits a conversation whose last message is the
assistant's into prompt ids (everything before that turn, with the
generation prompt) and response ids (that turn as the template closes it):
the loss mask covers the final assistant turn only, never earlier turns.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from psipo_jax.data import tokenizers as tokenizers_lib

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKEN_NAMES = (
  "bos_token",
  "eos_token",
  "unk_token",
  "sep_token",
  "pad_token",
  "cls_token",
  "mask_token",
)


def _token_text(token: Any) -> str | None:
  if isinstance(token, dict):  # AddedToken serialised as {"content": ...}
    token = token.get("content")
  return token if isinstance(token, str) else None


@functools.lru_cache(maxsize=16)
def _compile(template: str):
  try:
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.sandbox
  except ImportError:
    raise ImportError(
      "a chat template needs the `jinja2` package: pip install jinja2"
    ) from None

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(
    x, ensure_ascii=False, indent=None, separators=None, sort_keys=False
  ):
    # Jinja's own tojson escapes HTML characters; transformers' does not.
    return json.dumps(
      x,
      ensure_ascii=ensure_ascii,
      indent=indent,
      separators=separators,
      sort_keys=sort_keys,
    )

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  class Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant
    text with it) renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(
        self.call_method("_body"), [], [], body
      ).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True,
    lstrip_blocks=True,
    extensions=[Generation, jinja2.ext.loopcontrols],
  )
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(template)


class ChatTemplate:
  """A Jinja chat template and the special-token strings it may use."""

  def __init__(
    self,
    template: str,
    *,
    special_tokens: Mapping[str, str] | None = None,
    source: str = "chat template",
  ):
    self.template = template
    self.special_tokens = dict(special_tokens or {})
    self.source = source
    self._compiled = _compile(template)

  @classmethod
  def from_model_dir(cls, directory: str) -> ChatTemplate:
    """The template of a Hugging Face model (or tokenizer) directory."""
    config_path = os.path.join(directory, TOKENIZER_CONFIG)
    config: dict[str, Any] = {}
    if os.path.isfile(config_path):
      with open(config_path) as f:
        config = json.load(f)
    specials = {
      name: text
      for name in SPECIAL_TOKEN_NAMES
      if (text := _token_text(config.get(name))) is not None
    }
    file = os.path.join(directory, TEMPLATE_FILE)
    if os.path.isfile(file):
      with open(file) as f:
        return cls(f.read(), special_tokens=specials, source=file)
    template = config.get("chat_template")
    if isinstance(template, list):
      named = {t.get("name"): t.get("template") for t in template}
      if "default" not in named:
        raise ValueError(
          f"{config_path}: several chat templates {sorted(named)} and none"
          " named 'default'"
        )
      template = named["default"]
    if not isinstance(template, str):
      raise ValueError(
        f"{directory} has no chat template ({TEMPLATE_FILE}, or chat_template"
        f" in {TOKENIZER_CONFIG})"
      )
    return cls(template, special_tokens=specials, source=config_path)

  def render(
    self,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    **kwargs: Any,
  ) -> str:
    """The conversation's text, as transformers' apply_chat_template."""
    for i, message in enumerate(messages):
      if not isinstance(message, Mapping) or "role" not in message:
        raise ValueError(
          f"message {i} must be a mapping with a 'role', got {message!r}"
        )
    plain = [
      {k: v for k, v in message.items() if v is not None}
      for message in messages
    ]
    variables = {**self.special_tokens, **kwargs}
    return self._compiled.render(
      messages=plain,
      tools=None,
      documents=None,
      add_generation_prompt=add_generation_prompt,
      **variables,
    )


def encode_conversation(
  template: ChatTemplate,
  tokenizer: tokenizers_lib.Tokenizer,
  messages: Sequence[Mapping[str, Any]],
) -> tuple[np.ndarray, np.ndarray]:
  """(prompt ids [p], response ids [r]) int32 of a conversation whose last
  message is the assistant's; their concatenation is the whole rendered
  conversation's ids.

  Raises:
    ValueError: the last message is not the assistant's, or the template
      does not render the conversation so far as a prefix of the whole (the
      split would then not be where the final turn starts).
  """
  if not messages or messages[-1].get("role") != "assistant":
    raise ValueError(
      "a conversation to train on must end with the assistant's message,"
      f" got roles {[m.get('role') for m in messages]}"
    )
  prompt = template.render(messages[:-1], add_generation_prompt=True)
  full = template.render(messages)
  if not full.startswith(prompt):
    raise ValueError(
      f"{template.source}: the conversation without its final assistant turn"
      " (with the generation prompt) does not render as a prefix of the"
      " whole conversation, so the final turn cannot be told apart"
    )
  prompt_ids = tokenizer.encode(prompt)
  full_ids = tokenizer.encode(full)
  if not np.array_equal(full_ids[: len(prompt_ids)], prompt_ids):
    raise ValueError(
      f"{template.source}: the tokens of the prompt are not a prefix of the"
      " tokens of the whole conversation (a token spans the boundary of the"
      " final assistant turn)"
    )
  return prompt_ids, full_ids[len(prompt_ids) :]
