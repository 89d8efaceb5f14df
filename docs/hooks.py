"""mkdocs hook: tables built from the code, so the docs cannot drift from it.

A page holds a marker on a line of its own; ``on_page_markdown`` replaces it with a Markdown table built by
importing distattr:

* ``<!-- methods-table -->``: :data:`distattr.methods.METHODS` (name, kind, summary, arguments with defaults,
  whether the planner models it, whether it runs on a Petals model).
* ``<!-- step-functions-table -->``: :data:`distattr.steps.STEP_FUNCTIONS` (name, merge rule, contrastive,
  arguments with defaults, the first paragraph of its docstring).
* ``<!-- options-table -->``: the fields of :class:`distattr.options.AttributeOptions` and their
  :class:`distattr.options.Option` metadata (keyword, default, command-line flag, help, speed-only).
* ``<!-- modules-table -->``: every module of the ``distattr`` package (found by walking ``distattr/``, read
  with :mod:`ast`, nothing imported) with the first paragraph of its docstring.

An unknown marker, or a table that cannot be built, fails the build (``mkdocs build --strict`` in CI).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "distattr"
MARKER = re.compile(r"^<!-- ([a-z-]+)-table -->$", re.M)


CODE_SPAN = re.compile(r"(`+)(.+?)\1")
ROLE = re.compile(r":(?:func|meth|class|mod|data|attr|exc|obj):`~?([^`]+)`")


def cell(text: object) -> str:
    """Docstring text for a table cell: one line, Sphinx roles (``:func:`x` ``) as code, pipes escaped outside
    code spans (Markdown tables do not split a row inside a code span)."""
    text = ROLE.sub(r"`\1`", " ".join(str(text).split()))
    parts, last = [], 0
    for match in CODE_SPAN.finditer(text):
        parts += [text[last:match.start()].replace("|", "\\|"), match.group(0)]
        last = match.end()
    return "".join(parts) + text[last:].replace("|", "\\|")


def code(text: object) -> str:
    return f"`{' '.join(str(text).split())}`"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def field_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "required"


def dataclass_arguments(cls: type) -> str:
    """``name=default`` for every field of an argument dataclass."""
    items = [code(f"{f.name}={field_default(f)}") for f in dataclasses.fields(cls)]
    return ", ".join(items) or "none"


def first_paragraph(doc: str | None) -> str:
    """The first sentence-line of a docstring (its first paragraph, joined)."""
    if not doc:
        return ""
    paragraph = inspect.cleandoc(doc).split("\n\n")[0]
    return " ".join(paragraph.split())


def methods_table() -> str:
    from distattr.methods import METHODS

    rows = []
    for name, spec in sorted(METHODS.items()):
        if spec.remote is None:
            remote = "yes"
        elif spec.remote(name, {}) is None:
            remote = "depends on the arguments"
        else:
            remote = "no"
        rows.append([code(name), cell(spec.kind), cell(spec.summary), dataclass_arguments(spec.args),
                     "yes" if spec.cost is not None else "no", remote])
    return table(["method", "kind", "what", "arguments (defaults)", "`distattr plan`", "Petals"], rows)


def step_functions_table() -> str:
    from distattr.steps import STEP_FUNCTIONS

    rows = []
    for name, spec in sorted(STEP_FUNCTIONS.items()):
        params = list(inspect.signature(spec.fn).parameters.values())[1:]  # the first receives the StepContext
        args = ", ".join(code(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}")
                         for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) or "none"
        rows.append([code(name), cell(first_paragraph(spec.fn.__doc__)), args, code(spec.merge),
                     "yes" if spec.contrastive else ""])
    return table(["step function", "what", "arguments (defaults)", "merge", "contrastive"], rows)


def options_table() -> str:
    from distattr.options import option_fields

    rows = []
    for f, meta in option_fields():
        if meta.flag is None:
            flag = "(Python only)"
        else:
            flag = code(meta.flag or "--" + f.name.replace("_", "-"))
            if meta.short:
                flag = f"{code(meta.short)}, {flag}"
            if meta.metavar:
                flag += " " + code(meta.metavar)
            if meta.repeat:
                flag += " (repeatable)"
            elif meta.many:
                flag += " ..."
        choices = f" One of {', '.join(code(c) for c in meta.choices)}." if meta.choices else ""
        rows.append([code(f.name), code(field_default(f)), flag, cell(meta.help) + "." + choices,
                     "yes" if meta.speed_only else ""])
    return table(["option", "default", "command line", "meaning", "speed only"], rows)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_table() -> str:
    rows = []
    for path in sorted(PACKAGE.rglob("*.py"), key=lambda p: module_name(p).split(".")):
        if "__pycache__" in path.parts:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        name = code(module_name(path)) + (" (package)" if path.name == "__init__.py" else "")
        rows.append([name, cell(first_paragraph(doc)) or "(no docstring)"])
    return table(["module", "what it holds (its docstring's first paragraph)"], rows)


TABLES = {
    "methods": methods_table,
    "step-functions": step_functions_table,
    "options": options_table,
    "modules": modules_table,
}


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in TABLES:
            raise ValueError(f"{page.file.src_path}: unknown table marker <!-- {name}-table -->; "
                             f"known: {', '.join(sorted(TABLES))}")
        return TABLES[name]()

    return MARKER.sub(replace, markdown)
