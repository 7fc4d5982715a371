"""``fedmed-sim`` settings: a TOML file (``configs/sim.toml``) overridden by command-line flags.

Tables (every key optional; the built-in defaults are the demo, and ``configs/sim.toml``
spells them out):

- ``[sim]``: ``out`` (output folder), ``sites``, ``seed``, ``strategies`` (run labels: a
  strategy name from :data:`~fedmed.runsettings.rules.STRATEGIES`, or ``fedbn`` = FedAvg keeping
  normalization statistics local, ``fedprox+fedbn``, or ``ditto`` = FedAvg with Ditto personal
  models, ``ditto-lambda`` 0.1 unless ``[app]`` sets it), ``centralized`` (bool),
  ``local-baselines`` (bool: each site also trains a local-only model, same budget).
- ``[data]``: ``source`` (``demo``, ``folders`` or ``pooled``), ``folders`` (one per site),
  ``pooled`` (one folder split by patient), ``holdout`` (the server's held-out folder),
  ``split`` (``iid``, ``label-skew``, ``size-skew``), ``alpha``, ``holdout-fraction`` (pooled
  patients kept for the held-out set when ``holdout`` is empty), ``demo-cases``,
  ``demo-holdout``, ``demo-shape``.
- ``[data.shift.site-B]`` ...: a :class:`~fedmed.simulation.sites.ScannerShift` for that site
  (``hu-offset``, ``noise-sigma``, ``spacing-scale``).
- ``[resources]``: ``num-cpus``, ``num-gpus`` (per site), ``max-parallel``, ``cache-mode``,
  ``ray-address`` (an existing Ray cluster; fedmed-sim falls back to ``$RAY_ADDRESS``).
- ``[sites]``: what every simulated site allows (:class:`~fedmed.simulation.apps.SitePolicy`):
  ``disclosure-floor`` (fewest cases a summary may describe, default 5), ``share-models``
  (the sites' own models may travel for cross-site evaluation, default false), ``max-epsilon``
  (each site's own privacy budget, epsilon per patient; default 0 = none), ``devices`` (one
  device list per site, e.g. ``["cpu,cpu", "cpu"]``: site-A splits a LAMP model over two CPU
  stages; a CUDA device needs ``num-gpus`` > 0, and Ray gives a site one GPU at most, so
  only ``cuda``/``cuda:0``).
- ``[app]``: federation ``run_config`` keys (:class:`~fedmed.runsettings.settings.RunSettings`).
  ``min-sites`` defaults to every site, or to ``sites-per-round`` when sites are sampled.

Example:
    >>> cfg = load_sim_config(None)
    >>> cfg.sites, cfg.strategies, cfg.app["model"]
    (3, ('fedavg',), 'coplenet')
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmed.data.demo import site_name
from fedmed.errors import ConfigError
from fedmed.runsettings.rules import FEDPROX_DEFAULT_MU, STRATEGIES
from fedmed.runsettings.settings import RunSettings
from fedmed.tomlfile import TomlTable, read_toml

from .apps import SitePolicy
from .engine import SiteResources
from .partition import SPLIT_METHODS
from .sites import ScannerShift

__all__ = [
    "DEMO_APP",
    "SOURCES",
    "DataSpec",
    "SimConfig",
    "check_site_devices",
    "load_sim_config",
    "run_settings",
]

SOURCES = ("demo", "folders", "pooled")
# COPLE-Net with a quarter of the reference channels: a few minutes on two CPU cores. 12 rounds
# of 1 local epoch at lr 1e-3 (bench/quality.py, README "Quality"): with 6 x 2 epochs at 3e-3
# FedAvg's held-out Dice swung by 20+ points between rounds and ended 7-13 points below
# centralized training with the same epochs; at 3e-3, 12 x 1 diverged (NaN loss).
DEMO_APP: Mapping[str, Any] = {
    "num-rounds": 12,
    "model": "coplenet",
    "model-features": "16,32,64,128,256",
    "patch-size": "64,64",
    "local-epochs": 1,
    "batch-size": 8,
    "lr": 0.001,
}
_RUN_LABELS = (*STRATEGIES, "fedbn", "fedprox+fedbn", "ditto")
_DEFAULT_DITTO_LAMBDA = 0.1
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class DataSpec:
    """Where the simulated sites' data comes from (see the module docstring)."""

    source: str = "demo"
    folders: tuple[str, ...] = ()
    pooled: str = ""
    holdout: str = ""
    split: str = "iid"
    alpha: float = 0.5
    holdout_fraction: float = 0.2
    demo_cases: int = 6
    demo_holdout: int = 4
    demo_shape: tuple[int, int, int] = (64, 64, 32)
    shifts: Mapping[str, ScannerShift] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"data source {self.source!r}: use one of {', '.join(SOURCES)}")
        if self.split not in SPLIT_METHODS:
            raise ConfigError(f"data split {self.split!r}: use one of {', '.join(SPLIT_METHODS)}")
        if not self.alpha > 0:
            raise ConfigError(f"data alpha is {self.alpha}: it must be > 0 (e.g. 0.5)")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(
                f"data holdout-fraction is {self.holdout_fraction}: use 0 .. 1 (e.g. 0.2)"
            )
        if self.source == "folders" and not self.folders:
            raise ConfigError("data source 'folders' needs folders: give --data DIR [DIR ...]")
        if self.source == "pooled" and not self.pooled:
            raise ConfigError("data source 'pooled' needs a folder: give --pooled DIR")
        if self.demo_cases < 2:
            raise ConfigError(f"data demo-cases is {self.demo_cases}: use at least 2")

    def shift_by_index(self, sites: int) -> dict[int, ScannerShift]:
        """Shifts keyed by site index; ConfigError for a site name beyond ``sites``."""
        names = {site_name(i): i for i in range(sites)}
        out = {}
        for name, shift in self.shifts.items():
            if name not in names:
                raise ConfigError(
                    f"[data.shift.{name}]: no such site among {sites} sites ({', '.join(names)})"
                )
            out[names[name]] = shift
        return out


