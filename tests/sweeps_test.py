"""Tests for psipo_jax.sweeps: combinators, run names, override round trips."""

import textwrap

import pytest

from psipo_jax import sweeps

CONFIG = textwrap.dedent("""
    import ml_collections
    from psipo_jax import sweeps

    def get_config(arg=None):
      config = ml_collections.ConfigDict()
      config.seed = 0
      config.loss = ml_collections.ConfigDict({"name": "ipo", "tau": 0.1})
      config.input = ml_collections.ConfigDict({"dataset": "toy", "pairs": ((0, 1),)})
      config.use_ema = False
      return config

    def get_sweep(arg=None):
      taus = [0.1, 1.0] if arg is None else [float(t) for t in arg.split("+")]
      return sweeps.product(
          sweeps.sweep("loss.name", ["ipo", "dpo"]),
          sweeps.sweep("loss.tau", taus),
          sweeps.sweep("seed", range(2)),
      )
""")


@pytest.fixture
def config_path(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text(CONFIG)
  return str(path)


def test_sweep_product_first_varies_slowest():
  points = sweeps.product(
    sweeps.sweep("a", [1, 2]), sweeps.sweep("b", ["x", "y"])
  )
  assert points == [
    {"a": 1, "b": "x"},
    {"a": 1, "b": "y"},
    {"a": 2, "b": "x"},
    {"a": 2, "b": "y"},
  ]


def test_product_of_multi_key_points_merges_them():
  zipped = sweeps.zipit(sweeps.sweep("a", [1, 2]), sweeps.sweep("b", [3, 4]))
  points = sweeps.product(zipped, sweeps.sweep("c", [0]))
  assert points == [{"a": 1, "b": 3, "c": 0}, {"a": 2, "b": 4, "c": 0}]


def test_zipit_pairs_elementwise_and_rejects_unequal_lengths():
  assert sweeps.zipit(sweeps.sweep("a", [1, 2]), sweeps.sweep("b", [3, 4])) == [
    {"a": 1, "b": 3},
    {"a": 2, "b": 4},
  ]
  with pytest.raises(ValueError, match=r"equal length.*\[2, 3\]"):
    sweeps.zipit(sweeps.sweep("a", [1, 2]), sweeps.sweep("b", [3, 4, 5]))


def test_chain_concatenates():
  points = sweeps.chain(sweeps.sweep("a", [1]), sweeps.sweep("b", [2, 3]))
  assert points == [{"a": 1}, {"b": 2}, {"b": 3}]


def test_same_key_twice_in_a_point_is_an_error():
  with pytest.raises(ValueError, match="product: key 'a' set twice"):
    sweeps.product(sweeps.sweep("a", [1]), sweeps.sweep("a", [2]))
  with pytest.raises(ValueError, match="zipit: key 'a' set twice"):
    sweeps.zipit(sweeps.sweep("a", [1]), sweeps.sweep("a", [2]))


@pytest.mark.parametrize(
  "key", ["config.loss.tau", "loss..tau", "loss tau", "", "1x"]
)
def test_bad_keys_are_rejected(key):
  with pytest.raises(ValueError, match="not a dotted config path"):
    sweeps.sweep(key, [1])


def test_empty_sweeps_are_rejected():
  with pytest.raises(ValueError, match="no values"):
    sweeps.sweep("a", [])
  with pytest.raises(ValueError, match="no points"):
    sweeps.expand([])


def test_run_names_are_readable_and_in_declaration_order():
  assert sweeps.run_name({"loss.name": "ipo", "loss.tau": 0.1, "seed": 0}) == (
    "loss.name=ipo,loss.tau=0.1,seed=0"
  )
  assert (
    sweeps.run_name({"seed": 0, "loss.tau": 1e-05}) == "seed=0,loss.tau=1e-05"
  )
  assert sweeps.run_name({"input.dataset": "org/hh rlhf", "shape": (3, 4)}) == (
    "input.dataset=org_hh_rlhf,shape=3-4"
  )
  assert sweeps.run_name({}) == "default"


def test_run_name_depends_on_the_point_only():
  """Growing a sweep must not rename (and so orphan) the points already run."""
  small = sweeps.expand(
    sweeps.product(
      sweeps.sweep("loss.tau", [0.1]), sweeps.sweep("seed", [0, 1])
    )
  )
  grown = sweeps.expand(
    sweeps.product(
      sweeps.sweep("loss.tau", [0.1, 0.3]), sweeps.sweep("seed", [0, 1, 2])
    )
  )
  grown_names = {p.name: p.overrides for p in grown}
  for point in small:
    assert grown_names[point.name] == point.overrides


def test_names_unique_over_a_large_grid():
  points = sweeps.expand(
    sweeps.product(
      sweeps.sweep("loss.name", ["ipo", "dpo", "hinge"]),
      sweeps.sweep("loss.tau", [0.01, 0.1, 1.0, 10.0]),
      sweeps.sweep("seed", range(5)),
    )
  )
  assert len({p.name for p in points}) == 60


def test_long_names_are_cut_with_a_hash_and_stay_unique():
  a = sweeps.run_name({"input.dataset": "x" * 300 + "a"})
  b = sweeps.run_name({"input.dataset": "x" * 300 + "b"})
  assert len(a) == len(b) == 160 and a != b
  assert a == sweeps.run_name({"input.dataset": "x" * 300 + "a"})


def test_colliding_names_are_an_error_naming_both_points():
  with pytest.raises(ValueError, match=r"same run name 'input.dataset=a_b'"):
    sweeps.expand([{"input.dataset": "a/b"}, {"input.dataset": "a_b"}])
  with pytest.raises(ValueError, match="same run name"):
    sweeps.expand([{"seed": 1}, {"seed": 1}])


def test_expand_preserves_value_types():
  points = sweeps.expand([{"a": 1, "b": 1.0, "c": True, "d": "1", "e": (1, 2)}])
  values = points[0].overrides
  assert [type(values[k]) for k in "abcde"] == [int, float, bool, str, tuple]
  assert points[0].name == "a=1,b=1.0,c=True,d=1,e=1-2"


@pytest.mark.parametrize(
  "value, text",
  [
    (1, "1"),
    (1.0, "1.0"),
    (1e-05, "1e-05"),
    (0.1, "0.1"),
    (True, "True"),
    ("ipo", "ipo"),
    ((0, 1), "(0, 1)"),
    ([0.5], "[0.5]"),
  ],
)
def test_format_value(value, text):
  assert sweeps.format_value(value) == text


@pytest.mark.parametrize(
  "value", [None, {"a": 1}, object(), (1, None), [{"a": 1}]]
)
def test_unsupported_values_are_rejected(value):
  with pytest.raises(TypeError, match="not supported"):
    sweeps.expand([{"a": value}])


def test_override_flags():
  assert sweeps.override_flags(
    {"loss.tau": 0.5, "seed": 2, "loss.name": "dpo"}
  ) == ["--config.loss.tau=0.5", "--config.seed=2", "--config.loss.name=dpo"]


def test_load_sweep_passes_the_config_arg(config_path):
  points = sweeps.load_sweep(config_path + ":0.5+2.0+4.0")
  assert len(points) == 2 * 3 * 2
  assert points[0].name == "loss.name=ipo,loss.tau=0.5,seed=0"
  assert points[-1].overrides == {
    "loss.name": "dpo",
    "loss.tau": 4.0,
    "seed": 1,
  }
  assert sweeps.sweep_name(config_path + ":0.5+2.0+4.0") == "exp-0.5+2.0+4.0"
  assert sweeps.sweep_name(config_path) == "exp"


def test_load_sweep_without_get_sweep(tmp_path):
  path = tmp_path / "plain.py"
  path.write_text("def get_config(arg=None):\n  return None\n")
  with pytest.raises(AttributeError, match="plain.py defines no get_sweep"):
    sweeps.load_sweep(str(path))


def test_every_point_round_trips_through_config_flags(config_path):
  """What the trainer parses from --config.k=v is what the sweep declared."""
  for point in sweeps.load_sweep(config_path):
    sweeps.check_point(config_path, point)  # Raises on any difference.


@pytest.mark.parametrize(
  "overrides",
  [
    {"loss.tau": 1},  # int into a float field widens exactly.
    {"input.dataset": "1"},  # stays a string.
    {"input.pairs": ((2, 0), (1, 2))},
    {"use_ema": True},
  ],
)
def test_round_trip_of_typed_values(config_path, overrides):
  sweeps.check_point(config_path, sweeps.expand([overrides])[0])


@pytest.mark.parametrize(
  "overrides, message",
  [
    (
      {"loss.taux": 0.1},
      r"point 'loss.taux=0.1': --config.loss.taux=0.1 does not fit .*taux",
    ),
    (
      {"loss.tau": "big"},
      r"point 'loss.tau=big': --config.loss.tau=big does not fit .*convert",
    ),
    ({"seed": 1.5}, r"point 'seed=1.5': --config.seed=1.5 does not fit"),
    (
      {"input.pairs": [(2, 0)]},
      r"\[\(2, 0\)\] \(list\) comes back from the flag as .*tuple",
    ),
  ],
)
def test_points_that_do_not_fit_the_config_are_errors(
  config_path, overrides, message
):
  with pytest.raises(ValueError, match=message):
    sweeps.check_point(config_path, sweeps.expand([overrides])[0])


def test_is_finished_reads_the_marker(tmp_path):
  assert not sweeps.is_finished(str(tmp_path))
  sweeps.mark_finished(str(tmp_path), 200)
  assert sweeps.is_finished(str(tmp_path))
  assert sweeps.is_finished(str(tmp_path), total_steps=200)
  # The config now asks for more steps: the run must resume, not be skipped.
  assert not sweeps.is_finished(str(tmp_path), total_steps=300)


def test_a_corrupt_marker_is_an_error_naming_it(tmp_path):
  (tmp_path / sweeps.FINISHED_MARKER).write_text("{")
  with pytest.raises(
    ValueError, match=f"{tmp_path}/FINISHED: not a finished marker"
  ):
    sweeps.is_finished(str(tmp_path), total_steps=10)
