"""The suite's fast-compilation flags leave out what this jaxlib rejects."""

import xla_flags  # tests/xla_flags.py


def test_a_flag_xla_does_not_know_is_left_out(monkeypatch):
  known, unknown = xla_flags.FAST_COMPILE[0], "--xla_no_such_flag_exists=true"
  assert not xla_flags._xla_accepts((unknown,))  # XLA aborts on it
  monkeypatch.setattr(xla_flags, "FAST_COMPILE", (known, unknown))
  monkeypatch.delenv(xla_flags._KNOWN)  # probe again; restored afterwards
  assert xla_flags.xla_flags(num_cpu_devices=2).split() == [
    known,
    "--xla_force_host_platform_device_count=2",
  ]
