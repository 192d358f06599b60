"""Tests of the synthetic task's preference oracles against their definitions."""

import itertools
import math

import numpy as np
import pytest

from psipo_jax.data import oracle_task as ot


def _criteria_by_hand(x, y):
  """The documented criteria, written out again with plain loops."""
  relevance = 0
  for ch in y:
    relevance += 1 if ch in x else -1
  order = 0
  for i in range(len(y) - 1):
    if y[i] < y[i + 1]:
      order += 1
    elif y[i] > y[i + 1]:
      order -= 1
  return relevance, -abs(len(y) - len(x)), order


def _random_cases(n=300, seed=0):
  rng = np.random.default_rng(seed)
  cases = []
  for _ in range(n):
    x = ot.sample_prompt(rng)
    cases.append((x, ot.base_response(x, rng), ot.base_response(x, rng)))
  return cases


def test_criteria_golden_values():
  assert ot.criteria("abcd", "aaaaaa").tolist() == [6, -2, 0]
  assert ot.criteria("abcd", "dcba").tolist() == [4, 0, -3]
  assert ot.criteria("abcd", "efg").tolist() == [-3, -1, 2]
  assert ot.criteria("abc", "").tolist() == [0, -3, 0]
  assert ot.criteria("abc", "a z").tolist() == [-1, 0, 0]  # ' ' < 'a' < 'z'
  for x, y, _ in _random_cases():
    assert tuple(ot.criteria(x, y)) == _criteria_by_hand(x, y)
    assert ot.score(x, y) == sum(_criteria_by_hand(x, y))


@pytest.mark.parametrize("beta", [1.0, 0.3, 4.0])
def test_bradley_terry_is_the_logistic_of_the_score_difference(beta):
  oracle = ot.make_oracle("bradley_terry", beta=beta)
  for x, y, y2 in _random_cases():
    diff = sum(_criteria_by_hand(x, y)) - sum(_criteria_by_hand(x, y2))
    expected = 1 / (1 + np.exp(-beta * diff))
    assert oracle.prob(x, y, y2) == pytest.approx(expected, rel=1e-12)
  # Far apart scores stay finite and in [0, 1].
  assert (
    ot.make_oracle("bradley_terry", beta=1e3).prob("abc", "abc", "zzzzz") == 1
  )


def test_majority_is_the_share_of_criteria_voting_for_y():
  oracle = ot.make_oracle("majority")
  for x, y, y2 in _random_cases():
    a, b = _criteria_by_hand(x, y), _criteria_by_hand(x, y2)
    votes = sum(1.0 if i > j else 0.5 if i == j else 0.0 for i, j in zip(a, b))
    assert oracle.prob(x, y, y2) == pytest.approx(votes / 3, abs=1e-12)


@pytest.mark.parametrize("name", ot.ORACLES)
def test_every_oracle_is_a_preference_probability(name):
  oracle = ot.make_oracle(name)
  for x, y, y2 in _random_cases(100):
    p, q = oracle.prob(x, y, y2), oracle.prob(x, y2, y)
    assert 0 <= p <= 1 and p + q == pytest.approx(1.0)
    assert oracle.prob(x, y, y) == 0.5


def test_majority_oracle_has_a_cycle_no_bradley_terry_score_represents():
  oracle = ot.make_oracle("majority")
  x, a, b, c = "abcd", "aaaaaa", "dcba", "efg"
  # From the criteria (6,-2,0), (4,0,-3), (-3,-1,2): a beats b on relevance
  # and order, b beats c on relevance and length, c beats a on length and order.
  cycle = [(a, b), (b, c), (c, a)]
  probs = [oracle.prob(x, u, v) for u, v in cycle]
  assert probs == pytest.approx([2 / 3] * 3)
  assert all(p > 0.5 for p in probs)
  # Bradley-Terry would need logit p*(u > v) = s(u) - s(v) for some score s,
  # and the three differences around a cycle telescope to 0; these log-odds
  # sum to 3 log 2. The best any score can do (least squares in log-odds
  # over the three pairs) leaves that sum's residual: (3 log 2)^2 / 3 > 0.
  log_odds = np.log(np.array(probs) / (1 - np.array(probs)))
  assert log_odds.sum() == pytest.approx(3 * math.log(2))
  design = np.array([[1, -1, 0], [0, 1, -1], [-1, 0, 1]], float)  # s_u - s_v
  best = np.linalg.lstsq(design, log_odds, rcond=None)[0]  # rank 2: s + const
  residual = np.sum((design @ best - log_odds) ** 2)
  assert residual == pytest.approx((3 * math.log(2)) ** 2 / 3)
  # Any ordering of the three by a score contradicts one of the preferences.
  for scores in itertools.permutations(range(3)):
    s = dict(zip((a, b, c), scores))
    assert any(s[u] < s[v] for u, v in cycle)


