"""Outside text made safe to print: control characters escaped, length bounded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedmed.text import is_identifier, markdown_cell, printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("site-A", "site-A"),
        ("a\nb", "a\\nb"),
        ("\x1b[2J", "\\x1b[2J"),
        ("right\u202eleft", "right\\u202eleft"),
        ("café", "café"),
    ],
    ids=["plain", "newline", "escape", "bidi", "unicode"],
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


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("p01.nii.gz", "p01.nii.gz"),
        ("scan é 中文.nii.gz", "scan é 中文.nii.gz"),
        ("a\x1b[31mred\x1b[0m.nii", "a\\x1b[31mred\\x1b[0m.nii"),
        ("two\nlines\r\tx", "two\\nlines\\r\\tx"),
        ("del\x7f and c1\x9b", "del\\x7f and c1\\x9b"),
        ("evil\u202egpj.nii", "evil\\u202egpj.nii"),
        ("sep\u2028x", "sep\\u2028x"),
    ],
    ids=["plain", "unicode", "escape-sequence", "newline-tab", "del-c1", "bidi", "line-sep"],
)
def test_control_and_format_characters_are_escaped(name: str, shown: str) -> None:
    assert printable(name) == shown
    assert printable(name).isprintable()


def test_undecodable_bytes_show_as_the_byte() -> None:
    name = os.fsdecode(b"scan\xff\xfe.nii.gz")  # kept by Python as lone surrogates

    assert printable(Path("/data") / name) == "/data/scan\\xff\\xfe.nii.gz"
    printable(name).encode("utf-8")  # printing it can no longer fail
