"""A site's config file, ``configs/sites/X.toml``, read and validated once into a
:class:`SiteConfig`: its data, cache, case guard, hardware and how to reach the server.

Keys use dashes; relative paths are resolved against the folder of the file. Every error is a
:class:`~fedmed.errors.ConfigError` naming the file, the table, the key and the fix (the format
of :mod:`fedmed.tomlfile`). Reading a site config imports neither numpy nor torch.

Example:
    >>> site = load_site_config(Path("configs/sites/A.toml"), site="A")
    >>> site.name, site.cache_mode, site.connection.server_address
    ('A', 'memory', '127.0.0.1:9092')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fedmed.errors import ConfigError
from fedmed.security.pki import is_valid_site_name
from fedmed.tomlfile import TomlTable, read_toml

__all__ = [
    "AMP_MODES",
    "CACHE_MODES",
    "LAMP_BALANCES",
    "ON_BAD_CASE",
    "SiteConfig",
    "check_cache_mode",
    "load_site_config",
]

# The one vocabulary of ``cache-mode`` (site config, node config, fedmed train; the simulation
# takes memory | none and ``auto`` to choose between them); retired words map to their fix.
CACHE_MODES = ("memory", "disk", "none")
_RETIRED_CACHE_MODES = {
    "disk-encrypted": "'disk' (encrypted with FEDMED_CACHE_KEY, which a disk cache needs "
    "unless plaintext-cache = true)",
}
# The site's case guard (fedmed.io.guard.GuardSettings reads these node config keys; a test
# pins the defaults to GuardSettings'): kept here so reading a config never imports numpy.
ON_BAD_CASE = ("skip", "stop")
_MAX_IMAGE_GIB = 2.0
_LABEL_AFFINE_TOLERANCE_MM = 1e-3
_DISCLOSURE_FLOOR = 5  # fedmed.stats.DEFAULT_DISCLOSURE_FLOOR (not imported: no numpy here)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The site's hardware keys (fedmed.hardware.HardwareSettings reads them from the node config
# and checks the devices against the machine; a test pins these to its values): kept here so
# reading a config never imports torch.
AMP_MODES = ("auto", "off", "fp16", "bf16")
LAMP_BALANCES = ("memory", "time")


def check_cache_mode(value: object, *, where: str) -> str:
    """``value`` if it is one of :data:`CACHE_MODES`; ConfigError naming ``where`` (the file
    or source and the key) otherwise, with the word to write for a retired one.

    Example:
        >>> check_cache_mode("disk", where="configs/sites/A.toml: [site] cache-mode")
        'disk'
    """
    if isinstance(value, str) and value in CACHE_MODES:
        return value
    if isinstance(value, str) and value in _RETIRED_CACHE_MODES:
        raise ConfigError(
            f"{where} = {value!r} is a retired spelling: write {_RETIRED_CACHE_MODES[value]}"
        )
    raise ConfigError(f"{where} = {value!r} must be one of {', '.join(CACHE_MODES)}")


@dataclass(frozen=True)
class SiteConfig:
    """A site's ``configs/sites/X.toml``: its data, cache, device and how to reach the server.

    Example TOML::

        site = "A"
        data-dir = "../../demo/data/site-A"
        cache-dir = "../../runs/site-A/cache"
        cache-mode = "disk"          # memory | disk | none
        plaintext-cache = false      # true accepts a disk cache without FEDMED_CACHE_KEY
        device = "cpu"               # cpu, cuda, cuda:0, or "cuda:0,cuda:1" for LAMP
        amp = "auto"                 # auto | off | fp16 | bf16 (see fedmed.hardware)
        channels-last = false
        compile = false
        lamp-micro-batches = 4       # LAMP: GPipe micro-batches per batch
        lamp-checkpointing = true    # LAMP: recompute activations in backward
        lamp-balance = "memory"      # LAMP: partition by memory or time
        seed = 0
        on-bad-case = "skip"         # skip | stop: what a case failing the data guard does
        max-image-gib = 2.0          # memory one image may need once read
        label-affine-tolerance = 0.001   # mm a label's affine may differ from its image's
        allow-external-links = false     # follow symbolic links out of data-dir
        [connection]
        server-address = "127.0.0.1:9092"
        ca-cert = "../../certs/ca.pem"
        private-key = "../../certs/siteA.key"

    A ``disk`` cache holds the site's preprocessed patient images: ``fedmed-client`` refuses
    to start one without ``FEDMED_CACHE_KEY`` (which encrypts it) unless
    ``plaintext-cache = true`` accepts it in the clear.
    ``app-hash`` (optional list of sha256 hex digests) adds apps this site accepts to the one
    derived from its installed fedmed (see ``fedmed.flower.pinning``). With TLS the site
    refuses global models the server did not sign with a certificate of the federation CA
    (``ca-cert``); ``require-signed-models = false`` accepts unsigned ones. The four guard
    keys are :class:`fedmed.io.guard.GuardSettings`' (read back from the node config by
    ``GuardSettings.from_node_config``). ``device`` may be a list (a TOML list or
    comma-separated text) that splits a LAMP model over those devices; the hardware keys
    (``device``, ``amp``, ``channels-last``, ``compile``, ``lamp-*``) are
    :class:`fedmed.hardware.HardwareSettings`', which checks the devices against the site's
    machine when ``fedmed-client`` starts.
    """

    path: Path
    site: str
    data_dir: Path
    cache_dir: Path
    cache_mode: str
    device: str
    seed: int
    server_address: str
    ca_cert: Path | None
    private_key: Path | None
    insecure: bool
    state_dir: Path
    runtime_port: int
    max_restarts: int
    backoff_initial_s: float
    backoff_max_s: float
    check_data: bool
    app_hashes: tuple[str, ...] = ()
    poll_interval_s: float = 0.5
    warm_start: bool = True
    heartbeat_interval_s: float = 30.0
    require_signed_models: bool = True
    on_bad_case: str = "skip"
    max_image_gib: float = _MAX_IMAGE_GIB
    label_affine_tolerance: float = _LABEL_AFFINE_TOLERANCE_MM
    allow_external_links: bool = False
    disclosure_floor: int = _DISCLOSURE_FLOOR
    share_models: bool = False
    max_epsilon: float = 0.0
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    lamp_micro_batches: int = 4
    lamp_checkpointing: bool = True
    lamp_balance: str = "memory"
    plaintext_cache: bool = False

    def node_config(self) -> dict[str, str | int | float | bool]:
        """The SuperNode's ``--node-config`` (``context.node_config`` in the client app).

        ``server-ca`` is the federation CA, so the site refuses global models that the server
        did not sign; it is empty (no check, whatever ``$FEDMED_SERVER_CA`` says) with
        ``require-signed-models = false`` and absent when the site runs insecure. The guard
        keys (``plaintext-cache``, ``on-bad-case``, ``max-image-gib``, ``label-affine-tolerance``,
        ``allow-external-links``), the site's evaluation and privacy policy
        (``disclosure-floor``, ``share-models``, ``max-epsilon``) and its hardware keys
        (``amp``, ``channels-last``, ``compile``, ``lamp-*``) are always written.
        """
        node: dict[str, str | int | float | bool] = {
            "site": self.site,
            "data-dir": str(self.data_dir),
            "cache-dir": str(self.cache_dir),
            "cache-mode": self.cache_mode,
            "plaintext-cache": self.plaintext_cache,
            "device": self.device,
            "seed": self.seed,
            "on-bad-case": self.on_bad_case,
            "max-image-gib": self.max_image_gib,
            "label-affine-tolerance": self.label_affine_tolerance,
            "allow-external-links": self.allow_external_links,
            "disclosure-floor": self.disclosure_floor,
            "share-models": self.share_models,
            "max-epsilon": self.max_epsilon,
            "amp": self.amp,
            "channels-last": self.channels_last,
            "compile": self.compile,
            "lamp-micro-batches": self.lamp_micro_batches,
            "lamp-checkpointing": self.lamp_checkpointing,
            "lamp-balance": self.lamp_balance,
        }
        if self.ca_cert is not None and not self.insecure:
            node["server-ca"] = str(self.ca_cert) if self.require_signed_models else ""
        return node


def load_site_config(path: Path, *, site: str | None = None) -> SiteConfig:
    """Read and validate a site config; ``site`` (from ``--site``) must match its ``site`` key.

    Raises:
        ConfigError: the file is missing, invalid, or a key is missing or wrong.
    """
    path = Path(path).expanduser().resolve()
    data = read_toml(path)
    top = TomlTable(path, "site", {k: v for k, v in data.items() if k != "connection"})
    conn = TomlTable(path, "connection", data.get("connection", {}))
    name = top.get("site", str, site)
    if name is None:
        raise ConfigError(f'{path}: site is missing: add site = "A" or pass --site A')
    if not is_valid_site_name(name):
        raise ConfigError(
            f"{path}: site = {name!r} is invalid: use 1-64 letters, digits, '-' or '_' "
            "starting with a letter or digit (the name given to `fedmed certs --sites`)"
        )
    if site is not None and name != site:
        raise ConfigError(
            f"{path}: site = {name!r} but --site {site} was given: use the site's own config"
        )
    device = top.get("device", (str, list), "cpu")
    if isinstance(device, list):  # device = ["cuda:0", "cuda:1"]
        if not all(isinstance(part, str) for part in device):
            raise ConfigError(f"{path}: device = {device!r} must list device names")
        device = ",".join(device)
    if not all(part.strip() for part in device.split(",")):
        raise ConfigError(f"{path}: device = {device!r} must be e.g. cpu, cuda:0, cuda:0,cuda:1")
    insecure = conn.get("insecure", bool, False)
    ca_cert = conn.path_value("ca-cert", None)
    private_key = conn.path_value("private-key", None)
    if not insecure and (ca_cert is None or private_key is None):
        raise ConfigError(
            f"{path}: [connection] needs ca-cert and private-key (from `fedmed certs`) "
            "unless insecure = true"
        )
    server_address = conn.get("server-address", str)
    host, sep, port = server_address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(
            f"{path}: [connection] server-address = {server_address!r} must be HOST:PORT, "
            "e.g. fl.example.org:9092"
        )
    poll_interval = conn.positive("poll-interval", float, 0.5)
    if poll_interval > 3.0:
        raise ConfigError(
            f"{path}: [connection] poll-interval = {poll_interval} must be at most 3 s "
            "(Flower's own idle poll)"
        )
    heartbeat = conn.positive("heartbeat-interval", float, 30.0)
    if not 10.0 <= heartbeat <= 1800.0:
        raise ConfigError(
            f"{path}: [connection] heartbeat-interval = {heartbeat} must be within 10-1800 s "
            "(the bounds Flower's SuperLink accepts)"
        )
    backoff_initial = conn.positive("backoff-initial", float, 2.0)
    backoff_max = conn.positive("backoff-max", float, 60.0)
    if backoff_max < backoff_initial:
        raise ConfigError(
            f"{path}: [connection] backoff-max = {backoff_max} is below backoff-initial = "
            f"{backoff_initial}"
        )
    app_hashes = top.get("app-hash", list, [])
    for digest in app_hashes:
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ConfigError(
                f"{path}: app-hash entry {digest!r} must be a sha256 hex digest (64 characters "
                "0-9a-f), as printed by `fedmed-client --print-app-hash`"
            )
    state_dir = (
        top.path_value("state-dir", None) or (path.parent / f".fedmed-site-{name}").resolve()
    )
    config = SiteConfig(
        path=path,
        site=name,
        data_dir=top.path_value("data-dir"),  # type: ignore[arg-type]
        cache_dir=top.path_value("cache-dir", None) or state_dir / "cache",
        cache_mode=check_cache_mode(
            top.get("cache-mode", str, "memory"), where=f"{path}: [site] cache-mode"
        ),
        plaintext_cache=top.get("plaintext-cache", bool, False),
        device=device,
        seed=top.get("seed", int, 0),
        check_data=top.get("check-data", bool, True),
        server_address=server_address,
        ca_cert=None if insecure else ca_cert,
        private_key=None if insecure else private_key,
        insecure=insecure,
        state_dir=state_dir,
        runtime_port=conn.port("runtime-port", 9094),
        max_restarts=conn.positive("max-restarts", int, 20, zero=True),
        backoff_initial_s=backoff_initial,
        backoff_max_s=backoff_max,
        app_hashes=tuple(app_hashes),
        poll_interval_s=poll_interval,
        heartbeat_interval_s=heartbeat,
        warm_start=top.get("warm-start", bool, True),
        require_signed_models=top.get("require-signed-models", bool, True),
        on_bad_case=top.choice("on-bad-case", ON_BAD_CASE, "skip"),
        max_image_gib=top.positive("max-image-gib", float, _MAX_IMAGE_GIB),
        label_affine_tolerance=top.positive(
            "label-affine-tolerance", float, _LABEL_AFFINE_TOLERANCE_MM, zero=True
        ),
        allow_external_links=top.get("allow-external-links", bool, False),
        disclosure_floor=top.positive("disclosure-floor", int, _DISCLOSURE_FLOOR),
        share_models=top.get("share-models", bool, False),
        max_epsilon=top.positive("max-epsilon", float, 0.0, zero=True),
        amp=top.choice("amp", AMP_MODES, "auto"),
        channels_last=top.get("channels-last", bool, False),
        compile=top.get("compile", bool, False),
        lamp_micro_batches=top.positive("lamp-micro-batches", int, 4),
        lamp_checkpointing=top.get("lamp-checkpointing", bool, True),
        lamp_balance=top.choice("lamp-balance", LAMP_BALANCES, "memory"),
    )
    top.finish()
    conn.finish()
    return config
