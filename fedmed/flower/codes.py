"""Flower's protocol constants that fedmed writes into (or checks in) messages.

``flwr.app`` exports the message types but not these constants; they live in Flower's internal
``flwr.common.constant``. fedmed's modules take them from here, so a Flower upgrade that moves
them breaks one import (and ``tests/flower/test_flower_contract.py``), not several.

* :class:`ErrorCode`: e.g. ``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``, the code of a ClientApp's
  error reply;
* :class:`SType`: e.g. ``SType.NUMPY``, the serialization type of an ``Array`` holding NumPy
  ``.npy`` bytes.

Example:
    >>> Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="bad data")
    >>> Array(dtype="uint8", shape=(n,), stype=SType.NUMPY, data=npy_bytes)
"""

from __future__ import annotations

from flwr.common.constant import ErrorCode, SType

__all__ = ["ErrorCode", "SType"]