@dataclass(frozen=True)
class SimConfig:
    """Everything one ``fedmed-sim`` invocation does (see the module docstring)."""

    out: str = "fedmed-sim-run"
    sites: int = 3
    seed: int = 0
    strategies: tuple[str, ...] = ("fedavg",)
    centralized: bool = False
    local_baselines: bool = False
    data: DataSpec = field(default_factory=DataSpec)
    resources: SiteResources = field(default_factory=SiteResources)
    policy: SitePolicy = field(default_factory=SitePolicy)
    app: Mapping[str, Any] = field(default_factory=lambda: dict(DEMO_APP))

    def __post_init__(self) -> None:
        if self.sites < 1:
            raise ConfigError(f"sites is {self.sites}: simulate at least 1 site")
        if not self.strategies:
            raise ConfigError("no strategy to run: give --strategy or --compare")
        for label in self.strategies:
            if label not in _RUN_LABELS:
                raise ConfigError(
                    f"strategy {label!r} is unknown: use one of {', '.join(_RUN_LABELS)}"
                )
        if len(set(self.strategies)) != len(self.strategies):
            raise ConfigError(f"--compare lists a strategy twice: {','.join(self.strategies)}")
        if self.data.source == "folders" and len(self.data.folders) != self.sites:
            raise ConfigError(
                f"{len(self.data.folders)} data folders for {self.sites} sites: give one "
                "folder per site (or leave --sites out)"
            )
        run_settings(self, self.strategies[0], out_dir=self.out, holdout="")  # validate [app]
        check_site_devices(self.policy.devices, sites=self.sites, num_gpus=self.resources.num_gpus)


def check_site_devices(devices: tuple[str, ...], *, sites: int, num_gpus: float) -> None:
    """ConfigError unless ``devices`` is empty or one device list per site, each naming only
    devices a simulated site has: the CPU, and ``cuda``/``cuda:0`` when Ray gives each site a
    GPU share (``num-gpus`` > 0; Ray shows a site its one GPU as ``cuda:0``).

    Example:
        >>> check_site_devices(("cpu,cpu", "cpu"), sites=2, num_gpus=0.0)
    """
    if devices and len(devices) != sites:
        raise ConfigError(
            f"sites devices lists {len(devices)} device lists for {sites} sites: give one per "
            "site (e.g. --site-devices cpu,cpu cpu), or none"
        )
    for index, text in enumerate(devices):
        where = f"sites devices[{index}] ({site_name(index)}) = {text!r}"
        entries = [e.strip().lower() for e in text.split(",")]
        bad = [e for e in entries if not _DEVICE.match(e)]
        if bad or not entries:
            raise ConfigError(
                f"{where}: {bad[0] if bad else text!r} is not a device; use cpu, "
                "cuda or a comma-separated list such as 'cpu,cpu'"
            )
        if len(entries) > 1 and "auto" in entries:
            raise ConfigError(f"{where}: 'auto' stands alone; list the devices, e.g. 'cpu,cpu'")
        cuda = [e for e in entries if e.startswith("cuda")]
        if cuda and num_gpus <= 0:
            raise ConfigError(
                f"{where} names a CUDA device but resources num-gpus is {num_gpus:g}: Ray gives "
                "the sites no GPU; set num-gpus (e.g. 1.0, or 0.5 for two sites per GPU) or "
                "use cpu"
            )
        beyond = [e for e in cuda if e not in ("cuda", "cuda:0")]
        if beyond:
            raise ConfigError(
                f"{where}: {beyond[0]!r} does not exist at a simulated site: Ray gives each site "
                "at most one GPU, seen as cuda:0; use cuda:0 (or cpu,cuda:0)"
            )


