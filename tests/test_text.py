"""Outside text made safe to print: control characters escaped, length bounded."""

from __future__ import annotations

import pytest

from fedmed.text import is_identifier, markdown_cell, printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("site-A", "site-A"),
        ("a\nb", "a\\nb"),
        ("\x1b[2J", "\\x1b[2J"),
        ("right\u202eleft", "right\\u202eleft"),
        ("back\\slash", "back\\\\slash"),
        ("café", "café"),
    ],
    ids=["plain", "newline", "escape", "bidi", "backslash", "unicode"],
)
def test_printable_escapes_what_could_forge_or_hide_text(raw, shown):
    assert printable(raw) == shown


def test_printable_bounds_the_length():
    assert printable("x" * 1000, limit=5) == "xxxxx...(995 more)"


def test_markdown_cell_keeps_a_table_intact():
    assert markdown_cell("a|b\nc") == "a\\|b\\nc"


@pytest.mark.parametrize("name", ["A", "val-dice", "finetuned@B", "global-val-n_cases"])
def test_identifiers(name):
    assert is_identifier(name)


@pytest.mark.parametrize("name", ["", "-x", "a b", "a\nb", "x" * 65, 5, None])
def test_not_identifiers(name):
    assert not is_identifier(name)
