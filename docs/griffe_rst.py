"""A griffe extension (loaded by mkdocstrings, see ``mkdocs.yml``) that lets the reST habits of the docstrings
render as Markdown, without changing the sources:

- roles such as ``:func:`max_stable_step``` become code spans;
- reST simple tables (rows between lines of ``====  ====``) become Markdown tables, continuation lines (an empty
  first column) joined to the row above;
- ``Parameters`` entries written ``name, other : description`` become numpydoc entries (the name on its line,
  the description indented below), and a paragraph after them that is not an entry (``Shapes: ...``) is moved
  out of the section, under "Notes".
"""
from __future__ import annotations

import re
import textwrap

from griffe import Extension

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|data|attr|obj|exc|const|ref|term):`~?\.?([^`]+)`")
BORDER = re.compile(r"^\s*=+( +=+)+\s*$")
ENTRY = re.compile(r"^(\*{0,2}[A-Za-z_][\w]*(?:\s*,\s*\*{0,2}[A-Za-z_]\w*)*)\s+:\s+(.*)$")
UNDERLINE = re.compile(r"^\s*-{3,}\s*$")


def roles(text: str) -> str:
    return ROLE.sub(lambda m: f"``{m.group(1)}``", text)


def _columns(border: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"=+", border)]


def _cells(line: str, spans: list[tuple[int, int]]) -> list[str]:
    cells = []
    for i, (start, _) in enumerate(spans):
        end = spans[i + 1][0] if i + 1 < len(spans) else len(line)
        cells.append(line[start:end].strip())
    return cells


def tables(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if BORDER.match(lines[i]):
            # a simple table: border, header, border, rows, border
            borders = [j for j in range(i, len(lines)) if BORDER.match(lines[j])][:3]
            if len(borders) == 3 and borders[1] == i + 2:
                spans = _columns(lines[i])
                indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
                header = _cells(lines[i + 1], spans)
                rows: list[list[str]] = []
                for line in lines[borders[1] + 1: borders[2]]:
                    if not line.strip():
                        continue
                    cells = _cells(line, spans)
                    if rows and not cells[0]:
                        rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
                    else:
                        rows.append(cells)
                out.append("")
                for row in [header, ["---"] * len(spans), *rows]:
                    out.append(indent + "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
                out.append("")
                i = borders[2] + 1
                continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


def parameters(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i, moved = 0, []
    while i < len(lines):
        line = lines[i]
        out.append(line)
        if line.strip() == "Parameters" and i + 1 < len(lines) and UNDERLINE.match(lines[i + 1]):
            out.append(lines[i + 1])
            i += 2
            while i < len(lines):
                current = lines[i]
                if i + 1 < len(lines) and UNDERLINE.match(lines[i + 1]) and current.strip():
                    break  # the next section
                match = ENTRY.match(current.strip())
                if match:
                    indent = current[: len(current) - len(current.lstrip())]
                    out += [indent + match.group(1), indent + "    " + match.group(2)]
                elif not current.strip():
                    out.append(current)
                elif current.startswith((" ", "\t")) and out and out[-1].strip():
                    out.append("    " + current)  # continuation of an entry's description
                else:
                    # prose that is not an entry: take the paragraph out of the section
                    while i < len(lines) and lines[i].strip():
                        moved.append(lines[i])
                        i += 1
                    continue
                i += 1
            continue
        i += 1
    if moved:
        out += ["", "Notes", "-----", *moved]
    return "\n".join(out)


def convert(text: str) -> str:
    return parameters(tables(roles(textwrap.dedent(text))))


class ReSTDocstrings(Extension):
    def on_instance(self, *, obj, **kwargs) -> None:  # noqa: D102 - griffe's hook
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
