"""The SuperLink's SQL state: a longer SQLite lock wait, and a message handed out only once its
objects arrived, on a real Flower SqlLinkState and object store; on a Flower whose state does
not match (drift simulated), the hand-out is off and messages are delivered as Flower does."""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
from flwr.supercore.constant import TaskType
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store.sql_object_store import SqlObjectStore
from flwr.superlink.federation.noop_federation_manager import (
    NOOP_FEDERATION_ID,
    NoOpFederationManager,
)
from sqlalchemy import text

from fedmed import wire
from fedmed.flower import speedups
from fedmed.flower.linkstate import (
    deliver_complete_messages,
    incomplete_objects,
    lengthen_sqlite_busy_timeout,
)
from fedmed.flower.speedups import WITHOUT_ENV, FlowerDriftWarning

# Flower's SQL state runs alembic migrations, which warn about their own config
pytestmark = pytest.mark.filterwarnings("ignore:No path_separator found:DeprecationWarning")


@dataclass
class Link:
    state: SqlLinkState
    store: SqlObjectStore
    run: int
    node: int


@pytest.fixture
def link(tmp_path, monkeypatch) -> Iterator[Link]:
    # the patch is class-level: undo it after each test
    for name in ("get_message_ins", "get_message_res"):
        monkeypatch.setattr(SqlLinkState, name, getattr(SqlLinkState, name))
    monkeypatch.setattr(SqlLinkState, "_fedmed_hold_s", None, raising=False)
    monkeypatch.setattr(speedups, "_OFF", {})  # no speed-up off yet in this process
    monkeypatch.delenv(WITHOUT_ENV, raising=False)
    database = str(tmp_path / "state.db")
    store = SqlObjectStore(database)
    store.initialize()
    state = SqlLinkState(database, NoOpFederationManager(), store)
    state.initialize()
    node = state.create_node(
        owner_aid="a", owner_name="site", public_key=b"k" * 32, heartbeat_interval=30.0
    )
    state.activate_node(node, 30.0)
    run = state.create_run(
        None, None, None, {}, NOOP_FEDERATION_ID, None, None, TaskType.SERVER_APP
    )
    yield Link(state, store, run, node)


def _push(link: Link, content: RecordDict, *, src: int, dst: int, reply_to: str = "") -> Message:
    """Store the message and register its objects, as Flower's push-messages does."""
    metadata = Metadata(
        run_id=link.run, message_id="", src_node_id=src, dst_node_id=dst,
        reply_to_message_id=reply_to, group_id="round-1.1", created_at=time.time(),
        ttl=60.0 if reply_to else 600.0,  # a reply may not outlive its instruction
        message_type="train",
    )  # fmt: skip
    message = Message(content=content, metadata=metadata)
    message.metadata.__dict__["_message_id"] = message.object_id
    session = link.state.start_session(link.run)
    stored, _ = link.state.store_message_and_object_tree(message, get_object_tree(message), session)
    assert stored
    return message


def _upload(link: Link, message: Message) -> None:
    for object_id, obj in get_all_nested_objects(message).items():
        link.store.put(object_id, obj.deflate())


def _content() -> RecordDict:
    return RecordDict(
        {**wire.pack({"w": np.ones(3, np.float32)}), "config": ConfigRecord({"a": 1})}
    )


def test_incomplete_objects_follows_the_upload(link):
    message = _push(link, _content(), src=SUPERLINK_NODE_ID, dst=link.node)
    assert incomplete_objects(link.store, message.object_id)
    assert incomplete_objects(link.store, "0" * 64)  # not registered (yet)
    _upload(link, message)
    assert not incomplete_objects(link.store, message.object_id)


def test_a_site_gets_the_message_only_after_its_objects_arrived(link):
    deliver_complete_messages()
    message = _push(link, _content(), src=SUPERLINK_NODE_ID, dst=link.node)
    assert link.state.get_message_ins(node_id=link.node, limit=1) == []
    _upload(link, message)
    (pulled,) = link.state.get_message_ins(node_id=link.node, limit=1)
    assert pulled.metadata.message_id == message.object_id


def test_the_server_gets_a_reply_only_after_its_objects_arrived(link):
    deliver_complete_messages()
    ins = _push(link, _content(), src=SUPERLINK_NODE_ID, dst=link.node)
    _upload(link, ins)
    assert link.state.get_message_ins(node_id=link.node, limit=1)
    content = RecordDict(
        {**wire.pack({"w": np.zeros(3, np.float32)}), "metrics": MetricRecord({"n": 1})}
    )
    reply = _push(link, content, src=link.node, dst=SUPERLINK_NODE_ID, reply_to=ins.object_id)
    assert link.state.get_message_res({ins.object_id}, link.run) == []
    _upload(link, reply)
    (pulled,) = link.state.get_message_res({ins.object_id}, link.run)
    assert pulled.metadata.reply_to_message_id == ins.object_id


def test_an_upload_that_never_ends_is_released_after_the_hold(link, caplog):
    deliver_complete_messages(hold_s=0.0)
    message = _push(link, _content(), src=SUPERLINK_NODE_ID, dst=link.node)
    with caplog.at_level("WARNING", logger="fedmed.flower.linkstate"):
        (pulled,) = link.state.get_message_ins(node_id=link.node, limit=1)  # Flower's behaviour
    assert pulled.metadata.message_id == message.object_id
    assert f"message {message.object_id[:12]}: objects still missing" in caplog.text


def test_sqlite_busy_timeout_is_lengthened_where_flower_reads_it(monkeypatch) -> None:
    sql_mixin = importlib.import_module("flwr.supercore.sql_mixin")
    assert ("busy_timeout", "5000") in sql_mixin.SQLITE_PRAGMAS
    # Flower reads the module global at connect time: that is what the gateway replaces.
    assert "SQLITE_PRAGMAS" in inspect.getsource(sql_mixin._set_sqlite_pragmas)
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)

    lengthen_sqlite_busy_timeout("60000")

    assert dict(sql_mixin.SQLITE_PRAGMAS)["busy_timeout"] == "60000"
    assert dict(sql_mixin.SQLITE_PRAGMAS)["journal_mode"] == "WAL"


# ------------------------------------------------------------------- drift: Flower's behaviour


def test_handout_on_a_changed_delivery_signature_stays_flowers(link, monkeypatch):
    flowers = SqlLinkState.get_message_ins

    def get_message_ins(self, node_id, limit, *, run_id=None, federation=None):  # newer Flower
        return flowers(self, node_id, limit, run_id=run_id)

    monkeypatch.setattr(SqlLinkState, "get_message_ins", get_message_ins)

    with pytest.warns(
        FlowerDriftWarning,
        match=r"'handout' is off: SqlLinkState.get_message_ins takes \[.*'federation'\], not "
        r".* \(flwr 1\.\d+\.\d+\)",
    ):
        assert deliver_complete_messages() is False

    assert SqlLinkState.get_message_ins is get_message_ins  # not wrapped
    message = _push(link, _content(), src=SUPERLINK_NODE_ID, dst=link.node)
    (pulled,) = link.state.get_message_ins(node_id=link.node, limit=1)  # at once, objects or not
    assert pulled.metadata.message_id == message.object_id


def test_handout_on_a_changed_object_model_stays_flowers(link, monkeypatch):
    models = importlib.import_module("flwr.supercore.state.schema.objectstore_models")

    class StoredObject:  # a newer schema: availability tracked elsewhere
        __table__ = type("Table", (), {"columns": {"object_id": None, "content": None}})

    monkeypatch.setattr(models, "StoredObject", StoredObject)

    with pytest.warns(FlowerDriftWarning, match=r"StoredObject has no column \['is_available'\]"):
        assert deliver_complete_messages() is False
    assert getattr(SqlLinkState, "_fedmed_hold_s", None) is None


def test_handout_whose_query_fails_while_running_delivers_as_flower_does(link):
    deliver_complete_messages()
    patched = SqlLinkState.get_message_ins
    message = _push(link, _content(), src=SUPERLINK_NODE_ID, dst=link.node)
    assert link.state.get_message_ins(node_id=link.node, limit=1) == []  # held: objects missing
    with link.store.session() as session:  # a Flower migration renames the column it reads
        session.execute(text("ALTER TABLE objects RENAME COLUMN is_available TO available"))

    with pytest.warns(
        FlowerDriftWarning, match=r"'handout' is off: its query over Flower's tables failed: "
    ):
        (pulled,) = link.state.get_message_ins(node_id=link.node, limit=1)

    assert pulled.metadata.message_id == message.object_id  # delivered, not broken
    assert SqlLinkState.get_message_ins is not patched  # Flower's own from now on
    assert speedups.off()["handout"].startswith("its query over Flower's tables failed")


def test_handout_switched_off_by_env_delivers_at_once(link, monkeypatch):
    monkeypatch.setenv(WITHOUT_ENV, "handout")
    assert deliver_complete_messages() is False
    message = _push(link, _content(), src=SUPERLINK_NODE_ID, dst=link.node)
    (pulled,) = link.state.get_message_ins(node_id=link.node, limit=1)
    assert pulled.metadata.message_id == message.object_id
