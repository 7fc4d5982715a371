"""Sending messages on the Grid and polling for their replies, fast and bounded.

Flower's ``Grid.send_and_receive`` polls every 3 s and, without a timeout, lets instructions
live 12 h. fedmed's round loop and its SecAgg+ stages both push a batch of messages and poll
for the replies every ``poll-interval`` (0.1 s by default) until all arrived or the timeout:
:func:`exchange` does that once for both; :class:`PollingGrid` offers it as the grid's
``send_and_receive`` to Flower code that takes a grid (the SecAgg+ workflow).

Replies are matched to what was sent by ``reply_to_message_id``: an error reply the SuperLink
writes itself (a site went offline) comes from the SuperLink's node id, not the site's.

Example:
    >>> answered = exchange(grid, messages, timeout=60.0, interval=0.1)
    >>> {sent.metadata.dst_node_id: reply for sent, reply in answered}
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["PollingGrid", "exchange"]


def exchange(
    grid: Grid, messages: Sequence[Message], *, timeout: float, interval: float
) -> list[tuple[Message, Message]]:
    """Push ``messages``, then pull every ``interval`` s until each has a reply or ``timeout``
    s passed; the ``(sent, reply)`` pairs that got one, in the order of ``messages``."""
    ids = list(grid.push_messages(messages))
    pending = {mid: i for i, mid in enumerate(ids) if mid}  # '' = not accepted by the SuperLink
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            index = pending.pop(reply.metadata.reply_to_message_id, None)
            if index is not None:
                replies[index] = reply
        if pending:
            time.sleep(interval)
    return [(messages[i], replies[i]) for i in sorted(replies)]


class PollingGrid:
    """``grid`` whose ``send_and_receive`` is :func:`exchange` (polling every ``interval`` s)
    and gives each message the call's timeout as its time to live.

    Example:
        >>> replies = PollingGrid(grid, 0.1).send_and_receive(messages, timeout=30.0)
    """

    def __init__(self, grid: Grid, interval: float) -> None:
        self._grid = grid
        self._interval = interval

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Replies to ``messages`` (those that came within ``timeout``; None: no bound)."""
        messages = list(messages)
        if timeout is not None:  # Flower's default is 12 h: a stale stage must not linger
            for message in messages:
                message.metadata.ttl = timeout
        bound = float("inf") if timeout is None else timeout
        answered = exchange(self._grid, messages, timeout=bound, interval=self._interval)
        return [reply for _, reply in answered]
