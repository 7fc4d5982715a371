"""A run's settings: the ``[app]`` keys every federated run is configured with, validated.

The server app reads them from Flower's run config, ``fedmed-sim`` from ``sim.toml``, and a
site's SuperNode hashes their defaults into the app it pins; so they live in the library,
below the apps. :mod:`.settings` holds :class:`RunSettings` and the key table, :mod:`.rules`
which values and combinations are valid, :mod:`.derived` what follows from them (patch shape,
learning rate of a round, deadlines, the preprocessing plan).

Example:
    >>> from fedmed.runsettings import RunSettings
    >>> RunSettings.from_run_config({"num-rounds": 5}).num_rounds
    5
"""

from fedmed.runsettings.settings import RunSettings

__all__ = ["RunSettings"]
