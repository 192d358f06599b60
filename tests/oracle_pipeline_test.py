"""The known-oracle pipeline's stages on a tiny LM: SFT data, SFT, labelled
samples, a ΨPO run on them, and the evaluation against the reference."""

import dataclasses
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import lm_oracle
from psipo_jax import oracle_experiment
from psipo_jax import oracle_pipeline as op
from psipo_jax import oracle_report
from psipo_jax import stats
from psipo_jax import trained_policy
from psipo_jax.data import oracle_task as ot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW_TOKENS = 10  # the base responses have at most 6 letters + space + EOS


def test_sft_data_has_base_responses_and_disjoint_prompts(tmp_path):
  prompts = op.split_prompts(30, 10, seed=0)
  assert not set(prompts["train"]) & set(prompts["test"])
  files = op.write_sft_data(
    str(tmp_path), prompts, responses_per_prompt=3, seed=0
  )
  for split, path in files.items():
    records = [json.loads(l) for l in open(path)]
    assert len(records) == 3 * len(prompts[split])
    for r in records:
      x = r["prompt"].removesuffix(" ->")
      assert x in prompts[split] and r["prompt"] == ot.prompt_text(x)
      y, y2 = (ot.response_word(r[k]) for k in ("chosen", "rejected"))
      assert y != y2 and set(y + y2) <= set(ot.ALPHABET)
      assert 1 <= len(y) <= ot.MAX_RESPONSE_LENGTH


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  """`oracle_experiment` run through every stage at tiny sizes."""
  settings = oracle_experiment.Settings(
    workdir=str(tmp_path_factory.mktemp("oracle")),
    oracle="deterministic",
    num_train_prompts=64,
    num_test_prompts=16,
    sft_responses_per_prompt=4,
    pairs_per_prompt=2,
    max_new_tokens=MAX_NEW_TOKENS,
    sft_steps=150,
    train_steps=30,
    learning_rate=3e-3,
    eval_samples_per_prompt=4,
  )
  oracle_experiment.run("all", settings)
  return settings


@pytest.mark.slow
def test_every_stage_runs_and_the_evaluation_is_consistent(experiment):
  settings = experiment
  prompts = json.load(open(settings.path("prompts.json")))
  oracle = ot.make_oracle("deterministic")
  counts = json.load(open(settings.path("pairs", "counts.json")))
  for split in ("train", "test"):
    records = [
      json.loads(l) for l in open(settings.path("pairs", f"{split}.jsonl"))
    ]
    # The SFT policy has learnt the format: nearly every pair is usable.
    assert len(records) == counts[split]["pairs"]
    assert len(records) >= 1.5 * len(prompts[split]), counts
    for r in records:
      x = r["prompt"].removesuffix(" ->")
      assert x in prompts[split]
      y, y2 = ot.response_word(r["chosen"]), ot.response_word(r["rejected"])
      assert r["p_chosen"] == oracle.prob(x, y, y2) == 1.0  # the winner

  reference = trained_policy.Policy(settings.path("sft"))
  test_pairs = [
    json.loads(l) for l in open(settings.path("pairs", "test.jsonl"))
  ]
  kwargs = dict(
    samples_per_prompt=4,
    max_new_tokens=MAX_NEW_TOKENS,
    seed=3,
    pairs=test_pairs,
  )
  # The reference against itself: every log-ratio is 0 (the sampler's
  # log-probs are the scorer's), so the KL and every margin h vanish.
  same = op.evaluate(reference, reference, prompts["test"], oracle, **kwargs)
  assert abs(same["kl"]) < 1e-4 and same["kl_ci"] < 1e-4
  assert same["reward_accuracy"] == 0.0  # h > 0 never holds at h = 0

  got = json.load(open(settings.path("eval", f"{settings.run_name}.json")))
  assert (got["loss"], got["tau"], got["seed"]) == ("ipo", 0.25, 0)
  for key in ("win_rate", "kl", "reward_accuracy", "eos_fraction"):
    assert np.isfinite(got[key]) and np.isfinite(got.get(f"{key}_ci", 0)), key
  assert 0 <= got["win_rate"] <= 1 and got["kl"] > 0
  # The implicit-reward accuracy is the trainer's own on the same pairs.
  metrics = settings.path("policies", settings.run_name, "metrics.jsonl")
  lines = [json.loads(l) for l in open(metrics)]
  trainer = [l for l in lines if l["split"] == "eval"][-1]["rewards/accuracies"]
  assert got["reward_accuracy"] == pytest.approx(trainer, abs=1e-6)


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "psipo_jax.oracle_experiment", *args],
    cwd=ROOT,
    env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.mark.slow
