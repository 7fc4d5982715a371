"""printable(): file names from a site folder are shown with control characters escaped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedmed.io.display import printable


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
