"""systemd's readiness protocol (``sd_notify``), without libsystemd.

Under ``Type=notify`` systemd sets ``NOTIFY_SOCKET``; the daemon sends datagrams of
``KEY=value`` lines to it: ``READY=1`` once the mount serves, ``STATUS=`` with what it is
doing, ``STOPPING=1`` when it begins to stop, ``EXTEND_TIMEOUT_USEC=`` while a long final
write-out runs. Without ``NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """The service manager's notification socket, if there is one.

    Args:
        address: The value of ``NOTIFY_SOCKET`` (``@name`` for an abstract socket), or
            ``None`` to read it from the environment.
    """

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when a service manager listens."""
        return bool(self._address)

    def send(self, **fields: str | int) -> None:
        """Send ``KEY=value`` lines, e.g. ``send(READY=1, STATUS="serving")``.

        Failures are logged, never raised: a manager that went away must not stop the mount.
        """
        if not self._address:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            if self._socket is None:
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                self._socket = socket.socket(socket.AF_UNIX, kind)
                self._socket.setblocking(False)
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:
            log.warning("cannot notify the service manager: %s", exc.strerror)

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
