"""Truncation policy, packing and loss masks of one pair (byte tokenizer)."""

import numpy as np
import pytest

from psipo_jax.data import encoding
from psipo_jax.data import tokenizers

BOS, EOS, PAD = 1, 2, 0


def ids(n, start=10):
  return np.arange(start, start + n, dtype=np.int32)


def truncate(p, c, r, *, max_length, max_prompt_length, keep_first=1):
  return encoding.truncate_pair(
    p,
    c,
    r,
    max_length=max_length,
    max_prompt_length=max_prompt_length,
    keep_first=keep_first,
  )


def test_nothing_cut_when_it_fits():
  p, c, r = np.r_[BOS, ids(5)], ids(4, 100), ids(6, 200)
  out = truncate(p, c, r, max_length=12, max_prompt_length=2)
  for got, want in zip(out, (p, c, r)):
    np.testing.assert_array_equal(got, want)


def test_prompt_cut_only_as_much_as_needed_keeping_bos_and_its_end():
  p, c, r = np.r_[BOS, ids(9)], ids(4, 100), ids(6, 200)  # P=10, R=6, L=12
  prompt, chosen, rejected = truncate(
    p, c, r, max_length=12, max_prompt_length=3
  )
  np.testing.assert_array_equal(
    prompt, np.r_[BOS, ids(9)[-5:]]
  )  # k = 12 - 6 = 6
  np.testing.assert_array_equal(chosen, c)
  np.testing.assert_array_equal(rejected, r)


def test_prompt_never_below_max_prompt_length_then_responses_cut_from_the_end():
  p, c, r = np.r_[BOS, ids(9)], ids(4, 100), ids(8, 200)  # P=10, R=8, L=12, M=6
  prompt, chosen, rejected = truncate(
    p, c, r, max_length=12, max_prompt_length=6
  )
  np.testing.assert_array_equal(prompt, np.r_[BOS, ids(9)[-5:]])
  np.testing.assert_array_equal(chosen, c)  # 4 <= budget 6
  np.testing.assert_array_equal(rejected, r[:6])  # keeps its start


def test_no_bos_keeps_plain_prompt_tail():
  prompt, _, _ = truncate(
    ids(9),
    ids(8, 100),
    ids(8, 200),
    max_length=12,
    max_prompt_length=4,
    keep_first=0,
  )
  np.testing.assert_array_equal(prompt, ids(9)[-4:])


def test_pack_mask_is_aligned_with_response_token_positions():
  input_ids, loss_mask, attention = encoding.pack(
    [np.r_[BOS, ids(3)], np.r_[BOS]],
    [np.r_[ids(2, 100), EOS], ids(8, 50)],
    max_length=9,
    pad_id=PAD,
  )
  np.testing.assert_array_equal(
    input_ids,
    [[BOS, 10, 11, 12, 100, 101, EOS, PAD, PAD], [BOS, *range(50, 58)]],
  )
  np.testing.assert_array_equal(
    loss_mask, [[0, 0, 0, 0, 1, 1, 1, 0, 0], [0] + [1] * 8]
  )
  np.testing.assert_array_equal(
    attention, [[1, 1, 1, 1, 1, 1, 1, 0, 0], [1] * 9]
  )
  assert input_ids.dtype == loss_mask.dtype == attention.dtype == np.int32


def test_pack_never_marks_position_zero():
  _, loss_mask, _ = encoding.pack(
    [np.zeros(0, np.int32)], [ids(3)], max_length=4, pad_id=PAD
  )
  np.testing.assert_array_equal(loss_mask, [[0, 1, 1, 0]])


def make_encoder(**kw):
  options = dict(
    max_length=32, max_prompt_length=8, add_bos=True, append_eos=True
  )
  options.update(kw)
  return encoding.PairEncoder(tokenizers.ByteTokenizer(), **options)


def test_encoder_round_trip_and_next_token_targets():
  enc = make_encoder()
  prompt, chosen, rejected = "Q: ∑?", " yes", " nö"
  out = enc.encode(prompt, chosen, rejected)
  tok = enc.tokenizer
  for side, text in (("chosen", chosen), ("rejected", rejected)):
    input_ids, mask = out[f"{side}_input_ids"], out[f"{side}_loss_mask"]
    assert input_ids.shape == mask.shape == (32,)
    # Response tokens are exactly the masked positions, EOS last.
    response = input_ids[mask == 1]
    assert response[-1] == tok.eos_id and tok.decode(response) == text
    assert tok.decode(input_ids[: np.argmax(mask)]) == prompt
    assert input_ids[0] == tok.bos_id
    # The documented next-token use: labels input_ids[1:], mask[:, 1:].
    labels, target_mask = input_ids[1:], mask[1:]
    assert tok.decode(labels[target_mask == 1]) == text


def test_truncated_response_loses_eos_and_is_flagged():
  enc = make_encoder(max_length=12, max_prompt_length=6)
  pair = enc.truncate("0123456789", "abcdefgh", "xy")
  assert pair.truncated == (True, True, False)
  assert enc.tokenizer.decode(pair.prompt) == "56789"  # BOS + last 5 bytes
  assert (
    enc.tokenizer.decode(pair.chosen) == "abcdef"
    and enc.tokenizer.eos_id not in pair.chosen
  )
  assert pair.rejected[-1] == enc.tokenizer.eos_id
  assert pair.full_lengths == (11, 9, 3)
  assert pair.drop_reason is None


def test_response_truncated_to_zero_tokens_is_dropped():
  enc = make_encoder(max_length=8, max_prompt_length=8)
  pair = enc.truncate("a long prompt", "yes", "no")
  assert len(pair.chosen) == 0 and pair.drop_reason == encoding.EMPTY_RESPONSE
  with pytest.raises(ValueError, match=encoding.EMPTY_RESPONSE):
    enc.encode("a long prompt", "yes", "no")


def test_single_unscorable_token_without_bos_or_prompt_is_dropped():
  # No BOS and an empty prompt put the response's only token at position 0.
  enc = make_encoder(add_bos=False, append_eos=False)
  assert enc.truncate("", "a", "bc").drop_reason == encoding.EMPTY_RESPONSE
  assert enc.truncate("", "ab", "bc").drop_reason is None


def test_responses_identical_after_truncation_are_dropped():
  enc = make_encoder(max_length=10, max_prompt_length=4)
  assert (
    enc.truncate("abc", "same start, A", "same start, B").drop_reason
    == encoding.IDENTICAL
  )


def test_invalid_lengths_and_missing_eos():
  with pytest.raises(ValueError, match="input.max_prompt_length"):
    make_encoder(max_length=8, max_prompt_length=9)

  class NoEos(tokenizers.ByteTokenizer):
    def __init__(self):
      super().__init__()
      self.eos_id = None

  with pytest.raises(ValueError, match="input.eos_token"):
    encoding.PairEncoder(
      NoEos(), max_length=8, max_prompt_length=4, add_bos=True, append_eos=True
    )
