"""The site roster: identity from the registered key, bounded case counts, bad replies isolated."""

from __future__ import annotations

import logging

import pytest
from fedmed.server.roster import Roster, parse_site_record, registered_names
from flower_messages import flower_message
from flwr.app import ConfigRecord, Error, Message
from flwr.proto.node_pb2 import NodeInfo


def _reply(node: int, content: dict | Error) -> Message:
    return flower_message(
        content, "query", src=node, dst=1, message_id=f"reply-{node}", reply_to="q",
        group_id="roster", ttl=60.0,
    )  # fmt: skip


def _site(name: str, train: object = 4, val: object = 1) -> dict:
    return {"site": ConfigRecord({"name": name, "num-train-cases": train, "num-val-cases": val})}


def test_registered_names_come_from_fedmeds_key_registrations():
    nodes = [
        NodeInfo(node_id=11, name="site-A"),
        NodeInfo(node_id=12, name=""),  # not registered by fedmed (insecure, simulation)
        NodeInfo(node_id=13, name="site-bad\nname"),
    ]
    assert registered_names(nodes) == {11: "A"}


@pytest.mark.parametrize(
    ("train", "match"),
    [("x", "not a number"), (float("inf"), "whole number"), ([1, 2], "not a number"),
     (2.5, "whole number"), (-1, "whole number"), (10**9, r"\[0, 1000\]")],
    ids=["text", "inf", "list", "fraction", "negative", "too-many"],
)  # fmt: skip
def test_case_counts_must_be_small_whole_numbers(train, match):
    with pytest.raises(ValueError, match=match):
        parse_site_record(_site("A", train)["site"], 11, registered=None, max_site_cases=1000)


def test_the_registered_name_wins_over_the_claimed_one(caplog):
    with caplog.at_level(logging.WARNING):
        site = parse_site_record(_site("B")["site"], 11, registered="A", max_site_cases=1000)
    assert (site.name, site.verified) == ("A", True)
    assert "registered as site A but says it is B" in caplog.text


def test_a_self_declared_name_with_control_characters_is_replaced():
    site = parse_site_record(_site("A\n\x1b[31m")["site"], 11, registered=None, max_site_cases=9)
    assert (site.name, site.verified) == ("node-11", False)


def test_one_bad_reply_leaves_only_that_node_out(task_identity):
    roster = Roster(max_site_cases=1000)
    replies = {
        11: _reply(11, _site("A")),
        12: _reply(12, _site("B", train="x")),  # today: int("x") ended the whole run
        13: _reply(13, Error(code=1, reason="boom")),
    }
    roster.update([11, 12, 13, 14], {}, lambda messages: replies, config={}, ttl=5.0)
    assert roster.names() == {11: "A"}


def test_an_impostor_claiming_a_registered_name_is_kept_apart(task_identity):
    roster = Roster(max_site_cases=1000)
    replies = {11: _reply(11, _site("A")), 12: _reply(12, _site("A"))}
    roster.update([11, 12], {11: "A"}, lambda messages: replies, config={}, ttl=5.0)
    assert roster.names() == {11: "A", 12: "A#12"}


def test_a_site_that_comes_back_under_a_new_node_keeps_its_name(task_identity):
    roster = Roster(max_site_cases=1000)
    roster.update([11], {11: "A"}, lambda m: {11: _reply(11, _site("A"))}, config={}, ttl=5.0)
    # node 11 went away; the site reconnected as node 21
    roster.update([21], {21: "A"}, lambda m: {21: _reply(21, _site("A"))}, config={}, ttl=5.0)
    assert roster.names() == {21: "A"}


def test_a_node_that_cannot_answer_is_asked_again_after_a_growing_pause(task_identity):
    clock = [100.0]
    asked: list[list[int]] = []

    def exchange(messages: list[Message]) -> dict[int, Message]:
        asked.append([m.metadata.dst_node_id for m in messages])
        return {}  # no reply

    roster = Roster(max_site_cases=1000, clock=lambda: clock[0])
    for now in (100.0, 101.0, 102.0, 103.0, 105.9, 106.0):
        clock[0] = now
        roster.update([11], {}, exchange, config={}, ttl=5.0)
    # asked at 100 (pause 2 s), 102 (pause 4 s), 106
    assert asked == [[11], [11], [11]]
    # once it answers the pause is forgotten; a node that left is forgotten too
    roster.update([], {}, exchange, config={}, ttl=5.0)
    clock[0] = 106.5
    roster.update([11], {}, lambda m: {11: _reply(11, _site("A"))}, config={}, ttl=5.0)
    assert roster.names() == {11: "A"}
