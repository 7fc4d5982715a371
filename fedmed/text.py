"""Text from outside fedmed's control, made safe to print and write.

Site names, metric keys, error reasons and file names arrive from sites, replies and folders
that fedmed does not control. Printed raw, a newline forges a log line, an escape sequence
rewrites the operator's terminal, a ``|`` breaks a Markdown table and a megabyte of text
floods a log. :func:`printable` escapes every control and formatting character (as Python's
``repr`` would) and bounds the length; :func:`markdown_cell` also escapes the table separator.
:func:`is_identifier` is the rule for keys fedmed stores under (metric names, site names).

Example:
    >>> printable("site\\n\\x1b[2Jevil")
    'site\\\\n\\\\x1b[2Jevil'
    >>> printable("x" * 300, limit=10)
    'xxxxxxxxxx...(290 more)'
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["MAX_TEXT", "is_identifier", "markdown_cell", "printable"]

MAX_TEXT = 300  # characters of outside text kept in a log line, metrics.jsonl or report.md
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,63}$")


def _escape(char: str) -> str:
    if char == "\\":
        return "\\\\"
    if char.isprintable() and unicodedata.category(char) not in ("Cf", "Zl", "Zp"):
        return char
    return repr(char)[1:-1] if len(repr(char)) > 3 else f"\\x{ord(char):02x}"


def printable(text: object, *, limit: int = MAX_TEXT) -> str:
    """``text`` (any object, via ``str``) with control/format characters escaped and at most
    ``limit`` characters of the original kept."""
    raw = str(text)
    kept = "".join(_escape(c) for c in raw[:limit])
    return kept + (f"...({len(raw) - limit} more)" if len(raw) > limit else "")


def markdown_cell(text: object, *, limit: int = MAX_TEXT) -> str:
    """:func:`printable`, with ``|`` escaped so the text stays inside one table cell."""
    return printable(text, limit=limit).replace("|", "\\|")


def is_identifier(text: object) -> bool:
    """True for a short name of letters, digits and ``_.:@+-`` (1-64 characters, not starting
    with punctuation): what fedmed accepts as a metric key, model label or site name from a
    reply."""
    return isinstance(text, str) and bool(_IDENTIFIER.match(text))
