"""fedmed's Flower layer: the only code in ``fedmed/``, ``server/`` and ``client/`` that uses
Flower beyond its public app API (``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``).

``tests/flower/test_layering.py`` fails if any other module imports (or names) a Flower
internal; ``tests/flower/test_flower_contract.py`` asserts every internal these modules use, on
each flwr series of :data:`SUPPORTED_SERIES`; every fedmed start checks the installed flwr
against it (:func:`check_flower_version`). The security controls here fail closed; the
speed-ups switch off to Flower's own behaviour.

Versions and values:

* :mod:`fedmed.flower.version`: the tested flwr range and the start-up check;
* :mod:`fedmed.flower.codes`: Flower's protocol constants fedmed writes into messages;
* :mod:`fedmed.flower.speedups`: the latency speed-ups below switch off with one warning
  (stock Flower) where Flower drifted, or on request (``FEDMED_FLOWER_WITHOUT``).

Processes and the app:

* :mod:`fedmed.flower.process`: start, watch and stop Flower processes (shared by both sides);
* :mod:`fedmed.flower.fab`: fedmed's shim app as a FAB;
* :mod:`fedmed.flower.control`: the Control API (submit, follow and stop runs; register keys).

The central side (the SuperLink gateway):

* :mod:`fedmed.flower.gateway`: the SuperLink served on a private and a public socket;
* :mod:`fedmed.flower.public_filter`: the public socket serves only the Fleet API (fails
  closed when it cannot prove that);
* :mod:`fedmed.flower.port_limits`: size, time and connection limits on the public port;
* :mod:`fedmed.flower.node_gate`: a Fleet request's signature is checked before its body;
* :mod:`fedmed.flower.linkstate`: a longer SQLite lock wait;
* :mod:`fedmed.flower.secaggplus`: Flower's legacy SecAgg+ on both sides.

A site (the SuperNode):

* :mod:`fedmed.flower.pinning`: the site runs only pinned apps (fails closed);
* :mod:`fedmed.flower.liveness`, :mod:`fedmed.flower.fastpoll`: heartbeat interval, exit when
  stopped working, shorter idle poll and object-pull back-off;
* :mod:`fedmed.flower.warmstart`: a fork server for each message's ``flwr-clientapp``.

Only the version check is re-exported here: importing the package imports no Flower internal.

Example:
    >>> from fedmed.flower import check_flower_version
    >>> check_flower_version()
    '1.41.0'
"""

from __future__ import annotations

from fedmed.flower.version import SUPPORTED_SERIES, check_flower_version

__all__ = ["SUPPORTED_SERIES", "check_flower_version"]
