"""Record layouts: prompt/response splits, HH-style prefixes, chat rendering."""

import pytest

from psipo_jax.data import config as config_lib
from psipo_jax.data import layouts

FIELDS = {role: role for role in config_lib.FIELD_ROLES}
HH = "\n\nAssistant:"
TEMPLATE = "<|{role}|>\n{content}\n"


def parse(value, layout, **kw):
  options = dict(
    layout=layout,
    fields=FIELDS,
    response_marker=HH,
    chat_template=TEMPLATE,
    default_id="f.jsonl:1",
  )
  options.update(kw)
  return layouts.parse_pair(value, **options)


# ------------------------------------------------------------ shared prefix


def test_hh_single_turn_splits_after_the_marker():
  prompt = "\n\nHuman: Is the sky blue?\n\nAssistant:"
  pair = parse(
    {"chosen": prompt + " Yes.", "rejected": prompt + " No."}, "shared_prefix"
  )
  assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, " Yes.", " No.")


def test_hh_response_that_is_a_prefix_of_the_other_stays_whole():
  # The longest common prefix is all of chosen; the marker keeps " Yes." whole.
  prompt = "\n\nHuman: Is the sky blue?\n\nAssistant:"
  pair = parse(
    {"chosen": prompt + " Yes.", "rejected": prompt + " Yes. And the sea too."},
    "shared_prefix",
  )
  assert pair.prompt == prompt
  assert pair.chosen == " Yes."
  assert pair.rejected == " Yes. And the sea too."


def test_hh_multi_turn_splits_at_the_last_shared_marker():
  history = (
    "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant:"
  )
  pair = parse(
    {
      "chosen": history + " Blue is a colour.",
      "rejected": history + " Blue whales swim.",
    },
    "shared_prefix",
  )
  assert pair.prompt == history
  assert (pair.chosen, pair.rejected) == (
    " Blue is a colour.",
    " Blue whales swim.",
  )


def test_hh_divergence_before_the_last_turn():
  # The conversations differ at the first assistant turn: the prompt ends there,
  # and each response holds the rest of its own conversation.
  first = "\n\nHuman: Hi\n\nAssistant:"
  chosen = first + " Hello!\n\nHuman: Bye\n\nAssistant: Bye!"
  rejected = first + " Go away.\n\nHuman: Bye\n\nAssistant: Fine."
  pair = parse({"chosen": chosen, "rejected": rejected}, "shared_prefix")
  assert pair.prompt == first
  assert (
    pair.prompt + pair.chosen == chosen
    and pair.prompt + pair.rejected == rejected
  )


def test_plain_longest_common_prefix_without_marker():
  pair = parse(
    {"chosen": "Say hi: hello", "rejected": "Say hi: hey"},
    "shared_prefix",
    response_marker="",
  )
  assert (pair.prompt, pair.chosen, pair.rejected) == ("Say hi: he", "llo", "y")


def test_plain_prefix_response_is_an_invalid_record():
  with pytest.raises(layouts.InvalidRecord, match="prefix of 'rejected'") as e:
    parse(
      {"chosen": "Q: A", "rejected": "Q: AB"},
      "shared_prefix",
      response_marker="",
    )
  assert e.value.kind == "empty_response"


def test_missing_marker_is_an_invalid_record_naming_the_key():
  with pytest.raises(layouts.InvalidRecord, match="input.response_marker") as e:
    parse({"chosen": "Q? yes", "rejected": "Q? no"}, "shared_prefix")
  assert e.value.kind == "no_response_marker"


def test_identical_conversations_are_identical_not_invalid():
  with pytest.raises(layouts.IdenticalResponses):
    parse(
      {"chosen": "Q" + HH + " a", "rejected": "Q" + HH + " a"}, "shared_prefix"
    )


# ---------------------------------------------------------- prompt_response


def test_prompt_response_fields_and_options():
  pair = parse(
    {
      "prompt": "P",
      "chosen": "c",
      "rejected": "r",
      "weight": 2,
      "margin": -0.5,
      "id": 7,
    },
    "prompt_response",
  )
  assert pair == layouts.PreferencePair("7", "P", "c", "r", 2.0, -0.5)
  assert (
    parse({"prompt": "", "chosen": "c", "rejected": "r"}, "prompt_response").id
    == "f.jsonl:1"
  )


def test_the_two_rewards_make_the_margin():
  pair = parse(
    {
      "prompt": "P",
      "chosen": "c",
      "rejected": "r",
      "chosen_reward": 7.5,
      "rejected_reward": 9,
    },
    "prompt_response",
  )
  assert pair.margin == -1.5  # chosen_reward - rejected_reward
  # Renamed fields (input.fields.chosen_reward="score_chosen"): only the
  # mapped names are read.
  record = {"prompt": "P", "chosen": "c", "rejected": "r", "score_chosen": 2}
  record["rejected_reward"] = 0.5
  renamed = dict(FIELDS, chosen_reward="score_chosen")
  assert parse(record, "prompt_response", fields=renamed).margin == 1.5
  with pytest.raises(layouts.InvalidRecord, match="without 'chosen_reward'"):
    parse(record, "prompt_response")


