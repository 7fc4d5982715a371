"""A Fleet request's signature is checked before its body is read (public port).

Flower 1.41 authenticates a site from three headers (``flwr-public-key``, ``flwr-timestamp``
and ``flwr-signature``, an ECDSA signature of the timestamp) but only after its
``ProtobufTranslationMiddleware`` has read and parsed the whole body (its ``NodeAuthMiddleware``
also needs the node id from the body). So anyone reaching the public port could make the
SuperLink hold a body as large as the port accepts. :class:`NodeGate` sits in front of Flower's
app on the public socket and decides from the headers alone, with Flower's own functions and
constants, before one byte of the body is read:

* headers missing, malformed, signed outside Flower's time window or with a bad signature:
  401, as Flower would answer (a site that gets 401 stops, as with Flower);
* a valid signature by a key the SuperLink does not know (``get_node_id_by_public_key``): the
  body may be at most :data:`UNREGISTERED_BODY_BYTES` (a node's register and activate calls
  are about 300 bytes), then Flower answers as before;
* a registered site: the body may be as large as the port allows.

With site authentication off (``--insecure``) only the size limits apply. The body is then
read here, up to its limit, and handed to Flower in one piece (Flower reads it whole anyway).
Known keys are remembered for :data:`KNOWN_KEY_TTL_S` s; Flower still checks every request
itself (node id, unregistered keys) after this gate.

Example:
    >>> app = NodeGate(flower_app, public_port=9092, max_body_bytes=256 << 20,
    ...                known_key=registered_key_lookup(flower_app))
"""

from __future__ import annotations

import datetime
import json
import time
from base64 import b64decode
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fedmed.flower.port_limits import REFUSE_EXTENSION, refusal_log
from fedmed.flower.public_filter import FLEET_PREFIX

__all__ = [
    "KNOWN_KEY_TTL_S",
    "UNREGISTERED_BODY_BYTES",
    "NodeGate",
    "registered_key_lookup",
    "signed_public_key",
]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UNREGISTERED_BODY_BYTES = 64 << 10  # unknown key, and requests outside the Fleet API (/health)
KNOWN_KEY_TTL_S = 30.0


class _Refused(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


def signed_public_key(headers: MutableMapping[str, str]) -> bytes:
    """The public key (PEM bytes) of a request whose signed-timestamp headers verify, checked
    as Flower's ``authenticate_node`` checks them.

    Raises:
        ValueError: a header is missing or malformed, the timestamp is outside Flower's
            window, or the signature does not verify.
    """
    from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature

    try:
        public_key = b64decode(headers[FLEET_HTTP_PUBLIC_KEY_HEADER], validate=True)
        signature = b64decode(headers[FLEET_HTTP_SIGNATURE_HEADER], validate=True)
        timestamp = headers[TIMESTAMP_HEADER]
        age = (now() - datetime.datetime.fromisoformat(timestamp)).total_seconds()
        if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
            raise ValueError("timestamp outside the allowed window")
        if not verify_signature(
            bytes_to_public_key(public_key), timestamp.encode("ascii"), signature
        ):
            raise ValueError("invalid signature")
    except ValueError:
        raise
    except Exception as err:  # any header that fails to decode or verify: unauthenticated
        raise ValueError(f"invalid authentication headers ({type(err).__name__})") from err
    return public_key


def registered_key_lookup(flower_app: Any) -> Callable[[bytes], bool]:
    """Whether a public key is registered at the SuperLink whose FastAPI app is ``flower_app``
    (the linkstate Flower's own routes use)."""

    def known(public_key: bytes) -> bool:
        state = flower_app.state.linkstate_factory.state()
        return state.get_node_id_by_public_key(public_key) is not None

    return known


class NodeGate:
    """ASGI middleware: on the public port, bound each request's body by who signed it and
    read it before ``app`` runs (see the module docstring).

    ``known_key`` is None when site authentication is off: then every request may send up to
    ``max_body_bytes``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        public_port: int,
        max_body_bytes: int,
        known_key: Callable[[bytes], bool] | None,
    ) -> None:
        self.app = app
        self.public_port = public_port
        self.max_body_bytes = max_body_bytes
        self.known_key = known_key
        self._known: dict[bytes, float] = {}  # key -> time it was last found registered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if scope["type"] != "http" or (server and server[1] != self.public_port):
            await self.app(scope, receive, send)
            return
        peer = (scope.get("client") or ("?", 0))[0]
        try:
            limit = await self._body_limit(scope)
            body = await self._read_body(scope, receive, limit)
        except _Refused as refused:
            refuse = (scope.get("extensions") or {}).get(REFUSE_EXTENSION)
            if refuse is not None:  # the port answers, drops what follows, closes (and logs)
                refuse(refused.status, refused.reason, refused.detail)
                return
            refusal_log.refused(refused.reason, peer, refused.detail)
            await _answer(send, refused.status, refused.detail)
            return
        if body is None:
            return  # the peer went away (or the port's deadline closed it)
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _body_limit(self, scope: Scope) -> int:
        if self.known_key is None:
            return self.max_body_bytes
        if not scope.get("path", "").startswith(FLEET_PREFIX):
            return UNREGISTERED_BODY_BYTES
        from starlette.concurrency import run_in_threadpool

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            known = await run_in_threadpool(self._verdict, headers)
        except ValueError as err:
            raise _Refused(
                401, "unauthenticated request", "Invalid SuperNode authentication"
            ) from err
        except Exception as err:  # the state database failed: the site retries a 503
            raise _Refused(503, "key lookup failed", f"{type(err).__name__}: {err}") from err
        return self.max_body_bytes if known else UNREGISTERED_BODY_BYTES

    def _verdict(self, headers: MutableMapping[str, str]) -> bool:
        """Whether the signing key is registered; ValueError when the signature is bad."""
        public_key = signed_public_key(headers)
        now = time.monotonic()
        seen = self._known.get(public_key)
        if seen is not None and now - seen < KNOWN_KEY_TTL_S:
            return True
        if self.known_key is None or not self.known_key(public_key):
            return False
        if len(self._known) > 4096:  # registered keys are few; never grows without bound
            self._known.clear()
        self._known[public_key] = now
        return True

    @staticmethod
    async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
        """The whole body (None if the peer disconnected); refused beyond ``limit`` bytes."""
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and int(declared) > limit:
            raise _Refused(
                413,
                "body too large for its sender",
                f"Content-Length {int(declared)} is over the limit of {limit} bytes for this "
                "request (a site whose key is not registered, or the port's limit)",
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _Refused(413, "body too large", f"body over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _answer(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