def test_bradley_terry_log_odds_telescope_and_cycles_are_common_under_majority():
  bt, majority = ot.make_oracle("bradley_terry"), ot.make_oracle("majority")
  rng = np.random.default_rng(1)
  x = ot.sample_prompt(rng)
  responses = sorted({ot.base_response(x, rng) for _ in range(40)})
  p_bt, p_maj = bt.matrix(x, responses), majority.matrix(x, responses)
  cycles = 0
  for i, j, k in itertools.combinations(range(len(responses)), 3):
    lo = lambda p: math.log(p / (1 - p))
    assert lo(p_bt[i, j]) + lo(p_bt[j, k]) + lo(p_bt[k, i]) == pytest.approx(
      0, abs=1e-9
    )
    wins = (p_maj[i, j] > 0.5, p_maj[j, k] > 0.5, p_maj[k, i] > 0.5)
    losses = (p_maj[i, j] < 0.5, p_maj[j, k] < 0.5, p_maj[k, i] < 0.5)
    cycles += all(wins) or all(losses)
  assert cycles > 0  # on the base distribution's own responses


def test_deterministic_oracle_is_a_strict_total_order_by_score():
  oracle = ot.make_oracle("deterministic")
  rng = np.random.default_rng(2)
  x = ot.sample_prompt(rng)
  responses = sorted({ot.base_response(x, rng) for _ in range(30)})
  p = oracle.matrix(x, responses)
  off = ~np.eye(len(responses), dtype=bool)
  assert set(np.unique(p[off])) <= {0.0, 1.0}
  np.testing.assert_array_equal(p + p.T, np.ones_like(p))
  # Ranked by (score, string): each response beats exactly those below it.
  ranked = sorted(responses, key=lambda y: (ot.score(x, y), y))
  for rank, y in enumerate(ranked):
    assert p[responses.index(y)].sum() - 0.5 == rank
  # It agrees with Bradley-Terry wherever the scores differ.
  bt = ot.make_oracle("bradley_terry")
  for y, y2 in itertools.combinations(responses, 2):
    if ot.score(x, y) != ot.score(x, y2):
      assert oracle.prob(x, y, y2) == float(bt.prob(x, y, y2) > 0.5)


def test_labels_are_bernoulli_draws_of_p_star():
  rng = np.random.default_rng(3)
  oracle = ot.make_oracle("bradley_terry", beta=0.5)
  x, y, y2 = "abcd", "abd", "bda"  # scores 3 - 1 + 2 = 4 and 3 - 1 + 0 = 2
  p = oracle.prob(x, y, y2)
  assert p == pytest.approx(1 / (1 + math.exp(-0.5 * 2)))
  draws = [ot.label(oracle, x, y, y2, rng) for _ in range(20_000)]
  assert np.mean(draws) == pytest.approx(p, abs=0.015)
  hard = ot.make_oracle("deterministic")
  assert all(ot.label(hard, x, y, y2, rng) for _ in range(50))
  assert not any(ot.label(hard, x, y2, y, rng) for _ in range(50))


def test_win_rate_is_the_mean_preference_over_all_pairs():
  oracle = ot.make_oracle("majority")
  x, ys, opponents = "abcd", ["abcd", "dcba", "e"], ["aaaaaa", "efg"]
  expected = np.mean(
    [[oracle.prob(x, y, o) for o in opponents] for y in ys], axis=None
  )
  assert ot.win_rate(oracle, x, ys, opponents) == pytest.approx(expected)
  assert ot.win_rate(oracle, x, ys, ys) == pytest.approx(0.5)  # self-play
  with pytest.raises(ValueError, match="at least one"):
    ot.win_rate(oracle, x, [], opponents)


def test_prompts_responses_and_text_format():
  rng = np.random.default_rng(4)
  prompts = ot.sample_prompts(500, rng)
  assert len(set(prompts)) == 500
  for x in prompts:
    assert ot.MIN_PROMPT_LENGTH <= len(x) <= ot.MAX_PROMPT_LENGTH
    assert len(set(x)) == len(x) and set(x) <= set(ot.ALPHABET)
    y = ot.base_response(x, rng)
    assert 1 <= len(y) <= ot.MAX_RESPONSE_LENGTH and set(y) <= set(ot.ALPHABET)
  assert ot.prompt_text("abc") == "abc ->"
  assert ot.response_word(ot.response_text("cab")) == "cab"
  # Half the letters come from the prompt, half from the whole alphabet.
  x = "abc"
  letters = "".join(ot.base_response(x, rng) for _ in range(4000))
  in_prompt = np.mean([ch in x for ch in letters])
  assert in_prompt == pytest.approx(0.5 + 0.5 * 3 / 8, abs=0.02)


def test_bad_oracle_settings_are_refused():
  with pytest.raises(ValueError, match="'bt' is not one of"):
    ot.make_oracle("bt")
  with pytest.raises(ValueError, match="beta must be > 0"):
    ot.make_oracle("bradley_terry", beta=0.0)
  with pytest.raises(ValueError, match="distinct prompts asked"):
    ot.sample_prompts(10**6, np.random.default_rng(0))
