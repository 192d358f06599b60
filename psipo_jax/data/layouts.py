"""From one raw record to a (prompt, chosen, rejected) text pair.

Layouts (the field names are configurable, `input.fields`):

- "prompt_response": {"prompt": str, "chosen": str, "rejected": str}.
- "shared_prefix": {"chosen": str, "rejected": str}, each a whole conversation
  sharing its beginning (Anthropic HH style). The prompt is the longest common
  prefix of the two strings, cut back to end just after the last occurrence of
  `response_marker` (default "\\n\\nAssistant:") inside it, so that a response
  is never split inside a word or a turn even when the two responses start
  alike (" Yes." vs " Yes, and..."). With `response_marker=""` the prompt is
  the longest common prefix itself.
- "chat": {"prompt": [message, ...], "chosen": [message, ...], "rejected":
  [message, ...]}, a message being {"role": str, "content": str}.
- "chat_shared_prefix": {"chosen": [message, ...], "rejected": [message, ...]},
  whole conversations; the prompt is their longest common run of messages.

Chat messages are rendered with a template holding one "{content}" (and
optionally "{role}"), e.g. "<|{role}|>\\n{content}\\n". The prompt text is the
rendered prompt messages followed by the part of the template before
"{content}" for the first response message (the generation prompt), so that
prompt + response is exactly the rendered conversation.

Or the template is "hf:DIR", a Hugging Face model directory's own Jinja
chat template (`psipo_jax.data.chat_template`, rendered as transformers
does): the prompt is the prompt messages rendered with the generation
prompt, a response the rest of the whole conversation's rendering (the
final assistant turn, closed as the template closes it). The template then
writes the special tokens, so such a config sets `add_bos` and
`append_eos` False. A record the template refuses (`raise_exception`), or
whose prompt does not render as a prefix of the conversation, is invalid.

Optional fields: "weight" (finite, >= 0), "margin" (finite) and "id" (string
or integer; default: the caller's `default_id`, which the `preference_pairs`
builder makes "<path relative to the dataset's common directory>:<line or
record index>", see `readers.Location.default_id`). Instead of "margin" a
record may give each response's scalar reward, "chosen_reward" and
"rejected_reward" (both, finite; e.g. UltraFeedback's "score_chosen" and
"score_rejected"): its margin is then chosen_reward - rejected_reward, the
reward difference REBEL regresses on. A record giving a margin and rewards,
or one reward alone, is invalid.

Every text used (prompt, responses, chat roles and contents, string ids) must
be Unicode: JSON can escape half of a UTF-16 surrogate pair ("\\ud83d", e.g.
an emoji cut in two), which no UTF-8 writer accepts; such a record is invalid
("invalid_unicode", naming the field and character).

`parse_pair` raises `InvalidRecord` for a record that cannot be used, and
`IdenticalResponses` for one whose chosen and rejected are the same (dropped
and counted, never an error).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

from psipo_jax.data import chat_template

EXPLICIT_PROMPT_LAYOUTS = ("prompt_response", "chat")
# input.chat_template="hf:DIR": DIR's Jinja chat template.
HF_TEMPLATE_PREFIX = "hf:"
CHAT_LAYOUTS = ("chat", "chat_shared_prefix")
# Optional per-response rewards whose difference is the pair's margin.
REWARD_ROLES = ("chosen_reward", "rejected_reward")


class InvalidRecord(Exception):
  """A record that cannot be used; `kind` is the counter it is tallied under."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind
    self.message = message


class IdenticalResponses(Exception):
  """Chosen and rejected are the same: the pair carries no preference."""


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  id: str
  prompt: str
  chosen: str
  rejected: str
  weight: float | None = None
  margin: float | None = None


def detect_layout(value: Any, fields: Mapping[str, str]) -> str:
  """The layout of a record, from whether it has a prompt and holds strings."""
  if not isinstance(value, Mapping):
    raise InvalidRecord(
      "not_an_object", f"a record must be a JSON object, got {value!r:.80}"
    )
  chosen = value.get(fields["chosen"])
  is_chat = isinstance(chosen, list)
  if fields["prompt"] in value:
    return "chat" if is_chat else "prompt_response"
  return "chat_shared_prefix" if is_chat else "shared_prefix"


