"""The fedmed ClientApp: a site's ``train`` and ``query`` handlers over :class:`SiteTask`.

Flower loads it as ``fedmed.client.app:app``. The site is described by the SuperNode's
``--node-config`` (``context.node_config``):

=============  =====================================================================
key            meaning
=============  =====================================================================
``site``       the site's name (what the server's roster and report show)
``data-dir``   the site's data folder (MSD layout or ``*_img``/``*_seg`` pairs)
``cache-dir``  folder for the disk cache and FedBN's local layers (optional)
``cache-mode`` ``memory`` (default), ``disk`` or ``none``
``device``     ``auto`` (default), ``cpu``, ``cuda``, ``cuda:1`` ...
=============  =====================================================================

The train/validation split is seeded by the run's ``seed`` (sent in each round's config), so
every site splits the same way for a given run.

Messages (the privacy contract: nothing else leaves the site):

- ``query`` -> ConfigRecord ``site``: ``name``, ``num-train-cases``, ``num-val-cases``.
  The server asks each new node once and maps node ids to site names with it.
- ``train`` (the global arrays packed as ArrayRecord ``arrays`` + ConfigRecord
  ``arrays-index``, see :mod:`fedmed.wire`, and ConfigRecord ``config``) -> exactly the model
  arrays (the same keys, shapes and dtypes as received), packed the same way (ArrayRecord
  ``arrays`` holding one ``packed`` array, ConfigRecord ``arrays-index`` with their keys,
  dtypes, shapes and offsets), and MetricRecord ``metrics`` (``num-examples`` = training
  samples, ``num-steps``, ``train-loss``, ``val-dice``, ``val-hd95``, ``train-seconds``).
  The message may also carry ConfigRecords ``signature`` (the site refuses a model whose
  signature fails; node config ``server-ca``) and ``privacy`` (DP: the reply is the clipped,
  noised update added to the global model): see :mod:`fedmed.security.guard`.
- On any failure the reply is an error naming only the exception type and the site; the
  traceback (which may hold file paths) stays in the site's log.

FedBN: the server leaves the normalization layers out of ``arrays``; the site keeps its own
in ``context.state`` (ArrayRecord ``fedbn-local``) and, when ``cache-dir`` is set, in
``<cache-dir>/fedbn-<model>.safetensors`` so they survive a restart.

Example:
    >>> client_app = make_client_app(resolve_site=lambda ctx: SiteConfig("A", "demo/site-A"))
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from safetensors.numpy import load_file, save_file

from fedmed import wire
from fedmed.errors import ConfigError
from fedmed.io.msd import load_site_dataset, split_cases
from fedmed.security.guard import SiteGuard
from fedmed.security.secagg import is_secure_message, secure_train
from fedmed.task import SiteTask, TrainConfig, ensure_app_logging

__all__ = ["PartitionSites", "SiteConfig", "app", "make_client_app", "site_from_node_config"]

logger = logging.getLogger(__name__)

_LOCAL_STATE = "fedbn-local"
_TASKS: dict[tuple[str, str, str, str, float, int], SiteTask] = {}


@dataclass(frozen=True)
class SiteConfig:
    """Where a site's data is and how to run it.

    Example:
        >>> SiteConfig("A", "demo/data/site-A").cache_mode
        'memory'
    """

    name: str
    data_dir: str
    cache_dir: str = ""
    cache_mode: str = "memory"
    device: str = "auto"


SiteResolver = Callable[[Context], SiteConfig]


def site_from_node_config(context: Context) -> SiteConfig:
    """Read the site from ``--node-config``; ConfigError names a missing key."""
    cfg = context.node_config
    if "data-dir" not in cfg:
        raise ConfigError(
            "node config lacks 'data-dir': start the site with fedmed-client (or pass "
            "--node-config 'data-dir=\"/path/to/site\"')"
        )
    return SiteConfig(
        name=str(cfg.get("site", f"node-{context.node_id}")),
        data_dir=str(cfg["data-dir"]),
        cache_dir=str(cfg.get("cache-dir", "")),
        cache_mode=str(cfg.get("cache-mode", "memory")),
        device=str(cfg.get("device", "auto")),
    )


@dataclass(frozen=True)
class PartitionSites:
    """Simulation resolver: simulated node ``partition-id`` i is the site in ``folders[i]``.

    Picklable (Ray ships it to its actors); the site's name is its folder's name.

    Example:
        >>> resolve = PartitionSites(("demo/data/site-A", "demo/data/site-B"))
        >>> client_app = make_client_app(resolve_site=resolve)
    """

    folders: tuple[str, ...]
    cache_mode: str = "memory"
    device: str = "cpu"

    def __call__(self, context: Context) -> SiteConfig:
        pid = int(context.node_config["partition-id"])
        if not 0 <= pid < len(self.folders):
            raise ConfigError(
                f"simulation partition {pid} has no site folder: give num-supernodes "
                f"<= {len(self.folders)} or more folders"
            )
        folder = str(self.folders[pid])
        return SiteConfig(Path(folder).name, folder, cache_mode=self.cache_mode, device=self.device)


def _task(site: SiteConfig, cfg: TrainConfig) -> SiteTask:
    """One SiteTask per site and split, reused while the process lives (simulation actors)."""
    key = (site.data_dir, site.cache_dir, site.cache_mode, site.device, cfg.val_fraction, cfg.seed)
    if key not in _TASKS:
        _TASKS[key] = SiteTask(
            site.data_dir,
            cache_dir=site.cache_dir or None,
            cache_mode=site.cache_mode,
            device=site.device,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
        )
    return _TASKS[key]


def _local_file(site: SiteConfig, cfg: TrainConfig) -> Path | None:
    return Path(site.cache_dir) / f"fedbn-{cfg.model}.safetensors" if site.cache_dir else None


def _load_local(context: Context, site: SiteConfig, cfg: TrainConfig) -> dict[str, np.ndarray]:
    if _LOCAL_STATE in context.state.array_records:
        return {k: v.numpy() for k, v in context.state.array_records[_LOCAL_STATE].items()}
    path = _local_file(site, cfg)
    if path is not None and path.is_file():
        return load_file(str(path))
    return {}


def _save_local(
    context: Context, site: SiteConfig, cfg: TrainConfig, local: Mapping[str, np.ndarray]
) -> None:
    context.state[_LOCAL_STATE] = ArrayRecord({k: Array(v) for k, v in local.items()})
    path = _local_file(site, cfg)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: np.require(v, requirements="C") for k, v in local.items()}, str(tmp))
        tmp.replace(path)


def _error_reply(msg: Message, site: str, err: Exception) -> Message:
    logger.exception("site %s: %s message failed", site, msg.metadata.message_type)
    reason = f"{type(err).__name__} at site {site}; details are in the site's log"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _train_site(
    site: SiteConfig,
    context: Context,
    received: dict[str, np.ndarray],
    config: dict[str, Any],
    records: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One local round: check the global model, train, protect. ``(arrays to send, metrics)``.

    ``records`` holds the round's extra ConfigRecords by name (``signature``, ``privacy``).
    """
    cfg = TrainConfig.from_config(config)
    logger.info("site %s round %d: training", site.name, cfg.server_round)
    guard = SiteGuard.for_node(context.node_config, site=site.name, cache_dir=site.cache_dir)
    signed = guard.check_global(
        received, config, records.get("signature"), server_round=cfg.server_round
    )
    local = _load_local(context, site, cfg) if cfg.fedbn else {}
    trained, metrics = _task(site, cfg).train_round(received, cfg, local_arrays=local)
    if cfg.fedbn:
        _save_local(context, site, cfg, {k: v for k, v in trained.items() if k not in received})
    sent = guard.protect(
        trained,
        received,
        records.get("privacy"),
        server_round=cfg.server_round,
        signature_status=signed,
        num_examples=float(metrics.get("num-examples", 0)),
    )
    logger.info("site %s round %d: %s", site.name, cfg.server_round, metrics)
    return sent, metrics


