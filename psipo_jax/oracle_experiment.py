r"""The known-oracle language experiment, one command per stage or all of them.

    python -m psipo_jax.oracle_experiment --workdir=runs/oracle --stage=all \
        [--oracle=deterministic] [--loss=ipo] [--tau=0.25] [--seed=0] ...

The small setting's whole grid (ipo, dpo × τ ∈ {0.05, 0.1, 0.25, 0.5, 1}
× seeds 0–2, experiments/lm_oracle.py's sweep, trained as one vmapped
program by `psipo_jax.lm_grid`), evaluated at every checkpoint, with its
table and figures, is one command (experiments/README.md, "Language model
with a known oracle", has its measured run):

    python -m psipo_jax.oracle_experiment --workdir=runs/oracle_det \
        --stage=all --grid=full --all_steps

The larger setting, for one accelerator (`--size=large`, SIZES below: a
d = 256 decoder, 4,096 prompts, 32,768 pairs, 1,000 steps of 64; every
other flag still overrides it):

    python -m psipo_jax.oracle_experiment --workdir=runs/oracle_large \
        --size=large --stage=all --grid=full --all_steps

Stages (`--stage`), each reading what the previous ones wrote in workdir
(`psipo_jax.oracle_pipeline` documents what each computes):

  data      prompts.json (disjoint train/test prompt words) and
            sft_data/{train,test}.jsonl (base-distribution responses)
  sft       sft/: the reference, an `objective="sft"` run of the tiny
            transformer (experiments/lm_sft_tiny.py) on sft_data
  pairs     pairs/{train,test}.jsonl: pairs sampled from the SFT policy,
            labelled by `--oracle`; pairs/counts.json (pairs kept, dropped)
  train     policies/<loss>_tau<tau>_seed<seed>/: a ΨPO run
            (experiments/lm_oracle.py with `loss.name`, `loss.tau`, `seed`)
            from the SFT policy, which is also its reference; with
            `--grid=full` (or `tiny`, its 4-point sweep) the whole sweep
            instead, as one program, into sweep/<sweep name>/<point>/ (the
            launcher's layout: `launch/collect.py` reads it); with
            `--online_every=K` (K >= 1) online IPO instead
            (`psipo_jax.online`: pairs sampled from the policy every K
            steps, from its mixture with the reference with
            `--online_mixture`, labelled by `--oracle`), in
            policies/online<K>_mix<β>_<loss>_tau<tau>_seed<seed>/
  evaluate  eval/<run dir name>.json for this run, or for every run dir
            matching `--policies` (a glob: e.g. a sweep's runs): win rate
            against the reference under the exact p*, KL(π‖π_ref) from the
            policy's samples, implicit-reward accuracy on the held-out
            pairs, each with a 95% interval, and the margins h on the
            training pairs (`h_train_values`, summarised in `h_train`
            against IPO's target 1/(2τ)); of the newest checkpoint, and
            with `--all_steps` of every checkpoint as well, into
            eval/<run dir name>/<step>.json (the learning curves); with
            `--grid`, every run of the grid
  report    report/: the table (summary.md, .json) and the figures of
            every evaluation in eval/ (`psipo_jax.oracle_report`)
  all       every stage in order (a finished SFT or ΨPO run is resumed,
            i.e. left as it is, by the trainer)

Other grids: `train` once per (loss, τ, seed), or experiments/lm_oracle.py
through the sweep launcher (one process per point), then one `evaluate
--policies=GLOB` over the runs. The sizes below default to a
CPU-minutes setting, not a tuned experiment.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any

from absl import flags

from psipo_jax import cli
from psipo_jax import lm_grid
from psipo_jax import oracle_pipeline as op
from psipo_jax import oracle_report
from psipo_jax import sweeps
from psipo_jax import trained_policy
from psipo_jax import train
from psipo_jax.data import oracle_task as ot

STAGES = ("data", "sft", "pairs", "train", "evaluate", "report")
GRIDS = ("", "full", "tiny")  # Settings.grid: one run, or lm_oracle's sweeps


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sizes and choices of one experiment (the command's flags)."""

  workdir: str
  oracle: str = "deterministic"
  beta: float = 1.0
  loss: str = "ipo"
  tau: float = 0.25
  seed: int = 0
  num_train_prompts: int = 256
  num_test_prompts: int = 64
  sft_responses_per_prompt: int = 4
  pairs_per_prompt: int = 4
  max_new_tokens: int = 10  # the base responses: <= 6 letters, space, EOS
  model_preset: str = "tiny"  # sft, train: the decoder (`model.preset`)
  num_layers: int = 2  # sft, train: its depth (experiments/lm_oracle.py's)
  sft_steps: int = 300
  train_steps: int = 200
  learning_rate: float = 1e-3
  batch_size: int = 16
  eval_samples_per_prompt: int = 8
  policies: str = ""  # evaluate: a glob of run dirs ("": this run's)
  online_every: int = 0  # train: 0 offline pairs; K >= 1 online IPO
  online_mixture: float = 0.0  # train, online: β of the reference mixture
  all_steps: bool = False  # evaluate: every checkpoint, not only the newest
  grid: str = ""  # train, evaluate: one of GRIDS ("": this one run)

  def path(self, *parts: str) -> str:
    return os.path.join(os.path.abspath(self.workdir), *parts)

  @property
  def run_name(self) -> str:
    online = (
      f"online{self.online_every}_mix{self.online_mixture:g}_"
      if self.online_every
      else ""
    )
    return f"{online}{self.loss}_tau{self.tau:g}_seed{self.seed}"