def parse_pair(
  value: Any,
  *,
  layout: str,
  fields: Mapping[str, str],
  response_marker: str,
  chat_template: str,
  default_id: str,
) -> PreferencePair:
  """Validates one record and splits it into prompt and responses."""
  if not isinstance(value, Mapping):
    raise InvalidRecord(
      "not_an_object", f"a record must be a JSON object, got {value!r:.80}"
    )
  explicit_prompt = layout in EXPLICIT_PROMPT_LAYOUTS
  for role in (
    ("prompt", "chosen", "rejected")
    if explicit_prompt
    else ("chosen", "rejected")
  ):
    if fields[role] not in value:
      raise InvalidRecord(
        "missing_field", f"missing field {fields[role]!r} (layout {layout})"
      )

  if layout in CHAT_LAYOUTS:
    prompt_messages = (
      _messages(value, fields["prompt"]) if explicit_prompt else None
    )
    chosen_messages = _messages(value, fields["chosen"])
    rejected_messages = _messages(value, fields["rejected"])
    if chosen_messages == rejected_messages:
      raise IdenticalResponses()
    prompt, chosen, rejected = split_chat(
      prompt_messages,
      chosen_messages,
      rejected_messages,
      template=chat_template,
    )
  else:
    chosen = _text(value, fields["chosen"])
    rejected = _text(value, fields["rejected"])
    for role, text in (("chosen", chosen), ("rejected", rejected)):
      if not text.strip():
        raise InvalidRecord("empty_response", f"{fields[role]!r} is empty")
    if chosen == rejected:
      raise IdenticalResponses()
    if explicit_prompt:
      prompt = _text(value, fields["prompt"])
    else:
      prompt, chosen, rejected = split_shared_prefix(
        chosen, rejected, marker=response_marker
      )
    for role, text in (("chosen", chosen), ("rejected", rejected)):
      if not text.strip():
        other = "rejected" if role == "chosen" else "chosen"
        raise InvalidRecord(
          "empty_response",
          f"{fields[role]!r} is empty once the shared prompt is split off"
          f" (it is a prefix of {fields[other]!r})",
        )
  return PreferencePair(
    id=_record_id(value, fields["id"], default_id),
    prompt=prompt,
    chosen=chosen,
    rejected=rejected,
    weight=_optional_number(value, fields["weight"], minimum=0.0),
    margin=_margin(value, fields),
  )


def _margin(
  value: Mapping[str, Any], fields: Mapping[str, str]
) -> float | None:
  """The record's margin: its "margin" field, or chosen_reward -
  rejected_reward when it gives the two rewards instead (None: neither)."""
  margin = _optional_number(value, fields["margin"])
  rewards = {r: _optional_number(value, fields[r]) for r in REWARD_ROLES}
  given = [fields[r] for r, x in rewards.items() if x is not None]
  if not given:
    return margin
  if margin is not None:
    raise InvalidRecord(
      "bad_value",
      f"field {fields['margin']!r} and the reward field {given[0]!r} are both"
      " given: the margin is the rewards' difference, give one or the other",
    )
  if len(given) == 1:
    (missing,) = {fields[r] for r in REWARD_ROLES} - set(given)
    raise InvalidRecord(
      "missing_field",
      f"field {given[0]!r} is given without {missing!r}: a margin needs the"
      " rewards of both responses",
    )
  difference = rewards["chosen_reward"] - rewards["rejected_reward"]
  if not math.isfinite(difference):
    raise InvalidRecord(
      "bad_value",
      f"the rewards {given} differ by {difference} (float overflow)",
    )
  return difference


def split_shared_prefix(
  chosen: str, rejected: str, *, marker: str
) -> tuple[str, str, str]:
  """(prompt, chosen response, rejected response) of two whole conversations."""
  cut = len(os.path.commonprefix([chosen, rejected]))
  if marker:
    last = chosen.rfind(marker, 0, cut)  # wholly inside the shared prefix
    if last < 0:
      raise InvalidRecord(
        "no_response_marker",
        f"the response marker {marker!r} does not occur in the prefix shared by"
        " chosen and rejected; set input.response_marker to the text that opens"
        " a response, or to '' to split at the longest common prefix",
      )
    cut = last + len(marker)
  return chosen[:cut], chosen[cut:], rejected[cut:]


def split_chat(
  prompt_messages: list[tuple[str, str]] | None,
  chosen_messages: list[tuple[str, str]],
  rejected_messages: list[tuple[str, str]],
  *,
  template: str,
) -> tuple[str, str, str]:
  """Renders (prompt, chosen, rejected) texts from (role, content) messages."""
  if prompt_messages is None:
    shared = 0
    for a, b in zip(chosen_messages, rejected_messages):
      if a != b:
        break
      shared += 1
    prompt_messages = chosen_messages[:shared]
    chosen_messages = chosen_messages[shared:]
    rejected_messages = rejected_messages[shared:]
  for side, messages in (
    ("chosen", chosen_messages),
    ("rejected", rejected_messages),
  ):
    if not "".join(content for _, content in messages).strip():
      raise InvalidRecord(
        "empty_response", f"the {side} response has no content"
      )
  if chosen_messages[0][0] != rejected_messages[0][0]:
    raise InvalidRecord(
      "bad_value",
      f"the chosen response starts with role {chosen_messages[0][0]!r} but the"
      f" rejected one with {rejected_messages[0][0]!r}",
    )
  if template.startswith(HF_TEMPLATE_PREFIX):
    return _split_with_model_template(
      template[len(HF_TEMPLATE_PREFIX) :],
      prompt_messages,
      chosen_messages,
      rejected_messages,
    )
  header, footer = template.split("{content}")

  def render(messages):
    return "".join(
      header.replace("{role}", role) + content + footer.replace("{role}", role)
      for role, content in messages
    )

  def response(messages):
    (role, content), rest = messages[0], messages[1:]
    return content + footer.replace("{role}", role) + render(rest)

  prompt = render(prompt_messages) + header.replace(
    "{role}", chosen_messages[0][0]
  )
  return prompt, response(chosen_messages), response(rejected_messages)