def make_client_app(*, resolve_site: SiteResolver = site_from_node_config) -> ClientApp:
    """A ClientApp whose sites come from ``resolve_site`` (default: the node config)."""
    client_app = ClientApp()

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        ensure_app_logging()
        name = f"node-{context.node_id}"
        try:
            site = resolve_site(context)
            name = site.name
            cfg = TrainConfig.from_config(msg.content["config"])
            cases = load_site_dataset(site.data_dir).cases
            train, val = split_cases(cases, val_fraction=cfg.val_fraction, seed=cfg.seed)
        except Exception as err:  # the reply must not carry paths: see _error_reply
            return _error_reply(msg, name, err)
        info = ConfigRecord(
            {"name": site.name, "num-train-cases": len(train), "num-val-cases": len(val)}
        )
        return Message(RecordDict({"site": info}), reply_to=msg)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        ensure_app_logging()
        name = f"node-{context.node_id}"
        try:
            site = resolve_site(context)
            name = site.name
            if is_secure_message(msg):  # a SecAgg+ stage: see fedmed.security.secagg
                return secure_train(msg, context, functools.partial(_train_site, site))
            received = wire.unpack_content(msg.content)
            records = {k: dict(v) for k, v in msg.content.config_records.items()}
            sent, metrics = _train_site(site, context, received, records["config"], records)
            reply = wire.pack({k: sent[k] for k in received})
        except Exception as err:  # the reply must not carry paths: see _error_reply
            return _error_reply(msg, name, err)
        content = RecordDict({**reply, "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    return client_app


app = make_client_app()