# Named sizes (`--size`): the Settings fields that differ from the defaults
# (the small setting: CPU minutes). Flags given on the command line override
# their size's values.
SIZES = {
  "small": {},
  # For one accelerator (not measured on one yet): the `small` preset (d =
  # 256, 4 layers, 3.0M parameters at the byte vocabulary), 16 times the
  # prompts, 32 times the pairs, 5 times the ΨPO steps at 4 times the batch.
  "large": dict(
    model_preset="small",
    num_layers=4,
    num_train_prompts=4096,
    num_test_prompts=512,
    sft_responses_per_prompt=8,
    sft_steps=3000,
    pairs_per_prompt=8,
    train_steps=1000,
    batch_size=64,
    eval_samples_per_prompt=16,
  ),
}


def settings_for(size: str, **given: Any) -> Settings:
  """The Settings of `size` (a SIZES name) with the fields `given` set."""
  if size not in SIZES:
    raise ValueError(f"--size={size!r} is not one of {tuple(SIZES)}")
  return Settings(**{**SIZES[size], **given})


def _require(path: str, stage: str) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: run --stage={stage} first")
  return path


def _text_config(config, settings: Settings, files, steps: int):
  config.input.files = files
  config.input.data_dir = settings.path("tfds")
  config.input.batch_size = settings.batch_size
  # BOS + the longest prompt ("abcde ->") + max_new_tokens: nothing is cut.
  config.input.max_length = 1 + len(ot.prompt_text("a" * ot.MAX_PROMPT_LENGTH))
  config.input.max_length += settings.max_new_tokens
  config.input.max_prompt_length = config.input.max_length - 1
  config.total_steps = steps
  config.optimizer.warmup_steps = 0
  config.log_every = config.eval_every = config.ckpt_every = steps
  return config


def _pair_files(settings: Settings, stage: str) -> dict[str, str]:
  return {
    split: _require(settings.path(stage, f"{split}.jsonl"), stage)
    for split in ("train", "test")
  }


def stage_data(settings: Settings) -> None:
  prompts = op.split_prompts(
    settings.num_train_prompts, settings.num_test_prompts, settings.seed
  )
  os.makedirs(settings.path(), exist_ok=True)
  with open(settings.path("prompts.json"), "w") as f:
    json.dump(prompts, f)
  op.write_sft_data(
    settings.path("sft_data"),
    prompts,
    responses_per_prompt=settings.sft_responses_per_prompt,
    seed=settings.seed,
  )


def _prompts(settings: Settings) -> dict[str, list[str]]:
  with open(_require(settings.path("prompts.json"), "data")) as f:
    return json.load(f)


def stage_sft(settings: Settings) -> None:
  from experiments import lm_sft_tiny  # the configs live beside the package

  config = _text_config(
    lm_sft_tiny.get_config("runlocal"),
    settings,
    _pair_files(settings, "sft_data"),
    settings.sft_steps,
  )
  config.model.preset = settings.model_preset  # the train stage's model
  config.model.num_layers = settings.num_layers
  config.seed = settings.seed
  train.train_and_evaluate(config, settings.path("sft"))


