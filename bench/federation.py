"""Federation overhead and traffic per round: fedmed's loop vs Flower's stock recipe.

On 127.0.0.1 with TLS and site authentication: one SuperLink (fedmed's gateway) and 3 sites
(fedmed-client's SiteNode: pinned apps). For each model the same
federation runs two apps on the same data, model and local work:

* **fedmed**: the fedmed app (``fedmed.server.app``): one ``train`` message per site per round,
  validation metrics in the reply, replies polled every 0.1 s;
* **stock**: Flower's recipe: ``flwr.serverapp.strategy.FedAvg().start`` (a ``train`` and an
  ``evaluate`` message per site per round, ``Grid.send_and_receive``'s default 3 s polling),
  with a ClientApp doing the same local training (:meth:`fedmed.task.SiteTask.train_round`)
  and evaluating on the site's validation split.

Figures:

* **overhead per round** = round time minus the slowest site's local compute in that round.
  fedmed: the round's ``duration-s`` (send to last reply, from ``metrics.jsonl``) minus the
  largest ``train-seconds`` (model build + training + validation, measured at the site).
  stock: time between consecutive ``evaluate_fn`` calls (the whole round: train + evaluate)
  minus the largest train time and the largest evaluate time of the sites. Both include what a
  site pays per message outside the handler: Flower's polling, the ``flwr-clientapp`` process
  start (imports) and loading the site's data. fedmed's ``cycle-overhead-s`` (with
  ``--trace``) is the whole round like stock's: time between two rounds' train pushes (server
  aggregation, checkpoint and report included) minus the slowest site's compute.
* **bytes per site per round**: TLS bytes on the wire between each site and the SuperLink,
  counted by a TCP proxy in front of the public port (one per site): everything the site's
  SuperNode sent/received during the run (HTTP + TLS framing, heartbeats, idle polls, the FAB
  download) divided by the rounds (the largest site); compared with the model's size (the
  float32 arrays that travel). ``*-net`` subtracts the idle traffic (polls and heartbeats,
  sampled for ``--idle-window`` s before the runs) over the run's duration: what the messages
  themselves cost. ``*-cycle`` is the steady state: the bytes between two consecutive round
  starts (idle polls and heartbeats of that time included, the run's start-up and end not),
  mean over the rounds, largest site (fedmed: with ``--trace``).

The SuperNode-side settings (idle poll 0.5 s, short back-off for
objects not there yet, app pinning, warm-start ClientApp processes) and the gateway (longer
SQLite lock wait) are fedmed's for both apps; the stock figure is
therefore a lower bound for an unmodified Flower deployment. What differs is the app: message
count per round, the server's polling and the message encoding (fedmed packs all arrays of a
message into one Flower object, :mod:`fedmed.wire`; stock sends one object per array).

Speed-ups (:mod:`fedmed.flower.speedups`): ``--without fastpoll,warmstart`` (or ``all``) runs
everything with those switched off (``FEDMED_FLOWER_WITHOUT`` in every Flower process).
``--ablate [LIST]`` then measures what each one earns on the first model: a fresh federation
(SuperLink and sites restarted) runs the fedmed recipe with all on (``all-on``), then one per
speed-up with only that one off (``added-s``: its overhead per round minus ``all-on``'s; > 0
means the speed-up saves that much), and, with ``stock`` among the recipes, one runs Flower's
stock recipe with every speed-up off (``stock-flower``: an unmodified Flower deployment;
``overhead-ratio-vs-stock-flower``). ``heartbeat`` and
``sqlite-timeout`` guard liveness and a loaded machine, not a round's latency: expect ~0.

Options for issue #7's overhead figures, each a further fedmed run on the same federation and
model, reported beside the plain one (``dp-added-s``, ``secagg-added-s``: what the option adds
to the overhead per round):

* ``--dp``: client-side DP (``dp-clip-norm`` 1.0, ``dp-noise-multiplier`` 1.0, ``dp-delta``
  1e-5: each site clips its update and adds Gaussian noise, :mod:`fedmed.security.dp`);
* ``--secagg``: ``secure-aggregation = true`` (SecAgg+ on Flower's legacy workflow: several
  messages per site per round; the server sees only the sum).

``--trace`` writes every SuperLink request (time, duration, path, bytes) to
``WORK/trace.jsonl`` (:class:`fedmed.flower.gateway.RequestTrace`) to see where a round's time
goes.

Usage::

    python bench/federation.py                       # demo data, COPLE-Net and 3D U-Net
    python bench/federation.py --data DIR --rounds 3 # DIR holds one MSD folder per site
    python bench/federation.py --dp --secagg         # plus the DP and SecAgg+ overheads
    python bench/federation.py --models coplenet --ablate   # what each speed-up earns

Ends with one JSON line of its figures.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedmed.errors import ConfigError
from fedmed.flower.speedups import SPEEDUPS, WITHOUT_ENV, switched_off

__all__ = ["stock_client", "stock_server"]

BENCH_DIR = Path(__file__).resolve().parent
MODULE = Path(__file__).stem
STOCK_APP = {"server_module": f"{MODULE}:stock_server", "client_module": f"{MODULE}:stock_client"}
SITES = ("A", "B", "C")
# The privacy options of issue #7, each run as its own fedmed recipe beside the plain one.
VARIANTS: dict[str, dict[str, Any]] = {
    # client-side DP: each update clipped to L2 norm 1, noise std 1 x clip (fedmed.security.dp)
    "fedmed-dp": {"dp-clip-norm": 1.0, "dp-noise-multiplier": 1.0, "dp-delta": 1e-5},
    # SecAgg+ (Flower's legacy workflow; needs >= 3 sites): the server sees only the sum
    "fedmed-secagg": {"secure-aggregation": True},
}
MODELS = {
    # small features and few steps: the point is the federation's overhead, not training
    "coplenet": {"model-features": "4,8,16,32,64", "patch-size": "32,32"},
    "unet3d": {"model-features": "4,8,16,32", "patch-size": "16,16,16"},
}

log = logging.getLogger("bench.federation")

# ---------------------------------------------------------------- Flower's stock recipe (app)

stock_server = ServerApp()
stock_client = ClientApp()


def _settings(context: Context) -> Any:
    from fedmed.runsettings.settings import RunSettings

    return RunSettings.from_run_config(context.run_config)


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


@stock_server.main()
def _stock_main(grid: Grid, context: Context) -> None:
    from fedmed.server.federation import train_config

    from fedmed.globalmodel import build_network

    settings = _settings(context)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = train_config(settings, 0)
    model = build_network(cfg, seed=settings.seed)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        _append(out / "rounds.jsonl", {"round": server_round, "t": time.monotonic()})
        return None

    config = ConfigRecord({k: v for k, v in cfg.to_config().items() if k != "server-round"})
    strategy = FedAvg(min_available_nodes=settings.min_sites)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=settings.num_rounds,
        timeout=settings.round_timeout,
        train_config=config,
        evaluate_config=config,
        evaluate_fn=evaluate_fn,
    )


def _site_task(msg: Message, context: Context) -> tuple[Any, Any, Path]:
    from fedmed.roundconfig import TrainConfig
    from fedmed.task import SiteTask

    cfg = TrainConfig.from_config(msg.content["config"])
    node = context.node_config
    task = SiteTask(
        str(node["data-dir"]),
        cache_mode=str(node.get("cache-mode", "memory")),
        device="cpu",
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
    )
    # The bench runs everything on one machine: sites log their compute next to the server's.
    out = Path(str(context.run_config["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    return task, cfg, out


@stock_client.train()
def _stock_train(msg: Message, context: Context) -> Message:
    task, cfg, out = _site_task(msg, context)
    received = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    arrays, metrics = task.train_round(received, cfg)
    _append(
        out / "stock-sites.jsonl",
        {"kind": "train", "round": cfg.server_round, "seconds": metrics["train-seconds"]},
    )
    reply = RecordDict(
        {
            "arrays": ArrayRecord(
                {k: Array(np.require(v, requirements="C")) for k, v in arrays.items()}
            ),
            "metrics": MetricRecord({"num-examples": int(metrics["num-examples"])}),
        }
    )
    return Message(reply, reply_to=msg)


@stock_client.evaluate()
def _stock_evaluate(msg: Message, context: Context) -> Message:
    from fedmed.globalmodel import build_network, load_arrays
    from fedmed.scoring import evaluate_model

    task, cfg, out = _site_task(msg, context)
    start = time.perf_counter()
    model = build_network(cfg, seed=cfg.seed)
    load_arrays(model, {k: v.numpy() for k, v in msg.content["arrays"].items()}, partial=True)
    summary = evaluate_model(model, task.val, cfg) if len(task.val) else {"dice": 0.0}
    seconds = time.perf_counter() - start
    _append(
        out / "stock-sites.jsonl",
        {"kind": "evaluate", "round": cfg.server_round, "seconds": seconds},
    )
    metrics = MetricRecord({"num-examples": max(len(task.val), 1), "dice": float(summary["dice"])})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


# ------------------------------------------------------------------------ byte-counting proxy


class CountingProxy:
    """TCP proxy 127.0.0.1:port -> target counting bytes each way (TLS passes through)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sent = 0  # site -> SuperLink
        self.received = 0  # SuperLink -> site
        self.timeline: list[tuple[float, int, int]] = []  # (wall time, sent, received)
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.sent, self.received

    def counts_at(self, when: float) -> tuple[int, int]:
        """(sent, received) as they were at wall time ``when``."""
        with self._lock:
            at = bisect.bisect_right(self.timeline, (when, float("inf"), float("inf")))
            return self.timeline[at - 1][1:] if at else (0, 0)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self._lock:
                    if upward:
                        self.sent += len(data)
                    else:
                        self.received += len(data)
                    self.timeline.append((time.time(), self.sent, self.received))
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self._sock.close()


