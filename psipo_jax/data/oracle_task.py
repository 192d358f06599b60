"""A synthetic language task with a KNOWN preference oracle p*(y ≻ y' | x).

Prompts and responses are short words (strings; with the byte tokenizer,
short token sequences). Because p* is known exactly, a policy's win rate
against the reference can be computed from p* itself, not only from
sampled labels.

Text format (what a language model reads and writes):

    prompt text    = WORD " ->"         e.g. "abcd ->"
    response text  = " " RESPONSE        e.g. " dcba"
    WORD           = MIN_PROMPT_LENGTH..MAX_PROMPT_LENGTH (3..5) distinct
                     letters of ALPHABET ("abcdefgh"), in random order

`response_word(text)` drops the one leading space; every function below
takes any string as a response (a model may write anything), counting
characters.

Three criteria of a response y to a prompt x (integers):

    relevance  c1(x, y) = #{i : y_i in x} − #{i : y_i not in x}
               (letters of the prompt help, any other character hurts)
    length     c2(x, y) = −| |y| − |x| |
               (as long as the prompt is best)
    order      c3(x, y) = #{i : y_i < y_{i+1}} − #{i : y_i > y_{i+1}}
               (adjacent pairs in increasing minus decreasing order, by
               code point)

Oracles (`make_oracle(name, beta=...)`; `Oracle.prob(x, y, y2)` is
p*(y ≻ y2 | x)):

  "bradley_terry"  p* = σ(β (s(x, y) − s(x, y'))) with the score
                   s(x, y) = c1 + c2 + c3, β = `beta` (default 1).
  "majority"       NOT Bradley–Terry: three annotators, one per
                   criterion, one of them asked at random:
                   p* = (1/3) Σ_k [1{c_k(x,y) > c_k(x,y')}
                                   + ½ 1{c_k(x,y) = c_k(x,y')}].
                   The pairwise majority of three criteria is
                   intransitive (Condorcet): for x = "abcd",
                   a = "aaaaaa" (c = (6, −2, 0)), b = "dcba" (4, 0, −3),
                   c = "efg" (−3, −1, 2) give p*(a ≻ b) = p*(b ≻ c) =
                   p*(c ≻ a) = 2/3. A Bradley–Terry model would need
                   s(a) > s(b) > s(c) > s(a); equivalently the three
                   log-odds, which BT makes s(a)−s(b), s(b)−s(c),
                   s(c)−s(a), would sum to 0, but here they sum to 3 log 2.
  "deterministic"  p* ∈ {0, 1}: y ≻ y' iff (s(x, y), y) > (s(x, y'), y')
                   (the Bradley–Terry score, ties broken by the string
                   order, so every pair of different responses has a
                   winner); p*(y ≻ y) = ½. The regime where DPO's optimum
                   is deterministic whatever τ (paper §4.2, §5.3.1).

Every oracle satisfies p*(y ≻ y') + p*(y' ≻ y) = 1. `label(...)` draws the
winner of a pair (a Bernoulli(p*) draw, which for "deterministic" is the
winner itself); `win_rate` is the exact E p*(y ≻ y') over given responses.

The reference's base distribution of responses (`base_response`, for SFT):
length uniform on 1..MAX_RESPONSE_LENGTH (6); each letter, independently,
with probability PROMPT_LETTER_PROB (½) uniform over the prompt's letters,
else uniform over ALPHABET. So the base covers every criterion's range and
leaves room for a policy to improve on it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

ALPHABET = "abcdefgh"
MIN_PROMPT_LENGTH = 3
MAX_PROMPT_LENGTH = 5
MAX_RESPONSE_LENGTH = 6
PROMPT_LETTER_PROB = 0.5
ORACLES = ("bradley_terry", "majority", "deterministic")
CRITERIA = ("relevance", "length", "order")


def prompt_text(word: str) -> str:
  return f"{word} ->"


def prompt_word(text: str) -> str:
  """The word of a prompt text (`prompt_text`'s inverse).

  Raises:
    ValueError: `text` is not WORD " ->".
  """
  word = text.removesuffix(" ->")
  if word == text or not word:
    raise ValueError(f"{text!r} is not an oracle-task prompt (WORD ' ->')")
  return word


def response_text(word: str) -> str:
  return f" {word}"


def response_word(text: str) -> str:
  """The response of a response text: one leading space dropped (if any)."""
  return text[1:] if text.startswith(" ") else text


def criteria(x: str, y: str) -> np.ndarray:
  """[3] int64 (relevance, length, order) of response y to prompt x."""
  letters = set(x)
  inside = sum(ch in letters for ch in y)
  relevance = inside - (len(y) - inside)
  length = -abs(len(y) - len(x))
  ups = sum(a < b for a, b in zip(y, y[1:]))
  downs = sum(a > b for a, b in zip(y, y[1:]))
  return np.asarray([relevance, length, ups - downs], np.int64)


def score(x: str, y: str) -> int:
  """s(x, y) = c1 + c2 + c3, the Bradley–Terry score."""
  return int(criteria(x, y).sum())


def _sigmoid(z: float) -> float:
  # Stable for large |z|: exp of a non-positive number only.
  if z >= 0:
    return 1.0 / (1.0 + math.exp(-z))
  e = math.exp(z)
  return e / (1.0 + e)


@dataclasses.dataclass(frozen=True)
class Oracle:
  """p*(y ≻ y' | x) of one of ORACLES (module docstring).

  Attributes:
    name: one of ORACLES.
    beta: the Bradley–Terry inverse temperature (read by "bradley_terry").
  """

  name: str
  beta: float = 1.0

  def __post_init__(self):
    if self.name not in ORACLES:
      raise ValueError(f"oracle {self.name!r} is not one of {ORACLES}")
    if not (math.isfinite(self.beta) and self.beta > 0):
      raise ValueError(f"oracle beta must be > 0, got {self.beta!r}")

  @property
  def is_bradley_terry(self) -> bool:
    return self.name == "bradley_terry"

  def prob(self, x: str, y: str, y2: str) -> float:
    """p*(y ≻ y2 | x) in [0, 1]."""
    if self.name == "bradley_terry":
      return _sigmoid(self.beta * (score(x, y) - score(x, y2)))
    if self.name == "majority":
      a, b = criteria(x, y), criteria(x, y2)
      return float(np.mean((a > b) + 0.5 * (a == b)))
    key, key2 = (score(x, y), y), (score(x, y2), y2)
    return 0.5 if key == key2 else float(key > key2)

  def matrix(self, x: str, responses: Sequence[str]) -> np.ndarray:
    """[n, n] P[i, j] = p*(responses[i] ≻ responses[j] | x)."""
    n = len(responses)
    out = np.empty((n, n))
    for i in range(n):
      for j in range(n):
        out[i, j] = self.prob(x, responses[i], responses[j])
    return out


def make_oracle(name: str, *, beta: float = 1.0) -> Oracle:
  return Oracle(name, beta=beta)


def label(
  oracle: Oracle, x: str, y: str, y2: str, rng: np.random.Generator
) -> bool:
  """Whether y wins against y2: a Bernoulli(p*(y ≻ y2 | x)) draw (exact for
  p* in {0, 1}: no randomness is used up then)."""
  p = oracle.prob(x, y, y2)
  if p in (0.0, 1.0):
    return p == 1.0
  return bool(rng.random() < p)


def win_rate(
  oracle: Oracle, x: str, responses: Sequence[str], opponents: Sequence[str]
) -> float:
  """E p*(y ≻ y' | x) over y in `responses` and y' in `opponents` (all pairs):
  the exact win rate of the responses' policy against the opponents'."""
  if not responses or not opponents:
    raise ValueError("win_rate needs at least one response and one opponent")
  return float(
    np.mean([[oracle.prob(x, y, y2) for y2 in opponents] for y in responses])
  )


def sample_prompt(rng: np.random.Generator) -> str:
  """A prompt word: 3..5 distinct letters of ALPHABET in random order."""
  n = int(rng.integers(MIN_PROMPT_LENGTH, MAX_PROMPT_LENGTH + 1))
  return "".join(rng.choice(list(ALPHABET), size=n, replace=False))


def sample_prompts(n: int, rng: np.random.Generator) -> list[str]:
  """n DISTINCT prompts (so held-out prompts can be disjoint from training)."""
  space = sum(
    math.perm(len(ALPHABET), k)
    for k in range(MIN_PROMPT_LENGTH, MAX_PROMPT_LENGTH + 1)
  )
  if n > space:
    raise ValueError(f"{n} distinct prompts asked; only {space} exist")
  seen: dict[str, None] = {}
  while len(seen) < n:
    seen.setdefault(sample_prompt(rng), None)
  return list(seen)


def base_response(x: str, rng: np.random.Generator) -> str:
  """A response of the base distribution (module docstring) to prompt x."""
  n = int(rng.integers(1, MAX_RESPONSE_LENGTH + 1))
  letters = [
    x[rng.integers(len(x))]
    if rng.random() < PROMPT_LETTER_PROB
    else ALPHABET[rng.integers(len(ALPHABET))]
    for _ in range(n)
  ]
  return "".join(letters)
