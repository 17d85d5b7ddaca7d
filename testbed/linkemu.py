"""A TCP proxy that behaves like a poor rural uplink, for tests and benchmarks.

``LinkEmulator`` listens on 127.0.0.1 (a free port by default) and forwards
every accepted connection to ``target_host:target_port``. Each direction goes
through the same two stages::

    read ──► [stalls, loss stalls, token bucket]  ──► delay line ──► write
              "serialisation onto the link"           "propagation"

* **Rate** (``rate_bps``, bits per second of TCP payload, per direction,
  shared by all connections): a token bucket of ``burst_bytes``.
* **Latency** (``latency_s``, one way): each chunk is delivered ``latency_s``
  after it was put on the link; order is preserved.
* **Stalls**: link-wide pauses during which nothing new is put on the link,
  every ``stall_every_s`` (periodic, or exponentially distributed gaps with
  ``stall_random=True``) lasting ``stall_duration_s``. The schedule is a pure
  function of ``seed`` (see :func:`stall_windows`).
* **Loss stalls**: each chunk, with probability ``loss_stall_prob``, waits an
  extra ``loss_stall_s`` before going on the link (like a TCP retransmission:
  the chunks behind it wait too). Draws come from a per-connection RNG seeded
  from ``seed``, the connection's number and the direction, so the same chunk
  sequence sees the same losses.
* **Resets**: :meth:`LinkEmulator.reset_all` sends RST to both ends of every
  connection.
* **Up/down**: ``set_up(False)`` resets every connection and resets new ones
  at once; ``set_up(False, blackhole=True)`` instead silently stops moving
  bytes and holds new connections (like a dead radio: TCP notices only through
  its own timeouts). ``set_up(True)`` restores the link.

Command line (for the demo)::

    python -m testbed.linkemu --target 127.0.0.1:1883 --port 11883 \\
        --rate-bps 9600 --latency 0.3 --stall-every 30 --stall-duration 5

Counters (:attr:`LinkEmulator.stats`) count TCP payload bytes delivered in
each direction; ``up`` is client → target.

How data is cut into chunks depends on socket timing, so byte-exact timing is
not reproducible; the stall schedule and the per-chunk loss draws are.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import random
import signal
import socket
import struct
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

_READ_SIZE = 65536


@dataclass(frozen=True, slots=True)
class LinkStats:
    """A snapshot of the emulator's counters."""

    up_bytes: int  # client -> target, delivered
    down_bytes: int  # target -> client, delivered
    connections: int  # connections forwarded to the target
    refused: int  # connections reset at once because the link was down
    resets: int  # connections torn down by reset_all() or set_up(False)
    connect_failures: int  # target did not accept
    loss_stalls: int  # chunks held back by a loss stall


def stall_windows(
    seed: int, every_s: float, duration_s: float, randomized: bool
) -> Iterator[tuple[float, float]]:
    """Endless (start, end) stall windows in seconds since the link started.

    Periodic: a stall starts every ``every_s`` (the first at ``every_s``).
    Randomized: the gaps between stalls are exponential with mean ``every_s``.
    """
    if every_s <= 0 or duration_s < 0:
        raise ValueError("stall interval must be > 0 and duration >= 0")
    rng = random.Random(seed)
    t = 0.0
    for k in itertools.count(1):
        start = t + rng.expovariate(1.0 / every_s) if randomized else k * every_s
        if randomized:
            t = start + duration_s
        yield start, start + duration_s


