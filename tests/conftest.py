"""Test-wide set-up, before JAX is first imported: 8 fake CPU devices, fast
compilation (tests/xla_flags.py), and one persistent XLA compilation cache
for the whole run.

The cache is shared by pytest-xdist's workers and by every process a test
launches (they inherit the environment): the kill-and-resume, multi-host and
command-line tests start many processes that compile the same programs, and
only the first compiles each. A cached executable is keyed by the program,
the XLA flags and the devices, so it changes no result; variables already
set are left as they are (an empty JAX_COMPILATION_CACHE_DIR: no cache).

The directory is new for every run (made by the first process that loads
this file, the xdist controller, and removed when it exits), never one
left by an earlier run: a cache kept across runs on one machine once held
an entry that aborted the process that loaded it (the (2, 4, 1) mesh step
of tests/sharding_lm_test.py, "Fatal Python error: Aborted"), while the
same tests passed with no cache and with a fresh one, cold and warm.
"""

import atexit
import os
import shutil
import tempfile

from xla_flags import xla_flags  # tests/xla_flags.py

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " " + xla_flags(num_cpu_devices=8)
).strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="psipo_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
# Cache every program (tests compile many small ones), and bound the cache on
# disk: a maximum size also makes JAX lock the directory while it reads and
# writes, which the concurrent workers need.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 1024**3))
