"""The collectives of a compiled program, read from its optimized HLO text.

What a sharded step sends between devices is decided by XLA's partitioner,
not by the Python code, so checking it means reading the compiled program:

  compiled = jax.jit(step, ...).lower(*args).compile()
  for c in hlo_collectives.collectives(compiled.as_text()):
    print(c.op, c.dtype, c.shape, c.where)

Every all-gather, all-reduce, reduce-scatter, all-to-all and
collective-permute is listed once per result array (a combined collective
of several arrays gives one entry per array), with the shape of that array
on one device and whether it runs inside a loop (a `while` body, or a
computation one calls): the text holds a loop body once, however many
times it runs. Only the synchronous forms are read, which is what XLA:CPU
emits (tests and `benchmarks/activation_sharding.py` compile for fake CPU
devices); a GPU or TPU program's asynchronous `-start`/`-done` pairs are
not counted.
"""

import dataclasses
import math
import re

COLLECTIVE_OPS = (
  "all-gather",
  "all-reduce",
  "reduce-scatter",
  "all-to-all",
  "collective-permute",
)
FLOAT_TYPES = ("f64", "f32", "bf16", "f16")

# `%name = <result type> <op>(operands), ..., metadata={op_name="..." ...}`
_INSTRUCTION = re.compile(
  r"= (?P<result>.*?) (?P<op>" + "|".join(COLLECTIVE_OPS) + r")\("
)
_ARRAY = re.compile(r"(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]")
_OP_NAME = re.compile(r'op_name="(?P<name>[^"]*)"')
# A computation starts at column 0: `[ENTRY ]%name (params) -> type {`.
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?(?P<name>[^\s(]+)")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition)=%?(?P<name>[\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{(?P<names>[^}]*)\}")
_LOOP_BODY = re.compile(r"body=%?(?P<name>[\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One array a collective produces: op, HLO element type ("f32", "s32",
  "pred"), per-device shape, the JAX op name it came from, and whether it
  runs inside a loop."""

  op: str
  dtype: str
  shape: tuple[int, ...]
  where: str
  in_loop: bool

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def is_float(self) -> bool:
    return self.dtype in FLOAT_TYPES


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """Computation name -> its instruction lines."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    if line.endswith("{") and not line[:1].isspace():
      current = _COMPUTATION.match(line).group("name")
      computations[current] = []
    elif current is not None:
      computations[current].append(line)
  return computations


def _loop_computations(computations: dict[str, list[str]]) -> set[str]:
  """The computations that run inside a loop: while bodies and all they call."""
  callees = {}
  for name, lines in computations.items():
    called = set()
    for line in lines:
      called.update(m.group("name") for m in _CALLED.finditer(line))
      for m in _BRANCHES.finditer(line):
        called.update(
          n.strip().lstrip("%") for n in m.group("names").split(",")
        )
    callees[name] = called
  pending = [
    m.group("name")
    for lines in computations.values()
    for line in lines
    for m in _LOOP_BODY.finditer(line)
  ]
  inside = set()
  while pending:
    name = pending.pop()
    if name not in inside:
      inside.add(name)
      pending.extend(callees.get(name, ()))
  return inside


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective's result arrays in `hlo_text` (`Compiled.as_text()`)."""
  computations = _computations(hlo_text)
  in_loop = _loop_computations(computations)
  found = []
  for computation, lines in computations.items():
    for line in lines:
      match = _INSTRUCTION.search(line)
      if match is None:
        continue
      name = _OP_NAME.search(line)
      for array in _ARRAY.finditer(match.group("result")):
        found.append(
          Collective(
            op=match.group("op"),
            dtype=array.group("dtype"),
            shape=tuple(int(d) for d in array.group("dims").split(",") if d),
            where=name.group("name") if name else "",
            in_loop=computation in in_loop,
          )
        )
  return found