def stage_pairs(settings: Settings) -> None:
  reference = trained_policy.Policy(_require(settings.path("sft"), "sft"))
  oracle = ot.make_oracle(settings.oracle, beta=settings.beta)
  counts = {}
  for split, prompts in _prompts(settings).items():
    records, counts[split] = op.label_policy_samples(
      reference,
      prompts,
      oracle,
      pairs_per_prompt=settings.pairs_per_prompt,
      max_new_tokens=settings.max_new_tokens,
      seed=settings.seed + (split == "test"),
      split=split,
    )
    op.write_jsonl(settings.path("pairs", f"{split}.jsonl"), records)
  with open(settings.path("pairs", "counts.json"), "w") as f:
    json.dump(counts, f, indent=2)


def grid_spec(settings: Settings) -> str:
  """The `--config` spec of experiments/lm_oracle.py's sweep that
  `settings.grid` names, at this experiment's response cap and steps."""
  from experiments import lm_oracle

  arg = _lm_oracle_arg(settings) + (",tiny" if settings.grid == "tiny" else "")
  return f"{lm_oracle.__file__}:{arg}"


def _lm_oracle_arg(settings: Settings) -> str:
  """experiments/lm_oracle.py's argument for this experiment's ΨPO runs."""
  arg = (
    f"root={settings.path()},max_new_tokens={settings.max_new_tokens},"
    f"steps={settings.train_steps}"
  )
  default = Settings(workdir="")
  for key, field in (("preset", "model_preset"), ("layers", "num_layers")):
    if getattr(settings, field) != getattr(default, field):
      arg += f",{key}={getattr(settings, field)}"  # else the names stay short
  return arg


def _grid_runs(settings: Settings) -> str:
  """A glob of the grid's run directories."""
  return settings.path("sweep", sweeps.sweep_name(grid_spec(settings)), "*")


def stage_train(settings: Settings) -> None:
  from experiments import lm_oracle  # the same config a sweep runs

  _require(settings.path("sft"), "sft")
  _pair_files(settings, "pairs")
  if settings.grid:
    lm_grid.run(
      grid_spec(settings),
      settings.path("sweep"),
      [
        f"--config.input.batch_size={settings.batch_size}",
        f"--config.optimizer.learning_rate={settings.learning_rate}",
      ],
    )
    return
  config = lm_oracle.get_config(
    f"{_lm_oracle_arg(settings)},loss={settings.loss}"
    + (
      f",online,every={settings.online_every},"
      f"mixture={settings.online_mixture},oracle={settings.oracle}"
      if settings.online_every
      else ""
    )
  )
  if settings.online_every:
    config.online.beta = settings.beta
  config.input.batch_size = settings.batch_size
  config.seed = settings.seed
  config.loss.tau = settings.tau
  config.optimizer.learning_rate = settings.learning_rate
  train.train_and_evaluate(config, settings.path("policies", settings.run_name))


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def _evaluate_step(settings, policy, reference, pairs) -> dict[str, Any]:
  """The evaluation of `policy`'s current parameters: `op.evaluate` on the
  held-out prompts and pairs, and the margins h on the training pairs."""
  loss = policy.config.get("loss") or {}
  seed = int(policy.config.get("seed", 0))
  result = op.evaluate(
    policy,
    reference,
    _prompts(settings)["test"],
    ot.make_oracle(settings.oracle, beta=settings.beta),
    samples_per_prompt=settings.eval_samples_per_prompt,
    max_new_tokens=settings.max_new_tokens,
    seed=seed + 2,  # the same draws at every step of a run
    pairs=pairs["test"],
  )
  online = policy.config.get("online") or {}
  h = op.implicit_margins(policy, reference, pairs["train"])
  tau = loss.get("tau")
  return dict(
    result,
    online=dict(every=online["every"], mixture=online["mixture"])
    if online.get("enabled")
    else None,
    loss=loss.get("name"),
    tau=tau,
    seed=seed,
    run=policy.workdir,
    h_train=op.margin_summary(h, tau) if tau else None,
    h_train_values=[round(float(v), 4) for v in h],
  )


