"""Which connected sites train in a round: all of them, or ``sites-per-round`` sampled ones.

With ``sites-per-round`` 0 (the default) every connected site is asked each round. Otherwise
the round asks a uniform sample without replacement of that many connected sites (all of them
when fewer are connected), never fewer than ``min-sites``. The draw depends only on the run's
``seed``, the round number and the connected sites, so a resumed run asks the same sites again
as long as the same sites are connected; a different seed gives a different sequence. A retried
attempt passes the sites that failed the round so far as ``avoid``: they are drawn only when
too few other sites are connected, so a broken site does not sink every retry of its round.

Node ids are not stable (Flower draws them at random when a SuperNode registers or a simulation
starts), so pass ``names`` (node id -> site name) to order the sites by name: then a restarted
server or simulation samples the same sites. Memory and time per round then follow
``sites-per-round``, not the size of the federation.

Example:
    >>> from fedmed.runsettings.settings import RunSettings
    >>> settings = RunSettings(min_sites=2, sites_per_round=3, seed=0)
    >>> picked = sample_sites(list(range(100, 110)), settings, server_round=1)
    >>> len(picked), picked == sample_sites(list(range(109, 99, -1)), settings, server_round=1)
    (3, True)
    >>> sample_sites([7, 3, 5], settings, 1, names={7: "A", 3: "B", 5: "C"})
    [3, 5, 7]
    >>> 101 in sample_sites(list(range(100, 110)), settings, 1, avoid={101, 102})
    False
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence

from fedmed.runsettings import RunSettings

__all__ = ["sample_sites"]


def sample_sites(
    nodes: Sequence[int],
    settings: RunSettings,
    server_round: int,
    *,
    names: Mapping[int, str] | None = None,
    avoid: Collection[int] = (),
) -> list[int]:
    """The node ids asked to train in ``server_round`` (sorted), drawn from ``nodes``.

    ``nodes`` are the connected sites' node ids (any order); ``names`` maps node ids to site
    names (nodes without a name are ordered after named ones, by id). Returns every node when
    sampling is off or no more than ``sites-per-round`` are connected. Nodes in ``avoid`` (sites
    that failed an earlier attempt of the round) are drawn only to fill up the sample when too
    few other nodes are connected. (``RunSettings``
    already refuses ``sites-per-round`` below ``min-sites`` with a ConfigError.)
    """
    known = names or {}
    connected = sorted(set(nodes), key=lambda n: (n not in known, known.get(n, ""), n))
    want = max(settings.sites_per_round, settings.min_sites) if settings.sites_per_round else 0
    if want <= 0 or want >= len(connected):
        return sorted(connected)
    # A string seed is hashed (sha512) by random.Random: stable across Python versions and
    # processes, unlike hash(); the round is part of it so each round draws afresh.
    rng = random.Random(f"fedmed-sites:{settings.seed}:{server_round}")
    if not avoid:
        return sorted(rng.sample(connected, want))
    fresh = [n for n in connected if n not in avoid]
    picked = rng.sample(fresh, min(want, len(fresh)))
    failed_before = [n for n in connected if n in avoid]
    return sorted(picked + rng.sample(failed_before, want - len(picked)))
