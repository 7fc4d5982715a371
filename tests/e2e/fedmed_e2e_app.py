"""A minimal Flower app for the deployment harness tests (not fedmed's training app).

Each round the server sends a 3-vector to every connected site; a site adds 1 and replies with
its name. The server writes ``out-dir/result.json``: per round the sites that replied and the
mean weight. Child processes import it through PYTHONPATH=tests/e2e.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

__all__ = ["client", "server"]

server = ServerApp()
client = ClientApp()


@server.main()
def _main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-rounds"])
    min_sites = int(context.run_config["min-sites"])
    out = Path(str(context.run_config["out-dir"]))
    deadline = time.monotonic() + 60
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < min_sites and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    weight = 0.0
    history = []
    for server_round in range(1, rounds + 1):
        messages = [
            Message(
                RecordDict(
                    {
                        "arrays": ArrayRecord({"w": torch.full((3,), weight)}),
                        "config": ConfigRecord({"server-round": server_round}),
                    }
                ),
                dst_node_id=node_id,
                message_type="train",
            )
            for node_id in node_ids
        ]
        replies = [m for m in grid.send_and_receive(messages, timeout=60) if m.has_content()]
        sites = sorted(str(m.content["site"]["name"]) for m in replies)
        values = [float(m.content["arrays"].to_torch_state_dict()["w"].mean()) for m in replies]
        weight = sum(values) / max(len(values), 1)
        history.append({"round": server_round, "sites": sites, "w": weight})
        print(f"e2e round {server_round}: sites {sites} w {weight}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"rounds": history}))


@client.train()
def _train(msg: Message, context: Context) -> Message:
    state = msg.content["arrays"].to_torch_state_dict()
    state["w"] = state["w"] + 1.0
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({"num-examples": 1}),
            "site": ConfigRecord({"name": str(context.node_config["site"])}),
        }
    )
    return Message(content, reply_to=msg)