@pytest.mark.parametrize(
  "rewards, kind, message",
  [
    (
      {"chosen_reward": 1.0},
      "missing_field",
      "'chosen_reward' is given without 'rejected_reward'",
    ),
    (
      {"rejected_reward": 1.0},
      "missing_field",
      "'rejected_reward' is given without 'chosen_reward'",
    ),
    (
      {"margin": 0.5, "chosen_reward": 1.0, "rejected_reward": 0.0},
      "bad_value",
      "'margin' and the reward field 'chosen_reward' are both given",
    ),
    (
      {"chosen_reward": "high", "rejected_reward": 0.0},
      "bad_value",
      "'chosen_reward' must be a finite number",
    ),
    (
      {"chosen_reward": 1e308, "rejected_reward": -1e308},
      "bad_value",
      "differ by inf",
    ),
  ],
)
def test_bad_rewards_are_named(rewards, kind, message):
  record = {"prompt": "P", "chosen": "c", "rejected": "r", **rewards}
  with pytest.raises(layouts.InvalidRecord, match=message) as e:
    parse(record, "prompt_response")
  assert e.value.kind == kind


@pytest.mark.parametrize(
  "record, kind, message",
  [
    (
      {"prompt": "P", "rejected": "r"},
      "missing_field",
      "missing field 'chosen'",
    ),
    (
      {"prompt": "P", "chosen": " \n", "rejected": "r"},
      "empty_response",
      "'chosen' is empty",
    ),
    (
      {"prompt": "P", "chosen": "c", "rejected": ""},
      "empty_response",
      "'rejected' is empty",
    ),
    (
      {"prompt": "P", "chosen": 3, "rejected": "r"},
      "wrong_type",
      "'chosen' must be a string",
    ),
    (
      {"prompt": "P", "chosen": "c", "rejected": "r", "weight": -1},
      "bad_value",
      "'weight'",
    ),
    (
      {"prompt": "P", "chosen": "c", "rejected": "r", "margin": float("nan")},
      "bad_value",
      "'margin' must be a finite number",
    ),
    (["not", "an", "object"], "not_an_object", "JSON object"),
  ],
)
def test_invalid_records(record, kind, message):
  with pytest.raises(layouts.InvalidRecord, match=message) as e:
    parse(record, "prompt_response")
  assert e.value.kind == kind


def test_renamed_fields():
  fields = dict(FIELDS, prompt="question", chosen="good", rejected="bad")
  pair = parse(
    {"question": "Q", "good": "g", "bad": "b"}, "prompt_response", fields=fields
  )
  assert (pair.prompt, pair.chosen, pair.rejected) == ("Q", "g", "b")
  with pytest.raises(layouts.InvalidRecord, match="missing field 'good'"):
    parse(
      {"question": "Q", "chosen": "g", "bad": "b"},
      "prompt_response",
      fields=fields,
    )


# ---------------------------------------------------------------------- chat


def msg(role, content):
  return {"role": role, "content": content}


def render(messages):
  return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)


def test_chat_with_explicit_prompt_renders_the_whole_conversation():
  prompt = [msg("system", "Be brief."), msg("user", "2+2?")]
  chosen, rejected = [msg("assistant", "4")], [msg("assistant", "5")]
  pair = parse(
    {"prompt": prompt, "chosen": chosen, "rejected": rejected}, "chat"
  )
  assert pair.prompt == render(prompt) + "<|assistant|>\n"
  assert (pair.chosen, pair.rejected) == ("4\n", "5\n")
  assert pair.prompt + pair.chosen == render(prompt + chosen)


def test_chat_shared_prefix_multi_turn():
  history = [
    msg("user", "Hi"),
    msg("assistant", "Hello"),
    msg("user", "Colour?"),
  ]
  chosen = history + [msg("assistant", "Blue")]
  rejected = history + [msg("assistant", "Blue whale"), msg("user", "Huh?")]
  pair = parse({"chosen": chosen, "rejected": rejected}, "chat_shared_prefix")
  assert pair.prompt == render(history) + "<|assistant|>\n"
  assert pair.prompt + pair.chosen == render(chosen)
  assert pair.prompt + pair.rejected == render(rejected)


def test_chat_conversation_that_is_a_prefix_of_the_other_is_invalid():
  a = [msg("user", "Hi"), msg("assistant", "Hello")]
  with pytest.raises(
    layouts.InvalidRecord, match="chosen response has no content"
  ) as e:
    parse(
      {"chosen": a, "rejected": a + [msg("user", "more")]}, "chat_shared_prefix"
    )
  assert e.value.kind == "empty_response"


def test_chat_bad_message_names_its_index():
  with pytest.raises(layouts.InvalidRecord, match=r"chosen\[1\] must be"):
    parse(
      {
        "prompt": [],
        "chosen": [msg("assistant", "a"), {"role": "x"}],
        "rejected": [],
      },
      "chat",
    )


def test_chat_identical_responses():
  with pytest.raises(layouts.IdenticalResponses):
    parse(
      {
        "prompt": [],
        "chosen": [msg("assistant", "a")],
        "rejected": [msg("assistant", "a")],
      },
      "chat",
    )


def test_detect_layout():
  assert (
    layouts.detect_layout({"prompt": "p", "chosen": "c"}, FIELDS)
    == "prompt_response"
  )
  assert (
    layouts.detect_layout({"chosen": "c", "rejected": "r"}, FIELDS)
    == "shared_prefix"
  )
  assert layouts.detect_layout({"prompt": [], "chosen": []}, FIELDS) == "chat"
  assert (
    layouts.detect_layout({"chosen": [], "rejected": []}, FIELDS)
    == "chat_shared_prefix"
  )
