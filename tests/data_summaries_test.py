"""Summary files: atomic writes that concurrent hosts cannot garble."""

import json
import os
import socket

import pytest

from psipo_jax.data import summaries


def test_concurrent_writers_with_the_same_pid_and_host_do_not_share_a_temp_file(
    tmp_path, monkeypatch
):
  # Two hosts (or containers) on shared storage, both pid 7 on a host named
  # alike, write the same summary; the second starts while the first is mid-write.
  monkeypatch.setattr(os, "getpid", lambda: 7)
  monkeypatch.setattr(socket, "gethostname", lambda: "worker")
  target = tmp_path / "tokenized_train.json"
  first, second = {"host": "a", "pad": "x" * 5000}, {"host": "b"}
  real_dump = json.dump

  def dump_while_another_host_writes(value, f, **kw):
    real_dump(value, f, **kw)
    if value is first:
      summaries.write_json(str(target), second)

  monkeypatch.setattr(summaries.json, "dump", dump_while_another_host_writes)
  summaries.write_json(str(target), first)
  assert summaries.read_json(str(target)) == first  # the last rename wins, whole
  assert os.listdir(tmp_path) == [target.name]  # no temporary file left behind


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  target = tmp_path / "s.json"
  summaries.write_json(str(target), {"ok": 1})
  with pytest.raises(TypeError):
    summaries.write_json(str(target), {"bad": object()})
  assert summaries.read_json(str(target)) == {"ok": 1}
  assert os.listdir(tmp_path) == ["s.json"]
