"""The emulated network path as plain arithmetic: no sockets, no event loop.

`Link` says what the path does (delay, jitter, bandwidth cap). `LinkClock` turns
"a chunk of n bytes was read at time t, going this way" into the time it reaches
the other side: serialised behind whatever the capped link is still sending in
that direction, then one-way delay plus a jitter draw later. `in_order` keeps a
connection's chunks from overtaking each other. The proxy (proxy.py) only
schedules deliveries at the times computed here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# A direction index into per-direction state: UP is client -> server (near -> far).
UP, DOWN = 0, 1

# Without a bandwidth cap a pipe stops reading its source once this much is queued and not
# yet delivered, and resumes below LOW_WATER. This only bounds memory.
HIGH_WATER = 16 * 1024 * 1024
LOW_WATER = 4 * 1024 * 1024

# With a cap, a pipe holds what is in flight plus at most this much waiting to be sent, like
# a router buffer: a bulk sender then backs up into its own socket instead of queueing
# seconds of data in front of everyone else's small messages.
CAPPED_QUEUE_S = 0.1

# With a bandwidth cap, big reads are scheduled in slices so that the far side sees bytes
# trickle in at the capped rate instead of in one burst per 256 KiB read.
CAPPED_SLICE = 16 * 1024


@dataclass(frozen=True)
class Link:
    """What the emulated network path does to every chunk."""

    # Round-trip time; each direction adds half of it, so a request/response costs this much.
    rtt_ms: float = 0.0
    # Extra per-chunk delay drawn uniformly from [0, jitter_ms], per direction. Non-negative
    # so rtt_ms stays the floor; it never reorders (a chunk waits for the one before it).
    jitter_ms: float = 0.0
    # Bandwidth cap in megabits/s per direction, shared by all connections; None = unlimited.
    mbit: float | None = None
    # Seed for the jitter draws, for reproducible runs; None = a fresh random seed.
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.rtt_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"rtt_ms and jitter_ms must be >= 0, got {self.rtt_ms} and {self.jitter_ms}")
        if self.mbit is not None and self.mbit <= 0:
            raise ValueError(f"mbit must be > 0 (or None for unlimited), got {self.mbit}")

    @property
    def one_way_s(self) -> float:
        return self.rtt_ms / 2000.0

    def serialisation_s(self, nbytes: int) -> float:
        """How long `nbytes` occupy the link at the cap (0 when unlimited)."""
        return 0.0 if self.mbit is None else nbytes * 8 / (self.mbit * 1e6)

    def slice_size(self, nbytes: int) -> int:
        """How many bytes of a read to schedule as one chunk: all of it, or CAPPED_SLICE under a cap."""
        return CAPPED_SLICE if self.mbit is not None else max(nbytes, 1)

    def water_marks(self) -> tuple[int, int]:
        """(pause reading above, resume at or below) for the bytes one pipe holds undelivered."""
        if self.mbit is None:
            return HIGH_WATER, LOW_WATER
        bytes_per_s = self.mbit * 1e6 / 8
        in_flight_s = self.one_way_s + self.jitter_ms / 1000
        return (max(CAPPED_SLICE, int(bytes_per_s * (in_flight_s + CAPPED_QUEUE_S))),
                int(bytes_per_s * (in_flight_s + CAPPED_QUEUE_S / 2)))

    def describe(self) -> str:
        bandwidth = "unlimited bandwidth" if self.mbit is None else f"{self.mbit:g} Mbit/s"
        return f"rtt {self.rtt_ms:g} ms, jitter {self.jitter_ms:g} ms, {bandwidth}"


class LinkClock:
    """Arrival times on one emulated link, shared by every connection that crosses it.

    State: the jitter generator and, per direction, when the capped link finishes sending
    what it already has (chunks from all connections queue behind each other there).
    """

    def __init__(self, link: Link) -> None:
        self.link = link
        self._rng = random.Random(link.seed)
        self._free_at = [0.0, 0.0]  # per direction, in the caller's clock (seconds)

    def set_link(self, link: Link) -> None:
        """Use `link` for chunks read from now on; restarts the jitter draws from its seed."""
        self.link = link
        self._rng = random.Random(link.seed)

    def arrival_time(self, direction: int, nbytes: int, now: float) -> float:
        """When a chunk of `nbytes` read at `now` reaches the other side (before `in_order`)."""
        link = self.link
        sent_at = now
        if link.mbit is not None:
            # Serialised after whatever the link is still sending in this direction.
            sent_at = max(now, self._free_at[direction]) + link.serialisation_s(nbytes)
            self._free_at[direction] = sent_at
        jitter_s = self._rng.uniform(0.0, link.jitter_ms) / 1000.0 if link.jitter_ms else 0.0
        return sent_at + link.one_way_s + jitter_s


def in_order(previous_at: float, at: float) -> float:
    """A chunk never arrives before the one read before it on the same connection and direction."""
    return max(previous_at, at)