# ----------------------------------------------------------------------------- the benchmark


def _model_bytes(model: str) -> int:
    from fedmed.server.federation import train_config

    from fedmed.globalmodel import build_network, model_arrays
    from fedmed.runsettings.settings import RunSettings

    settings = RunSettings.from_run_config({"model": model, **MODELS[model]})
    net = build_network(train_config(settings, 0), seed=0)
    return sum(a.nbytes for a in model_arrays(net).values())


def _run_config(
    model: str, args: argparse.Namespace, out: Path, recipe: str = "fedmed"
) -> dict[str, Any]:
    return {
        **VARIANTS.get(recipe, {}),
        "num-rounds": args.rounds,
        "min-sites": len(SITES),
        "model": model,
        **MODELS[model],
        "local-epochs": 1,
        "local-steps": args.local_steps,
        "batch-size": 1,
        "round-timeout": 300.0,
        "data-dir": "",
        "out-dir": str(out),
        "seed": 0,
    }


def _submit(link: Any, ca: Path, fab: Any, run_config: dict[str, Any]) -> tuple[bool, float]:
    from fedmed.server.submit import submit_run, wait_for_run

    from fedmed.flower.control import control_client

    with control_client(link.address, ca_cert=ca) as client:
        start = time.monotonic()
        outcome = wait_for_run(
            client, submit_run(client, fab, run_config=run_config), timeout=900, poll=0.5
        )
    if not outcome.ok:
        log.error("run failed: %s %s", outcome.status, outcome.details)
    return outcome.ok, time.monotonic() - start


