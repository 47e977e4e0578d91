"""A guard for tests that download: any connection or name lookup beyond the loopback fails the test.

Not a mock: loopback traffic goes through untouched; anything else is refused and recorded, so a test
that reaches the internet fails even when the code under test swallows the error.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import pytest

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class OutsideNetwork(AssertionError):
    pass


def install(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Wrap socket connect/connect_ex/getaddrinfo for the test; returns the list of refused attempts."""
    attempts: list[Any] = []
    real_connect, real_connect_ex, real_getaddrinfo = (
        socket.socket.connect,
        socket.socket.connect_ex,
        socket.getaddrinfo,
    )

    def check(family: int, address: Any) -> None:
        if family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            attempts.append(address)
            raise OutsideNetwork(f"a test tried to connect to {address}")

    def connect(self: socket.socket, address: Any) -> None:
        check(self.family, address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(self.family, address)
        return real_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and name not in LOOPBACK:
            attempts.append(name)
            raise OutsideNetwork(f"a test tried to resolve {name!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


def this_machine() -> set[str]:
    """The addresses of this machine's own interfaces (Ray's node address among them), as far as its name
    resolves: traffic to them never leaves the machine."""
    own = set(LOOPBACK)
    with contextlib.suppress(OSError):
        own.update(socket.gethostbyname_ex(socket.gethostname())[2])
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent, a UDP connect only picks a route
        own.add(probe.getsockname()[0])
    return own


def install_for_session(patch: pytest.MonkeyPatch) -> list[Any]:
    """For the whole suite: TCP connections from this process to anything but this machine fail (and are
    recorded). Name lookups and UDP are left alone (a resolver, Ray's own address probe); the download tests
    add `install`'s stricter guard on top."""
    attempts: list[Any] = []
    own = this_machine()
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(sock: socket.socket, address: Any) -> None:
        tcp = sock.type == socket.SOCK_STREAM
        if tcp and sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in own:
            attempts.append(address)
            raise OutsideNetwork(f"a test connected beyond this machine: {address}")

    def connect(self: socket.socket, address: Any) -> None:
        check(self, address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(self, address)
        return real_connect_ex(self, address)

    patch.setattr(socket.socket, "connect", connect)
    patch.setattr(socket.socket, "connect_ex", connect_ex)
    return attempts
