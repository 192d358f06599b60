"""Whether glibc's malloc gives XLA:CPU's buffers transparent huge pages.

Why it matters. XLA:CPU allocates an execution's buffers anew at every
call, and glibc serves large allocations with fresh `mmap`ed memory, whose
every 4 KiB page faults on first touch. The `small` preset's jitted
gradient (8 pairs × 256 tokens, scanned layers) takes about 191,000 minor
page faults a call this way (≈ 750 MB touched afresh). With
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc ≥ 2.35) malloc asks the kernel
for transparent huge pages (`madvise(MADV_HUGEPAGE)`): about 1,100–1,500
faults a call (most of them 2 MiB pages), and the gradient takes 0.62–0.76×
the time over two invocations, with the same peak memory (BENCHMARKS.md,
"Host memory allocator on CPU").

It matters where the kernel's THP mode is "madvise" (Debian's and Ubuntu's
default): under "always" the kernel gives huge pages unasked, under "never"
it gives none. glibc reads its tunables when the process starts, so Python
cannot switch this on for itself: :func:`huge_pages_hint` only says when a
run would benefit, and the trainer logs it at start-up on CPU.
"""

from __future__ import annotations

import os
import pathlib
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE_FILE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
_FIRST_GLIBC_WITH_TUNABLE = (2, 35)


def thp_mode(path: pathlib.Path = _THP_MODE_FILE) -> str | None:
  """The kernel's transparent-huge-page mode ("always", "madvise" or
  "never": the bracketed word of `path`), or None where there is none."""
  try:
    text = path.read_text()
  except OSError:
    return None
  for word in text.split():
    if word.startswith("[") and word.endswith("]"):
      return word[1:-1]
  return None


def _glibc_version() -> tuple[int, ...] | None:
  if not sys.platform.startswith("linux"):
    return None
  libc, version = platform.libc_ver()
  if libc != "glibc" or not version:
    return None
  return tuple(int(part) for part in version.split(".") if part.isdigit())


def huge_pages_hint(
  environ: Mapping[str, str],
  glibc_version: tuple[int, ...] | None,
  mode: str | None,
) -> str | None:
  """A one-line hint to set the tunable, or None when it would not help.

  None unless glibc ≥ 2.35 (`glibc_version`; None: no glibc), the kernel's
  THP `mode` is "madvise" and `environ`'s `GLIBC_TUNABLES` does not set
  `glibc.malloc.hugetlb` already. :func:`this_host_hint` passes this
  process's.
  """
  if glibc_version is None or glibc_version < _FIRST_GLIBC_WITH_TUNABLE:
    return None
  if mode != "madvise":
    return None
  if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
    return None
  return (
    "XLA:CPU buffers get 4 KiB pages here (kernel THP mode 'madvise', no"
    " glibc.malloc.hugetlb tunable): start the process with"
    f" GLIBC_TUNABLES={TUNABLE} for faster CPU steps (the small LM's"
    " gradient takes 0.62-0.76x the time; BENCHMARKS.md, 'Host memory"
    " allocator on CPU')."
  )


def this_host_hint() -> str | None:
  """:func:`huge_pages_hint` for this process's environment, glibc and kernel."""
  return huge_pages_hint(os.environ, _glibc_version(), thp_mode())


def describe() -> str:
  """This process's allocator set-up in one line, for benchmark headers."""
  version = _glibc_version()
  glibc = "glibc " + ".".join(map(str, version)) if version else "no glibc"
  tunables = os.environ.get("GLIBC_TUNABLES") or "unset"
  return (
    f"{glibc}, kernel THP mode {thp_mode() or 'unknown'},"
    f" GLIBC_TUNABLES {tunables}"
  )
