"""The few Markdown pieces every reference is built from: wrapped prose that cannot turn
into a list or a heading by accident, table cells, and the marked sections of a document
that the generator rewrites in place (everything outside the markers is left alone).

Purely computational.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

WIDTH = 92
"""Generated prose is wrapped to this many columns, so the files read well raw too."""

_BLOCK_START = re.compile(r"^(?:[-+*](?:\s|$)|\d+[.)](?:\s|$)|#|>|\||=+$|`{3}|~{3})")
"""What would make a wrapped line start a list, heading, quote, table or fence."""
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_TAG_LIKE = re.compile(r"<(?=[A-Za-z/!?])")


class MarkerError(ValueError):
    """A document lacks the markers of a generated section, or has them twice."""


def begin_marker(name: str) -> str:
    return f"<!-- generated:{name} begin -->"


def end_marker(name: str) -> str:
    return f"<!-- generated:{name} end -->"


def _marker_span(text: str, name: str) -> tuple[int, int]:
    """Where the body between the markers of `name` starts and ends in `text`."""
    begin, end = begin_marker(name), end_marker(name)
    if text.count(begin) != 1 or text.count(end) != 1:
        raise MarkerError(f"expected exactly one {begin} and one {end} "
                          f"(found {text.count(begin)} and {text.count(end)})")
    start = text.index(begin) + len(begin)
    stop = text.index(end)
    if stop < start:
        raise MarkerError(f"{end} comes before {begin}")
    return start, stop


def section(text: str, name: str) -> str:
    """The generated body between the markers of `name` (without the blank lines that
    frame it)."""
    start, stop = _marker_span(text, name)
    return text[start:stop].strip("\n") + "\n"


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with the body between the markers of `name` replaced by `body`."""
    start, stop = _marker_span(text, name)
    return text[:start] + "\n\n" + body.strip("\n") + "\n\n" + text[stop:]


def inline(text: str) -> str:
    """Prose as Markdown: anything outside code spans that an HTML renderer would take
    for a tag (`<name>`) is escaped."""
    out, position = [], 0
    for span in _CODE_SPAN.finditer(text):
        out.append(_TAG_LIKE.sub(r"\\<", text[position:span.start()]))
        out.append(span.group(0))
        position = span.end()
    out.append(_TAG_LIKE.sub(r"\\<", text[position:]))
    return "".join(out)


def wrap(text: str, *, first: str = "", indent: str = "", width: int = WIDTH) -> list[str]:
    """`text` (one paragraph; its own line breaks count as spaces) as lines of at most
    `width` columns where possible: the first prefixed by `first`, the rest by `indent`.
    No line after the first starts with what would open a Markdown block."""
    words = text.split()
    lines: list[list[str]] = [[]]
    used = len(first)
    for word in words:
        line = lines[-1]
        if line and used + 1 + len(word) > width:
            carried: list[str] = [word]
            while _BLOCK_START.match(carried[0]) and len(line) > 1:
                carried.insert(0, line.pop())
            lines.append(carried)
            used = len(indent) + len(" ".join(carried))
        else:
            line.append(word)
            used += (1 if len(line) > 1 else 0) + len(word)
    return [(first if i == 0 else indent) + " ".join(line) for i, line in enumerate(lines)]


def paragraphs(text: str) -> list[str]:
    """A text's paragraphs (split at blank lines), each on one line."""
    return [" ".join(block.split()) for block in re.split(r"\n\s*\n", text.strip())
            if block.strip()]


def code(text: str) -> str:
    """`text` as a code span, whatever backticks it holds; the empty string as `""`."""
    if not text:
        return '`""`'
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    padded = f" {text} " if text.startswith("`") or text.endswith("`") else text
    return f"{fence}{padded}{fence}"


def cell(text: str) -> str:
    """Text for a table cell: one line, pipes escaped (also inside code spans, as GitHub
    Flavored Markdown requires)."""
    return inline(" ".join(text.split())).replace("|", "\\|")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A GitHub Flavored Markdown table; cells are taken as already formatted."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines
