"""The server reads a site's packed reply, and refuses one whose index does not match."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fedmed.server.federation import Federation
from fedmed.server.settings import RunSettings
from fedmed.server.validation import InvalidReply
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from fedmed import wire

SMALL = {"model_features": "4,8,16,32,64", "patch_size": "32,32"}
METRICS = {"num-examples": 12, "train-loss": 0.5}


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Federation:
    out = tmp_path_factory.mktemp("out")
    return Federation(None, RunSettings(out_dir=str(out), **SMALL))  # type: ignore[arg-type]


def _reply(content: dict) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="reply",
        src_node_id=7,
        dst_node_id=1,
        reply_to_message_id="train",
        group_id="round-1.1",
        created_at=time.time(),
        ttl=600.0,
        message_type="train",
    )
    return Message(content=RecordDict(content), metadata=metadata)


def test_a_packed_reply_becomes_the_site_update(federation):
    sent = federation.initial_weights
    trained = {k: v + 1 if v.dtype.kind == "f" else v for k, v in sent.items()}
    reply = _reply({**wire.pack(trained), "metrics": MetricRecord(METRICS)})
    update = federation._parse(reply, "A", sent)
    assert (update.site, update.num_examples) == ("A", 12)
    assert update.metrics == {"num-examples": 12.0, "train-loss": 0.5}
    assert list(update.arrays) == list(sent)
    assert all(np.array_equal(update.arrays[k], trained[k]) for k in sent)


def test_an_index_that_does_not_match_is_rejected_with_the_reason(federation):
    sent = federation.initial_weights
    records = wire.pack(sent)
    index = ConfigRecord({**dict(records[wire.INDEX]), "nbytes": 5})
    reply = _reply(
        {"arrays": records["arrays"], wire.INDEX: index, "metrics": MetricRecord(METRICS)}
    )
    with pytest.raises(InvalidReply, match="packed arrays: 'arrays-index' says the payload has 5"):
        federation._parse(reply, "A", sent)


def test_a_packed_reply_of_another_model_is_rejected(federation):
    sent = federation.initial_weights
    other = dict(list(sent.items())[1:])
    reply = _reply({**wire.pack(other), "metrics": MetricRecord(METRICS)})
    with pytest.raises(InvalidReply, match="array keys differ from the global model: missing"):
        federation._parse(reply, "A", sent)


def test_per_array_records_or_extra_records_are_rejected(federation):
    sent = federation.initial_weights
    plain = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in sent.items()})
    with pytest.raises(InvalidReply, match=r"exactly ArrayRecord 'arrays', ConfigRecord"):
        federation._parse(_reply({"arrays": plain, "metrics": MetricRecord(METRICS)}), "A", sent)
    extra = {**wire.pack(sent), "metrics": MetricRecord(METRICS), "notes": ConfigRecord({"a": 1})}
    with pytest.raises(InvalidReply, match=r"got \['arrays', 'arrays-index', 'metrics', 'notes'\]"):
        federation._parse(_reply(extra), "A", sent)
