"""Attacks on the SuperLink's public port from an unauthenticated peer, and the memory they cost.

Shared by ``tests/server/test_gateway_limits.py`` and run as a script to measure a gateway
(the before/after figures of the public port limits)::

    python tests/server/port_attacks.py            # starts a TLS gateway, prints a table

Each attack talks raw HTTP/1.1 over TLS (``ssl`` sockets, no HTTP client that would refuse
to send what an attacker sends) and returns what happened: the status line the server
answered (or ``closed`` / ``open``), the seconds until then, and the growth of the resident
memory (``VmRSS`` from ``/proc``) of the process serving the port, sampled every 20 ms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
PUSH_OBJECT = "/v1/fleet/push-object"


def rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssPeak:
    """Context manager sampling ``rss(pid)`` every 20 ms; ``growth`` = peak - value at entry."""

    def __init__(self, pid: int) -> None:
        self.pid, self.start, self.peak = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="rss")

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> RssPeak:
        self.start = self.peak = rss(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        with contextlib.suppress(OSError, RuntimeError):
            self.peak = max(self.peak, rss(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.start


@dataclass
class Outcome:
    """What one attack got: ``answer`` per connection (status line, ``closed`` or ``open``),
    seconds until the last connection was answered or closed, server RSS growth (peak)."""

    name: str
    answers: list[str]
    seconds: float
    growth: int = 0
    sent: int = 0  # body or header bytes the server took

    def row(self) -> str:
        counts: dict[str, int] = {}
        for answer in self.answers:
            counts[answer] = counts.get(answer, 0) + 1
        what = ", ".join(f"{n} x {a}" for a, n in sorted(counts.items()))
        return (
            f"{self.name:<26} {self.growth / MIB:8.1f} MiB  {self.sent / MIB:8.1f} MiB sent  "
            f"{self.seconds:6.1f} s  {what}"
        )


def client_context(ca: Path | None) -> ssl.SSLContext:
    """TLS context trusting ``ca`` (None: no verification)."""
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if ca is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def connect(
    port: int, context: ssl.SSLContext, *, host: str = "127.0.0.1", source: str = "127.0.0.1"
) -> ssl.SSLSocket:
    """A TLS connection to ``host:port`` from ``source`` (any 127.x.y.z is a distinct peer)."""
    raw = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
    return context.wrap_socket(raw, server_hostname=host)


def _answer(sock: ssl.SSLSocket, timeout: float) -> str:
    """The status line the server sent, ``closed`` (EOF or reset) or ``open`` (nothing yet)."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return "open"
    except (ssl.SSLError, OSError):
        return "closed"
    if not data:
        return "closed"
    return data.split(b"\r\n", 1)[0].decode(errors="replace")


