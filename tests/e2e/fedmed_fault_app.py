"""fedmed's own ClientApp behind two test-only Flower client mods (e2e fault and privacy tests).

The server ships it with ``[server] client-app = "fedmed_fault_app:app"``; sites import it
through ``PYTHONPATH=tests/e2e``. The handlers are production's (``fedmed.client.app``); the
mods only act on the reply on its way out:

- :func:`record_mod` (outermost, so it sees exactly what leaves the site) writes every reply a
  site sends under ``$FEDMED_E2E_RECORD_DIR/<site>/<n>-<type>/``: ``message.json`` (record
  names and types, config/metric values, the error if any), ``arrays.npz`` (every model array,
  unpacked from fedmed's packed ArrayRecord with its index, :mod:`fedmed.wire`) and ``raw.bin``
  (the serialized bytes of every Flower array, as Flower ships them).
- :func:`fault_mod` makes site ``C`` misbehave (NaN weights in round 1, a wrong-shaped array
  in the first attempt of round 2) and site ``B`` slow in the first attempt of round 2 (it
  prints ``FEDMED-E2E slow B`` and sleeps, so a test can SIGKILL it mid-round).

Example::

    [server]
    client-app = "fedmed_fault_app:app"
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fedmed.client.app import make_client_app
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedmed import wire

__all__ = ["RECORD_ENV", "SLOW_MARK", "app", "fault_mod", "record_mod"]

RECORD_ENV = "FEDMED_E2E_RECORD_DIR"
SLOW_MARK = "FEDMED-E2E slow B"
SLOW_SECONDS = 40.0
CallNext = Callable[[Message, Context], Message]

_inner = make_client_app()


def _site(context: Context) -> str:
    return str(context.node_config.get("site", f"node-{context.node_id}"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes-hex": value.hex()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _record(folder: Path, reply: Message) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {
        "message-type": reply.metadata.message_type,
        "group-id": reply.metadata.group_id,
        "error": None,
        "records": {},
    }
    arrays: dict[str, np.ndarray] = {}
    raw = bytearray()
    if reply.has_error():
        entry["error"] = {"code": reply.error.code, "reason": reply.error.reason}
    else:
        for name, record in reply.content.items():
            kind = type(record).__name__
            if isinstance(record, ArrayRecord):
                keys = list(record.keys())
                entry["records"][name] = {"type": kind, "keys": keys}
                for key in keys:
                    raw += record[key].data
                if name == wire.ARRAYS and wire.INDEX in reply.content:
                    unpacked = wire.unpack_content(reply.content)
                    arrays.update({f"{name}/{k}": v for k, v in unpacked.items()})
                else:
                    arrays.update({f"{name}/{k}": record[k].numpy() for k in keys})
            else:
                values = {k: _jsonable(v) for k, v in record.items()}
                entry["records"][name] = {"type": kind, "values": values}
    (folder / "message.json").write_text(json.dumps(entry))
    np.savez(folder / "arrays.npz", **arrays)
    (folder / "raw.bin").write_bytes(bytes(raw))


def record_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Write the reply the site sends (see the module docstring) and pass it on."""
    reply = call_next(msg, context)
    out = os.environ.get(RECORD_ENV)
    if out:
        site_dir = Path(out) / _site(context)
        stamp = f"{time.time_ns()}-{os.getpid()}-{msg.metadata.message_type}"
        _record(site_dir / stamp, reply)
    return reply


def _round(msg: Message) -> int:
    return int(msg.content["config"]["server-round"]) if "config" in msg.content else 0


def fault_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Site C corrupts its reply in round 1 (NaN) and round 2 attempt 1 (wrong shape); site B
    is slow in round 2 attempt 1."""
    site, group = _site(context), msg.metadata.group_id
    if site == "B" and group == "round-2.1":
        print(SLOW_MARK, file=sys.stderr, flush=True)
        time.sleep(SLOW_SECONDS)
    reply = call_next(msg, context)
    if site != "C" or msg.metadata.message_type != "train" or reply.has_error():
        return reply
    arrays = wire.unpack_content(reply.content)
    first = next(k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating))
    if _round(msg) == 1:
        arrays[first] = np.full_like(arrays[first], np.nan)
    elif group == "round-2.1":
        arrays[first] = np.zeros(arrays[first].size + 1, dtype=arrays[first].dtype)
    else:
        return reply
    content = RecordDict({**wire.pack(arrays), "metrics": reply.content["metrics"]})
    return Message(content, reply_to=msg)


app = ClientApp(mods=[record_mod, fault_mod])


@app.query()
def _query(msg: Message, context: Context) -> Message:
    return _inner(msg, context)


@app.train()
def _train(msg: Message, context: Context) -> Message:
    return _inner(msg, context)


@app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return _inner(msg, context)
