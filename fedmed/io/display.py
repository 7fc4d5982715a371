"""File names from a site folder, made safe to print: control characters escaped.

A file name is chosen by whoever filled the folder. Printed raw, a name holding an escape
sequence rewrites the terminal, a newline forges a second report line, and bytes that are not
UTF-8 (kept by Python as lone surrogates) make ``print`` itself fail. :func:`printable` is the
one place fedmed turns such a name into text: every character Python does not count as
printable (control and format characters, line and paragraph separators, non-space blanks,
lone surrogates) becomes a visible escape, and everything else is kept as it is.

Example:
    >>> printable("imagesTr/p01\\x1b[2J.nii.gz")
    'imagesTr/p01\\\\x1b[2J.nii.gz'
    >>> printable(Path("labelsTr/ok.nii.gz"))
    'labelsTr/ok.nii.gz'
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["printable"]

# surrogateescape maps an undecodable byte 0xNN to the lone surrogate U+DCNN
_SURROGATE_BYTES = range(0xDC80, 0xDD00)
_FAMILIAR = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(value: str | Path) -> str:
    """``value`` as text with every non-printable character escaped (``\\n``, ``\\x1b``,
    ``\\u202e``).

    An undecodable byte of the file name (a lone surrogate) is shown as ``\\xNN``, the byte
    itself. Names made only of printable characters come back unchanged.
    """
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


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
