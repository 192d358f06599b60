"""Summary files: atomic writes that concurrent hosts cannot garble."""

import os
import socket

import pytest

from psipo_jax.data import summaries


def test_concurrent_writers_with_the_same_pid_and_host_do_not_share_a_temp_file(
  tmp_path, monkeypatch
):
  # Two hosts (or containers) on shared storage, both pid 7 on hosts named
  # alike, write the same summary; the second writes in full while the first
  # is between writing its temporary file and renaming it.
  monkeypatch.setattr(os, "getpid", lambda: 7)
  monkeypatch.setattr(socket, "gethostname", lambda: "worker")
  target = str(tmp_path / "tokenized_train.json")
  first, second = {"host": "a", "pad": "x" * 5000}, {"host": "b"}
  real_replace = os.replace
  renames = []

  def replace_after_the_other_host(src, dst):
    renames.append(src)
    if len(renames) == 1:
      summaries.write_json(target, second)
    real_replace(src, dst)

  monkeypatch.setattr(os, "replace", replace_after_the_other_host)
  summaries.write_json(target, first)
  assert len(set(renames)) == 2  # each writer had its own temporary file
  assert summaries.read_json(target) == first  # the last rename wins, whole
  assert os.listdir(tmp_path) == [
    "tokenized_train.json"
  ]  # no temporary left behind


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
  tmp_path, monkeypatch
):
  target = tmp_path / "s.json"
  summaries.write_json(str(target), {"ok": 1})

  def full_disk(src, dst):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "replace", full_disk)
  with pytest.raises(OSError, match="No space left"):
    summaries.write_json(str(target), {"new": 2})
  assert summaries.read_json(str(target)) == {"ok": 1}
  assert os.listdir(tmp_path) == ["s.json"]
