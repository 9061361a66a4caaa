"""The control socket: its name held only while serving, and never fatal when still taken.

A device number is free for the next mount as soon as the kernel has unmounted, while the old
daemon may still be writing out: a new daemon must not die because the name is still taken.
"""

from __future__ import annotations

import socket

import trio

from vhdfs.daemon import control
from vhdfs.daemon.control import ControlServer
from vhdfs.daemon.shutdown import StopOutcome


def _holder(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(name)
    sock.listen(1)
    return sock


def test_a_taken_name_is_bound_once_free_and_released_when_serving_ends() -> None:
    requests: list[str] = []

    async def on_unmount() -> StopOutcome:
        requests.append("unmount")
        return StopOutcome(stopping=False, busy=True, reasons=("held by a test",))

    server = ControlServer("0:0", "/nonexistent/vhdfs-test-mountpoint", on_unmount)
    old_daemon = _holder(server.name)

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(5):
                await nursery.start(server.serve)  # started although the name is taken
            old_daemon.close()  # the old daemon exits
            await trio.sleep(2 * control.BIND_RETRY + 0.2)
            client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with client:
                await client.connect(server.name)
                await client.send(b"unmount\n")
                reply = await client.recv(200)
            assert reply == b"busy\theld by a test\n"
            nursery.cancel_scope.cancel()
        # Serving is over: the name is free at once.
        _holder(server.name).close()

    trio.run(scenario)
    assert requests == ["unmount"]
