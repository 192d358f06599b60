"""The XLA flags of the test suite, also for the processes tests launch.

The tests' programs are small, so compiling them costs far more than
running them; two flags make compilation cheaper:

  --xla_backend_optimization_level=0   LLVM's optimisation level 0 (measured
      on tests/blocked_attention_test.py's transformer test: 18.6 -> 10.8 s
      of CPU);
  --xla_cpu_use_fusion_emitters=false  XLA:CPU's loop emitters instead of
      its MLIR fusion emitters (tests/transformer_test.py's 208 compilations
      21.0 -> 8.8 s, the module 42.6 -> 21.5 s of CPU; the whole suite
      19.3 -> 16.4 min of user CPU time, 13.4 -> 12.2 min of wall time on 2
      cores).

Every program of a test is compiled the same way, so comparisons between
programs (one device vs eight, resumed vs uninterrupted) are unaffected;
benchmarks never use these flags. XLA aborts a process whose XLA_FLAGS hold
a flag it does not know, and XLA:CPU is retiring its older emitters, so the
flags are probed once per test run, in a child process, and the ones this
jaxlib knows are kept in the environment for every process after it.
"""

import os
import subprocess
import sys

FAST_COMPILE = (
  "--xla_backend_optimization_level=0",
  "--xla_cpu_use_fusion_emitters=false",
)
_KNOWN = "PSIPO_TESTS_FAST_COMPILE_FLAGS"  # the probe's answer, for children


def _xla_accepts(flags: tuple[str, ...]) -> bool:
  """Whether a JAX process starts its CPU backend with XLA_FLAGS `flags`."""
  env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
  probe = [sys.executable, "-c", "import jax; jax.devices()"]
  return subprocess.run(probe, env=env, capture_output=True).returncode == 0


def fast_compile_flags() -> list[str]:
  """The FAST_COMPILE flags this jaxlib knows (probed once per run)."""
  if _KNOWN not in os.environ:
    known = FAST_COMPILE
    if not _xla_accepts(known):
      known = tuple(f for f in FAST_COMPILE if _xla_accepts((f,)))
    os.environ[_KNOWN] = " ".join(known)
  return os.environ[_KNOWN].split()


def xla_flags(num_cpu_devices: int | None = None) -> str:
  """XLA_FLAGS for a test process: fast compilation, and `num_cpu_devices`
  fake CPU devices (None: JAX's default, one)."""
  flags = fast_compile_flags()
  if num_cpu_devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={num_cpu_devices}")
  return " ".join(flags)
