"""The LiteRT op coverage table, generated from the op handlers.

    python -m qlite.ops.coverage          # Markdown table on stdout
"""

from __future__ import annotations

from qlite.ops.base import COMPUTE, OpHandler
from qlite.ops.registry import FAMILIES, REGISTRY


def _traits(h: OpHandler) -> list[str]:
  t = []
  cls = type(h)
  if cls.weight_axis is not OpHandler.weight_axis:
    t.append("weight per output channel")
  if cls.chain_fusion is not OpHandler.chain_fusion:
    t.append("fuses into conv / FC")
  if cls.fixed_range is not OpHandler.fixed_range:
    t.append("fixed output scale")
  if cls.same_scale_output is not OpHandler.same_scale_output:
    t.append("inputs share the output's scale")
  if cls.quantized_constants is not OpHandler.quantized_constants:
    t.append("constant operands quantized per tensor")
  if cls.scale_fuses_into is not OpHandler.scale_fuses_into:
    t.append("sum + scale = one op")
  if cls.output_rounding is not OpHandler.output_rounding:
    t.append("rounds half away from zero")
  return t


def table() -> str:
  """Returns the Markdown coverage table: one row per handler."""
  rows = ["| family (module) | jax ops / composites | LiteRT int8 ops | role "
          "| what the planner does |", "|---|---|---|---|---|"]
  module_of = {id(h): m.__name__.rsplit(".", 1)[-1]
               for m in FAMILIES for h in m.HANDLERS}
  for h in REGISTRY.handlers:
    prims = sorted(h.primitives)
    role = h.role(None) if type(h).role is not OpHandler.role else COMPUTE
    traits = _traits(h) + ([h.notes] if h.notes else [])
    rows.append(f"| {h.family} (`{module_of[id(h)]}`) | "
                f"{', '.join(f'`{p}`' for p in prims)} | "
                f"{', '.join(h.litert_ops)} | {role} | {'; '.join(traits)} |")
  return "\n".join(rows)


if __name__ == "__main__":
  print(table())
