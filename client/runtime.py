"""A site as the client app (:mod:`.app`) runs it, described by the SuperNode's ``--node-config``
(``context.node_config``; ``fedmed-client`` writes it from the site's config file):

=============  =====================================================================
key            meaning
=============  =====================================================================
``site``       the site's name (what the server's roster and report show)
``data-dir``   the site's data folder (MSD layout or ``*_img``/``*_seg`` pairs)
``cache-dir``  folder for the disk cache and the site's state of a run (optional)
``cache-mode`` ``memory`` (default), ``disk`` or ``none``; ``disk`` needs ``FEDMED_CACHE_KEY``
               (the cache is encrypted) or ``plaintext-cache = true``
``device``     ``auto`` (default), ``cpu``, ``cuda``, ``cuda:1`` ... or a device list
               (``"cuda:0,cuda:1"``, ``"cpu,cuda:0"``) that splits a LAMP model
``amp`` ...    the other hardware keys (``amp``, ``channels-last``, ``compile``,
               ``lamp-micro-batches``, ``lamp-checkpointing``, ``lamp-balance``): see
               :mod:`fedmed.hardware`
=============  =====================================================================

The hardware keys fit the computation to the site's machine; what changes the model (loss,
``lamp-skips``, the preprocessing plan) comes from the server in each round's config. A
device that does not exist, or a list for a model that cannot be split, is a ConfigError
naming ``device``; so is a LAMP model split over several devices in a run with record-level
DP (DP-SGD needs the whole model's per-patient gradients on one device).

In a simulation :class:`PartitionSites` maps each simulated node to a site folder instead.

Example:
    >>> site = site_from_node_config(context)      # in a handler of the client app
    >>> site.name, site.cache_mode
    ('A', 'memory')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context

from fedmed.errors import ConfigError
from fedmed.hardware import HardwareSettings
from fedmed.io.guard import GuardSettings
from fedmed.security.encryption import PLAINTEXT_CACHE, check_cache_at_rest
from fedmed.site_config import check_cache_mode
from fedmed.stats import DEFAULT_DISCLOSURE_FLOOR

__all__ = ["PartitionSites", "SiteResolver", "SiteRuntime", "site_from_node_config"]


@dataclass(frozen=True)
class SiteRuntime:
    """A site as the client app runs it: its data, cache, policy and hardware, resolved from
    the SuperNode's node config (:func:`site_from_node_config`; a deployment writes it from the
    site's :class:`fedmed.site_config.SiteConfig`) or from a simulation's :class:`PartitionSites`.

    ``hardware`` holds the site's devices and how it runs the model on them; without it,
    ``HardwareSettings(devices=device)``. ``device`` is then set to the device list the site
    uses (``auto`` resolved), so two configs of the same site compare equal. A ``disk`` cache
    needs ``FEDMED_CACHE_KEY`` or ``plaintext_cache`` (ConfigError otherwise).

    Example:
        >>> SiteRuntime("A", "demo/data/site-A").cache_mode
        'memory'
        >>> SiteRuntime("A", "demo/data/site-A", device="cpu,cpu").hardware.devices
        (device(type='cpu'), device(type='cpu'))
    """

    name: str
    data_dir: str
    cache_dir: str = ""
    cache_mode: str = "memory"
    device: str = "auto"
    plaintext_cache: bool = False
    disclosure_floor: int = DEFAULT_DISCLOSURE_FLOOR
    share_models: bool = False
    max_epsilon: float = 0.0
    guard: GuardSettings = field(default_factory=GuardSettings)
    hardware: HardwareSettings | None = None

    def __post_init__(self) -> None:
        if self.hardware is None:  # the device is checked against this machine here
            object.__setattr__(self, "hardware", HardwareSettings(devices=self.device))
        assert self.hardware is not None
        devices = ",".join(str(d) for d in self.hardware.devices)
        object.__setattr__(self, "device", devices)
        check_cache_mode(self.cache_mode, where=f"site {self.name} node config: cache-mode")
        check_cache_at_rest(
            self.cache_mode,
            plaintext_cache=self.plaintext_cache,
            source=f"site {self.name} node config",
        )
        if isinstance(self.disclosure_floor, bool) or not (
            isinstance(self.disclosure_floor, int) and self.disclosure_floor >= 1
        ):
            raise ConfigError(
                f"site setting 'disclosure-floor' is {self.disclosure_floor!r}: give the fewest "
                f"cases (>= 1) a summary may describe, e.g. {DEFAULT_DISCLOSURE_FLOOR}"
            )
        if not (0.0 <= self.max_epsilon < float("inf")):
            raise ConfigError(
                f"site setting 'max-epsilon' is {self.max_epsilon!r}: give the site's privacy "
                "budget (epsilon over all runs, per patient), or 0 for none"
            )


SiteResolver = Callable[[Context], SiteRuntime]


def site_from_node_config(context: Context) -> SiteRuntime:
    """Read the site from ``--node-config``; ConfigError names a missing key."""
    cfg = context.node_config
    if "data-dir" not in cfg:
        raise ConfigError(
            "node config lacks 'data-dir': start the site with fedmed-client (or pass "
            "--node-config 'data-dir=\"/path/to/site\"')"
        )
    name = str(cfg.get("site", f"node-{context.node_id}"))
    return SiteRuntime(
        name=name,
        data_dir=str(cfg["data-dir"]),
        cache_dir=str(cfg.get("cache-dir", "")),
        cache_mode=str(cfg.get("cache-mode", "memory")),
        plaintext_cache=cfg.get(PLAINTEXT_CACHE, False) is True,
        disclosure_floor=cfg.get("disclosure-floor", DEFAULT_DISCLOSURE_FLOOR),  # type: ignore[arg-type]
        share_models=cfg.get("share-models", False) is True,
        max_epsilon=float(cfg.get("max-epsilon", 0.0)),  # type: ignore[arg-type]
        guard=GuardSettings.from_node_config(cfg),
        hardware=HardwareSettings.from_node_config(cfg, source=f"site {name} node config"),
    )


@dataclass(frozen=True)
class PartitionSites:
    """Simulation resolver: simulated node ``partition-id`` i is the site in ``folders[i]``.

    Picklable (Ray ships it to its actors); the site's name is its folder's name. ``devices``
    gives each site its own device list (``("cpu,cpu", "cpu")``: site 0 splits a LAMP model
    over two CPU stages); without it every site uses ``device``.

    Example:
        >>> resolve = PartitionSites(("demo/data/site-A", "demo/data/site-B"))
        >>> resolve(context).name       # context.node_config['partition-id'] == 0
        'site-A'
    """

    folders: tuple[str, ...]
    cache_mode: str = "memory"
    device: str = "cpu"
    disclosure_floor: int = DEFAULT_DISCLOSURE_FLOOR
    share_models: bool = False
    max_epsilon: float = 0.0
    devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.devices and len(self.devices) != len(self.folders):
            raise ConfigError(
                f"simulation site devices: {len(self.devices)} device lists for "
                f"{len(self.folders)} sites: give one device list per site (or none)"
            )

    def __call__(self, context: Context) -> SiteRuntime:
        pid = int(context.node_config["partition-id"])
        if not 0 <= pid < len(self.folders):
            raise ConfigError(
                f"simulation partition {pid} has no site folder: give num-supernodes "
                f"<= {len(self.folders)} or more folders"
            )
        folder = str(self.folders[pid])
        name = Path(folder).name
        device = self.devices[pid] if self.devices else self.device
        try:
            hardware = HardwareSettings(devices=device)
        except ConfigError as err:
            raise ConfigError(f"simulated site {name}: {err}") from None
        return SiteRuntime(
            name,
            folder,
            cache_mode=self.cache_mode,
            hardware=hardware,
            disclosure_floor=self.disclosure_floor,
            share_models=self.share_models,
            max_epsilon=self.max_epsilon,
        )