def test_one_stage_from_the_command_line(experiment, tmp_path):
  s = experiment
  done = _cli(
    f"--workdir={s.workdir}",
    "--stage=evaluate",
    f"--policies={s.workdir}/policies/*",
    f"--max_new_tokens={s.max_new_tokens}",
    "--eval_samples_per_prompt=2",
  )
  assert done.returncode == 0, done.stderr
  (line,) = done.stdout.splitlines()  # one run matches
  result = json.loads(line)
  assert set(result) >= {"win_rate", "kl", "reward_accuracy", "loss", "tau"}
  assert "h_train_values" not in result  # in the file only
  assert result["run"] == s.path("policies", s.run_name)
  missing = _cli(f"--workdir={tmp_path}", "--stage=pairs")
  assert missing.returncode == 2
  assert "sft does not exist: run --stage=sft first" in missing.stderr
  bad = _cli(f"--workdir={tmp_path}", "--stage=sample")
  assert bad.returncode == 2 and "--stage='sample' is not one of" in bad.stderr
  bad = _cli(f"--workdir={tmp_path}", "--size=huge", "--stage=data")
  assert bad.returncode == 2 and "--size='huge' is not one of" in bad.stderr


@pytest.mark.slow
def test_every_checkpoint_is_evaluated_and_reported(experiment, tmp_path):
  s = dataclasses.replace(experiment, all_steps=True, eval_samples_per_prompt=2)
  oracle_experiment.stage_evaluate(s)
  per_step = {}
  for path in glob.glob(s.path("eval", s.run_name, "*.json")):
    result = json.load(open(path))
    per_step[result["step"]] = result
  # 30 steps, a checkpoint every 30 // 4 = 7 and at the end (all kept).
  assert sorted(per_step) == [7, 14, 21, 28, 30]
  final = json.load(open(s.path("eval", f"{s.run_name}.json")))
  assert final == per_step[30]
  # Each step's accuracy is the trainer's at that step: the evaluation read
  # that step's parameters, not the newest.
  metrics = s.path("policies", s.run_name, "metrics.jsonl")
  trainer = {
    l["step"]: l["rewards/accuracies"]
    for l in map(json.loads, open(metrics))
    if l["split"] == "eval"
  }
  accuracies = {step: r["reward_accuracy"] for step, r in per_step.items()}
  assert accuracies == pytest.approx({k: trainer[k] for k in per_step})
  assert len(set(accuracies.values())) > 1  # the steps differ
  policy = trained_policy.Policy(s.path("policies", s.run_name))
  assert policy.checkpoint_steps() == [7, 14, 21, 28, 30]
  with pytest.raises(ValueError, match=r"holds no step 8 \(it holds \[7, 14"):
    policy.load_step(8)
  train_pairs = json.load(open(s.path("pairs", "counts.json")))["train"]
  h = np.asarray(final["h_train_values"])
  assert h.shape == (train_pairs["pairs"],)
  summary = final["h_train"]
  assert summary["target"] == 1 / (2 * s.tau)
  assert summary["above_target"] == pytest.approx(
    np.mean(h > summary["target"]), abs=1 / h.size
  )
  assert summary["quantiles"]["0.5"] == pytest.approx(np.median(h), abs=1e-3)

  done = oracle_report.report(s.workdir, out=str(tmp_path), prefix="t_")
  assert sorted(os.path.basename(p) for p in done["figures"]) == [
    "t_curves.png",
    "t_frontier.png",
    "t_h_hist.png",
  ]
  for path in done["figures"]:
    assert 1_000 < os.path.getsize(path) < 200_000, path
  (row,) = done["rows"]  # one run: one (loss, τ), one seed, no interval
  assert (row["loss"], row["tau"], row["seeds"]) == ("ipo", 0.25, [0])
  assert row["win_rate"] == final["win_rate"] and math.isnan(row["kl_ci"])
  assert open(s.path("report", "summary.md")).read() == done["table"]


