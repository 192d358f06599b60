"""Workdirs and data on object storage (gs://), through etils.epath.

The bucket is `object_store.FakeGcs`: epath's real gs:// code path (its
fsspec back-end) over objects kept in memory, with an object store's rules
(no append, whole objects at close, directories as prefixes). Everything
runs in this process, as the in-memory bucket is this process's.

Not exercised here: Orbax's array writes. Orbax hands a gs:// path to
TensorStore's own GCS driver (HTTP, not fsspec), so the test keeps the
`checkpoints/` of each gs:// workdir on local disk (`_LocalCheckpoints`);
every other file of the run, the reference job, the launcher and the
collector goes through the fake bucket.
"""

import csv
import io
import json
import os
import sys

import numpy as np
import pytest

import object_store
from experiments import lm_ipo_tiny
from psipo_jax import checkpointing
from psipo_jax import config_checks
from psipo_jax import precompute_reference
from psipo_jax import run_config
from psipo_jax import storage
from psipo_jax import sweeps
from psipo_jax import train
from psipo_jax.data import readers
from psipo_jax.data import text_task

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "launch"))
import collect  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import sweep  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

BUCKET = "gs://bucket"


@pytest.fixture
def gcs(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)  # a stray os-level write would land here
  monkeypatch.setenv("PSIPO_JAX_CACHE", str(tmp_path / "cache"))
  fs = object_store.install(monkeypatch)
  yield fs
  object_store.uninstall()
  assert not os.path.exists(tmp_path / "gs:"), "a gs:// path reached os"


def _text(fs, url: str) -> str:
  return fs.objects()[url].decode("utf-8")


def _jsonl(fs, url: str) -> list[dict]:
  return [json.loads(line) for line in _text(fs, url).splitlines()]


# ------------------------------------------------------------ the helpers


def test_append_log_and_append_text_rewrite_objects_whole(gcs):
  log = storage.AppendLog(f"{BUCKET}/run/metrics.jsonl")
  log.write("a\n")
  log.write("b\n")
  log.close()
  again = storage.AppendLog(f"{BUCKET}/run/metrics.jsonl")  # a resumed run
  again.write("c\n")
  assert _text(gcs, f"{BUCKET}/run/metrics.jsonl") == "a\nb\nc\n"
  storage.append_text(f"{BUCKET}/run/h.jsonl", "1\n")
  storage.append_text(f"{BUCKET}/run/h.jsonl", "2\n")
  assert _text(gcs, f"{BUCKET}/run/h.jsonl") == "1\n2\n"


def test_writable_directory_probes_the_bucket_and_leaves_nothing(gcs):
  assert config_checks.writable_directory(f"{BUCKET}/run/") == f"{BUCKET}/run"
  assert gcs.objects() == {}


def test_writable_directory_names_the_key_when_the_bucket_refuses(
  gcs, monkeypatch
):
  def denied(self, path, mode="rb", **kwargs):
    raise PermissionError(f"403 Forbidden: {path}")

  monkeypatch.setattr(object_store.FakeGcs, "_open", denied)
  with pytest.raises(ValueError, match=r"workdir='gs://bucket/run' is not"):
    config_checks.writable_directory(f"{BUCKET}/run", name="workdir")


def test_a_gs_data_dir_is_refused_by_name(gcs, tmp_path):
  from psipo_jax import inputs  # pylint: disable=g-import-not-at-top

  config = _config(tmp_path, {"train": "x", "test": "y"})
  config.input.data_dir = f"{BUCKET}/tfds"
  with pytest.raises(ValueError, match=r"input.data_dir='gs://bucket/tfds'"):
    inputs.dataset_section(config, f"{BUCKET}/run")
  config.input.data_dir = None
  section = inputs.dataset_section(config, f"{BUCKET}/run")
  assert section.data_dir == str(tmp_path / "cache" / "tfds")


