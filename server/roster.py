"""The site roster: which site each connected node is, and how many cases it announced.

A site's identity is the name its key was registered under, never what its reply claims:
``fedmed-server`` registers every allow-listed public key as ``site-<name>`` and Flower's
public Grid API (``grid.get_nodes()``) gives the registration name of each authenticated node.
A reply claiming another name is logged and overruled. Without site authentication
(``--insecure`` deployments, and simulation, where every node runs in this machine's own
process tree) there is no key: the name the site's ``query`` reply gives stands in, checked as
an identifier, and two nodes claiming one name are kept apart as ``A#<node>``.

Each new node is asked once with a ``query`` message for its name and case counts
(``num-train-cases``, ``num-val-cases``). Whatever the reply holds, one site's reply never
breaks the roster: a reply that is not a small whole number of cases within ``max-site-cases``,
or that fails in any other way, leaves that node out of the roster (it is asked again before
the next round) with a logged reason. The announced training cases bound the aggregation
weight a site may later claim (:mod:`.validation`).

Nodes that are no longer connected are pruned before new ones are named, so a site that comes
back under a new node id keeps its name.

Example:
    >>> roster = Roster(max_site_cases=1000)
    >>> roster.name_of(7)
    'node-7'
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedmed.text import is_identifier, printable

__all__ = ["Roster", "SiteInfo", "parse_site_record", "registered_names"]

_FIRST_BACKOFF_S = 2.0
_MAX_BACKOFF_S = 30.0

logger = logging.getLogger(__name__)

_MAX_VOLUME_MM3 = 1e15  # 10^6 whole-body CTs; a larger claim is a lie
_REGISTRATION_PREFIX = "site-"  # fedmed-server registers site A's key as "site-A"
Exchange = Callable[[list[Message]], Mapping[int, Message]]


@dataclass(frozen=True)
class SiteInfo:
    """A connected site: its name, the cases it announced, and whether a key vouches for it.

    Example:
        >>> SiteInfo(7, "A", 12, 3, verified=True).num_train_cases
        12
    """

    node_id: int
    name: str
    num_train_cases: int = 0
    num_val_cases: int = 0
    verified: bool = False
    num_train_voxels: float = 0.0


def registered_names(nodes: Iterable[Any]) -> dict[int, str]:
    """Node id -> site name for nodes whose key was registered by fedmed (``site-<name>``),
    from Flower's ``NodeInfo`` records (``grid.get_nodes()``)."""
    names: dict[int, str] = {}
    for info in nodes:
        name = str(getattr(info, "name", "") or "")
        if name.startswith(_REGISTRATION_PREFIX) and is_identifier(
            name[len(_REGISTRATION_PREFIX) :]
        ):
            names[int(info.node_id)] = name[len(_REGISTRATION_PREFIX) :]
    return names


def _case_count(record: Mapping[str, Any], key: str, limit: int) -> int:
    value = record.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} is {printable(value, limit=40)}: not a number")
    if not math.isfinite(value) or value != int(value) or not 0 <= value <= limit:
        raise ValueError(
            f"{key} is {printable(value, limit=40)}: it must be a whole number in [0, {limit}] "
            "(max-site-cases)"
        )
    return int(value)


def _volume(record: Mapping[str, Any]) -> float:
    value = record.get("num-train-voxels", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"num-train-voxels is {printable(value, limit=40)}: not a number")
    if not (math.isfinite(value) and 0 <= value <= _MAX_VOLUME_MM3):
        raise ValueError(f"num-train-voxels is {value!r}: it must be in [0, {_MAX_VOLUME_MM3:g}]")
    return float(value)


def parse_site_record(
    record: Mapping[str, Any], node: int, *, registered: str | None, max_site_cases: int
) -> SiteInfo:
    """The :class:`SiteInfo` of a ``site`` query reply; ValueError (with a printable reason)
    when a count is not a whole number in ``[0, max_site_cases]``."""
    claimed = record.get("name", "")
    train = _case_count(record, "num-train-cases", max_site_cases)
    val = _case_count(record, "num-val-cases", max_site_cases)
    volume = _volume(record)
    if registered is not None:
        if claimed != registered:
            logger.warning(
                "node %d is registered as site %s but says it is %s: recorded as %s",
                node,
                registered,
                printable(claimed, limit=80),
                registered,
            )
        return SiteInfo(node, registered, train, val, verified=True, num_train_voxels=volume)
    name = claimed if is_identifier(claimed) and "@" not in claimed else f"node-{node}"
    if name != claimed:
        logger.warning(
            "node %d gave the site name %s, which is not 1-64 letters, digits or _.:+- : "
            "recorded as %s",
            node,
            printable(claimed, limit=80),
            name,
        )
    return SiteInfo(node, name, train, val, verified=False, num_train_voxels=volume)


