"""Stages of the known-oracle language experiment, as library functions.

The task is `psipo_jax.data.oracle_task` (prompts and responses are short
words; p*(y ≻ y' | x) known exactly). The stages, each a function here,
the training in between done by the ordinary trainer
(`psipo_jax.train.train_and_evaluate` / `python -m psipo_jax.main`):

  1. `write_sft_data`       prompts with responses of the task's base
                            distribution, in the `prompt_response` layout
                            of the `preference_pairs` builder; an
                            `objective="sft"` run on them is the reference.
  2. `label_policy_samples` for every prompt, pairs of responses SAMPLED
     + `write_pairs`        from a trained policy (the SFT reference), the
                            winner drawn from the oracle (a Bernoulli(p*)
                            draw; the winner itself for "deterministic"):
                            the ΨPO runs' training and held-out pairs,
                            read through the same builder.
  3. `evaluate`             a trained policy against its reference on
                            held-out prompts: the exact win rate
                            E_{x, y~π, y'~π_ref} p*(y ≻ y' | x) (p* averaged
                            over sampled responses, not sampled labels),
                            KL(π ‖ π_ref) estimated from the policy's own
                            samples, and the implicit-reward accuracy on
                            held-out labelled pairs; each with a 95%
                            Student-t interval.

Policies are `psipo_jax.trained_policy.Policy` objects (a run's newest
checkpoint and tokenizer). Sampling for KL and win rates is at temperature
1 with no top-k/top-p, so the samples are the policy's own distribution.
Responses are cut at `max_new_tokens`, so the KL is that of the responses'
first `max_new_tokens` tokens (the whole responses' when every sample ends
with EOS before, which `evaluate` reports as `eos_fraction`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from psipo_jax import sampling
from psipo_jax import stats
from psipo_jax.data import oracle_task as ot


def write_jsonl(path: str, records: Sequence[dict[str, Any]]) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  return path


def split_prompts(
  num_train: int, num_test: int, seed: int
) -> dict[str, list[str]]:
  """Disjoint train and test prompt words (seeded)."""
  prompts = ot.sample_prompts(num_train + num_test, np.random.default_rng(seed))
  return {"train": prompts[:num_train], "test": prompts[num_train:]}


def write_sft_data(
  out_dir: str,
  prompts: dict[str, Sequence[str]],
  *,
  responses_per_prompt: int,
  seed: int,
) -> dict[str, str]:
  """Stage 1: base-distribution responses for SFT; {split: jsonl path}.

  Each record is a `prompt_response` pair whose `chosen` is a base response
  (SFT learns the chosen side only) and whose `rejected` is another base
  response, different from it (the builder drops identical pairs).
  """
  rng = np.random.default_rng(seed)
  files = {}
  for split, words in prompts.items():
    records = []
    for x in words:
      for i in range(responses_per_prompt):
        y = ot.base_response(x, rng)
        other = ot.base_response(x, rng)
        while other == y:
          other = ot.base_response(x, rng)
        records.append(
          dict(
            id=f"{split}-{x}-{i}",
            prompt=ot.prompt_text(x),
            chosen=ot.response_text(y),
            rejected=ot.response_text(other),
          )
        )
    files[split] = write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), records)
  return files


def _own_samples(policy: Any, max_new_tokens: int) -> sampling.SamplingConfig:
  # The policy's own distribution: no temperature, no truncation of it.
  return policy.sampling_config(
    max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0
  )


def label_policy_samples(
  policy: Any,
  prompts: Sequence[str],
  oracle: ot.Oracle,
  *,
  pairs_per_prompt: int,
  max_new_tokens: int,
  seed: int,
  split: str = "train",
) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """Stage 2: oracle-labelled pairs of the policy's samples.

  Args:
    policy: a `trained_policy.Policy` (the reference).
    prompts: prompt words.
    oracle: labels each pair.
    pairs_per_prompt: N; 2N responses are sampled per prompt.
    max_new_tokens: response length cap (tokens).
    seed: sampling and labelling seed.
    split: the records' id prefix.

  Returns:
    (records with id, prompt, chosen, rejected and p_chosen =
    p*(chosen ≻ rejected | x), counts {"pairs", "identical_dropped",
    "unfinished_dropped", "empty_dropped"}): a pair of identical responses
    carries no preference, a response cut at max_new_tokens (no EOS) is
    not one the builder may close with EOS, and the builder refuses an
    empty (or blank) response; such pairs are dropped and counted.
  """
  config = _own_samples(policy, max_new_tokens)
  texts = [ot.prompt_text(x) for x in prompts]
  results = policy.complete(
    texts, config, num_samples=2 * pairs_per_prompt, seed=seed
  )
  rng = np.random.default_rng(seed)
  records, dropped, unfinished, empty = [], 0, 0, 0
  per_prompt = 2 * pairs_per_prompt
  for i, x in enumerate(prompts):
    mine = results[i * per_prompt : (i + 1) * per_prompt]
    for j in range(pairs_per_prompt):
      pair = mine[2 * j : 2 * j + 2]
      if config.eos_id is not None and not all(r["eos"] for r in pair):
        unfinished += 1
        continue
      a, b = (r["completion"] for r in pair)
      if not (a.strip() and b.strip()):
        empty += 1
        continue
      y, y2 = ot.response_word(a), ot.response_word(b)
      if y == y2:
        dropped += 1
        continue
      if not ot.label(oracle, x, y, y2, rng):
        (a, y), (b, y2) = (b, y2), (a, y)
      records.append(
        dict(
          id=f"{split}-{i}-{j}",
          prompt=ot.prompt_text(x),
          chosen=a,
          rejected=b,
          p_chosen=oracle.prob(x, y, y2),
        )
      )
  counts = dict(
    pairs=len(records),
    identical_dropped=dropped,
    unfinished_dropped=unfinished,
    empty_dropped=empty,
  )
  return records, counts


def evaluate(
  policy: Any,
  reference: Any,
  prompts: Sequence[str],
  oracle: ot.Oracle,
  *,
  samples_per_prompt: int,
  max_new_tokens: int,
  seed: int,
  pairs: Sequence[dict[str, Any]] = (),
) -> dict[str, float]:
  """Stage 3: win rate against the reference, KL and implicit-reward accuracy.

  Args:
    policy, reference: `trained_policy.Policy` objects (same tokenizer).
    prompts: held-out prompt words.
    oracle: the task's p*.
    samples_per_prompt: K responses of each policy per prompt.
    max_new_tokens: response length cap.
    seed: sampling seed (the reference's draws use seed + 1).
    pairs: held-out labelled pairs (records of `label_policy_samples`) for
      the implicit-reward accuracy; none skips it.

  Returns:
    win_rate (mean over prompts of E p*(y ≻ y'), y ~ π, y' ~ π_ref) and
    win_rate_ci (95% half-width over prompts); kl (mean over the policy's
    samples of log π(y|x) − log π_ref(y|x)) and kl_ci; eos_fraction; and,
    with pairs, reward_accuracy (fraction of pairs with h > 0, h the
    implicit reward margin of DESIGN.md §1) and reward_accuracy_ci.
  """
  if policy.tokenizer.fingerprint != reference.tokenizer.fingerprint:
    raise ValueError("the policy and the reference use different tokenizers")
  config = _own_samples(policy, max_new_tokens)
  texts = [ot.prompt_text(x) for x in prompts]
  k = samples_per_prompt
  mine = policy.complete(texts, config, num_samples=k, seed=seed)
  theirs = reference.complete(texts, config, num_samples=k, seed=seed + 1)
  wins = [
    ot.win_rate(
      oracle,
      x,
      [ot.response_word(r["completion"]) for r in mine[i * k : (i + 1) * k]],
      [ot.response_word(r["completion"]) for r in theirs[i * k : (i + 1) * k]],
    )
    for i, x in enumerate(prompts)
  ]
  sample_prompts = [r["prompt"] for r in mine]
  tokens = [r["tokens"] for r in mine]
  log_ratio = np.asarray([r["logp"] for r in mine]) - reference.sequence_logps(
    sample_prompts, tokens
  )
  out = {}
  out["win_rate"], out["win_rate_ci"] = map(float, stats.mean_and_ci(wins))
  out["kl"], out["kl_ci"] = map(float, stats.mean_and_ci(log_ratio))
  out["eos_fraction"] = float(np.mean([r["eos"] for r in mine]))
  if pairs:
    h = implicit_margins(policy, reference, pairs)
    out["reward_accuracy"], out["reward_accuracy_ci"] = map(
      float, stats.mean_and_ci((h > 0).astype(np.float64))
    )
  return out


def implicit_margins(
  policy: Any, reference: Any, pairs: Sequence[dict[str, Any]]
) -> np.ndarray:
  """[len(pairs)] h_π(chosen, rejected) of labelled pairs (DESIGN.md §1:
  log π(y_w) − log π(y_l) − log π_ref(y_w) + log π_ref(y_l)), the responses
  encoded as the training pipeline encodes them."""
  # As the builder encodes a response: EOS closes it when the run adds one.
  tok = policy.tokenizer
  eos = [tok.eos_id] if policy.config.input.get("append_eos", True) else []
  encode = lambda text: tok.encode(text).tolist() + eos
  prompts_2 = [p["prompt"] for p in pairs] * 2
  responses = [encode(p["chosen"]) for p in pairs] + [
    encode(p["rejected"]) for p in pairs
  ]
  ratio = policy.sequence_logps(
    prompts_2, responses
  ) - reference.sequence_logps(prompts_2, responses)
  return ratio[: len(pairs)] - ratio[len(pairs) :]


MARGIN_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def margin_summary(h: np.ndarray, tau: float) -> dict[str, Any]:
  """Where the margins h [n] lie against IPO's target 1/(2τ) (DESIGN.md §1):
  mean, max, the MARGIN_QUANTILES, and the fractions of pairs above the
  target and above twice it. DPO's loss keeps decreasing as h grows, so on
  deterministic preferences its h has no finite target; IPO's is 1/(2τ)."""
  h = np.asarray(h, np.float64)
  target = 1.0 / (2.0 * tau)
  return dict(
    target=target,
    mean=float(h.mean()),
    max=float(h.max()),
    quantiles={
      f"{q:g}": float(v)
      for q, v in zip(MARGIN_QUANTILES, np.quantile(h, MARGIN_QUANTILES))
    },
    above_target=float(np.mean(h > target)),
    above_twice_target=float(np.mean(h > 2 * target)),
  )
