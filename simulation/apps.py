"""The apps a simulation SuperLink runs: fedmed's server and client apps, fed by ``run_config``.

A simulation SuperLink (``flower-superlink --simulation``) gives its apps only the run's
``run_config`` (the FAB's defaults fused with the submitted overrides) and, to each simulated
node, ``node_config = {"partition-id": i, "num-partitions": n}``. So ``fedmed-sim`` submits
its run settings plus a few simulation keys (:data:`SIM_KEYS`, prefix ``sim-``) and these two
apps split them:

- :data:`server_app` builds :class:`~fedmed.runsettings.settings.RunSettings` from the fedmed keys
  (unknown keys still refused) and runs ``fedmed.server.app.make_server_app(settings)``, the
  deployment's server app;
- :data:`client_app` is ``fedmed.client.app.make_client_app`` with a resolver that maps
  ``partition-id`` i to the i-th folder of ``sim-sites`` (:class:`RunConfigSites`).

==================  ======  ============================================================
key                 type    meaning
==================  ======  ============================================================
``sim-sites``       str     JSON list of the sites' data folders (absolute paths)
``sim-cache-mode``  str     the sites' volume cache: ``memory`` or ``none``
``sim-device``      str     the sites' torch device (``cpu`` or ``cuda``)
``sim-threads``     int     torch threads of the server process (held-out evaluation)
``sim-disclosure-``  int     the sites' disclosure floor (:class:`SitePolicy`)
``floor``
``sim-share-``       bool    whether the sites let their own models travel
``models``
``sim-site-``        str     JSON list of each site's device list (``["cpu,cpu", "cpu"]``;
``devices``                  ``[]``: every site uses ``sim-device``)
==================  ======  ============================================================

Example:
    >>> sim, app = split_run_config({"num-rounds": 2, "sim-sites": '["/d/site-A"]'})
    >>> sim["sim-sites"], app
    ('["/d/site-A"]', {'num-rounds': 2})
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmed.client.app import make_client_app
from fedmed.client.runtime import PartitionSites, SiteRuntime
from fedmed.server.app import make_server_app
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmed.errors import ConfigError
from fedmed.runsettings.settings import RunSettings
from fedmed.stats import DEFAULT_DISCLOSURE_FLOOR

__all__ = [
    "SIM_KEYS",
    "RunConfigSites",
    "SitePolicy",
    "client_app",
    "server_app",
    "sim_run_config",
    "split_run_config",
]

# The FAB's defaults for the simulation keys (every run overrides sim-sites).
SIM_KEYS: Mapping[str, str | int | bool] = {
    "sim-sites": "[]",
    "sim-cache-mode": "memory",
    "sim-device": "cpu",
    "sim-threads": 1,
    "sim-disclosure-floor": DEFAULT_DISCLOSURE_FLOOR,
    "sim-share-models": False,
    "sim-max-epsilon": 0.0,
    "sim-site-devices": "[]",
}


@dataclass(frozen=True)
class SitePolicy:
    """What every simulated site allows (in a deployment, each site's own config decides):
    the fewest cases a summary may describe, whether its own models may travel, and its own
    privacy budget (epsilon per patient; 0 = none: only the run's ``dp-max-epsilon`` applies);
    and each site's device list (``devices``, one per site: ``"cpu,cpu"`` splits a LAMP model
    over two CPU stages; empty: CUDA when the sites get a GPU share, else the CPU).

    Example:
        >>> SitePolicy(disclosure_floor=1).share_models
        False
        >>> SitePolicy(devices=("cpu,cpu", "cpu")).devices[0]
        'cpu,cpu'
    """

    disclosure_floor: int = DEFAULT_DISCLOSURE_FLOOR
    share_models: bool = False
    max_epsilon: float = 0.0
    devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (0.0 <= self.max_epsilon < float("inf")):
            raise ConfigError(
                f"sites max-epsilon is {self.max_epsilon!r}: give each site's privacy budget "
                "(epsilon per patient), or 0 for none"
            )
        if isinstance(self.disclosure_floor, bool) or self.disclosure_floor < 1:
            raise ConfigError(
                f"sites disclosure-floor is {self.disclosure_floor!r}: give the fewest cases "
                f"(>= 1) a summary may describe, e.g. {DEFAULT_DISCLOSURE_FLOOR}"
            )


def sim_run_config(
    folders: list[str],
    *,
    cache_mode: str,
    device: str,
    threads: int,
    policy: SitePolicy | None = None,
) -> dict[str, str | int | bool]:
    """The simulation keys of one run (see the module docstring)."""
    policy = policy or SitePolicy()
    return {
        "sim-sites": json.dumps(folders),
        "sim-cache-mode": cache_mode,
        "sim-device": device,
        "sim-threads": threads,
        "sim-disclosure-floor": policy.disclosure_floor,
        "sim-share-models": policy.share_models,
        "sim-max-epsilon": policy.max_epsilon,
        "sim-site-devices": json.dumps(list(policy.devices)),
    }


def split_run_config(run_config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(simulation keys, fedmed run settings keys)`` of a run's ``run_config``."""
    sim = {k: v for k, v in run_config.items() if k in SIM_KEYS}
    app = {k: v for k, v in run_config.items() if k not in SIM_KEYS}
    return sim, app


def _strings(run_config: Mapping[str, Any], key: str, what: str) -> tuple[str, ...]:
    text = str(run_config.get(key, "[]"))
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"run config key {key!r} is not a JSON list: {text[:80]!r}") from err
    if not isinstance(values, list) or not all(isinstance(f, str) for f in values):
        raise ConfigError(f"run config key {key!r} must list {what}: {text[:80]!r}")
    return tuple(values)


@dataclass(frozen=True)
class RunConfigSites:
    """Resolver: simulated node ``partition-id`` i trains on the i-th ``sim-sites`` folder.

    Example:
        >>> client = make_client_app(resolve_site=RunConfigSites())
    """

    def __call__(self, context: Context) -> SiteRuntime:
        cfg = context.run_config
        resolve = PartitionSites(
            _strings(cfg, "sim-sites", "folder names"),
            cache_mode=str(cfg.get("sim-cache-mode", "memory")),
            device=str(cfg.get("sim-device", "cpu")),
            disclosure_floor=int(cfg.get("sim-disclosure-floor", DEFAULT_DISCLOSURE_FLOOR)),
            share_models=cfg.get("sim-share-models", False) is True,
            max_epsilon=float(cfg.get("sim-max-epsilon", 0.0)),  # type: ignore[arg-type]
            devices=_strings(cfg, "sim-site-devices", "device lists"),
        )
        return resolve(context)


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    import torch

    sim, app = split_run_config(context.run_config)
    settings = RunSettings.from_run_config(app)
    # the held-out evaluation runs here, beside the Ray actors: one thread per site's share
    torch.set_num_threads(max(1, int(sim.get("sim-threads", 1))))
    make_server_app(settings)(grid, context)


client_app = make_client_app(resolve_site=RunConfigSites())