def test_input_files_glob_and_default_ids_on_the_bucket(gcs):
  for name in ("a/x.jsonl", "a/y.jsonl", "b/z.jsonl", "a/notes.txt"):
    storage.write_atomically(f"{BUCKET}/data/{name}", b'{"k": 1}\n')
  paths = readers.expand_paths((f"{BUCKET}/data/*/*.jsonl",), key="input.files")
  assert paths == [
    f"{BUCKET}/data/a/x.jsonl",
    f"{BUCKET}/data/a/y.jsonl",
    f"{BUCKET}/data/b/z.jsonl",
  ]
  root = readers.id_root(paths)
  assert root == f"{BUCKET}/data"
  (record,) = readers.iter_records(paths[2], "jsonl")
  assert record.value == {"k": 1}
  assert record.location.default_id(root) == "b/z.jsonl:1"
  with pytest.raises(readers.DataError, match="no file matches"):
    readers.expand_paths((f"{BUCKET}/data/*.parquet",), key="input.files")


def test_tokenizer_files_on_the_bucket_load_as_the_local_ones(gcs, tmp_path):
  from psipo_jax.data import tokenizers  # pylint: disable=g-import-not-at-top

  tk = pytest.importorskip("tokenizers")
  spm = pytest.importorskip("sentencepiece")
  corpus = ["the quick brown fox jumps over the lazy dog"] * 20
  hf = tk.Tokenizer(tk.models.WordLevel(unk_token="<unk>"))
  hf.pre_tokenizer = tk.pre_tokenizers.Whitespace()
  hf.train_from_iterator(
    corpus, tk.trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>"])
  )
  hf.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(corpus),
    model_writer=model,
    vocab_size=30,
    minloglevel=2,
  )
  (tmp_path / "tok.model").write_bytes(model.getvalue())
  for name in ("tokenizer.json", "tokenizer_config.json", "tok.model"):
    storage.write_atomically(
      f"{BUCKET}/tok/{name}", (tmp_path / name).read_bytes()
    )
  for spec in ("huggingface:{}/tokenizer.json", "sentencepiece:{}/tok.model"):
    local = tokenizers.make_tokenizer(spec.format(tmp_path))
    remote = tokenizers.make_tokenizer(spec.format(f"{BUCKET}/tok"))
    assert remote.fingerprint == local.fingerprint
    assert (remote.eos_id, remote.pad_id) == (local.eos_id, local.pad_id)
    assert remote.eos_id is not None  # the HF one from tokenizer_config.json
    np.testing.assert_array_equal(
      remote.encode("the lazy fox"), local.encode("the lazy fox")
    )
  with pytest.raises(FileNotFoundError, match="no such file gs://bucket/no"):
    tokenizers.make_tokenizer(f"hf:{BUCKET}/no/tokenizer.json")


# ------------------------------------- a run, its resume, a sweep, collect


class _LocalCheckpoints(checkpointing.Checkpointer):
  """Orbax's arrays go to TensorStore's GCS driver, which no fsspec stand-in
  reaches: the checkpoints of a gs:// workdir stay on local disk here."""

  root = None

  def __init__(self, workdir, **kwargs):
    if storage.is_remote(workdir):
      workdir = os.path.join(self.root, storage.split_scheme(workdir)[1])
    super().__init__(workdir, **kwargs)


EXPERIMENT = """
from experiments import lm_ipo_tiny
from psipo_jax import sweeps

def get_config(arg=None):
  config = lm_ipo_tiny.get_config("runlocal,init=")
  config.input.files = {files!r}
  config.input.ref_logps_file = {ref_files!r}
  config.input.batch_size = 16
  config.total_steps = 4
  config.optimizer.warmup_steps = 0
  config.log_every = config.eval_every = config.ckpt_every = 2
  return config

def get_sweep(arg=None):
  return sweeps.sweep("loss.tau", [0.25, 1.0])
"""


def _config(tmp_path, files):
  config = lm_ipo_tiny.get_config("runlocal,init=")
  config.input.files = files
  config.input.batch_size = 16
  return config


def _upload_text_task(tmp_path) -> dict[str, str]:
  local = text_task.cached_files(
    num_train=48, num_test=20, cache_dir=str(tmp_path / "task")
  )
  files = {}
  for split, path in local.items():
    files[split] = f"{BUCKET}/data/{os.path.basename(path)}"
    with open(path, "rb") as f:
      storage.write_atomically(files[split], f.read())
  return files


