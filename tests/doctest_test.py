"""Runs the docstring examples of the public modules as tests.

Each module's examples are checked values (derived by hand or in closed form
in the docstring itself), so a failing example is a wrong number, not just
stale documentation.
"""

import doctest
import importlib
import io

import pytest

MODULES = ["psipo_jax.losses", "psipo_jax.psi", "psipo_jax.testing"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  out = io.StringIO()
  finder = doctest.DocTestFinder()
  runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
  for test in finder.find(module, name):
    runner.run(test, out=out.write)
  results = runner.summarize(verbose=False)
  assert results.attempted > 0, f"{name} has no docstring examples"
  assert results.failed == 0, out.getvalue()
