"""Tests of the transparent-huge-page hint (psipo_jax/host_allocator.py)."""

import pytest

from psipo_jax import host_allocator

GLIBC = (2, 36)


def test_the_hint_names_the_tunable_where_it_would_help():
  hint = host_allocator.huge_pages_hint({}, GLIBC, "madvise")
  assert hint is not None and host_allocator.TUNABLE in hint


def test_other_tunables_do_not_silence_the_hint():
  environ = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
  assert host_allocator.huge_pages_hint(environ, GLIBC, "madvise")


@pytest.mark.parametrize(
  "tunables",
  ["glibc.malloc.hugetlb=1", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"],
)
def test_no_hint_once_the_tunable_is_set(tunables):
  environ = {"GLIBC_TUNABLES": tunables}
  assert host_allocator.huge_pages_hint(environ, GLIBC, "madvise") is None


@pytest.mark.parametrize("mode", ["always", "never", None])
def test_no_hint_where_the_kernel_decides_alone(mode):
  assert host_allocator.huge_pages_hint({}, GLIBC, mode) is None


@pytest.mark.parametrize("version", [None, (2, 31), (2, 34)])
def test_no_hint_without_a_glibc_that_has_the_tunable(version):
  assert host_allocator.huge_pages_hint({}, version, "madvise") is None


def test_thp_mode_is_the_bracketed_word(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert host_allocator.thp_mode(path) == "madvise"
  path.write_text("[always] madvise never\n")
  assert host_allocator.thp_mode(path) == "always"
  assert host_allocator.thp_mode(tmp_path / "missing") is None