@pytest.mark.slow
def test_a_size_sets_the_model_of_both_training_stages(experiment, tmp_path):
  """`--size=large`'s decoder trains in the SFT and the ΨPO stage (on the
  fixture's prompts and pairs: they are text, whatever the model)."""
  for name in ("prompts.json", "sft_data", "pairs"):
    copy = shutil.copytree if name != "prompts.json" else shutil.copy
    copy(experiment.path(name), str(tmp_path / name))
  s = oracle_experiment.settings_for(
    "large",
    workdir=str(tmp_path),
    num_layers=1,  # a quicker test; the preset's width stays
    sft_steps=2,
    train_steps=2,
    batch_size=8,  # the tests' 8 devices each take a share
  )
  assert (s.model_preset, s.num_train_prompts, s.sft_steps) == (
    "small",
    4096,
    2,
  )
  for stage in ("sft", "train"):
    oracle_experiment.run(stage, s)
  for run in (s.path("sft"), s.path("policies", s.run_name)):
    model = json.load(open(os.path.join(run, "config.json")))["model"]
    assert (model["preset"], model["num_layers"]) == ("small", 1), run
  default = oracle_experiment.Settings(workdir=str(tmp_path))
  assert (
    oracle_experiment.settings_for("small", workdir=str(tmp_path)) == default
  )
  assert default.num_layers == lm_oracle.NUM_LAYERS  # one default depth


def _result(loss, tau, seed, win_rate, kl):
  h = [0.5 * seed, 1.0, 3.0 + seed]
  return dict(
    loss=loss,
    tau=tau,
    seed=seed,
    win_rate=win_rate,
    kl=kl,
    reward_accuracy=0.5,
    h_train=op.margin_summary(np.asarray(h), tau),
    h_train_values=h,
  )


def test_the_report_groups_seeds_by_loss_and_tau(tmp_path):
  results = [
    _result("ipo", 0.5, 0, 0.6, 0.2),
    _result("ipo", 0.5, 1, 0.7, 0.4),
    _result("ipo", 0.5, 2, 0.65, 0.3),
    _result("dpo", 0.5, 0, 0.8, 3.0),
    _result("dpo", 0.5, 1, 0.9, 5.0),
  ]
  rows = oracle_report.aggregate(results)
  assert [(r["loss"], r["tau"], r["seeds"]) for r in rows] == [
    ("dpo", 0.5, [0, 1]),
    ("ipo", 0.5, [0, 1, 2]),
  ]
  dpo, ipo = rows
  mean, ci = stats.mean_and_ci([0.6, 0.7, 0.65])
  assert (ipo["win_rate"], ipo["win_rate_ci"]) == pytest.approx((mean, ci))
  assert dpo["kl"] == pytest.approx(4.0) and dpo["kl_ci"] > 0
  # Margins [0, 1, 3], [0.5, 1, 4], [1, 1, 5] against the target 1/(2τ) = 1.
  assert ipo["h_median"] == pytest.approx(1.0)
  assert ipo["h_above_target"] == pytest.approx(1 / 3)
  table = oracle_report.markdown_table(rows)
  assert "| ipo | 0.5 | 3 | 0.650 ± " in table
  with pytest.raises(ValueError, match="seed repeated"):
    oracle_report.aggregate(results + [_result("ipo", 0.5, 0, 0.6, 0.2)])


