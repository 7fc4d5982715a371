"""Which connected sites train in a round: all of them, or ``sites-per-round`` sampled ones.

With ``sites-per-round`` 0 (the default) every connected site is asked each round. Otherwise
the round asks a uniform sample without replacement of that many connected sites (all of them
when fewer are connected), never fewer than ``min-sites``. The draw depends only on the run's
``seed``, the round number and the sorted node ids, so a resumed run, or a retried attempt of
a round, asks the same sites again as long as the same sites are connected; a different seed
gives a different sequence. Memory and time per round then follow ``sites-per-round``, not the
size of the federation.

Example:
    >>> from fedmed.server.settings import RunSettings
    >>> settings = RunSettings(min_sites=2, sites_per_round=3, seed=0)
    >>> picked = sample_sites(list(range(100, 110)), settings, server_round=1)
    >>> len(picked), picked == sample_sites(list(range(109, 99, -1)), settings, server_round=1)
    (3, True)
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .settings import RunSettings

__all__ = ["sample_sites"]


def sample_sites(nodes: Sequence[int], settings: RunSettings, server_round: int) -> list[int]:
    """The node ids asked to train in ``server_round`` (sorted), drawn from ``nodes``.

    ``nodes`` are the connected sites' node ids (any order). Returns them all when sampling
    is off or no more than ``sites-per-round`` are connected. (``RunSettings`` already refuses
    ``sites-per-round`` below ``min-sites`` with a ConfigError.)
    """
    connected = sorted(set(nodes))
    want = max(settings.sites_per_round, settings.min_sites) if settings.sites_per_round else 0
    if want <= 0 or want >= len(connected):
        return connected
    # A string seed is hashed (sha512) by random.Random: stable across Python versions and
    # processes, unlike hash(); the round is part of it so each round draws afresh.
    rng = random.Random(f"fedmed-sites:{settings.seed}:{server_round}")
    return sorted(rng.sample(connected, want))
