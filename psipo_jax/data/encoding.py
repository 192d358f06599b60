"""One text pair -> fixed-length token arrays: truncation policy and masks.

Each side (chosen, rejected) becomes a row of length T = `max_length`:

  position    0 .. p-1             p .. p+r-1              p+r .. T-1
  token       [BOS] prompt tail    response head [EOS]     PAD
  loss_mask   0                    1                       0
  attention   1                    1                       0

The loss mask is aligned with TOKEN POSITIONS: `loss_mask[t] = 1` iff token t
is a response token. A causal model scoring log p(token_t | tokens_<t) for
t >= 1 (logits[:, :-1] against labels input_ids[:, 1:]) uses `loss_mask[:, 1:]`
unchanged:

    logp = log_softmax(logits[:, :-1])                            # [B, T-1, V]
    token_logp = take_along_axis(logp, input_ids[:, 1:, None], -1)[..., 0]
    seq_logp = sum(token_logp * loss_mask[:, 1:], axis=-1)        # [B]

`loss_mask[:, 0]` is always 0 (position 0 has no predecessor), so that slice
loses nothing. EOS closes a complete response and is scored like any other
response token; a response cut by truncation has no EOS.

Truncation ("keep the end of the prompt, the start of the responses"): with
P the prompt length (BOS included), R the longer response (EOS included),
L = max_length and M = max_prompt_length,

    the prompt keeps its last  k = min(P, max(M, L - R))  tokens
        (when it is cut, BOS stays as its first token),
    each response keeps its first  L - k  tokens.

So nothing is cut when P + R <= L; the prompt is cut first but never below M
tokens; then the responses are cut. A pair is dropped (and counted), never
passed on, when a response keeps no scored token ("empty_response_after_
truncation": possible when M = L, or for a tokenizer that maps some text to
no tokens) or when both truncated responses are the same tokens
("identical_after_truncation": the pair no longer carries a preference).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from psipo_jax.data import tokenizers as tokenizers_lib

EMPTY_RESPONSE = "empty_response_after_truncation"
IDENTICAL = "identical_after_truncation"


@dataclasses.dataclass(frozen=True)
class TruncatedPair:
  """Kept token ids of one pair, and what truncation did to it."""

  prompt: np.ndarray  # [k] int32, BOS included
  chosen: np.ndarray  # [<= L - k] int32, EOS included when complete
  rejected: np.ndarray
  full_lengths: tuple[
    int, int, int
  ]  # (prompt, chosen, rejected) before truncation
  drop_reason: str | None  # None, EMPTY_RESPONSE or IDENTICAL

  @property
  def truncated(self) -> tuple[bool, bool, bool]:
    """Whether (prompt, chosen, rejected) lost tokens."""
    kept = (len(self.prompt), len(self.chosen), len(self.rejected))
    return tuple(k < n for k, n in zip(kept, self.full_lengths))


def truncate_pair(
  prompt: np.ndarray,
  chosen: np.ndarray,
  rejected: np.ndarray,
  *,
  max_length: int,
  max_prompt_length: int,
  keep_first: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Applies the truncation policy of the module docstring.

  Args:
    prompt: [P] prompt ids, BOS included.
    chosen: [Rc] chosen response ids, EOS included.
    rejected: [Rr] rejected response ids, EOS included.
    max_length: L.
    max_prompt_length: M, 1 <= M <= L.
    keep_first: leading prompt tokens always kept (1 for BOS, else 0).

  Returns:
    (prompt [k], chosen [<= L - k], rejected [<= L - k]).
  """
  longest = max(len(chosen), len(rejected))
  k = min(len(prompt), max(max_prompt_length, max_length - longest))
  if k < len(prompt):
    head = prompt[: min(keep_first, k)]
    prompt = np.concatenate([head, prompt[len(prompt) - (k - len(head)) :]])
  budget = max_length - k
  return prompt, chosen[:budget], rejected[:budget]