def _trained_rounds(out: Path) -> list[tuple[float, float]]:
    """Per completed round of a fedmed run: (``duration-s``, the slowest site's
    ``train-seconds``), from its ``metrics.jsonl``."""
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        (r["duration-s"], max(m["train-seconds"] for m in r["sites"].values()))
        for r in records
        if r.get("status") == "ok" and r.get("sites")
    ]


def _fedmed_overheads(trained: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    return [d for d, _ in trained], [d - slowest for d, slowest in trained]


def _train_pushes(trace: Path, window: tuple[float, float], rounds: int) -> list[float]:
    """Wall times of fedmed's train pushes in ``window`` (SuperLink trace); [] when they do
    not map one to one onto the ``rounds`` completed rounds (retries, SecAgg+ stages)."""
    pushes = []
    for line in trace.read_text().splitlines():
        request = json.loads(line)
        inside = window[0] <= request["t"] <= window[1]
        if inside and request["path"] == "/v1/runtime/push-messages":
            pushes.append(request["t"])
    starts = sorted(pushes)[1:]  # the first push is the roster query
    return starts if len(starts) == rounds else []


def _cycle_overheads(starts: list[float], trained: list[tuple[float, float]]) -> list[float]:
    """fedmed's whole round (server aggregation, checkpoint and report included): the time
    between two rounds' train pushes minus the slowest site's compute of the earlier round."""
    slowest = [s for _, s in trained]
    return [b - a - s for a, b, s in zip(starts, starts[1:], slowest, strict=False)]


def _cycle_traffic(
    proxies: dict[str, CountingProxy], bounds: list[float]
) -> tuple[float, float] | None:
    """Bytes (down, up) per site per round in the steady state: everything a site's
    connection carried between consecutive round starts (idle polls and heartbeats in that
    time included), mean over the rounds, largest site."""
    if len(bounds) < 2:
        return None
    per_site = []
    for proxy in proxies.values():
        marks = [proxy.counts_at(t) for t in bounds]
        ups = [b[0] - a[0] for a, b in itertools.pairwise(marks)]
        downs = [b[1] - a[1] for a, b in itertools.pairwise(marks)]
        per_site.append((_mean(downs), _mean(ups)))
    return max(d for d, _ in per_site), max(u for _, u in per_site)


def _stock_bounds(out: Path, *, offset: float) -> list[float]:
    """Wall times of the stock run's evaluate_fn calls (round 0, 1, ...): round boundaries."""
    ticks = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    return [t["t"] + offset for t in sorted(ticks, key=lambda t: t["round"])]


def _stock_overheads(out: Path, num_rounds: int) -> tuple[list[float], list[float]]:
    ticks = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    sites = [json.loads(x) for x in (out / "stock-sites.jsonl").read_text().splitlines()]
    times = {t["round"]: t["t"] for t in ticks}
    rounds, overheads = [], []
    for r in range(1, num_rounds + 1):
        if r not in times or r - 1 not in times:
            continue
        train = max(
            (s["seconds"] for s in sites if s["kind"] == "train" and s["round"] == r), default=0
        )
        evaluate = max(
            (s["seconds"] for s in sites if s["kind"] == "evaluate" and s["round"] == r), default=0
        )
        duration = times[r] - times[r - 1]
        rounds.append(duration)
        overheads.append(duration - train - evaluate)
    return rounds, overheads


def _traffic(proxies: dict[str, CountingProxy], before: dict[str, tuple[int, int]], rounds: int):
    per_site = {}
    for site, proxy in proxies.items():
        sent, received = proxy.counts()
        per_site[site] = (
            (received - before[site][1]) / rounds,  # down: SuperLink -> site
            (sent - before[site][0]) / rounds,  # up: site -> SuperLink
        )
    return per_site


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@contextlib.contextmanager
def _federation(
    work: Path,
    tag: str,
    folders: list[Path],
    pki: Any,
    app_hashes: tuple[str, ...],
    without: frozenset[str],
) -> Iterator[tuple[Any, dict[str, CountingProxy]]]:
    """A SuperLink (fedmed's gateway) and the 3 sites (each behind a :class:`CountingProxy`),
    every Flower process started with the speed-ups in ``without`` switched off; yields
    ``(link, proxies)`` once all sites joined, stops everything after."""
    from fedmed.client.supernode import SiteNode
    from fedmed.server.submit import register_sites, wait_for_sites
    from fedmed.server.superlink import SuperLink

    from fedmed.config import ServerConfig
    from fedmed.flower.control import control_client
    from fedmed.flower.process import free_loopback_port
    from fedmed.site_config import SiteConfig

    previous = os.environ.get(WITHOUT_ENV)
    os.environ[WITHOUT_ENV] = ",".join(sorted(without))  # inherited by every Flower process
    link = SuperLink(
        ServerConfig(
            host="127.0.0.1",
            port=free_loopback_port(),
            state_dir=work / tag / "server",
            ca_cert=pki.ca_cert,
            server_cert=pki.server_cert,
            server_key=pki.server_key,
            insecure=False,
            min_sites=len(SITES),
            sites={s: pki.site_public_keys[s] for s in SITES},
            wait_for_sites_s=120,
            run_timeout_s=900,
            startup_timeout_s=60,
            stream_logs=False,
        )
    )
    proxies: dict[str, CountingProxy] = {}
    nodes: list[SiteNode] = []
    threads: list[threading.Thread] = []
    link.start()
    try:
        with control_client(link.address, ca_cert=pki.ca_cert) as client:
            register_sites(client, link.config.sites)
        for site, folder in zip(SITES, folders, strict=True):
            proxies[site] = CountingProxy(("127.0.0.1", link.config.port))
            state = work / tag / f"site-{site}"
            config = SiteConfig(
                path=state / "site.toml",
                site=site,
                data_dir=folder,
                cache_dir=state / "cache",
                cache_mode="memory",
                device="cpu",
                seed=0,
                server_address=f"127.0.0.1:{proxies[site].port}",
                ca_cert=pki.ca_cert,
                private_key=pki.site_private_keys[site],
                insecure=False,
                state_dir=state,
                runtime_port=free_loopback_port(),
                max_restarts=3,
                backoff_initial_s=1.0,
                backoff_max_s=4.0,
                check_data=False,
                app_hashes=app_hashes,
            )
            nodes.append(SiteNode(config))
            threads.append(threading.Thread(target=nodes[-1].run, daemon=True))
            threads[-1].start()
        with control_client(link.address, ca_cert=pki.ca_cert) as client:
            wait_for_sites(client, min_sites=len(SITES), timeout=120, alive=link.alive)
        yield link, proxies
    finally:
        for node in nodes:
            node.stop()
        for thread in threads:
            thread.join(timeout=30)
        link.stop()
        for proxy in proxies.values():
            proxy.close()
        if previous is None:
            os.environ.pop(WITHOUT_ENV, None)
        else:
            os.environ[WITHOUT_ENV] = previous


def _overheads(out: Path, recipe: str, num_rounds: int) -> tuple[list[float], list[float]]:
    """(round seconds, overhead seconds) per completed round of a finished run."""
    if recipe == "stock":
        return _stock_overheads(out, num_rounds)
    return _fedmed_overheads(_trained_rounds(out))


def _ablation(
    args: argparse.Namespace,
    work: Path,
    federation: Any,
    fabs: dict[str, Any],
    names: list[str],
    base: frozenset[str],
    model: str,
) -> dict[str, Any]:
    """What each speed-up earns: the fedmed recipe on a fresh federation with every speed-up on
    (``all-on``, the baseline: same conditions), then with each one switched off in turn
    (beside ``base``), and Flower's stock recipe with every speed-up off (stock Flower) when
    ``stock`` is among the recipes. Per run: overhead per round."""
    runs = [("all-on", base, "fedmed")]
    runs += [(f"without-{n}", base | {n}, "fedmed") for n in names]
    if "stock" in args.recipes.split(","):
        runs.append(("stock-flower", frozenset(SPEEDUPS), "stock"))
    results: dict[str, Any] = {"model": model}
    for tag, without, recipe in runs:
        out = work / f"out-{model}-{tag}"
        with federation(tag, without) as (link, _):
            config = _run_config(model, args, out, recipe)
            if recipe != "stock":
                config["signing-dir"] = str(link.config.server_key.parent)
            ok, seconds = _submit(link, link.config.ca_cert, fabs[recipe], config)
        if not ok:
            results[tag] = {"ok": False, "out": str(out)}
            continue
        rounds, overheads = _overheads(out, recipe, args.rounds)
        results[tag] = {
            "without": sorted(without),
            "run-s": round(seconds, 1),
            "round-s": round(_mean(rounds), 2),
            "overhead-s": round(_mean(overheads), 2),
        }
        log.info("ablation %s %s: %s", model, tag, results[tag])
    return results


def _without(parser: argparse.ArgumentParser, value: str) -> frozenset[str]:
    """``--without``/``--ablate`` names, checked against fedmed's speed-ups."""
    try:
        return switched_off({WITHOUT_ENV: value})
    except ConfigError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="folder with one MSD folder per site (3)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--models", default="coplenet,unet3d")
    parser.add_argument("--recipes", default="fedmed,stock")
    parser.add_argument(
        "--dp",
        action="store_true",
        help="also run fedmed with client-side DP (clip 1.0, noise multiplier 1.0)",
    )
    parser.add_argument(
        "--secagg", action="store_true", help="also run fedmed with secure-aggregation = true"
    )
    parser.add_argument("--idle-window", type=float, default=10.0, help="idle traffic sample s")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument(
        "--trace", action="store_true", help="log every SuperLink request to WORK/trace.jsonl"
    )
    parser.add_argument(
        "--without",
        default="",
        help=f"speed-ups switched off for every run: 'all' or some of {', '.join(SPEEDUPS)}",
    )
    parser.add_argument(
        "--ablate",
        nargs="?",
        const="all",
        default=None,
        help="then, on the first model: fedmed with each of these speed-ups off in turn "
        "(default: all), and stock Flower (stock recipe, every speed-up off)",
    )
    args = parser.parse_args(argv)
    without = _without(parser, args.without)
    ablate = [n for n in SPEEDUPS if n in _without(parser, args.ablate or "") - without]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "fedmed.server.submit"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="fedmed-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    # The server app and the client apps (Flower's processes) import this module.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH")) if p
    )
    os.environ["OMP_NUM_THREADS"] = "1"
    if args.trace:
        from fedmed.flower.gateway import TRACE_ENV

        os.environ[TRACE_ENV] = str(work / "trace.jsonl")

    from fedmed.server.submit import build_fab

    from fedmed.security.pki import write_pki

    if args.data is not None:
        folders = sorted(p for p in args.data.iterdir() if p.is_dir())[: len(SITES)]
        if len(folders) < len(SITES):
            parser.error(f"--data {args.data} needs {len(SITES)} site folders")
    else:
        demo = work / "data"
        if not demo.exists():
            subprocess.run(
                [str(Path(sys.executable).parent / "fedmed"), "demo-data", str(demo),
                 "--sites", "3", "--cases", "3", "--holdout", "0", "--shape", "48", "48", "16"],
                check=True, capture_output=True, timeout=300,
            )  # fmt: skip
        folders = [demo / f"site-{site}" for site in SITES]
    pki = write_pki(work / "certs", server_hosts=["127.0.0.1"], sites=list(SITES))
    recipes = [r for r in args.recipes.split(",") if r]
    recipes += [v for v, on in (("fedmed-dp", args.dp), ("fedmed-secagg", args.secagg)) if on]
    stock_fab, fedmed_fab = build_fab(**STOCK_APP), build_fab()
    fabs = {"stock": stock_fab, "fedmed": fedmed_fab}

    def federation(tag: str, off: frozenset[str]) -> Any:
        return _federation(work, tag, folders, pki, (stock_fab.hash_str,), off)

    figures: dict[str, Any] = {"rounds": args.rounds, "local-steps": args.local_steps, "sites": 3}
    figures["without"] = sorted(without)
    figures["load-avg-start"] = [round(x, 2) for x in os.getloadavg()]  # a quiet machine?
    with federation("main", without) as (link, proxies):
        # Idle traffic (polls, heartbeats) per site and second, to tell it from the model's.
        idle_start = {s: p.counts() for s, p in proxies.items()}
        time.sleep(args.idle_window)
        idle = {}
        for site, proxy in proxies.items():
            (up, down), (up0, down0) = proxy.counts(), idle_start[site]
            idle[site] = ((up - up0) / args.idle_window, (down - down0) / args.idle_window)
        figures["idle-bytes-per-site-s"] = {
            "up": round(max(v[0] for v in idle.values())),
            "down": round(max(v[1] for v in idle.values())),
        }
        for model in args.models.split(","):
            size = _model_bytes(model)
            entry: dict[str, Any] = {"model-bytes": size, **MODELS[model]}
            for recipe in recipes:
                out = work / f"out-{model}-{recipe}"
                before = {s: p.counts() for s, p in proxies.items()}
                fab = stock_fab if recipe == "stock" else fedmed_fab
                run_config = _run_config(model, args, out, recipe)
                if recipe != "stock":  # as fedmed-server does: sites with TLS require signing
                    run_config["signing-dir"] = str(pki.server_key.parent)
                window_start = time.time()
                ok, seconds = _submit(link, pki.ca_cert, fab, run_config)
                window = (window_start, time.time())
                if not ok:
                    entry[recipe] = {"ok": False, "out": str(out)}
                    continue
                rounds, overheads = _overheads(out, recipe, args.rounds)
                traffic = _traffic(proxies, before, args.rounds)
                down = max(t[0] for t in traffic.values())
                up = max(t[1] for t in traffic.values())
                idle_up = figures["idle-bytes-per-site-s"]["up"] * seconds / args.rounds
                idle_down = figures["idle-bytes-per-site-s"]["down"] * seconds / args.rounds
                entry[recipe] = {
                    "run-s": round(seconds, 1),
                    "round-s": round(_mean(rounds), 2),
                    "overhead-s": round(_mean(overheads), 2),
                    "overhead-max-s": round(max(overheads), 2),
                    "down-bytes-per-site-round": int(down),
                    "up-bytes-per-site-round": int(up),
                    "down-x-model": round(down / size, 3),
                    "up-x-model": round(up / size, 3),
                    # minus the idle rate over the run: what the messages themselves cost
                    "down-x-model-net": round((down - idle_down) / size, 3),
                    "up-x-model-net": round((up - idle_up) / size, 3),
                }
                if recipe == "stock":  # round boundaries: the evaluate_fn calls
                    bounds = _stock_bounds(out, offset=time.time() - time.monotonic())
                elif args.trace and recipe in ("fedmed", "fedmed-dp"):
                    trained = _trained_rounds(out)
                    bounds = _train_pushes(work / "trace.jsonl", window, len(trained))
                    if cycles := _cycle_overheads(bounds, trained):
                        entry[recipe]["cycle-overhead-s"] = round(_mean(cycles), 2)
                else:
                    bounds = []
                if steady := _cycle_traffic(proxies, bounds):
                    entry[recipe]["down-x-model-cycle"] = round(steady[0] / size, 3)
                    entry[recipe]["up-x-model-cycle"] = round(steady[1] / size, 3)
                log.info("%s %s: %s", model, recipe, entry[recipe])
            plain = entry.get("fedmed", {}).get("overhead-s")
            if plain is not None and entry.get("stock", {}).get("overhead-s"):
                entry["overhead-ratio"] = round(plain / entry["stock"]["overhead-s"], 3)
            for variant in VARIANTS:  # what the option adds per round, same run, same model
                extra = entry.get(variant, {}).get("overhead-s")
                if plain is not None and extra is not None:
                    entry[f"{variant.removeprefix('fedmed-')}-added-s"] = round(extra - plain, 2)
            figures[model] = entry
    if ablate:
        model = args.models.split(",")[0]
        ablation = _ablation(args, work, federation, fabs, ablate, without, model)
        base = ablation.get("all-on", {}).get("overhead-s")
        for name in ablate:
            off_s = ablation.get(f"without-{name}", {}).get("overhead-s")
            if base is not None and off_s is not None:  # > 0: the speed-up saves that much
                ablation[f"without-{name}"]["added-s"] = round(off_s - base, 2)
        stock_s = ablation.get("stock-flower", {}).get("overhead-s")
        if base is not None and stock_s:
            ablation["overhead-ratio-vs-stock-flower"] = round(base / stock_s, 3)
        figures["ablation"] = ablation
    figures["load-avg-end"] = [round(x, 2) for x in os.getloadavg()]
    _print_table(figures, recipes)
    print(json.dumps({"bench": "federation", **figures}))
    return 0