@functools.lru_cache(maxsize=4)
def model_chat_template(directory: str) -> chat_template.ChatTemplate:
  """The Jinja chat template of a model directory (read once)."""
  return chat_template.ChatTemplate.from_model_dir(directory)


def _split_with_model_template(
  directory, prompt_messages, chosen_messages, rejected_messages
):
  import jinja2  # only reached once a template was compiled

  template = model_chat_template(directory)

  def as_dicts(messages):
    return [{"role": role, "content": content} for role, content in messages]

  try:
    prompt = template.render(
      as_dicts(prompt_messages), add_generation_prompt=True
    )
    responses = []
    for side, messages in (
      ("chosen", chosen_messages),
      ("rejected", rejected_messages),
    ):
      whole = template.render(as_dicts(prompt_messages + messages))
      if not whole.startswith(prompt):
        raise InvalidRecord(
          "bad_value",
          f"{template.source}: the prompt with the generation prompt does not"
          f" render as a prefix of the {side} conversation",
        )
      responses.append(whole[len(prompt) :])
  except jinja2.TemplateError as e:
    raise InvalidRecord(
      "bad_value", f"{template.source} refuses the conversation: {e}"
    ) from None
  return prompt, responses[0], responses[1]


def _text(value: Mapping[str, Any], field: str) -> str:
  text = value[field]
  if not isinstance(text, str):
    raise InvalidRecord(
      "wrong_type", f"field {field!r} must be a string, got {text!r:.80}"
    )
  return _unicode(text, field)


def _unicode(text: str, where: str) -> str:
  """`text`, checked to be encodable as UTF-8 (no lone surrogates)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise InvalidRecord(
      "invalid_unicode",
      f"field {where!r} holds {text[e.start : e.end]!r} at character {e.start}: a lone"
      " UTF-16 surrogate (half of a pair, e.g. an emoji cut in two), which is not"
      " Unicode text",
    ) from None
  return text


def _messages(value: Mapping[str, Any], field: str) -> list[tuple[str, str]]:
  messages = value[field]
  if not isinstance(messages, list):
    raise InvalidRecord(
      "wrong_type",
      f"field {field!r} must be a list of chat messages, got {messages!r:.80}",
    )
  out = []
  for i, message in enumerate(messages):
    if (
      not isinstance(message, Mapping)
      or not isinstance(message.get("role"), str)
      or not isinstance(message.get("content"), str)
    ):
      raise InvalidRecord(
        "wrong_type",
        f"{field}[{i}] must be {{'role': str, 'content': str}}, got {message!r:.80}",
      )
    out.append(
      (
        _unicode(message["role"], f"{field}[{i}].role"),
        _unicode(message["content"], f"{field}[{i}].content"),
      )
    )
  return out


def _record_id(value: Mapping[str, Any], field: str, default: str) -> str:
  record_id = value.get(field)
  if record_id is None:
    return default
  if isinstance(record_id, bool) or not isinstance(
    record_id, (str, numbers.Integral)
  ):
    raise InvalidRecord(
      "wrong_type", f"field {field!r} must be a string or an integer"
    )
  if record_id == "":
    raise InvalidRecord("bad_value", f"field {field!r} is empty")
  return _unicode(str(record_id), field)


def _optional_number(
  value: Mapping[str, Any], field: str, *, minimum: float | None = None
) -> float | None:
  x = value.get(field)
  if x is None:
    return None
  if (
    isinstance(x, bool)
    or not isinstance(x, numbers.Real)
    or not math.isfinite(x)
  ):
    raise InvalidRecord(
      "bad_value", f"field {field!r} must be a finite number, got {x!r}"
    )
  if minimum is not None and x < minimum:
    raise InvalidRecord(
      "bad_value", f"field {field!r} must be >= {minimum}, got {x!r}"
    )
  return float(x)
