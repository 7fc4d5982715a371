"""fedmed's Flower layer: code that builds on Flower's (and its web server's) internals.

* :mod:`fedmed.flower.port_limits`: size, time and connection limits on the SuperLink's
  public port, enforced by uvicorn's HTTP protocol before a request reaches an app;
* :mod:`fedmed.flower.node_gate`: a Fleet request's signed headers are checked before its
  body is read (Flower checks them only after reading the whole body);
* :mod:`fedmed.flower.public_filter`: the public socket serves only the Fleet API routes.

flwr (and through it uvicorn) is pinned in pyproject.toml; ``tests/flower`` and
``tests/server/test_gateway.py`` fail loudly when the internals these use move.
"""

from __future__ import annotations

__all__: list[str] = []