def stage_evaluate(settings: Settings) -> list[dict[str, Any]]:
  """Evaluates `settings.policies` (a glob of run dirs; default this
  settings' own run) into eval/<run dir name>.json each (its newest
  checkpoint), and with `all_steps` every checkpoint of each into
  eval/<run dir name>/<step>.json as well (the learning curves)."""
  pattern = settings.policies or (
    _grid_runs(settings)
    if settings.grid
    else settings.path("policies", settings.run_name)
  )
  run_dirs = sorted(
    d
    for d in glob.glob(pattern)
    if os.path.isfile(os.path.join(d, "config.json"))
  )
  if not run_dirs:
    raise FileNotFoundError(
      f"no training run matches {pattern}: run --stage=train first"
    )
  reference = trained_policy.Policy(_require(settings.path("sft"), "sft"))
  files = _pair_files(settings, "pairs")
  pairs = {split: _read_jsonl(path) for split, path in files.items()}
  os.makedirs(settings.path("eval"), exist_ok=True)
  results = []
  for run_dir in run_dirs:
    policy = trained_policy.Policy(run_dir)
    steps = policy.checkpoint_steps()
    name = os.path.basename(os.path.normpath(run_dir))
    for step in steps if settings.all_steps else steps[-1:]:
      policy.load_step(step)
      result = dict(
        _evaluate_step(settings, policy, reference, pairs), step=step
      )
      if settings.all_steps:
        os.makedirs(settings.path("eval", name), exist_ok=True)
        with open(settings.path("eval", name, f"{step}.json"), "w") as f:
          json.dump(result, f)
    with open(settings.path("eval", f"{name}.json"), "w") as f:
      json.dump(result, f)  # the newest step's
    results.append(result)
  return results


def stage_report(settings: Settings) -> None:
  oracle_report.report(settings.path(), prefix=f"oracle_{settings.oracle}_")


RUNNERS = {
  "data": stage_data,
  "sft": stage_sft,
  "pairs": stage_pairs,
  "train": stage_train,
  "evaluate": stage_evaluate,
  "report": stage_report,
}


def run(stage: str, settings: Settings) -> None:
  """Runs `stage` (one of STAGES, or "all")."""
  if stage != "all" and stage not in RUNNERS:
    raise ValueError(f"--stage={stage!r} is not one of {(*STAGES, 'all')}")
  ot.make_oracle(settings.oracle, beta=settings.beta)  # refuse a bad name first
  if settings.online_every < 0:
    raise ValueError(
      f"--online_every={settings.online_every} must be >= 0 (0: offline"
      " pairs; K >= 1: online IPO, pairs sampled every K steps)"
    )
  if settings.grid not in GRIDS:
    raise ValueError(f"--grid={settings.grid!r} is not one of {GRIDS}")
  if settings.grid and settings.online_every:
    raise ValueError(
      "--grid with --online_every: the vmapped grid trains on the offline"
      " pairs; run online IPO one run at a time (--stage=train)"
    )
  for name in STAGES if stage == "all" else (stage,):
    RUNNERS[name](settings)


def _define_flags() -> tuple[dict[str, flags.FlagHolder], flags.FlagHolder]:
  """(a flag per `Settings` field, --stage), defined only when this module
  is the program (other command-line modules define --workdir too, and
  tests import several of them into one process)."""
  holders = {}
  for field in dataclasses.fields(Settings):
    define = {
      "str": flags.DEFINE_string,
      "float": flags.DEFINE_float,
      "int": flags.DEFINE_integer,
      "bool": flags.DEFINE_boolean,
    }[field.type]
    default = None if field.name == "workdir" else field.default
    holders[field.name] = define(field.name, default, f"Settings.{field.name}.")
  stage = flags.DEFINE_string("stage", "all", f"One of {(*STAGES, 'all')}.")
  holders["size"] = flags.DEFINE_string(
    "size",
    "small",
    f"One of {tuple(SIZES)}: the sizes the other flags override.",
  )
  flags.mark_flags_as_required(["workdir"])
  return holders, stage


def main(argv, holders, stage_holder):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  stage = stage_holder.value
  with cli.user_errors():
    settings = settings_for(
      holders["size"].value,
      **{
        k: h.value
        for k, h in holders.items()
        if k != "size" and (h.present or k == "workdir")
      },
    )
    run(stage, settings)
  if stage in ("evaluate", "all"):
    for path in sorted(glob.glob(settings.path("eval", "*.json"))):
      with open(path) as f:
        result = json.load(f)
      result.pop("h_train_values", None)  # in the file; too long to print
      print(json.dumps(result))


if __name__ == "__main__":
  _holders, _stage = _define_flags()
  cli.run(lambda argv: main(argv, _holders, _stage))
