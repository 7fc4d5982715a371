"""A site's end-of-run evaluation reply: summaries, and its own models only where they travel."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fedmed.server.evaluation import _read_reply
from fedmed.server.federation import Federation
from flower_messages import flower_message
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedmed import wire
from fedmed.runsettings.settings import RunSettings


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Federation:
    out = tmp_path_factory.mktemp("out")
    settings = RunSettings(model_features="4,8,16,32,64", patch_size="32,32", out_dir=str(out))
    return Federation(None, settings)  # type: ignore[arg-type]


def _reply(models: dict) -> Message:
    entry = {"model": "global-final", "data": "val:A", "metric": "dice", "status": "ok", "n": 6,
             "mean": 0.8, "ci_low": 0.7, "ci_high": 0.9, "worst_decile": 0.6}  # fmt: skip
    content = RecordDict(
        {
            "results": ConfigRecord({"entries": json.dumps([entry])}),
            "metrics": MetricRecord({"global-final-val-dice": 0.8}),
            **(wire.pack(wire.join_models(models)) if models else {}),
        }
    )
    return flower_message(
        content, "evaluate", src=7, dst=1, reply_to="evaluate", group_id="evaluation"
    )


def test_a_sites_own_models_travel_back_whole(fed):
    entries, metrics, travelling = _read_reply(
        fed, _reply({"finetuned@A": fed.initial_weights}), "A", {"global-final"}
    )
    assert [e["model"] for e in entries] == ["global-final"]
    assert metrics == {"global-final-val-dice": 0.8}
    assert list(travelling) == ["finetuned@A"]
    assert set(travelling["finetuned@A"]) == set(fed.initial_weights)


def test_a_model_labelled_as_another_sites_is_refused(fed):
    with pytest.raises(ValueError, match="is not the site's own"):
        _read_reply(fed, _reply({"finetuned@B": fed.initial_weights}), "A", {"global-final"})


def test_a_travelling_model_with_other_keys_is_refused(fed):
    partial = dict(list(fed.initial_weights.items())[:-1])
    with pytest.raises(ValueError, match="array keys differ from the global model: missing"):
        _read_reply(fed, _reply({"finetuned@A": partial}), "A", {"global-final"})


def test_an_array_key_without_a_model_label_is_refused(fed):
    reply = _reply({})
    reply.content.update(wire.pack({"w": np.zeros(1, np.float32)}))
    with pytest.raises(ValueError, match="is not '<model>::<key>'"):
        _read_reply(fed, reply, "A", {"global-final"})