def run_settings(
    cfg: SimConfig, label: str, *, out_dir: str, holdout: str, references: str = ""
) -> RunSettings:
    """The federation settings of run ``label`` (``fedbn`` -> FedAvg + FedBN, ...);
    ``references`` is the ``reference-models`` JSON (the centralized baseline's checkpoint)."""
    values = dict(cfg.app)
    sampled = values.get("sites-per-round", 0)
    sampling = isinstance(sampled, int) and not isinstance(sampled, bool) and sampled > 0
    values.setdefault("min-sites", min(cfg.sites, sampled) if sampling else cfg.sites)
    values.setdefault("seed", cfg.seed)
    strategy, _, extra = label.partition("+")
    fedbn = strategy == "fedbn" or extra == "fedbn"
    if strategy == "ditto":
        values.setdefault("ditto-lambda", _DEFAULT_DITTO_LAMBDA)
    values["strategy"] = "fedavg" if strategy in ("fedbn", "ditto") else strategy
    values["fedbn"] = fedbn or bool(values.get("fedbn", False))
    if strategy == "fedprox":
        values.setdefault("proximal-mu", FEDPROX_DEFAULT_MU)
    values["out-dir"] = out_dir
    values["data-dir"] = holdout
    values["local-baselines"] = cfg.local_baselines or bool(values.get("local-baselines"))
    if references:
        values["reference-models"] = references
    return RunSettings.from_run_config(values)


def _tuple(table: TomlTable, key: str, default: tuple[Any, ...]) -> tuple[Any, ...]:
    value = table.get(key, list, None)
    return default if value is None else tuple(value)


def _device_lists(values: tuple[Any, ...], where: str) -> tuple[str, ...]:
    """``[sites] devices``: one device list per site, as text or a TOML list of names."""
    out = []
    for value in values:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        if not isinstance(value, str):
            raise ConfigError(
                f"{where}: [sites] devices entry {value!r} must be a device list such as "
                "'cpu,cpu' or ['cpu', 'cpu']"
            )
        out.append(value)
    return tuple(out)


def load_sim_config(path: str | Path | None) -> SimConfig:
    """Read a ``sim.toml`` (None: the built-in demo defaults); ConfigError names the key."""
    if path is None:
        return SimConfig()
    path = Path(path)
    doc = read_toml(path)
    where = str(path)
    unknown = sorted(set(doc) - {"sim", "data", "resources", "sites", "app"})
    if unknown:
        raise ConfigError(
            f"{where}: unknown tables {unknown}: use sim, data, resources, sites, app"
        )
    sim, data, res, site, app = (
        TomlTable(path, n, doc.get(n, {})) for n in ("sim", "data", "resources", "sites", "app")
    )
    shift_tables = data.get("shift", dict, {})
    shifts = {
        name: ScannerShift.from_table(t, where=f"{where} [data.shift.{name}]")
        for name, t in shift_tables.items()
    }
    base = SimConfig()
    spec = DataSpec(
        source=data.get("source", str, base.data.source),
        folders=_tuple(data, "folders", ()),
        pooled=data.get("pooled", str, ""),
        holdout=data.get("holdout", str, ""),
        split=data.get("split", str, base.data.split),
        alpha=data.get("alpha", float, base.data.alpha),
        holdout_fraction=data.get("holdout-fraction", float, 0.2),
        demo_cases=data.get("demo-cases", int, base.data.demo_cases),
        demo_holdout=data.get("demo-holdout", int, base.data.demo_holdout),
        demo_shape=_tuple(data, "demo-shape", base.data.demo_shape),
        shifts=shifts,
    )
    resources = SiteResources(
        num_cpus=res.get("num-cpus", int, 1),
        num_gpus=res.get("num-gpus", float, 0.0),
        max_parallel=res.get("max-parallel", int, 2),
        cache_mode=res.get("cache-mode", str, "auto"),
        ray_address=res.get("ray-address", str, ""),
    )
    cfg = SimConfig(
        out=sim.get("out", str, base.out),
        sites=sim.get("sites", int, base.sites),
        seed=sim.get("seed", int, base.seed),
        strategies=_tuple(sim, "strategies", base.strategies),
        centralized=sim.get("centralized", bool, False),
        local_baselines=sim.get("local-baselines", bool, False),
        data=spec,
        resources=resources,
        policy=SitePolicy(
            disclosure_floor=site.get("disclosure-floor", int, 5),
            share_models=site.get("share-models", bool, False),
            max_epsilon=site.get("max-epsilon", float, 0.0),
            devices=_device_lists(_tuple(site, "devices", ()), where),
        ),
        app={**DEMO_APP, **app.data},
    )
    for table in (sim, data, res, site):
        table.finish()
    return cfg
