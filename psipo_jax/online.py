r"""Online IPO and IPO-MD: the pairs are sampled from the policy being trained.

Calandriello et al. 2024, "Human Alignment of Large Language Models through
Online Preference Optimisation" (arXiv:2403.08635). Offline IPO (DESIGN.md
§1, Eq. 17 of Azar et al.) fits h_θ on pairs drawn once from a fixed
behaviour policy μ. Online IPO makes μ the policy being trained, held
fixed (no gradient flows through the sampling) while it generates, with the
reference π_ref frozen (the run's reference, e.g. the SFT policy):

    L(θ) = E_x E_{y, y' ~ sg[π_θ^β](· | x)} [ (h_θ(y_w, y_l) − 1/(2τ))² ],

(y_w, y_l) being (y, y') ordered by a Bernoulli(p*(y ≻ y' | x)) draw of the
oracle (for a deterministic oracle, the winner itself). In expectation over
that draw this is, up to a constant, E (h_θ(y, y') − (p*(y ≻ y' | x) − ½)/τ)²,
the paper's online IPO loss with the preference model's probability.
The sampling distribution, β = `online.mixture`:

    π_θ^β(y_t | x, y_<t) ∝ π_θ(y_t | x, y_<t)^(1−β) · π_ref(y_t | x, y_<t)^β,

the token-level geometric mixture (`sampling.mix_logits`), both responses of
a pair drawn from it: β = 0 is online IPO (both from π_θ), 0 < β < 1 is
IPO-MD, whose data come from Nash-MD's regularised policy
π_θ^β(y) ∝ π_θ(y)^(1−β) π_ref(y)^β, here sampled token by token (so the
sequence law is Π_t π_θ^β(y_t | x, y_<t), the usual autoregressive
approximation of the sequence-level mixture, not the mixture itself), and
β = 1 samples π_ref alone (offline IPO's distribution, fresh pairs at every
refresh). Any pairwise `loss.name` trains on these pairs (online DPO with
"dpo"); the loss itself is the run's unchanged.

Config (`online.*`; absent or `online.enabled=False`: the offline input):

  enabled           True turns it on.
  every             K >= 1: at steps 1, K + 1, 2K + 1, ... the current
                    policy samples the pairs of the next K steps in one call
                    (K = 1: every batch comes from the policy it updates,
                    the paper's setting).
  mixture           β in [0, 1] above.
  oracle            the labelling oracle, one of `oracle_task.ORACLES`.
  beta              its Bradley–Terry inverse temperature.
  pairs_per_prompt  m: a batch of B pairs holds B/m prompts, m pairs each.
  max_new_tokens    response cap; prompt + cap must fit input.max_length.

The input must be `preference_pairs` text pairs of the oracle task
(`psipo_jax.data.oracle_task`): the prompts are the distinct prompts of its
"train" split, visited in epochs in an order seeded by (`seed`, epoch)
(`pipeline.BatchPlan`); evaluation is the offline input's (the whole
held-out split), so online and offline runs report the same eval metrics,
and the oracle experiment's evaluate stage reads an online run unchanged.

Pairs are those the offline `pairs` stage would write
(`oracle_pipeline.label_policy_samples`) read back as the builder reads
them: the completions decoded to text, a pair dropped when a response has
no EOS, is blank, or both are the same word; then both responses encoded by
the run's `PairEncoder` (BOS + prompt, response + EOS), so an online pair and
an offline one of the same texts are the same arrays. A dropped pair stays
in the batch at weight 0 (a copy of a kept pair), so every batch has B rows;
a batch with no kept pair is an error. Counts go to the log at each refresh.

Determinism: the prompts, the sampling key and the labels of the refresh at
step s are pure functions of (`seed`, s), and the pairs sampled for later
steps of a window are kept (as texts) in the checkpoint's data state, so a
resumed run trains on exactly the pairs an uninterrupted one does.

Why an input and not a new training loop: online IPO changes where the
batches come from, not the update. `OnlinePairs` is the train iterator (the
`inputs` contract: this process's rows, `get_state` / `set_state`) given a
read-only handle on the loop's current state (`follow`, one call in
`train.py`); the jitted update core, the reference handling, checkpoints,
evaluation and non-finite checks are the offline run's. The samples are drawn
outside the jitted update with the jitted KV-cached sampler, on the training
mesh, from the parameters as training shards them (no copy).

Limit: one process (every device of one host); a multi-process run is
refused (the prompt rows would need to be assembled as global arrays).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from psipo_jax import config_checks
from psipo_jax import data
from psipo_jax import inputs
from psipo_jax import models
from psipo_jax import sampling
from psipo_jax import sharding
from psipo_jax.data import oracle_task as ot
from psipo_jax.data import pipeline
from psipo_jax.data import sources as data_sources
from psipo_jax.data import token_stats
from psipo_jax.loss_config import LossConfig

KEYS = (
  "enabled",
  "every",
  "mixture",
  "oracle",
  "beta",
  "pairs_per_prompt",
  "max_new_tokens",
)
# Folded into the seed's key (and the labels' seed) so online draws never
# repeat the trainer's other streams of the same seed.
_STREAM = 0x0171E


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
  """The checked `online.*` block (module docstring)."""

  every: int
  mixture: float
  oracle: ot.Oracle
  pairs_per_prompt: int
  max_new_tokens: int


def validate(
  config: ml_collections.ConfigDict, loss_config: Any
) -> OnlineConfig | None:
  """The online settings of `config`, or None for an offline run.

  Args:
    config: the run's config.
    loss_config: what `train.validate_config` parsed (a `LossConfig` for a
      pairwise objective).
  Raises:
    ValueError: naming the offending config key.
  """
  block = config.get("online")
  if block is None:
    return None
  config_checks.check_keys(block, KEYS, prefix="online.")
  enabled = block.get("enabled", False)
  if not isinstance(enabled, bool):
    raise ValueError(f"online.enabled must be True or False, got {enabled!r}")
  if not enabled:
    return None
  if not isinstance(loss_config, LossConfig):
    raise ValueError(
      "online.enabled=True trains a pairwise loss on sampled pairs:"
      f" objective={config.get('objective')!r} is not one ('psipo')"
    )
  if config.input.get("name") != "preference_pairs":
    raise ValueError(
      "online.enabled=True samples text from a language model: input.name"
      f" must be 'preference_pairs' (its prompts and tokenizer), got"
      f" {config.input.get('name')!r}"
    )
  if models.INPUT_KINDS.get(config.model.get("name")) != "tokens":
    raise ValueError(
      "online.enabled=True samples from the policy: model.name="
      f"{config.model.get('name')!r} is not a language model"
    )
  for key in ("ref_logps_file", "packing"):
    if config.input.get(key):
      raise ValueError(
        f"online.enabled=True with input.{key} set: "
        + (
          "precomputed reference log-probs cannot cover freshly sampled pairs"
          if key == "ref_logps_file"
          else "online batches are padded pairs, not packed rows"
        )
        + f"; drop input.{key}"
      )
  every = config_checks.integer(block, "every", minimum=1, prefix="online.")
  mixture = config_checks.number(block, "mixture", prefix="online.")
  if not 0 <= mixture <= 1:
    raise ValueError(f"online.mixture={mixture} must be in [0, 1]")
  if mixture > 0 and loss_config.reference_free:
    raise ValueError(
      f"online.mixture={mixture} samples from the reference but"
      f" loss.name={loss_config.name!r} keeps none; use online.mixture=0"
    )
  name = block.get("oracle")
  if name not in ot.ORACLES:
    raise ValueError(f"online.oracle={name!r} is not one of {ot.ORACLES}")
  beta = config_checks.number(block, "beta", positive=True, prefix="online.")
  per_prompt = config_checks.integer(
    block, "pairs_per_prompt", minimum=1, prefix="online."
  )
  if config.input.batch_size % per_prompt:
    raise ValueError(
      f"online.pairs_per_prompt={per_prompt} does not divide"
      f" input.batch_size={config.input.batch_size}"
    )
  max_new_tokens = config_checks.integer(
    block, "max_new_tokens", minimum=1, prefix="online."
  )
  if jax.process_count() > 1:
    raise ValueError(
      "online.enabled=True runs in one process for now, this run has"
      f" {jax.process_count()}"
    )
  return OnlineConfig(
    every=every,
    mixture=mixture,
    oracle=ot.make_oracle(name, beta=beta),
    pairs_per_prompt=per_prompt,
    max_new_tokens=max_new_tokens,
  )


def train_prompts(section: ml_collections.ConfigDict) -> list[str]:
  """The distinct prompt texts of the "train" split, in stored order."""
  builder = data_sources.prepare(data.parse_input_config(section))
  source = data_sources.data_source(builder, "train")
  seen: dict[str, None] = {}
  for record in token_stats.iter_source(source):
    seen.setdefault(token_stats.read_texts(record)[0], None)
  return list(seen)


def build(
  config: ml_collections.ConfigDict,
  online: OnlineConfig,
  mesh: jax.sharding.Mesh,
  workdir: str,
) -> OnlinePairs:
  """The online train iterator of a validated config (`validate`)."""
  section = inputs.dataset_section(config, workdir)
  encoder = pipeline.make_encoder(data.parse_input_config(section))
  abstract = nnx.eval_shape(
    lambda: models.build_model(config.model, rngs=nnx.Rngs(0))
  )
  return OnlinePairs(
    online,
    prompts=train_prompts(section),
    encoder=encoder,
    model_def=nnx.split(abstract, nnx.Param, ...)[0],
    mesh=mesh,
    batch_size=config.input.batch_size,
    seed=config.seed,
  )


class OnlinePairs:
  """The train iterator of online pairs (module docstring).

  `follow(read_state)` must be called before the first batch: `read_state()`
  returns the training loop's current `TrainState` (the one the next batch
  will update). Attributes for inspection: `last_refresh` (the step, the
  sampled rows and the labelled pairs of the latest refresh) and `counts`
  (pairs kept and dropped so far, by reason).
  """

  def __init__(
    self,
    online: OnlineConfig,
    *,
    prompts: list[str],
    encoder: Any,
    model_def: nnx.GraphDef,
    mesh: jax.sharding.Mesh,
    batch_size: int,
    seed: int,
  ):
    self._online = online
    self._prompts = prompts
    try:
      self._words = [ot.prompt_word(p) for p in prompts]
    except ValueError as e:
      raise ValueError(
        f"online.oracle labels oracle-task prompts; input.files' train split {e}"
      ) from None
    self._encoder = encoder
    tokenizer = encoder.tokenizer
    if tokenizer.eos_id is None:
      raise ValueError(
        "online sampling needs an EOS token: set input.eos_token"
      )
    ids = [encoder.prompt_ids(p) for p in prompts]
    self._width = max(len(i) for i in ids)
    if self._width + online.max_new_tokens > encoder.max_length:
      raise ValueError(
        f"online.max_new_tokens={online.max_new_tokens} after the longest"
        f" prompt ({self._width} tokens) exceeds input.max_length="
        f"{encoder.max_length}: responses would be cut; lower the first or"
        " raise the second"
      )
    self._prompt_ids = ids
    self._model_def = model_def
    self._mesh = mesh
    self._batch_size = batch_size
    self._seed = seed
    self._rows = sharding.local_batch_rows(mesh, batch_size)
    self._plan = pipeline.BatchPlan(
      np.arange(len(prompts)),
      seed=seed,
      shuffle=True,
      batch_size=batch_size // online.pairs_per_prompt,
      process_index=0,
      process_count=1,
    )
    self._sampling = sampling.SamplingConfig(
      max_new_tokens=online.max_new_tokens,
      temperature=1.0,  # the policy's own distribution: no truncation
      top_k=0,
      top_p=1.0,
      eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id,
    )
    self._sampler = None
    self._read_state: Callable[[], Any] | None = None
    self._next_step = 1
    self._pending: list[
      list[list[Any]]
    ] = []  # per step: [prompt, chosen, rejected, weight]
    self.counts: dict[str, int] = {}
    self.last_refresh: dict[str, Any] | None = None

  def follow(self, read_state: Callable[[], Any]) -> None:
    """Gives the iterator its handle on the loop's current train state."""
    self._read_state = read_state

  def __iter__(self) -> OnlinePairs:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    step = self._next_step
    if not self._pending:
      self._pending = self._refresh(step)
    pairs = self._pending.pop(0)
    batch = self._encoder.encode_batch([tuple(p[:3]) for p in pairs])
    batch["weight"] = np.asarray([p[3] for p in pairs], np.float32)
    self._next_step += 1
    return {k: v[self._rows] for k, v in batch.items()}

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable: the next step and the window's pending pairs."""
    return dict(
      next_step=self._next_step,
      pending=[[list(pair) for pair in pairs] for pairs in self._pending],
      every=self._online.every,
      batch_size=self._batch_size,
      seed=self._seed,
    )

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes at `state` (from `get_state`), which must be this stream's."""
    mine = self.get_state()
    for key, config_key in (
      ("every", "online.every"),
      ("batch_size", "input.batch_size"),
      ("seed", "seed"),
    ):
      if state.get(key) != mine[key]:
        raise ValueError(
          f"the checkpoint's online input state has {key}={state.get(key)!r}"
          f" but this run has {config_key}={mine[key]!r}"
        )
    self._next_step = int(state["next_step"])
    self._pending = [list(map(list, pairs)) for pairs in state["pending"]]

  # ------------------------------------------------------------ sampling

  def _refresh(self, step: int) -> list[list[list[Any]]]:
    """Samples and labels the pairs of steps step .. step + K − 1."""
    if self._read_state is None:
      raise RuntimeError(
        "OnlinePairs.follow(read_state) was not called: the online input"
        " samples from the training loop's current policy"
      )
    state = self._read_state()
    if int(state.step) != step - 1:
      raise RuntimeError(
        f"the online input samples the batch of step {step} but the train"
        f" state has taken {int(state.step)} steps"
      )
    k, m = self._online.every, self._online.pairs_per_prompt
    chosen = np.concatenate([self._plan(step - 1 + i) for i in range(k)])
    rows = np.repeat(chosen, 2 * m)  # [2 K B] prompt index per sample
    tokens, lengths = sampling.left_pad(
      [self._prompt_ids[i] for i in rows],
      pad_id=self._encoder.tokenizer.pad_id,
      length=self._width,
    )
    key = jax.random.fold_in(jax.random.key(self._seed), _STREAM)
    out = jax.device_get(
      self._sample(state)(
        *self._params(state), tokens, lengths, jax.random.fold_in(key, step)
      )
    )
    rng = np.random.default_rng([self._seed, _STREAM, step])
    samples, labelled = [], []
    for row, prompt in enumerate(rows):
      n = int(out.lengths[row])
      ids = out.tokens[row, :n]
      samples.append(
        dict(
          prompt=self._prompts[prompt],
          tokens=ids.tolist(),
          logp=float(out.logps[row, :n].sum()),
          eos=bool(n and ids[-1] == self._sampling.eos_id),
          completion=self._encoder.tokenizer.decode(ids),
        )
      )
    for pair in range(len(rows) // 2):
      labelled.append(
        self._label(rows[2 * pair], samples[2 * pair : 2 * pair + 2], rng)
      )
    b = self._batch_size
    windows = [labelled[i * b : (i + 1) * b] for i in range(k)]
    self.last_refresh = dict(step=step, samples=samples, pairs=labelled)
    batches = [self._fill(pairs, step + i) for i, pairs in enumerate(windows)]
    logging.info(
      "online pairs at step %d (mixture %g): %s so far.",
      step,
      self._online.mixture,
      self.counts,
    )
    return batches

  def _params(self, state) -> tuple[Any, ...]:
    mixture = self._online.mixture
    if mixture == 0:
      return (state.params,)
    if mixture == 1:
      return (state.ref_params,)
    return state.params, state.ref_params

  def _sample(self, state):
    if self._sampler is None:  # Built on first use: the state's shardings.
      mixture = self._online.mixture
      self._sampler = sampling.make_sampler(
        self._model_def,
        self._sampling,
        mesh=self._mesh,
        param_sharding=jax.tree.map(lambda x: x.sharding, state.params),
        mixture=mixture if 0 < mixture < 1 else None,
      )
    return self._sampler

  def _label(self, prompt: int, pair, rng) -> dict[str, Any]:
    """One sampled pair -> {prompt, chosen, rejected, p_chosen, drop}, the
    drop reason None for a kept pair (as `label_policy_samples`)."""
    a, b = pair
    x = self._words[prompt]
    out = dict(prompt=self._prompts[prompt], drop=None)
    if not (a["eos"] and b["eos"]):
      out["drop"] = "unfinished"
    elif not (a["completion"].strip() and b["completion"].strip()):
      out["drop"] = "empty"
    else:
      y, y2 = (
        ot.response_word(a["completion"]),
        ot.response_word(b["completion"]),
      )
      if y == y2:
        out["drop"] = "identical"
      else:
        if not ot.label(self._online.oracle, x, y, y2, rng):
          (a, y), (b, y2) = (b, y2), (a, y)
        out.update(
          chosen=a["completion"],
          rejected=b["completion"],
          p_chosen=self._online.oracle.prob(x, y, y2),
        )
        # Text that re-encodes longer than it was sampled (e.g. a lone
        # invalid UTF-8 byte decoded as U+FFFD) could be cut: never trained.
        encoded = self._encoder.truncate(
          out["prompt"], out["chosen"], out["rejected"]
        )
        if encoded.drop_reason is not None or any(encoded.truncated):
          out["drop"] = "truncated"
    reason = out["drop"] or "pairs"
    self.counts[reason] = self.counts.get(reason, 0) + 1
    return out

  def _fill(self, pairs, step: int) -> list[list[Any]]:
    """[prompt, chosen, rejected, weight] rows; dropped pairs at weight 0."""
    kept = [p for p in pairs if p["drop"] is None]
    if not kept:
      raise ValueError(
        f"step {step}: every online pair of the batch was dropped"
        f" ({[p['drop'] for p in pairs]}); raise online.max_new_tokens or"
        " start from a policy that ends its responses (e.g. an SFT run)"
      )
    fill = kept[0]
    return [
      [q["prompt"], q["chosen"], q["rejected"], float(q is p)]
      for p in pairs
      for q in [p if p["drop"] is None else fill]
    ]
