"""A guard for tests that download: any connection or name lookup beyond the loopback fails the test.

Not a mock: loopback traffic goes through untouched; anything else is refused and recorded, so a test
that reaches the internet fails even when the code under test swallows the error.
"""

from __future__ import annotations

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
