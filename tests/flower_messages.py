"""Flower messages with full metadata, as the Grid and a ClientApp hand them to fedmed.

Flower's ``Message(content, dst_node_id, message_type)`` needs a running app's identity; tests
build the metadata themselves, here once.

Example:
    >>> reply = flower_message({"site": ConfigRecord({"name": "A"})}, "query", src=7, dst=1,
    ...                        reply_to="q")
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from flwr.app import Error, Message, Metadata, RecordDict

__all__ = ["flower_message"]


def flower_message(
    content: Mapping[str, Any] | RecordDict | Error,
    message_type: str,
    *,
    src: int = 1,
    dst: int = 7,
    message_id: str | None = None,
    reply_to: str = "",
    group_id: str = "round-1.1",
    ttl: float = 600.0,
) -> Message:
    """A message of run 1 from node ``src`` to ``dst``: an instruction, or a reply when
    ``reply_to`` names the message it answers; an :class:`Error` makes an error reply."""
    metadata = Metadata(
        run_id=1,
        message_id=message_id or f"msg-{message_type}-{src}-{dst}",
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id=group_id,
        created_at=time.time(),
        ttl=ttl,
        message_type=message_type,
    )
    if isinstance(content, Error):
        return Message(error=content, metadata=metadata)
    record = content if isinstance(content, RecordDict) else RecordDict(dict(content))
    return Message(content=record, metadata=metadata)