@pytest.mark.slow
def test_train_resume_reference_sweep_and_collect_on_a_bucket(
  gcs, tmp_path, monkeypatch, capsys
):
  monkeypatch.setattr(_LocalCheckpoints, "root", str(tmp_path / "orbax"))
  monkeypatch.setattr(checkpointing, "Checkpointer", _LocalCheckpoints)
  files = _upload_text_task(tmp_path)

  # The reference job reads its data from the bucket and writes there.
  ref_workdir = f"{BUCKET}/ref"
  ref_files = precompute_reference.precompute(
    _config(tmp_path, files), ref_workdir
  )
  assert ref_files == {
    s: f"{ref_workdir}/reference_logps/{s}.jsonl" for s in ("train", "test")
  }
  header = _jsonl(gcs, ref_files["train"])[0]
  assert header["computed_with"]["max_length"] == 32

  spec = tmp_path / "exp.py"
  spec.write_text(EXPERIMENT.format(files=files, ref_files=ref_files))
  (point, other) = sweeps.load_sweep(str(spec))
  config = sweeps.check_point(str(spec), point, [])
  sweep_dir = f"{BUCKET}/sweeps/exp"
  workdir = f"{sweep_dir}/{point.name}"

  # Two steps, then (a free change of total_steps) a resume to four.
  config.total_steps = 2
  train.train_and_evaluate(config, workdir)
  assert sweeps.is_finished(workdir, total_steps=2)
  assert not sweeps.is_finished(workdir, total_steps=4)
  config.total_steps = 4
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 4
  assert sweeps.is_finished(workdir, total_steps=4)
  assert sorted(os.listdir(tmp_path / "orbax" / "bucket" / "sweeps" / "exp"))
  assert run_config.read(workdir)["total_steps"] == 4
  (change,) = _jsonl(gcs, f"{workdir}/{run_config.HISTORY_FILE}")
  assert change["step"] == 2 and change["changes"] == [
    {"key": "total_steps", "old": 2, "new": 4}
  ]
  lines = _jsonl(gcs, f"{workdir}/metrics.jsonl")
  assert [(l["split"], l["step"]) for l in lines] == [
    ("train", 2),
    ("eval", 2),
    ("train", 4),
    ("eval", 4),
  ]
  assert all(np.isfinite(l["loss"]) for l in lines)
  events = [
    url
    for url in gcs.objects()
    if url.startswith(f"{workdir}/tensorboard/events.out.tfevents.")
  ]
  assert len(events) == 2 and all(gcs.objects()[u] for u in events)
  assert not any("tfds" in url for url in gcs.objects())  # prepared locally

  # The launcher skips the finished point, reading the bucket.
  capsys.readouterr()
  assert (
    sweep.main(
      [
        f"--config={spec}",
        f"--root={BUCKET}/sweeps",
        "--dry-run",
        "--where=tpu",
        "--tpu=pod",
        "--zone=z",
      ]
    )
    == 0
  )
  out = capsys.readouterr()
  assert "2 points, 1 finished (skipped), 1 to run" in out.err
  (line,) = out.out.splitlines()
  assert f"--workdir={sweep_dir}/{other.name} " in line
  # ... and refuses to resume it under a config that computes otherwise.
  with pytest.raises(SystemExit) as exit_info:
    sweep.main(
      [
        f"--config={spec}",
        f"--root={BUCKET}/sweeps",
        "--dry-run",
        "--where=tpu",
        "--tpu=pod",
        "--zone=z",
        "--",
        "--config.optimizer.learning_rate=0.1",
      ]
    )
  assert exit_info.value.code == 2
  assert "optimizer.learning_rate: 0.0005 -> 0.1" in capsys.readouterr().err

  # The collector reads the runs from the bucket and writes its tables there.
  sweeps.write_manifest(
    sweep_dir,
    spec=str(spec),
    module="psipo_jax.main",
    where="tpu",
    extra=[],
    points=[point, other],
  )
  assert collect.main([f"--root={sweep_dir}"]) == 0
  rows = list(
    csv.DictReader(io.StringIO(_text(gcs, f"{sweep_dir}/results.csv")))
  )
  assert [(r["run"], r["status"]) for r in rows] == [
    (point.name, "finished"),
    (other.name, "not started"),
  ]
  assert rows[0]["step"] == "4"
  assert float(rows[0]["final/eval/loss"]) == lines[-1]["loss"]
  assert any(
    url.startswith(f"{sweep_dir}/plots/") and url.endswith(".png")
    for url in gcs.objects()
  )
