"""The error hierarchy and how CLIs report expected errors."""

from __future__ import annotations

import pytest

from fedmed.cli.runner import run_command
from fedmed.errors import (
    ConfigError,
    DataError,
    FederationError,
    FedmedError,
    ModelError,
    SecurityError,
)


@pytest.mark.parametrize(
    ("error", "code"),
    [(ConfigError, 3), (DataError, 4), (ModelError, 5), (FederationError, 6), (SecurityError, 7)],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_each_error_is_a_fedmed_error_with_its_own_exit_code(error: type, code: int) -> None:
    assert issubclass(error, FedmedError)
    assert error.exit_code == code


def test_subclass_without_exit_code_is_refused() -> None:
    with pytest.raises(TypeError, match="must define its own integer exit_code"):

        class Vague(FedmedError):
            pass


def test_expected_error_prints_one_line_and_returns_its_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def fail() -> int:
        raise DataError("image imagesTr/p03.nii.gz is truncated: re-export it")

    code = run_command(fail, prog="fedmed")

    assert code == 4
    err = capsys.readouterr().err
    assert err == "fedmed: error: image imagesTr/p03.nii.gz is truncated: re-export it\n"


def test_bug_keeps_its_traceback() -> None:
    def bug() -> int:
        raise ZeroDivisionError("boom")

    with pytest.raises(ZeroDivisionError):
        run_command(bug, prog="fedmed")