def _headers(method: str, path: str, length: int | None, extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
    if length is not None:
        head += f"content-type: application/protobuf\r\ncontent-length: {length}\r\n"
    return (head + extra + "\r\n").encode()


def _push(sock: ssl.SSLSocket, total: int, deadline: float) -> int:
    """Send up to ``total`` body bytes until the server stops taking them; bytes sent."""
    chunk, sent = b"\0" * MIB, 0
    sock.settimeout(2.0)
    while sent < total and time.monotonic() < deadline:
        try:
            sock.sendall(chunk[: min(MIB, total - sent)])
        except TimeoutError:
            break  # the server stopped reading: the body waits in buffers, not in its memory
        except (ssl.SSLError, OSError):
            break
        sent += min(MIB, total - sent)
    return sent


def oversized_body(port: int, pid: int, ca: Path | None, *, size: int = 256_000_000) -> Outcome:
    """One request declaring ``size`` body bytes and streaming them (stops when refused)."""
    with RssPeak(pid) as peak:
        start = time.monotonic()
        with connect(port, client_context(ca)) as sock:
            sock.sendall(_headers("POST", PUSH_OBJECT, size))
            sent = _push(sock, size, start + 60)
            answer = _answer(sock, 10)
        seconds = time.monotonic() - start
    return Outcome("256 MB body", [answer], seconds, peak.growth, sent)


def idle_holders(
    port: int,
    pid: int,
    ca: Path | None,
    *,
    count: int = 4,
    each: int = 100_000_000,
    hold_s: float = 3.0,
) -> Outcome:
    """``count`` connections, each declaring twice ``each`` bytes, pushing ``each`` and then
    holding the connection idle (the request never completes); closed after ``hold_s``."""
    with RssPeak(pid) as peak:
        start = time.monotonic()
        socks = [connect(port, client_context(ca)) for _ in range(count)]
        sent = 0
        try:
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.sendall(_headers("POST", PUSH_OBJECT, 2 * each))
                sent += _push(sock, each, start + 60)
            time.sleep(hold_s)
            answers = [_answer(sock, 1) for sock in socks]
        finally:
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.close()
        seconds = time.monotonic() - start
        time.sleep(1)  # memory kept after the connections closed counts too
    return Outcome(f"{count} idle x 100 MB", answers, seconds, peak.growth, sent)


def huge_header(port: int, pid: int, ca: Path | None, *, size: int = 8 * MIB) -> Outcome:
    """One ``GET /health`` with an ``x-pad`` header of ``size`` bytes."""
    with RssPeak(pid) as peak:
        start = time.monotonic()
        with connect(port, client_context(ca)) as sock:
            head = b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nx-pad: "
            sock.sendall(head)
            sent = _push_text(sock, size, start + 60)
            with contextlib.suppress(OSError):
                sock.sendall(b"\r\n\r\n")
            answer = _answer(sock, 10)
        seconds = time.monotonic() - start
    return Outcome("8 MB header", [answer], seconds, peak.growth, sent)


def _push_text(sock: ssl.SSLSocket, total: int, deadline: float) -> int:
    chunk, sent = b"a" * MIB, 0
    sock.settimeout(2.0)
    while sent < total and time.monotonic() < deadline:
        try:
            sock.sendall(chunk[: min(MIB, total - sent)])
        except (TimeoutError, ssl.SSLError, OSError):
            break
        sent += min(MIB, total - sent)
    return sent


def slow_trickle(
    port: int,
    pid: int,
    ca: Path | None,
    *,
    count: int = 100,
    seconds: float = 20.0,
    source: str = "127.0.0.1",
) -> Outcome:
    """``count`` connections from ``source`` each sending a request one header byte per second
    for ``seconds``; the answer per connection is what it got by then (``open``: still held)."""
    context = client_context(ca)
    with RssPeak(pid) as peak:
        start = time.monotonic()
        socks: list[ssl.SSLSocket] = []
        for _ in range(count):
            with contextlib.suppress(OSError):
                socks.append(connect(port, context, source=source))
        answers: dict[int, str] = {}
        for index, sock in enumerate(socks):
            try:
                sock.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nx-a: ")
            except OSError:
                answers[index] = "closed"
        last_byte = time.monotonic()
        while time.monotonic() - start < seconds and len(answers) < len(socks):
            # look every 0.2 s (an answer is readable for the server's 1 s linger), trickle
            # one byte per connection every second
            trickle = time.monotonic() - last_byte >= 1.0
            if trickle:
                last_byte = time.monotonic()
            for index, sock in enumerate(socks):
                if index in answers:
                    continue
                answer = _answer(sock, 0.001)
                if answer != "open":
                    answers[index] = answer
                elif trickle:
                    try:
                        sock.sendall(b"a")
                    except OSError:
                        answers[index] = "closed"
            time.sleep(0.2)
        elapsed = time.monotonic() - start
        final = [answers.get(index, "open") for index in range(len(socks))]
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
    return Outcome(f"{count} slow trickles", final, elapsed, peak.growth)


def health(port: int, ca: Path | None, *, source: str = "127.0.0.2") -> int:
    """Status of a real ``GET /health`` from ``source`` (a peer other than the attacker)."""
    import httpx

    transport = httpx.HTTPTransport(verify=client_context(ca), local_address=source)
    with httpx.Client(transport=transport, timeout=10) as client:
        return client.get(f"https://127.0.0.1:{port}/health").status_code


@contextlib.contextmanager
def gateway(tmp: Path, **limits: object) -> Iterator[tuple[object, object]]:
    """A started TLS + site-auth SuperLink (gateway) on free ports with sites A and B
    registered, and the PKI: ``(link, pki)``. ``limits`` are ServerConfig fields."""
    from fedmed.server.submit import register_sites
    from fedmed.server.superlink import SuperLink

    from fedmed.config import ServerConfig
    from fedmed.flower.control import control_client
    from fedmed.flower.process import free_loopback_port
    from fedmed.security.pki import write_pki

    pki = write_pki(tmp / "certs", server_hosts=["127.0.0.1"], sites=["A", "B"])
    config = ServerConfig(
        host="127.0.0.1",
        port=free_loopback_port(),
        state_dir=tmp / "server",
        ca_cert=pki.ca_cert,
        server_cert=pki.server_cert,
        server_key=pki.server_key,
        insecure=False,
        min_sites=2,
        sites=dict(pki.site_public_keys),
        wait_for_sites_s=10.0,
        run_timeout_s=60.0,
        startup_timeout_s=60.0,
        stream_logs=False,
    )
    config = dataclasses.replace(config, **limits)
    with SuperLink(config) as link:
        with control_client(link.address, ca_cert=pki.ca_cert) as control:
            register_sites(control, config.sites)
        yield link, pki


def main() -> None:
    """Run each attack on a fresh gateway; print one row per attack (argv[1]: trickle seconds)."""
    import tempfile

    trickle_s = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    attacks = {
        "body": oversized_body,
        "idle": idle_holders,
        "header": huge_header,
        "trickle": lambda port, pid, ca: slow_trickle(port, pid, ca, seconds=trickle_s),
    }
    for attack in attacks.values():
        with tempfile.TemporaryDirectory(prefix="ports") as tmp, gateway(Path(tmp)) as (link, pki):
            port, pid, ca = link.config.port, link.proc.pid, pki.ca_cert
            before = rss(pid)
            print(attack(port, pid, ca).row(), flush=True)
            print(
                f"  RSS {before / MIB:.0f} -> {rss(pid) / MIB:.0f} MiB after; /health from "
                f"another peer: {health(port, ca)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
