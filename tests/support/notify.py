"""A service manager's notification socket, owned by a test (what systemd gives a Type=notify
service in NOTIFY_SOCKET)."""

from __future__ import annotations

import socket
import time
from pathlib import Path


class NotifySocket:
    """Collects the datagrams a daemon sends, as dicts of ``KEY=value`` fields."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def close(self) -> None:
        self.socket.close()

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30) -> dict[str, str]:
        """The first message (seen before or arriving now) with ``key`` (equal to ``value``,
        or starting with it when it ends in ``*``)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for message in self.messages[seen:]:
                if key in message and _matches(message[key], value):
                    return message
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value} within {timeout} s: {self.messages}")
            self.socket.settimeout(left)
            try:
                data = self.socket.recv(65536)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)


def _matches(actual: str, wanted: str | None) -> bool:
    if wanted is None:
        return True
    if wanted.endswith("*"):
        return actual.startswith(wanted[:-1])
    return actual == wanted
