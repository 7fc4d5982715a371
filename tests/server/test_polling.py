"""Pushing a batch of messages and polling for their replies (the round loop and SecAgg+)."""

from __future__ import annotations

import pytest
from fedmed.server.polling import PollingGrid, exchange
from flower_messages import flower_message
from flwr.app import ConfigRecord, Message
from flwr.common.constant import SUPERLINK_NODE_ID


class _Grid:
    """The two Grid calls exchange uses; ``answering`` maps a node to the pull that brings its
    reply, ``refused`` nodes' messages are not accepted (no id)."""

    def __init__(self, answering: dict[int, int], refused: set[int] = frozenset()) -> None:
        self.answering, self.refused = answering, refused
        self.pushed: list[Message] = []
        self.pulls = 0

    def push_messages(self, messages):
        self.pushed += messages
        return [
            "" if m.metadata.dst_node_id in self.refused else m.metadata.message_id
            for m in messages
        ]

    def pull_messages(self, message_ids):
        self.pulls += 1
        replies = [
            # as a SuperLink-written error reply (site offline): from the SuperLink, not the site
            _message(1, f"re-{m.metadata.message_id}", m.metadata.message_id, SUPERLINK_NODE_ID)
            for m in self.pushed
            if m.metadata.message_id in message_ids
            and self.answering.get(m.metadata.dst_node_id) == self.pulls
        ]
        return replies[::-1]  # any order


def _message(dst: int, message_id: str, reply_to: str = "", src: int = 1) -> Message:
    content = {"c": ConfigRecord({"to": dst})}
    return flower_message(
        content, "train", src=src, dst=dst, message_id=message_id, reply_to=reply_to, ttl=43200.0
    )


def _messages(*nodes: int) -> list[Message]:
    return [_message(n, f"msg-{n}") for n in nodes]


def test_replies_are_paired_with_what_was_sent_by_reply_id():
    grid = _Grid({7: 1, 8: 3, 9: 2})
    messages = _messages(7, 8, 9)

    answered = exchange(grid, messages, timeout=10.0, interval=0.0)

    assert [sent.metadata.dst_node_id for sent, _ in answered] == [7, 8, 9]
    assert [reply.metadata.reply_to_message_id for _, reply in answered] == [
        "msg-7",
        "msg-8",
        "msg-9",
    ]
    assert grid.pulls == 3  # stops polling once every message has its reply


def test_a_site_that_never_answers_is_left_out_after_the_timeout():
    grid = _Grid({7: 1})
    answered = exchange(grid, _messages(7, 8), timeout=0.05, interval=0.01)
    assert [sent.metadata.dst_node_id for sent, _ in answered] == [7]
    assert grid.pulls >= 2


def test_a_message_the_superlink_refused_is_not_waited_for():
    grid = _Grid({7: 1, 8: 1}, refused={8})
    answered = exchange(grid, _messages(7, 8), timeout=10.0, interval=0.0)
    assert [sent.metadata.dst_node_id for sent, _ in answered] == [7]
    assert grid.pulls == 1


@pytest.mark.parametrize(("timeout", "ttl"), [(30.0, 30.0), (None, 43200.0)])
def test_polling_grid_gives_messages_the_calls_timeout_as_ttl(timeout, ttl):
    grid = _Grid({7: 1})
    messages = _messages(7)  # ttl 43200 s: Flower's default

    replies = PollingGrid(grid, 0.0).send_and_receive(messages, timeout=timeout)

    assert [r.metadata.reply_to_message_id for r in replies] == ["msg-7"]
    assert grid.pushed[0].metadata.ttl == ttl
    assert PollingGrid(grid, 0.0).pulls == grid.pulls  # everything else is the grid's
