"""Data shown as text (ids, decoded tokens): one line, no control characters, no markup.

Training ids and token text come from whoever supplied the data: raw, an id with newlines wrote
a fake ``# Gate: PASSED`` heading into ``report.md`` and a fake ``gate: PASSED`` line (or
terminal escape codes) into the CLI's summary.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["markdown_code", "markdown_inline", "printable"]

_MARKUP = re.compile(r"([\\`*_\[\]<>#|!])")


def printable(value: Any) -> str:
    """``value`` as one printable line: control characters (newlines, terminal escapes, line
    separators) written as their escapes (``\\n``, ``\\x1b``), so data adds no lines or codes."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def markdown_inline(value: Any) -> str:
    """:func:`printable`, with markdown's markup characters escaped (no headings, links,
    emphasis or code spans made of data)."""
    return _MARKUP.sub(r"\\\1", printable(value))


def markdown_code(value: Any) -> str:
    """:func:`printable` as one markdown code span, fenced by more backticks than the text holds
    in a row (CommonMark), so the text cannot close it and is shown as it is."""
    text = printable(value)
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"
