"""The XLA flags of the test suite, also for the processes tests launch.

LLVM's optimisation level 0: the tests' programs are small, so compiling
them costs far more than running them, and level 0 halves the compile time
(measured on tests/blocked_attention_test.py's transformer test: 18.6 ->
10.8 s of CPU). Every program of a test is compiled the same way, so
comparisons between programs (one device vs eight, resumed vs
uninterrupted) are unaffected; benchmarks never use these flags.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(num_cpu_devices: int | None = None) -> str:
  """XLA_FLAGS for a test process: fast compilation, and `num_cpu_devices`
  fake CPU devices (None: JAX's default, one)."""
  flags = [FAST_COMPILE]
  if num_cpu_devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={num_cpu_devices}")
  return " ".join(flags)