def pack(prompts, responses, *, max_length: int, pad_id: int):
  """Right-padded rows of prompt + response, with their masks.

  Args:
    prompts: n prompt id arrays (BOS included).
    responses: n response id arrays, len(prompt) + len(response) <= max_length.
    max_length: T.
    pad_id: id written after the last token.

  Returns:
    (input_ids [n, T], loss_mask [n, T], attention_mask [n, T]), all int32.
  """
  n = len(prompts)
  input_ids = np.full((n, max_length), pad_id, np.int32)
  starts = np.empty(n, np.int64)  # first response position
  ends = np.empty(n, np.int64)  # one past the last token
  for row, (prompt, response) in enumerate(zip(prompts, responses)):
    starts[row], ends[row] = len(prompt), len(prompt) + len(response)
    input_ids[row, : starts[row]] = prompt
    input_ids[row, starts[row] : ends[row]] = response
  positions = np.arange(max_length)
  # Position 0 is never scored: nothing precedes it.
  first_scored = np.maximum(starts, 1)[:, None]
  loss_mask = (positions >= first_scored) & (positions < ends[:, None])
  attention_mask = positions < ends[:, None]
  return input_ids, loss_mask.astype(np.int32), attention_mask.astype(np.int32)


class PairEncoder:
  """Tokenises, truncates and packs (prompt, chosen, rejected) texts."""

  def __init__(
    self,
    tokenizer: tokenizers_lib.Tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    add_bos: bool,
    append_eos: bool,
  ):
    if not 1 <= max_prompt_length <= max_length:
      raise ValueError(
        f"need 1 <= input.max_prompt_length ({max_prompt_length}) <= input.max_length"
        f" ({max_length})"
      )
    if append_eos and tokenizer.eos_id is None:
      raise ValueError(
        "input.append_eos=True but the tokenizer has no EOS: set input.eos_token"
      )
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.max_prompt_length = max_prompt_length
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    self._bos = np.asarray(bos, np.int32)  # [0 or 1]
    self._eos = np.asarray(
      [tokenizer.eos_id] if append_eos else [], np.int32
    )  # [0 or 1]

  @property
  def fingerprint(self) -> str:
    """Everything that decides the encoded arrays."""
    return (
      f"{self.tokenizer.fingerprint}|L={self.max_length}|M={self.max_prompt_length}"
      f"|bos={self._bos.tolist()}|eos={self._eos.tolist()}"
    )

  def prompt_ids(self, prompt: str) -> np.ndarray:
    """[P] int32 ids of a prompt before truncation: [BOS] + its tokens."""
    return np.concatenate([self._bos, self.tokenizer.encode(prompt)])

  def truncate(self, prompt: str, chosen: str, rejected: str) -> TruncatedPair:
    encode = self.tokenizer.encode
    prompt_ids = self.prompt_ids(prompt)
    chosen_ids = np.concatenate([encode(chosen), self._eos])
    rejected_ids = np.concatenate([encode(rejected), self._eos])
    kept = truncate_pair(
      prompt_ids,
      chosen_ids,
      rejected_ids,
      max_length=self.max_length,
      max_prompt_length=self.max_prompt_length,
      keep_first=len(self._bos),
    )
    # A response token at position 0 cannot be scored (see `pack`).
    scored = [len(r) - (1 if len(kept[0]) == 0 else 0) for r in kept[1:]]
    if min(scored) <= 0:
      reason = EMPTY_RESPONSE
    elif np.array_equal(kept[1], kept[2]):
      reason = IDENTICAL
    else:
      reason = None
    return TruncatedPair(
      *kept,
      full_lengths=(len(prompt_ids), len(chosen_ids), len(rejected_ids)),
      drop_reason=reason,
    )

  def encode_batch(self, pairs) -> dict[str, np.ndarray]:
    """Model inputs of n (prompt, chosen, rejected) text triples, [n, T] each.

    Raises:
      ValueError: a pair must be dropped (callers filter such pairs first;
        a zero-token response must never reach the loss).
    """
    truncated = [self.truncate(*texts) for texts in pairs]
    for pair in truncated:
      if pair.drop_reason is not None:
        raise ValueError(
          f"pair dropped by truncation ({pair.drop_reason}) reached the encoder"
        )
    out = {}
    prompts = [pair.prompt for pair in truncated]
    for side in ("chosen", "rejected"):
      ids, loss_mask, attention_mask = pack(
        prompts,
        [getattr(pair, side) for pair in truncated],
        max_length=self.max_length,
        pad_id=self.tokenizer.pad_id,
      )
      out[f"{side}_input_ids"] = ids
      out[f"{side}_loss_mask"] = loss_mask
      out[f"{side}_attention_mask"] = attention_mask
    return out

  def encode(
    self, prompt: str, chosen: str, rejected: str
  ) -> dict[str, np.ndarray]:
    """Model inputs of one pair, [T] each (see `encode_batch`)."""
    return {
      k: v[0]
      for k, v in self.encode_batch([(prompt, chosen, rejected)]).items()
    }
