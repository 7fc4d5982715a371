"""Text from outside fedmed's control, made safe to print and write.

Site names, metric keys, error reasons and file names arrive from sites, replies and folders
that fedmed does not control. Printed raw, a newline forges a log line, an escape sequence
rewrites the operator's terminal, bytes that are not UTF-8 make ``print`` fail, a ``|`` breaks
a Markdown table and a megabyte of text floods a log. :func:`printable` is the one place
fedmed turns such text into something safe to show: every non-printable character becomes a
visible escape and the length is bounded; :func:`markdown_cell` also escapes the table
separator.
:func:`is_identifier` is the rule for keys fedmed stores under (metric names, site names).

Example:
    >>> printable("site\\n\\x1b[2Jevil")
    'site\\\\n\\\\x1b[2Jevil'
    >>> printable(Path("labelsTr/ok.nii.gz"))
    'labelsTr/ok.nii.gz'
    >>> printable("x" * 300, limit=10)
    'xxxxxxxxxx...(290 more)'
"""

from __future__ import annotations

import re

__all__ = ["MAX_TEXT", "is_identifier", "markdown_cell", "printable"]

MAX_TEXT = 500  # characters of outside text kept in a log line, metrics.jsonl or report.md
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,63}$")
# surrogateescape maps an undecodable byte 0xNN (of a file name) to the lone surrogate U+DCNN
_SURROGATE_BYTES = range(0xDC80, 0xDD00)
_FAMILIAR = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _FAMILIAR:
        return _FAMILIAR[ch]
    code = ord(ch)
    if code in _SURROGATE_BYTES:
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: object, *, limit: int | None = MAX_TEXT) -> str:
    """``text`` (any object, via ``str``; a path too) with every character Python does not
    count as printable (control and format characters, line separators, lone surrogates of
    undecodable file-name bytes) escaped, and at most ``limit`` characters of it kept."""
    raw = str(text)
    kept = raw if limit is None else raw[:limit]
    if not kept.isprintable():
        kept = "".join(ch if ch.isprintable() else _escape(ch) for ch in kept)
    if limit is not None and len(raw) > limit:
        kept += f"...({len(raw) - limit} more)"
    return kept


def markdown_cell(text: object, *, limit: int = MAX_TEXT) -> str:
    """:func:`printable`, with ``|`` escaped so the text stays inside one table cell."""
    return printable(text, limit=limit).replace("|", "\\|")


def is_identifier(text: object) -> bool:
    """True for a short name of letters, digits and ``_.:@+-`` (1-64 characters, not starting
    with punctuation): what fedmed accepts as a metric key, model label or site name from a
    reply."""
    return isinstance(text, str) and bool(_IDENTIFIER.match(text))
