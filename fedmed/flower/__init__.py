"""fedmed's Flower layer: code that builds on Flower's (and its web server's) internals.

* :mod:`fedmed.flower.port_limits`: size, time and connection limits on the SuperLink's
  public port, enforced by uvicorn's HTTP protocol before a request reaches an app;
* :mod:`fedmed.flower.node_gate`: a Fleet request's signed headers are checked before its
  body is read (Flower checks them only after reading the whole body).

flwr is pinned (pyproject.toml); ``tests/flower`` fails loudly when the internals move.
"""

from __future__ import annotations

__all__: list[str] = []
