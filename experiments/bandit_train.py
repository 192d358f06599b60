r"""Finite-action (bandit) ΨPO through the full training system.

The illustrative setting of Azar et al. (arXiv:2310.12036, §5.3): three
actions, a uniform reference policy, and a dataset of observed preferences
(y_w, y_l) forming the total order y0 ≻ y1 ≻ y2. The policy is tabular,
π_θ = softmax(θ), θ ∈ R^3, initialised at θ₀ = log π_ref. The run goes
through the same path as a language model: sharded jitted step, Orbax
checkpoints, JSON-lines / TensorBoard metrics. Hyper-parameters are ours.

Command (a few seconds on a laptop CPU; `runlocal` for a quick smoke run):

  python -m psipo_jax.main --config=experiments/bandit_train.py:loss=ipo \
      --workdir=/tmp/bandit_ipo [--config.loss.tau=0.1]

Expected result: for IPO with τ = 0.1 the policy keeps mass on every action
(IPO's regression target 1/(2τ) bounds h), while DPO
(`loss=dpo`) pushes π(y2) towards 0: see `eval/logps/*` in metrics.jsonl.

Exact data order and optimiser (so that a vmapped runner can reproduce the
run number for number):
  * keys: `init_key, state_key, data_key =
    psipo_jax.data_order.run_keys(seed)` (Threefry-2x32);
  * step s = 0, 1, ... uses the pairs `input.pairs[i]` for
    `i = psipo_jax.data_order.minibatch_indices(data_key, s,
    batch_size=input.batch_size, dataset_size=len(input.pairs))` — uniform,
    with replacement, counter-based Threefry-2x32
    (`psipo_jax.pair_sampler.sample_indices`);
  * the loss is the mean over the batch of `psipo_jax.losses.<loss.name>` on
    log π_θ(y) = log_softmax(θ)_y against log π_ref(y) = log_softmax(θ₀)_y
    (float32);
  * the update is `optax.adam(optimizer.learning_rate)` (no clipping, no
    schedule) on θ, through `psipo_jax.update.apply_update` (kept only if
    everything stays finite).
"""

import ml_collections

from experiments import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Args: arg: comma-separated `loss=<name>` (default ipo) and `runlocal`."""
  args = common.parse_arg(arg, loss="ipo", runlocal=False)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 2000

  config.input = ml_collections.ConfigDict()
  config.input.name = "pairs"
  config.input.pairs = ((0, 1), (1, 2), (0, 2))  # (winner, loser)
  config.input.batch_size = 64  # global

  config.model = ml_collections.ConfigDict()
  config.model.name = "tabular"
  config.model.num_actions = 3
  config.model.ref_probs = ml_collections.config_dict.placeholder(
    tuple
  )  # None: uniform π_ref

  config.loss = ml_collections.ConfigDict()
  config.loss.name = args.loss
  config.loss.tau = 0.1
  config.loss.normalize = "sum"
  config.loss.nll_weight = 0.0
  # A module (dotted name or .py path) to import first: its losses register.
  config.loss.module = ml_collections.config_dict.placeholder(str)

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 0.01
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip_norm = ml_collections.config_dict.placeholder(
    float
  )

  common.add_trainer_keys(config)
  config.log_every = 100
  config.eval_every = 500
  config.ckpt_every = 500
  config.keep_checkpoints = 3

  if args.runlocal:
    config.total_steps = 200
    config.log_every = 20
    config.eval_every = 100
    config.ckpt_every = 100
  return config
