"""The server reads a site's packed reply alone: whatever is wrong with it rejects only it."""

from __future__ import annotations

import numpy as np
import pytest
from fedmed.server.attempt import ReplyBounds, parse_train_reply, run_plain_attempt
from fedmed.server.federation import Federation, train_config
from fedmed.server.validation import InvalidReply
from flower_messages import flower_message
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
)

from fedmed import wire
from fedmed.runsettings.settings import RunSettings

SMALL = {"model_features": "4,8,16,32,64", "patch_size": "32,32"}
METRICS = {"num-examples": 12, "train-loss": 0.5}


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Federation:
    out = tmp_path_factory.mktemp("out")
    return Federation(None, RunSettings(out_dir=str(out), **SMALL))  # type: ignore[arg-type]


def _parse(reply: Message, sent: dict, *, max_weight: float = 100.0, bound: float = 0.0):
    return parse_train_reply(reply, "A", sent, max_update_norm=bound, max_weight=max_weight)


def _reply(content: dict | Error) -> Message:
    return flower_message(content, "train", src=7, dst=1, message_id="reply", reply_to="train")


def test_a_packed_reply_becomes_the_site_update(federation):
    sent = federation.initial_weights
    trained = {k: v + 1 if v.dtype.kind == "f" else v for k, v in sent.items()}
    reply = _reply({**wire.pack(trained), "metrics": MetricRecord(METRICS)})
    update = _parse(reply, sent)
    assert (update.site, update.num_examples) == ("A", 12.0)
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
        _parse(reply, sent)


def test_a_packed_reply_of_another_model_is_rejected(federation):
    sent = federation.initial_weights
    other = dict(list(sent.items())[1:])
    reply = _reply({**wire.pack(other), "metrics": MetricRecord(METRICS)})
    with pytest.raises(InvalidReply, match="array keys differ from the global model: missing"):
        _parse(reply, sent)


def test_per_array_records_or_extra_records_are_rejected(federation):
    sent = federation.initial_weights
    plain = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in sent.items()})
    with pytest.raises(InvalidReply, match=r"exactly ArrayRecord 'arrays', ConfigRecord"):
        _parse(_reply({"arrays": plain, "metrics": MetricRecord(METRICS)}), sent)
    extra = {**wire.pack(sent), "metrics": MetricRecord(METRICS), "notes": ConfigRecord({"a": 1})}
    with pytest.raises(InvalidReply, match=r"got \['arrays', 'arrays-index', 'metrics', 'notes'\]"):
        _parse(_reply(extra), sent)


def _packed_with_index(sent: dict, **index_changes) -> dict:
    records = wire.pack(sent)
    index = ConfigRecord({**dict(records[wire.INDEX]), **index_changes})
    return {"arrays": records["arrays"], wire.INDEX: index, "metrics": MetricRecord(METRICS)}


def test_a_crafted_dtype_string_is_rejected_not_raised(federation):
    sent = federation.initial_weights
    dtypes = list(wire.pack(sent)[wire.INDEX]["dtypes"])
    dtypes[0] = "(99999999999999999999,)f4"  # today: an unhandled ValueError ended the run
    with pytest.raises(InvalidReply, match="not a plain numeric dtype"):
        _parse(_reply(_packed_with_index(sent, dtypes=dtypes)), sent)


def test_an_array_header_declaring_terabytes_is_rejected_before_allocation(federation):
    sent = federation.initial_weights
    records = wire.pack(sent)
    packed = records["arrays"]["packed"]
    # the Array says it holds 10^13 bytes but carries the real payload: today a MemoryError
    huge = Array(dtype="uint8", shape=(10**13,), stype=packed.stype, data=packed.data)
    content = {
        "arrays": ArrayRecord({"packed": huge}),
        wire.INDEX: records[wire.INDEX],
        "metrics": MetricRecord(METRICS),
    }
    with pytest.raises(InvalidReply, match="declares 10000000000000 bytes"):
        _parse(_reply(content), sent)


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        ({"num-examples": 1e12}, "claims 1e\\+12 but the site announced 100"),
        ({"num-examples": 1.7e308}, "claims 1.7e\\+308 but the site announced 100"),
        ({"num-examples": 12, "bad\nkey": 1.0}, "metric key 'bad\\\\\\\\nkey' is not"),
        ({"num-examples": 12, **{f"m{i}": 1.0 for i in range(70)}}, "at most 64"),
    ],
    ids=["weight-1e12", "weight-overflow", "control-char-key", "too-many"],
)
def test_claims_beyond_what_a_site_announced_are_rejected(federation, metrics, match):
    sent = federation.initial_weights
    reply = _reply({**wire.pack(sent), "metrics": MetricRecord(metrics)})
    with pytest.raises(InvalidReply, match=match):
        _parse(reply, sent, max_weight=100.0)


def test_a_site_error_reason_is_escaped_and_bounded(federation):
    reply = _reply(Error(code=1, reason="boom\n\x1b[2J" + "x" * 1000))
    with pytest.raises(InvalidReply) as info:
        _parse(reply, federation.initial_weights)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    assert "\\x1b[2J" in str(info.value) and len(str(info.value)) < 700


class _Exploding:
    """A reply whose every access raises: an exception no check foresaw."""

    def has_error(self) -> bool:
        raise RuntimeError("nobody expected this")


def test_one_unreadable_reply_is_rejected_and_the_attempt_goes_on(federation, task_identity):
    # Prepare: node 11 replies well, node 12 with something that explodes when read
    sent = federation.initial_weights
    good = _reply({**wire.pack(sent), "metrics": MetricRecord(METRICS)})
    cfg = train_config(federation.settings, 1)
    bounds = ReplyBounds(0.0, {11: 100.0, 12: 100.0})
    # Execute
    record, updates = run_plain_attempt(
        lambda messages, timeout: {11: good, 12: _Exploding()},  # type: ignore[dict-item]
        1,
        1,
        {11: "A", 12: "B"},
        sent,
        cfg,
        {},
        bounds,
        timeout=1.0,
    )
    # Assert
    assert [u.site for u in updates] == ["A"]
    assert record["rejected"] == {"B": "unreadable reply (RuntimeError: nobody expected this)"}
