"""When to schedule the next step: late enough to take requests that arrive meanwhile.

With the overlap schedule, step N+1 is chosen while step N runs. Chosen as soon as
step N starts, it cannot take a request that arrives during step N: that request
waits for N, then N+1, before its own step (a whole extra step of TTFT). The
clock learns how long each step shape runs on the device, and the server's engine
thread waits until step N is almost done (less the host's own time to schedule
and launch) before choosing step N+1: as late as it can without idling the device.

The estimate is the shortest recent duration, so a slow outlier never makes the
host wait too long. A step the host found already done counts with the time it
had run by then: more than it took, but less than the wait that made the host
late, so a too-long estimate shrinks with every step until the host is on time.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

RECENT = 8  # durations kept per step shape
# Also wake this share of the estimate early: the server's event loop shares the GIL, so
# the wake-up can be late (a (d)-like load: 0.05 gave a median TTFT of 200 ms, 0.25 300).
SLACK = 0.05


@dataclass
class Dispatched:
    shape: tuple
    launched_at: float
    started_at: float | None  # None while the step before it still runs


@dataclass
class StepClock:
    durations: dict = field(default_factory=lambda: defaultdict(lambda: deque(maxlen=RECENT)))
    host_time: float = 0.002  # s, smoothed: from starting to prepare a step to its launch
    queue: deque = field(default_factory=deque)  # dispatched steps not landed yet, oldest first
    seen: set = field(default_factory=set)

    def launched(self, shape: tuple, prepare_started: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.host_time = 0.8 * self.host_time + 0.2 * (now - prepare_started)
        self.queue.append(Dispatched(shape, now, None if self.queue else now))

    def landed(self, now: float | None = None) -> None:
        """The oldest dispatched step is done (the host has its outputs)."""
        now = time.monotonic() if now is None else now
        step = self.queue.popleft()
        if step.started_at is not None:
            if step.shape in self.seen:
                self.durations[step.shape].append(now - step.started_at)
            self.seen.add(step.shape)  # a shape's first run after warmup is cold: not counted
        if self.queue and self.queue[0].started_at is None:
            # It was queued behind the one that just ended (if that one ended before it
            # was even launched, ``now`` is a fetch of finished outputs late: a few µs).
            self.queue[0].started_at = max(self.queue[0].launched_at, now)

    def launch_delay(self, now: float | None = None) -> float:
        """Seconds to wait before choosing the next step (0: now)."""
        if len(self.queue) != 1 or self.queue[0].started_at is None:
            return 0.0
        recent = self.durations.get(self.queue[0].shape)
        if not recent:
            return 0.0
        now = time.monotonic() if now is None else now
        estimate = min(recent)
        margin = 2 * self.host_time + 0.001 + SLACK * estimate
        return max(0.0, self.queue[0].started_at + estimate - margin - now)