def test_online_runs_are_reported_apart_from_offline_ones(tmp_path):
  online = lambda every, mixture: dict(every=every, mixture=mixture)
  results = {
    "ipo_seed0": _result("ipo", 0.25, 0, 0.6, 0.3),
    "ipo_seed1": _result("ipo", 0.25, 1, 0.5, 0.3),
    "online1_seed0": dict(
      _result("ipo", 0.25, 0, 0.7, 0.2), online=online(1, 0)
    ),
    "online1_seed1": dict(
      _result("ipo", 0.25, 1, 0.8, 0.2), online=online(1, 0)
    ),
    "md_seed0": dict(_result("ipo", 0.25, 0, 0.65, 0.1), online=online(1, 0.5)),
  }
  rows = oracle_report.aggregate(list(results.values()))
  assert [(r["method"], r["loss"], r["seeds"]) for r in rows] == [
    ("ipo", "ipo", [0, 1]),
    ("ipo online K=1", "ipo", [0, 1]),
    ("ipo-md β=0.5 K=1", "ipo", [0]),
  ]
  assert [r["win_rate"] for r in rows] == pytest.approx([0.55, 0.75, 0.65])
  assert "| ipo online K=1 | 0.25 | 2 | 0.750 ± " in (
    oracle_report.markdown_table(rows)
  )
  os.makedirs(tmp_path / "eval")
  for name, result in results.items():
    (tmp_path / "eval" / f"{name}.json").write_text(json.dumps(result))
  done = oracle_report.report(str(tmp_path), runs=["online*", "md_*"])
  assert [r["method"] for r in done["rows"]] == [
    "ipo online K=1",
    "ipo-md β=0.5 K=1",
  ]
  with pytest.raises(FileNotFoundError, match=r"matching \['dpo\*'\]"):
    oracle_report.report(str(tmp_path), runs=["dpo*"])


def test_the_train_stage_config_sweeps_through_the_launcher(tmp_path):
  done = subprocess.run(
    [
      sys.executable,
      "launch/sweep.py",
      f"--config=experiments/lm_oracle.py:root={tmp_path},tiny",
      f"--root={tmp_path / 'sweep'}",
      "--dry-run",
    ],
    cwd=ROOT,
    env={**os.environ, "PYTHONPATH": ROOT},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr
  commands = done.stdout.splitlines()
  points = {c.split("--config.loss.name=")[1] for c in commands}
  assert points == {
    f"{loss} --config.loss.tau={tau}"
    for loss in ("ipo", "dpo")
    for tau in ("0.1", "1.0")
  }
  assert all(
    "-m psipo_jax.main --config=experiments/lm_oracle.py" in c for c in commands
  )


@pytest.mark.slow
def test_the_grid_trains_evaluates_and_reports_every_point(
  experiment, tmp_path
):
  """`--grid=tiny`: experiments/lm_oracle.py's 4-point sweep as one vmapped
  program, then every point evaluated and reported, from the fixture's
  prompts, SFT run and pairs (copied: the fixture's eval/ stays its own)."""
  for name in ("prompts.json", "sft", "pairs"):
    copy = shutil.copytree if name != "prompts.json" else shutil.copy
    copy(experiment.path(name), str(tmp_path / name))
  s = dataclasses.replace(
    experiment, workdir=str(tmp_path), grid="tiny", train_steps=4
  )
  for stage in ("train", "evaluate", "report"):
    oracle_experiment.run(stage, s)
  runs = sorted(glob.glob(s.path("sweep", "*", "*", "FINISHED")))
  assert len(runs) == 4
  evaluated = {
    (r["loss"], r["tau"]): r
    for r in map(json.load, map(open, glob.glob(s.path("eval", "*.json"))))
  }
  assert set(evaluated) == {(l, t) for l in ("ipo", "dpo") for t in (0.1, 1.0)}
  for (loss, tau), result in evaluated.items():
    # Each evaluation is of its own point's final parameters: its accuracy
    # is that point's trainer's on the same held-out pairs.
    metrics = os.path.join(result["run"], "metrics.jsonl")
    lines = [json.loads(l) for l in open(metrics)]
    (final,) = [l for l in lines if l["split"] == "eval" and l["step"] == 4]
    assert result["step"] == 4
    assert result["reward_accuracy"] == pytest.approx(
      final["rewards/accuracies"], abs=1e-6
    )
    assert json.load(open(os.path.join(result["run"], "config.json")))["loss"][
      "tau"
    ] == pytest.approx(tau)
  rows = json.load(open(s.path("report", "summary.json")))
  assert {(r["loss"], r["tau"]) for r in rows} == set(evaluated)
  for name in ("frontier", "h_hist"):
    assert os.path.isfile(s.path("report", f"oracle_deterministic_{name}.png"))
  with pytest.raises(ValueError, match="--grid='all' is not one of"):
    oracle_experiment.run("train", dataclasses.replace(s, grid="all"))
  with pytest.raises(ValueError, match="--grid with --online_every"):
    oracle_experiment.run(
      "train", dataclasses.replace(s, grid="tiny", online_every=1)
    )
