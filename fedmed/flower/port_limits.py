"""Limits on the SuperLink's public port: sizes, deadlines and connections, before any app runs.

The SuperLink's web server is uvicorn with its ``httptools`` protocol. What uvicorn does by
itself (0.49, pinned by flwr 1.41) and why that is not enough on a port open to the internet:

* a request body is *not* buffered ahead of the app: the protocol keeps at most 64 KiB
  (``HIGH_WATER_LIMIT``) of it and pauses reading the socket until the app calls
  ``receive()`` (seen: an app that does not read took 2.8 MiB of a 100 MB upload, all of it in
  the kernel's socket buffers, +0.4 MiB RSS). It is the app that buffers: Flower reads the
  whole body and parses it before it checks the site's signature, so a 256 MB body from anyone
  cost 234-486 MB. Deciding on a request before the app reads its body therefore bounds the
  memory: this module refuses bodies over :attr:`PortLimits.max_body_bytes` from their
  ``Content-Length``, and :mod:`fedmed.flower.node_gate` refuses unauthenticated ones;
* header size is not limited at all (httptools has no limit; uvicorn's
  ``h11_max_incomplete_event_size`` applies only to the slower h11 protocol);
* there is no deadline for a request to arrive: the keep-alive timeout starts only after a
  response, so a connection that trickles a byte now and then, or sends nothing after the TLS
  handshake, stays open forever;
* ``limit_concurrency`` answers 503 only after reading a request's headers, counts the private
  socket's connections (Flower's own executor) too and knows no peers.

So the limits live in a subclass of uvicorn's protocol (:class:`LimitedHttpProtocol`, used for
both sockets through ``uvicorn.Config(http=...)``, active only on the public one), where the
request stream is seen as it arrives, after TLS and before any app: connections counted in all
and per peer (503), the header section bounded in bytes (431) and time, a whole request bounded
in time (408), bodies sent without a length refused (411), a declared body over the limit
refused (413). A refused request gets its answer with ``connection: close``; for
:data:`LINGER_S` s what the peer still sends is read and dropped (so that it reads the answer
rather than a reset), then the connection is aborted. The alternative, an asyncio TLS front
ahead of uvicorn, would need its own HTTP parser and a second, plain hop into uvicorn (where
the public/private decision by socket would have to be rebuilt) for the same result.

Not bounded here: the TLS handshake (the event loop's 60 s default), which happens before
uvicorn's protocol exists. Each refusal is logged with the peer (escaped), at most one line per
reason per :attr:`RefusalLog.interval_s` s with the count of those not logged.

Example:
    >>> protocol = limited_protocol(PortLimits(max_body_bytes=64 << 20), public_port=9092)
    >>> uvicorn.Config(app, http=protocol, timeout_keep_alive=5)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

__all__ = [
    "LINGER_S",
    "REFUSE_EXTENSION",
    "ConnectionBook",
    "LimitedHttpProtocol",
    "PortLimits",
    "RefusalLog",
    "escape",
    "limited_protocol",
    "refusal_log",
]

log = logging.getLogger("fedmed.flower.port_limits")

KIB, MIB = 1 << 10, 1 << 20
LINGER_S = 1.0  # after a refusal, read and drop what the peer still sends, then close
# scope["extensions"][REFUSE_EXTENSION](status, reason, answer): an app on the public port
# refuses a request the way the port does (answer, linger, abort) instead of a TLS close that
# would read and decrypt what the peer still sends for up to 30 s.
REFUSE_EXTENSION = "fedmed.refuse"


def escape(text: str, limit: int = 200) -> str:
    """``text`` safe for one log line: control and non-ASCII characters escaped, cut."""
    escaped = ascii(text)[1:-1]
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


@dataclass(frozen=True)
class PortLimits:
    """What the public port accepts (``[server]`` keys in brackets; see the README).

    * ``max_body_bytes`` (``public-max-body-mib``, 256 MiB): largest request body. Flower sends
      model arrays in 5 MiB objects (5,242,995-byte bodies); SecAgg+ sends a site's masked
      update as one object of 2.0x the model (COPLE-Net 80 MiB, 3D U-Net 126 MiB, LAMP 172 MiB
      at their default sizes).
    * ``max_header_bytes`` (``public-max-header-kib``, 16 KiB): request line and headers (a
      site sends about 1 KiB).
    * ``header_timeout_s`` (``public-header-timeout``, 10 s): the header section must arrive
      within this of the connection's start (after TLS) or of the request's first byte.
    * ``request_timeout_s`` (``public-request-timeout``, 300 s): the whole request, headers
      and body, within this (a 172 MiB body at 5 Mbit/s).
    * ``max_connections`` (``public-max-connections``, 512) and ``max_connections_per_peer``
      (``public-max-connections-per-peer``, 32): open connections in all and per client
      address. A Flower site opens up to about 6 at once; sites behind one address add up.

    Example:
        >>> PortLimits(max_body_bytes=64 << 20).max_header_bytes
        16384
    """

    max_body_bytes: int = 256 * MIB
    max_header_bytes: int = 16 * KIB
    header_timeout_s: float = 10.0
    request_timeout_s: float = 300.0
    max_connections: int = 512
    max_connections_per_peer: int = 32

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"PortLimits.{name} = {value!r} must be > 0")


class RefusalLog:
    """Warnings about refused peers, at most one line per reason per ``interval_s`` seconds;
    the next line says how many were not logged.

    Example:
        >>> refusal_log.refused("body too large", "203.0.113.9", "Content-Length 300000000")
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}
        self._lock = threading.Lock()

    def refused(self, reason: str, peer: str, detail: str = "") -> None:
        """Log (or count) one refusal of ``peer`` for ``reason``; ``detail`` is escaped."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(reason)
            if last is not None and now - last < self.interval_s:
                self._skipped[reason] = self._skipped.get(reason, 0) + 1
                return
            self._last[reason] = now
            skipped = self._skipped.pop(reason, 0)
        more = f" (and {skipped} more not logged since)" if skipped else ""
        log.warning(
            "public port: refused %s from %s%s%s",
            reason,
            escape(peer, 64),
            f": {escape(detail)}" if detail else "",
            more,
        )


refusal_log = RefusalLog()


class ConnectionBook:
    """Open public connections, in all and per peer address (one event loop, no locking).

    Example:
        >>> book = ConnectionBook(PortLimits())
        >>> book.admit("203.0.113.9")
        ''
    """

    def __init__(self, limits: PortLimits) -> None:
        self.limits = limits
        self.total = 0
        self.per_peer: dict[str, int] = {}

    def admit(self, peer: str) -> str:
        """Count a new connection from ``peer``; '' when admitted, else the reason it is not."""
        if self.total >= self.limits.max_connections:
            return f"too many connections ({self.limits.max_connections} open)"
        if self.per_peer.get(peer, 0) >= self.limits.max_connections_per_peer:
            return (
                f"too many connections from one peer ({self.limits.max_connections_per_peer} open)"
            )
        self.total += 1
        self.per_peer[peer] = self.per_peer.get(peer, 0) + 1
        return ""

    def release(self, peer: str) -> None:
        """Forget one connection of ``peer``."""
        self.total -= 1
        left = self.per_peer.get(peer, 1) - 1
        if left > 0:
            self.per_peer[peer] = left
        else:
            self.per_peer.pop(peer, None)


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`PortLimits` on connections to ``public_port``.

    Use :func:`limited_protocol` to get a class bound to the limits; connections to any other
    port (the private socket) behave exactly as uvicorn's.
    """

    limits: PortLimits = PortLimits()
    public_port: int = 0
    book: ConnectionBook = ConnectionBook(limits)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._public = False
        self._peer = "?"
        self._admitted = False
        self._refused = False
        self._in_request = False  # between the request's first byte and its last body byte
        self._headers_done = False
        self._header_bytes = 0
        self._received: object = None  # the cycle of the last request received in full
        self._timers: dict[str, asyncio.TimerHandle] = {}

    # -- connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._public = not self.server or self.server[1] == self.public_port
        if not self._public:
            return
        self._peer = self.client[0] if self.client else "?"
        reason = self.book.admit(self._peer)
        if reason:
            self._refuse(503, reason, "the server is busy: retry later")
            return
        self._admitted = True
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._admitted:
            self._admitted = False
            self.book.release(self._peer)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._public:
            super().data_received(data)
            return
        if self._refused:
            return  # lingering: dropped
        if not self._in_request and "header" not in self._timers:
            self._arm()  # the next request's first bytes (leading blank lines included)
        # uvicorn's data_received, with its per-request warning replaced by a rate-limited one
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()  # never upgraded here: served as plain HTTP
        except httptools.HttpParserError as err:
            self._refuse(400, "invalid HTTP request", f"{type(err).__name__}: {err}")
        if not self._headers_done and not self._refused and self.parser is not None:
            # Counted per read: the header section can pass the limit by one read at most.
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(
                    431,
                    "header section too large",
                    f"request line and headers over {self.limits.max_header_bytes} bytes "
                    "([server] public-max-header-kib)",
                )

    def _should_upgrade(self) -> bool:
        # A protocol switch would leave this class (and the connection count) behind.
        return not self._public and super()._should_upgrade()

    def _unsupported_upgrade_warning(self) -> None:
        if self._public:
            refusal_log.refused("upgrade request", self._peer, "served as plain HTTP")
        else:
            super()._unsupported_upgrade_warning()

    # -- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        self._in_request, self._headers_done, self._header_bytes = True, False, 0
        if self._public and "header" not in self._timers:
            self._arm()  # a request that began in the same read as the previous one ended

    def on_url(self, url: bytes) -> None:
        if not self._refused:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._refused:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._headers_done = True
        if self._public:
            self._cancel("header")
            problem = self._size_problem() or self._framing_problem()
            if problem:
                self._refuse(*problem)
                return
            self.scope["extensions"] = {REFUSE_EXTENSION: self._refuse}
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._in_request = False
        self._received = self.cycle
        self._cancel("request")
        super().on_message_complete()

    # -- limits -------------------------------------------------------------------------------

    def _size_problem(self) -> tuple[int, str, str] | None:
        """431 when the request line and headers, as parsed, are over the limit (one read can
        hold a whole header section: the count per read in data_received misses it)."""
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size <= self.limits.max_header_bytes:
            return None
        return (
            431,
            "header section too large",
            f"request line and headers over {self.limits.max_header_bytes} bytes "
            "([server] public-max-header-kib)",
        )

    def _framing_problem(self) -> tuple[int, str, str] | None:
        """(status, reason, answer) when the request's body framing is refused, else None."""
        length = None
        for name, value in self.headers:
            if name == b"transfer-encoding":
                return 411, "body without Content-Length", "send the body with a Content-Length"
            if name == b"content-length":
                length = int(value)  # the parser has checked it is a number
        if length is not None and length > self.limits.max_body_bytes:
            return (
                413,
                "body too large",
                f"Content-Length {length} is over the limit of {self.limits.max_body_bytes} "
                "bytes ([server] public-max-body-mib)",
            )
        return None

    def _arm(self) -> None:
        self._timers["header"] = self.loop.call_later(
            self.limits.header_timeout_s, self._expired, "header"
        )
        self._timers.setdefault(
            "request",
            self.loop.call_later(self.limits.request_timeout_s, self._expired, "request"),
        )

    def _cancel(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _expired(self, name: str) -> None:
        self._timers.pop(name, None)
        if self._refused or self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle is self._received and not cycle.response_complete:
            # A request received in full is being answered (the next one was pipelined behind
            # it): its deadline waits for that answer.
            self._timers[name] = self.loop.call_later(1.0, self._expired, name)
            return
        seconds = (
            self.limits.header_timeout_s if name == "header" else self.limits.request_timeout_s
        )
        what = "headers" if name == "header" else "request"
        self._refuse(
            408,
            f"{what} too slow",
            f"the {what} did not arrive within {seconds:g} s ([server] public-{name}-timeout)",
        )

    def _refuse(self, status: int, reason: str, answer: str) -> None:
        """Answer ``status`` with ``connection: close`` (unless an answer started), drop the
        request, read and drop what follows for :data:`LINGER_S` s, then close."""
        if self._refused:
            return  # refused already (a deadline and the app's refusal can meet)
        self._refused = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        refusal_log.refused(reason, self._peer, answer)
        cycle = self.cycle  # the request's, or the previous request's when its headers are due
        if cycle is None or cycle.response_complete or not cycle.response_started:
            body = answer.encode() + b"\n"
            self.transport.write(
                STATUS_LINE[status]
                + b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
                + b"content-length: %d\r\n\r\n" % len(body)
                + body
            )
        if cycle is not None and not cycle.response_complete:
            # The app (reading the body) sees a disconnect; nothing it sends goes out.
            cycle.disconnected = True
            cycle.message_event.set()
        self.flow.resume_reading()
        # abort, not close: a TLS close would wait up to 30 s for the peer's close_notify
        self._timers["linger"] = self.loop.call_later(LINGER_S, self.transport.abort)


def limited_protocol(limits: PortLimits, *, public_port: int) -> type[LimitedHttpProtocol]:
    """A :class:`LimitedHttpProtocol` subclass enforcing ``limits`` on ``public_port`` (its
    own connection count), for ``uvicorn.Config(http=...)``."""
    return type(
        "PublicPortProtocol",
        (LimitedHttpProtocol,),
        {"limits": limits, "public_port": public_port, "book": ConnectionBook(limits)},
    )