class Roster:
    """Node id -> :class:`SiteInfo` for the connected sites (see the module docstring)."""

    def __init__(self, *, max_site_cases: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_site_cases = max_site_cases
        self._clock = clock
        self.sites: dict[int, SiteInfo] = {}
        self._warned_unverified = False
        # node -> (monotonic time it may be asked again, failures so far): a node that cannot
        # answer is asked again with a growing pause, not every polling tick
        self._backoff: dict[int, tuple[float, int]] = {}

    def name_of(self, node: int) -> str:
        """The site's name, ``node-<id>`` for a node not (yet) in the roster."""
        return self.sites[node].name if node in self.sites else f"node-{node}"

    def names(self) -> dict[int, str]:
        """Node id -> name of every site in the roster."""
        return {node: site.name for node, site in self.sites.items()}

    def update(
        self,
        connected: list[int],
        registered: Mapping[int, str],
        exchange: Exchange,
        *,
        config: Mapping[str, Any],
        ttl: float,
        ask: Iterable[int] | None = None,
        now: bool = False,
    ) -> None:
        """Prune nodes that left, then ask each new node of ``ask`` (default: every connected
        node) who it is; with sampling only the sampled nodes are asked. A node that failed to
        answer waits out its pause unless ``now``."""
        live = set(connected)
        for node in [n for n in self.sites if n not in live]:
            logger.info("site %s (node %d) is no longer connected", self.sites[node].name, node)
            del self.sites[node]
        for node in [n for n in self._backoff if n not in live]:
            del self._backoff[node]
        clock = self._clock()
        candidates = connected if ask is None else [n for n in ask if n in live]
        new = [
            n
            for n in candidates
            if n not in self.sites and (now or self._backoff.get(n, (0.0, 0))[0] <= clock)
        ]
        if not new:
            return
        content = RecordDict({"config": ConfigRecord(dict(config))})
        messages = [
            Message(content, node, MessageType.QUERY, group_id="roster", ttl=ttl) for node in new
        ]
        replies = exchange(messages)
        for node in new:
            try:
                site = self._site(node, replies.get(node), registered.get(node))
            except Exception as err:  # one site's reply never breaks the roster
                failures = self._backoff.get(node, (0.0, 0))[1] + 1
                pause = min(_MAX_BACKOFF_S, _FIRST_BACKOFF_S * 2 ** (failures - 1))
                self._backoff[node] = (self._clock() + pause, failures)
                logger.warning(
                    "node %d did not say which site it is (%s): asked again in %.0f s",
                    node,
                    printable(err),
                    pause,
                )
                continue
            self._backoff.pop(node, None)
            self.sites[node] = site
            logger.info(
                "site %s joined (node %d, %d train / %d val cases%s)",
                site.name,
                node,
                site.num_train_cases,
                site.num_val_cases,
                "" if site.verified else ", name not authenticated",
            )

    def _site(self, node: int, reply: Message | None, registered: str | None) -> SiteInfo:
        if reply is None:
            raise ValueError("no reply")
        if reply.has_error():
            raise ValueError(f"site error {reply.error.code}: {reply.error.reason}")
        if "site" not in reply.content.config_records:
            raise ValueError("the reply has no ConfigRecord 'site'")
        site = parse_site_record(
            reply.content.config_records["site"],
            node,
            registered=registered,
            max_site_cases=self.max_site_cases,
        )
        if registered is None:
            if not self._warned_unverified:
                logger.warning(
                    "site names are self-declared: no site key vouches for them (--insecure or "
                    "simulation)"
                )
                self._warned_unverified = True
            taken = {s.name for s in self.sites.values()}
            if site.name in taken:  # two live nodes claiming one name: keep both apart
                site = dataclasses.replace(site, name=f"{site.name}#{node}")
        else:
            for other in [n for n, s in self.sites.items() if s.name == site.name]:
                logger.warning(
                    "site %s reconnected as node %d: node %d dropped", site.name, node, other
                )
                del self.sites[other]
        return site