class TokenBucket:
    """Pacing for ``rate`` bytes/s with bursts up to ``burst`` bytes.

    ``reserve`` returns how long the caller must wait before sending ``n``
    bytes; reservations queue behind each other (the bucket may go into debt),
    so concurrent senders share the rate fairly in arrival order.
    """

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def reserve(self, n: int, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class _DelayLine:
    """FIFO of (deliver_at, chunk), bounded in bytes; ``None`` marks EOF."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: deque[tuple[float, bytes]] = deque()
        self._bytes = 0
        self._eof = False
        self._cond = asyncio.Condition()

    async def put(self, deliver_at: float, chunk: bytes) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self._bytes < self.max_bytes)
            self._items.append((deliver_at, chunk))
            self._bytes += len(chunk)
            self._cond.notify_all()

    async def close(self) -> None:
        async with self._cond:
            self._eof = True
            self._cond.notify_all()

    async def get(self) -> tuple[float, bytes] | None:
        async with self._cond:
            await self._cond.wait_for(lambda: bool(self._items) or self._eof)
            if not self._items:
                return None
            item = self._items.popleft()
            self._bytes -= len(item[1])
            self._cond.notify_all()
            return item


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST (SO_LINGER 0) instead of FIN."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Conn:
    def __init__(self, number: int, client: asyncio.StreamWriter, task: asyncio.Task[None]):
        self.number = number
        self.client = client
        self.target: asyncio.StreamWriter | None = None
        self.task = task

    def reset(self) -> None:
        _rst(self.client)
        _rst(self.target)
        self.task.cancel()


class LinkEmulator:
    """TCP proxy imposing rate, latency, stalls, resets and outages; see module doc."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        rate_bps: int | None = None,
        latency_s: float = 0.0,
        burst_bytes: int | None = None,
        stall_every_s: float | None = None,
        stall_duration_s: float = 0.0,
        stall_random: bool = False,
        loss_stall_prob: float = 0.0,
        loss_stall_s: float = 0.2,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        max_buffer_bytes: int = 1 << 20,
    ) -> None:
        if rate_bps is not None and rate_bps <= 0:
            raise ValueError(f"rate_bps must be positive or None, not {rate_bps}")
        if latency_s < 0 or stall_duration_s < 0 or loss_stall_s < 0:
            raise ValueError("latency and stall durations must be >= 0")
        if not 0.0 <= loss_stall_prob <= 1.0:
            raise ValueError(f"loss_stall_prob must be within [0, 1], not {loss_stall_prob}")
        if burst_bytes is not None and burst_bytes <= 0:
            raise ValueError(f"burst_bytes must be positive or None, not {burst_bytes}")
        if stall_every_s is not None and stall_every_s <= 0:
            raise ValueError("stall_every_s must be positive or None")
        self.target_host = target_host
        self.target_port = target_port
        self.rate_bps = rate_bps
        self.latency_s = latency_s
        self.burst_bytes = burst_bytes
        self.stall_every_s = stall_every_s
        self.stall_duration_s = stall_duration_s
        self.stall_random = stall_random
        self.loss_stall_prob = loss_stall_prob
        self.loss_stall_s = loss_stall_s
        self.seed = seed
        self.host = host
        self.port = port
        self.max_buffer_bytes = max_buffer_bytes

        self._server: asyncio.Server | None = None
        self._t0 = 0.0
        self._buckets: dict[str, TokenBucket | None] = {"up": None, "down": None}
        self._windows: Iterator[tuple[float, float]] | None = None
        self._window: tuple[float, float] | None = None
        self._up = True
        self._blackhole = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._conns: set[_Conn] = set()
        self._numbers = itertools.count(1)
        self._bytes = {"up": 0, "down": 0}
        self._connections = 0
        self._refused = 0
        self._resets = 0
        self._connect_failures = 0
        self._loss_stalls = 0

    # -- lifecycle ---------------------------------------------------------- #

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("link emulator already started")
        loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        self.set_rate(self.rate_bps)
        if self.stall_every_s is not None and self.stall_duration_s > 0:
            self._windows = stall_windows(
                self.seed, self.stall_every_s, self.stall_duration_s, self.stall_random
            )
            self._window = next(self._windows)
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        log.info(
            "link emulator %s:%d -> %s:%d", self.host, self.port, self.target_host, self.target_port
        )

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = [c.task for c in self._conns]
        for conn in list(self._conns):
            conn.reset()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- control ------------------------------------------------------------ #

    @property
    def is_up(self) -> bool:
        return self._up

    def set_up(self, up: bool, *, blackhole: bool = False) -> None:
        """Bring the link up or down (see module doc for the two kinds of down)."""
        self._up = up
        self._blackhole = not up and blackhole
        if up:
            self._flowing.set()
            return
        self._flowing.clear()
        if not blackhole:
            self.reset_all()

    def reset_all(self) -> int:
        """Reset every current connection (RST to both ends); returns how many."""
        conns = list(self._conns)
        for conn in conns:
            conn.reset()
        self._resets += len(conns)
        return len(conns)

    def set_rate(self, rate_bps: int | None) -> None:
        """Change the per-direction rate ceiling (None = unlimited)."""
        if rate_bps is not None and rate_bps <= 0:
            raise ValueError(f"rate_bps must be positive or None, not {rate_bps}")
        self.rate_bps = rate_bps
        now = asyncio.get_running_loop().time()
        for direction in ("up", "down"):
            if rate_bps is None:
                self._buckets[direction] = None
            else:
                rate = rate_bps / 8
                burst = self.burst_bytes or max(1460, int(rate / 50))
                self._buckets[direction] = TokenBucket(rate, burst, now)

    def set_latency(self, latency_s: float) -> None:
        """Change the one-way latency for chunks put on the link from now on."""
        if latency_s < 0:
            raise ValueError("latency must be >= 0")
        self.latency_s = latency_s

    @property
    def stats(self) -> LinkStats:
        return LinkStats(
            up_bytes=self._bytes["up"],
            down_bytes=self._bytes["down"],
            connections=self._connections,
            refused=self._refused,
            resets=self._resets,
            connect_failures=self._connect_failures,
            loss_stalls=self._loss_stalls,
        )

    # -- forwarding --------------------------------------------------------- #

    def _stall_end(self, now: float) -> float | None:
        """Loop time at which the current stall ends, or None if not stalled."""
        if self._windows is None or self._window is None:
            return None
        rel = now - self._t0
        while self._window[1] <= rel:
            self._window = next(self._windows)
        start, end = self._window
        return self._t0 + end if start <= rel else None

    async def _link_available(self) -> None:
        """Return when the link is neither stalled nor down."""
        loop = asyncio.get_running_loop()
        while True:
            end = self._stall_end(loop.time())
            if end is not None:
                await asyncio.sleep(end - loop.time())
            elif not self._flowing.is_set():
                await self._flowing.wait()
            else:
                return

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if not self._up and not self._blackhole:
            self._refused += 1
            _rst(writer)
            return
        conn = _Conn(next(self._numbers), writer, task)
        self._conns.add(conn)
        clean = False
        try:
            await self._flowing.wait()  # blackhole: hold the connection
            try:
                t_reader, conn.target = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError as exc:
                self._connect_failures += 1
                log.info("link emulator: target refused connection %d: %s", conn.number, exc)
                return
            self._connections += 1
            up, down = _DelayLine(self.max_buffer_bytes), _DelayLine(self.max_buffer_bytes)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._onto_link(conn, "up", reader, up))
                    tg.create_task(self._off_link("up", up, conn.target))
                    tg.create_task(self._onto_link(conn, "down", t_reader, down))
                    tg.create_task(self._off_link("down", down, writer))
                clean = True  # both directions reached EOF and were flushed
            except* OSError as group:
                log.debug("link emulator: connection %d ended: %s", conn.number, group.exceptions)
        except asyncio.CancelledError:
            # reset or stop: end normally, since asyncio.start_server reports a
            # handler task that ends cancelled as an error (Python 3.11)
            pass
        finally:
            self._conns.discard(conn)
            for end in (conn.client, conn.target):
                if end is None:
                    continue
                if clean:
                    end.close()
                else:
                    _rst(end)  # an error or reset on one side is passed on to the other

    async def _onto_link(
        self, conn: _Conn, direction: str, src: asyncio.StreamReader, line: _DelayLine
    ) -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(f"{self.seed}/{conn.number}/{direction}")
        while data := await src.read(_READ_SIZE):
            bucket = self._buckets[direction]
            step = bucket.burst if bucket is not None else len(data)
            for i in range(0, len(data), step):
                piece = data[i : i + step]
                await self._link_available()
                if self.loss_stall_prob and rng.random() < self.loss_stall_prob:
                    self._loss_stalls += 1
                    await asyncio.sleep(self.loss_stall_s)
                bucket = self._buckets[direction]
                if bucket is not None:
                    wait = bucket.reserve(len(piece), loop.time())
                    if wait > 0:
                        await asyncio.sleep(wait)
                await line.put(loop.time() + self.latency_s, piece)
        await line.close()

    async def _off_link(self, direction: str, line: _DelayLine, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while (item := await line.get()) is not None:
            deliver_at, chunk = item
            delay = deliver_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._flowing.wait()
            dst.write(chunk)
            self._bytes[direction] += len(chunk)
            await dst.drain()
        if dst.can_write_eof() and not dst.transport.is_closing():
            dst.write_eof()


# --------------------------------------------------------------------------- #
# Command line: python -m testbed.linkemu --target HOST:PORT ...
# --------------------------------------------------------------------------- #


def _parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT")
    return host, int(port)


async def _run(args: argparse.Namespace) -> None:
    host, port = args.target
    link = LinkEmulator(
        host,
        port,
        rate_bps=args.rate_bps,
        latency_s=args.latency,
        stall_every_s=args.stall_every,
        stall_duration_s=args.stall_duration,
        stall_random=args.stall_random,
        loss_stall_prob=args.loss_stall_prob,
        loss_stall_s=args.loss_stall,
        seed=args.seed,
        host=args.host,
        port=args.port,
    )
    await link.start()
    print(f"link emulator listening on {link.host}:{link.port} -> {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await link.stop()
        print(f"link emulator: {link.stats}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.linkemu",
        description="TCP proxy imposing rate, latency and stalls (a poor uplink).",
    )
    parser.add_argument("--target", type=_parse_target, required=True, metavar="HOST:PORT")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0 = any free port)")
    parser.add_argument("--rate-bps", type=int, default=None, help="bits/s per direction")
    parser.add_argument("--latency", type=float, default=0.0, help="one-way latency, s")
    parser.add_argument("--stall-every", type=float, default=None, help="s between stalls")
    parser.add_argument("--stall-duration", type=float, default=0.0, help="stall length, s")
    parser.add_argument("--stall-random", action="store_true", help="exponential gaps")
    parser.add_argument("--loss-stall-prob", type=float, default=0.0)
    parser.add_argument("--loss-stall", type=float, default=0.2, help="loss stall length, s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        asyncio.run(_run(args))
    except (OSError, ValueError) as exc:
        print(f"linkemu: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