def _print_table(figures: dict[str, Any], recipes: list[str]) -> None:
    print(
        f"\n{'model':10} {'recipe':13} {'round s':>8} {'overhead s':>11} {'down xM':>8} "
        f"{'up xM':>7}"
    )
    for model in MODELS:
        for recipe in recipes:
            r = figures.get(model, {}).get(recipe)
            if r and r.get("run-s") is not None:
                print(
                    f"{model:10} {recipe:13} {r['round-s']:8.2f} {r['overhead-s']:11.2f} "
                    f"{r['down-x-model']:8.3f} {r['up-x-model']:7.3f}"
                )
            elif r:
                print(f"{model:10} {recipe:13} FAILED (see {r.get('out')})")
    ablation = figures.get("ablation", {})
    if ablation:
        print(f"\nablation ({ablation['model']}): overhead s per round; added: vs all on")
    for tag, r in ablation.items():
        if isinstance(r, dict) and r.get("overhead-s") is not None:
            added = r.get("added-s")
            extra = f" added {added:+.2f}" if added is not None else ""
            print(f"  {tag:26} {r['overhead-s']:8.2f}{extra}")
        elif isinstance(r, dict):
            print(f"  {tag:26} FAILED (see {r.get('out')})")


if __name__ == "__main__":
    sys.exit(main())
