"""fedmed's exceptions, one place for all of them.

The hierarchy::

    FedmedError                 exit code 1
     +-- ConfigError            exit code 3   a setting or config file is wrong
     +-- DataError              exit code 4   a scan, label, dataset.json or cache is wrong
     +-- ModelError             exit code 5   a network, checkpoint or weight set is wrong
     +-- FederationError        exit code 6   the federation cannot proceed (sites, rounds, Flower)
     +-- SecurityError          exit code 7   certificates, keys, signatures, encryption

Exit code 2 is left to argparse (usage errors) and to commands not available yet.
Messages name the file or setting, the bad value and the fix; CLIs print them as one line.

Example:
    >>> raise DataError(
    ...     "label labelsTr/p03.nii.gz has shape (4, 4, 3) but its image has (4, 4, 4): "
    ...     "re-export the label on the image grid"
    ... )
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ConfigError",
    "DataError",
    "FederationError",
    "FedmedError",
    "ModelError",
    "SecurityError",
]


class FedmedError(Exception):
    """Base of every error fedmed raises on purpose; ``exit_code`` is the CLI's exit status."""

    exit_code: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not isinstance(cls.__dict__.get("exit_code"), int):
            raise TypeError(f"{cls.__name__} must define its own integer exit_code")


class ConfigError(FedmedError):
    """A setting, command-line flag or config file is missing or invalid."""

    exit_code: ClassVar[int] = 3


class DataError(FedmedError):
    """A scan, label, dataset description or cache entry is unreadable or inconsistent."""

    exit_code: ClassVar[int] = 4


class ModelError(FedmedError):
    """A network definition, checkpoint or set of weights is invalid."""

    exit_code: ClassVar[int] = 5


class FederationError(FedmedError):
    """The federation cannot go on: too few sites, a failed round, a Flower process died."""

    exit_code: ClassVar[int] = 6


class SecurityError(FedmedError):
    """A certificate, key, signature or encryption check failed."""

    exit_code: ClassVar[int] = 7
