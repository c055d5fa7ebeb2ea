"""Sphinx configuration of the qlite documentation site (``make docs``).

Markdown guides (MyST) plus an API reference generated at build time from
the docstrings of every public name (``_ext/qlite_api.py`` writes
``api/*.rst``), and the LiteRT op coverage table generated from the op
handlers (``python -m qlite.ops.coverage``) and the examples page (the
docstrings of ``examples/*.py``) and the command-line reference (``qlite
--help`` per subcommand) into ``_generated/``. Both
generated folders are rebuilt on every build and ignored by git.
"""

import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE / "_ext"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import qlite  # noqa: E402
import qlite_api  # noqa: E402
from qlite.ops import coverage  # noqa: E402

project = "qlite"
release = version = qlite.__version__
author = "the qlite authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "_generated", "img/*.md", "README.md"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "separated"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True     # "Attributes:" as fields: no duplicate of a documented property
add_module_names = False

html_theme = "sphinx_book_theme"
html_title = f"qlite {version}"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
}
html_static_path = ["_static"]
html_css_files = ["qlite.css"]


def _generate(app):
  qlite_api.write_pages(HERE / "api")
  gen = HERE / "_generated"
  gen.mkdir(exist_ok=True)
  table = coverage.table() + "\n"
  os.environ["COLUMNS"] = "88"                 # argparse's help width
  for name, text in (("op_coverage.md", table),
                     ("examples.md", _examples_page()),
                     ("cli.md", _cli_page())):
    f = gen / name
    if not f.exists() or f.read_text() != text:   # keep Sphinx's cache valid
      f.write_text(text)


def _examples_page() -> str:
  """One section per examples/*.py script: its module docstring."""
  import ast
  out = []
  for f in sorted((HERE.parent / "examples").glob("*.py")):
    doc = ast.get_docstring(ast.parse(f.read_text()))
    if not doc:
      continue
    first, _, rest = doc.partition("\n\n")
    out += [f"## `examples/{f.name}`", "", first.replace("\n", " "), "",
            "```text", rest.strip() or f"python examples/{f.name}", "```", ""]
  return "\n".join(out) + "\n"


def _cli_page() -> str:
  """``qlite --help`` and each subcommand's ``--help``, run in-process."""
  import contextlib
  import io
  import re
  from qlite import cli

  def helptext(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      try:
        cli.main(argv + ["--help"])
      except SystemExit:
        pass
    return buf.getvalue().rstrip()

  top = helptext([])
  subs = re.search(r"\{([\w,-]+)\}", top).group(1).split(",")
  out = ["```text", top, "```", ""]
  for name in subs:
    out += [f"## `qlite {name}`", "", "```text", helptext([name]), "```", ""]
  return "\n".join(out) + "\n"


DESIGN_NOTES_MARK = "<!-- design-notes: conf.py lists here every other docs/*.md -->"


def _design_notes(app, docname, source):
  """The index's design-notes toctree: every docs/*.md page that no other
  toctree of the index names (architecture first), so a note added to
  docs/ is on the site without editing the index."""
  if docname != "index" or DESIGN_NOTES_MARK not in source[0]:
    return
  import re
  named = set(re.findall(r"^([\w/]+)$", source[0], re.M))
  notes = sorted(p.stem for p in HERE.glob("*.md")
                 if p.stem not in named and p.stem != "index")
  source[0] = source[0].replace(DESIGN_NOTES_MARK, "\n".join(notes))


def setup(app):
  app.connect("builder-inited", _generate)
  app.connect("source-read", _design_notes)
