"""Shared by the hardening tests (faults, secrets, web config): clocks, daemons, raw servers."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import subprocess
import time
from datetime import datetime, timedelta

from helpers import T0, ExporterProcess


class HybridClock:
    """Injected time that runs with the real clock and can be jumped ahead by the test.

    Jumping is how a test crosses a 30 s Retry-After or three poll intervals without waiting;
    running with real time is what keeps tiny sleeps (rate-limit spacing, 0 s backoff) and real
    socket timeouts working without a driver. The wall clock (exporter and simulator) and the
    monotonic clock (schedules, pauses) move together, so the simulator's recorded request times
    are on the same axis as the exporter's pauses.
    """

    def __init__(self, start: datetime = T0) -> None:
        self._real0 = time.monotonic()
        self._offset = 0.0
        self._start = start
        self._sleepers: set[asyncio.Future[None]] = set()

    def monotonic(self) -> float:
        return time.monotonic() - self._real0 + self._offset

    def time(self) -> float:
        return self._start.timestamp() + self.monotonic()

    def datetime(self) -> datetime:
        return self._start + timedelta(seconds=self.monotonic())

    def advance(self, seconds: float) -> None:
        self._offset += seconds
        for waiter in list(self._sleepers):
            if not waiter.done():
                waiter.set_result(None)

    def parked(self, longer_than: float = 1.0) -> int:
        """How many sleeps are waiting for more than `longer_than` injected seconds."""
        return sum(1 for f in self._sleepers if getattr(f, "wake", 0.0) - self.monotonic() > longer_than)

    async def sleep(self, delay: float) -> None:
        wake = self.monotonic() + delay
        while (left := wake - self.monotonic()) > 0:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiter.wake = wake  # type: ignore[attr-defined]
            self._sleepers.add(waiter)
            try:
                await asyncio.wait({waiter}, timeout=left)
            finally:
                self._sleepers.discard(waiter)
        await asyncio.sleep(0)


def free_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_resetting_server(port: int = 0) -> tuple[asyncio.Server, int]:
    """A TCP server that reads the request, then resets the connection (RST, not FIN)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(reader.read(1024), 5)
        sock = writer.get_extra_info("socket")
        # SO_LINGER with a zero timeout makes close() send RST: "connection reset by peer".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", port, reuse_address=True)
    return server, int(server.sockets[0].getsockname()[1])


class Daemon(ExporterProcess):
    """A long-running `python -m exporter ...`, waited on by its stderr lines."""

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines["stdout"] + self.lines["stderr"])

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines["stderr"] if regex.search(line))

    def wait_for(self, pattern: str, timeout: float = 15.0, *, after: int = 0) -> re.Match[str]:
        """The first stderr line (from index `after`) matching `pattern`; fails at the deadline or exit."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines["stderr"][after:]:
                    if (match := regex.search(line)) is not None:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or self.popen.poll() is not None:
                    raise AssertionError(
                        f"no stderr line matching {pattern!r} (exit {self.popen.poll()}):\n"
                        + "\n".join(self.lines["stderr"])
                    )
                self._cond.wait(min(left, 0.1))

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait(5)
        self._join_readers()
        return code
