"""Link-aware pacing of the uplink (pure: times are arguments, no I/O).

Three controls keep a backlog draining near the link's capacity without
flooding the broker or starving live events:

* **Batch size follows the link.** The delivery rate is estimated from
  headend acks (bytes acknowledged ÷ time since the previous ack or since
  the send, whichever is later — so back-to-back batches measure the
  bottleneck, as in BBR), kept as the maximum of the last few samples. A
  batch is sized to take about ``target_airtime_s`` on the link, between
  ``min_batch_bytes`` and the configured maximum (``uplink.batch_max_bytes``).
  Big enough that compression and per-message overhead are amortised, small
  enough that a retransmission or an event behind it waits seconds, not
  minutes.
* **In-flight window, AIMD on ack latency.** At most ``window()`` batches
  await their ack, and backlog is not sent while more than two batches plus
  a round trip's worth of bytes are in flight (beyond that, bytes only queue
  in the link's buffers and delay events). Each ack whose latency is within what the link explains
  (base round trip + the bytes queued ahead of it at the measured rate, with
  slack) adds 1/window; a slower ack (the broker or headend is queueing)
  multiplies the window by 0.7, and an ack timeout halves it — at most once
  per round trip. Limits: 1 … ``max_window``.
* **Byte-rate ceiling** (``uplink.max_bytes_per_s``): a token bucket that
  backlog batches wait for. Events never wait for the bucket or the window
  (they go at once and the bucket goes into debt), so a relay event is never
  queued behind a week of backlog: at most behind the batches already on
  the wire.

Retransmission deadlines also come from here: ``ack_timeout_s`` plus the time
the link needs for everything queued ahead of the batch, doubled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float | None  # bytes per second; None = unlimited
    burst: float
    tokens: float = 0.0
    stamp: float = 0.0

    def _refill(self, now: float) -> None:
        if self.rate is None:
            return
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_s(self, now: float) -> float:
        """Seconds until a send may start (0: now)."""
        if self.rate is None:
            return 0.0
        self._refill(now)
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def take(self, n: int, now: float) -> None:
        if self.rate is None:
            return
        self._refill(now)
        self.tokens -= n


@dataclass
class LinkPacer:
    batch_max_bytes: int
    max_window: int = 4
    max_bytes_per_s: float | None = None
    min_batch_bytes: int = 2048
    initial_batch_bytes: int = 16 * 1024
    target_airtime_s: float = 4.0
    ack_timeout_s: float = 20.0
    cwnd: float = 2.0
    rate: float | None = None  # estimated delivery rate, bytes/s
    base_rtt: float | None = None  # smallest ack latency seen for a small batch
    _samples: deque[float] = field(default_factory=lambda: deque(maxlen=8))
    _last_ack: float | None = None
    _last_cut: float = -1e9
    bucket: TokenBucket = field(init=False)

    def __post_init__(self) -> None:
        self.cwnd = min(self.cwnd, float(self.max_window))
        burst = max(float(self.batch_max_bytes), (self.max_bytes_per_s or 0) * 2)
        self.bucket = TokenBucket(self.max_bytes_per_s, burst, burst)

    # -- decisions -----------------------------------------------------------

    def window(self) -> int:
        return max(1, int(self.cwnd))

    def effective_rate(self) -> float | None:
        rates = [r for r in (self.rate, self.max_bytes_per_s) if r]
        return min(rates) if rates else None

    def batch_bytes(self) -> int:
        rate = self.effective_rate()
        if rate is None:
            want = self.initial_batch_bytes
        else:
            want = int(rate * self.target_airtime_s)
        return max(min(self.min_batch_bytes, self.batch_max_bytes), min(want, self.batch_max_bytes))

    def ack_deadline_s(self, queued_bytes: int) -> float:
        """How long to wait for an ack of a batch with ``queued_bytes`` ahead of
        and including it, before sending it again."""
        rate = self.effective_rate()
        transfer = queued_bytes / rate if rate else queued_bytes / 2000.0
        return self.ack_timeout_s + 2 * transfer

    def inflight_cap(self) -> int | None:
        """Bytes of backlog worth having in flight: two batches plus what one
        round trip holds. More only queues in the link's buffers, where a live
        event would wait behind it. None until the rate is known."""
        rate = self.effective_rate()
        if rate is None:
            return None
        return 2 * self.batch_bytes() + int(rate * (self.base_rtt or 0.0))

    def may_send_backlog(self, inflight: int, inflight_bytes: int, now: float) -> bool:
        cap = self.inflight_cap()
        return (
            inflight < self.window()
            and self.bucket.wait_s(now) == 0.0
            and (cap is None or inflight_bytes < cap)
        )

    def send_wait_s(self, now: float, *, urgent: bool) -> float:
        return 0.0 if urgent else self.bucket.wait_s(now)

    # -- feedback ------------------------------------------------------------

    def on_send(self, nbytes: int, now: float) -> None:
        self.bucket.take(nbytes, now)

    def on_ack(self, nbytes: int, sent_at: float, queued_bytes: int, now: float) -> None:
        """An ack for a batch of ``nbytes`` sent at ``sent_at`` with
        ``queued_bytes`` (incl. itself) in flight when it was sent."""
        latency = max(now - sent_at, 1e-3)
        start = sent_at if self._last_ack is None else max(sent_at, self._last_ack)
        self._last_ack = now
        if now - start > 1e-3 and nbytes >= 512:
            self._samples.append(nbytes / (now - start))
            self.rate = max(self._samples)
        rate = self.effective_rate()
        # The round trip without the transfer: what the latency leaves once the
        # bytes queued ahead (and the batch itself) have crossed the link.
        base = max(1e-3, latency - queued_bytes / rate) if rate else latency
        self.base_rtt = base if self.base_rtt is None else min(self.base_rtt, base)
        explained = (self.base_rtt or 0.0) + (queued_bytes / rate if rate else 0.0)
        if latency <= 1.5 * explained + 0.5:
            self.cwnd = min(float(self.max_window), self.cwnd + 1.0 / self.cwnd)
        elif now - self._last_cut > latency:
            self.cwnd = max(1.0, self.cwnd * 0.7)
            self._last_cut = now

    def on_timeout(self, now: float) -> None:
        if now - self._last_cut > max(self.base_rtt or 0.0, 1.0):
            self.cwnd = max(1.0, self.cwnd / 2)
            self._last_cut = now
