"""bench/RESULTS.md holds one section per benchmark command; each command
rewrites only its own section (between HTML comment markers)."""

from __future__ import annotations

import os
import re

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "RESULTS.md")
HEADER = ("# qlite benchmark results\n\nEach section is written by the "
          "command named in it (`make bench` runs them all).\n")


def write_section(name: str, markdown: str, path: str = RESULTS) -> str:
  """Replaces (or appends) section ``name`` of ``path``; returns the path."""
  text = open(path).read() if os.path.exists(path) else HEADER
  start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
  block = f"{start}\n{markdown.strip()}\n{end}"
  pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
  if pattern.search(text):
    text = pattern.sub(lambda _: block, text)
  else:
    text = text.rstrip() + "\n\n" + block + "\n"
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
  return path
