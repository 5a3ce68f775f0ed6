"""HTTP serving shared by the cloud's /health and the local OpenAI-compatible API.

Both run on waitress, a production WSGI server, never werkzeug's development
server: waitress answers from a fixed pool of worker threads, caps the
connections it holds (further ones wait in the kernel's listen backlog and cost
this process no descriptor), closes connections idle or stalled for longer than
`idle_timeout`, and sends no `Server:` banner here.  Refusals that a stranger
can cause are logged through `RateLimitedLog`, one summary line per interval,
so nobody can flood the log.

On top of waitress (`_GuardedServer`): at the connection cap, while others wait
in the backlog, the longest-idle connection without a request in work is closed
to make room, so idle connections cannot lock everyone out until they time out;
a request still arriving `idle_timeout` after its first byte (a client that
dribbles a byte now and then to look busy) is closed too; and the loop uses
poll(), since select() fails outright on a descriptor numbered above 1023, which
a process holding many WebSocket connections soon hands out.
"""

from __future__ import annotations

import logging
import resource
import select
import threading
import time
from collections import Counter
from dataclasses import dataclass

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP port may cost this process."""

    threads: int = 8  # requests in work at once; more wait, queued, on their connections
    connection_limit: int = 64  # connections held at once; the rest wait in the listen backlog
    # Seconds a connection may sit idle, or take to send one request (headers and body, however busy it
    # keeps the line), before it is closed.  Checked every `cleanup_interval` seconds, so a connection is
    # closed within idle_timeout + cleanup_interval (+ 1 s, the loop's wake-up).
    idle_timeout: int = 20
    cleanup_interval: int = 5
    max_body_bytes: int = 1 << 20  # a request body larger than this is refused (413) before it is read


def create_http_server(app, host: str, port: int, limits: HttpLimits = HttpLimits()):
    """A waitress server for `app` on host:port (not yet running: call `.run()`, stop with `.close()`)."""
    adj = Adjustments(
        host=host,
        port=port,
        threads=limits.threads,
        connection_limit=limits.connection_limit,
        channel_timeout=limits.idle_timeout,
        cleanup_interval=limits.cleanup_interval,
        max_request_body_size=limits.max_body_bytes,
        # Reading ahead lets waitress notice a client that hung up while its request is being answered
        # (environ["waitress.client_disconnected"]), so a generation nobody waits for can stop.
        channel_request_lookahead=1,
        ident="",  # no Server: header for scanners
        clear_untrusted_proxy_headers=True,
        expose_tracebacks=False,
        log_socket_errors=False,
        asyncore_use_poll=True,  # select() raises ValueError on a descriptor above 1023 and the loop dies
    )
    _quiet_waitress_queue_warnings()
    # What waitress.create_server does for TCP listeners, with _GuardedServer in place of TcpWSGIServer.
    socket_map: dict = {}
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    servers = [_GuardedServer(app, socket_map, dispatcher=dispatcher, adj=adj, sockinfo=info) for info in adj.listen]
    if len(servers) == 1:
        return servers[0]
    listening = [(s.effective_host, s.effective_port) for s in servers]
    return MultiSocketServer(socket_map, adj, listening, dispatcher, servers[-1].log_info)


class _TimedChannel(HTTPChannel):
    """A waitress channel that remembers when the request it is receiving began to arrive."""

    request_started = 0.0  # time.time() of the first byte of the request in self.request

    def received(self, data: bytes) -> bool:
        if self.request is None:  # these bytes begin a new request
            self.request_started = time.time()
        return super().received(data)

    def receiving_since(self, cutoff: float) -> bool:
        """Whether a request has been arriving since before `cutoff` and is still not complete."""
        return self.request is not None and not self.requests and self.request_started < cutoff


class _GuardedServer(TcpWSGIServer):
    """TcpWSGIServer that makes room at its cap and closes requests that arrive too slowly (module doc)."""

    channel_class = _TimedChannel

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.overload = RateLimitedLog(log, "HTTP overload")

    def readable(self) -> bool:
        # BaseWSGIServer.readable without its log line on every crossing of the cap, which a stranger who
        # opens and closes one connection at the cap could repeat as fast as he likes.
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        if not self.accepting:
            return False
        if len(self._map) < self.adj.connection_limit:
            return True
        self._make_room()
        return False

    def _make_room(self) -> None:
        """At the cap, with a connection waiting to be accepted: close the longest-idle one without a request in work."""
        channels = list(self.active_channels.values())
        if any(c.will_close for c in channels) or not self._someone_waiting():
            return  # room is already being made, or nobody needs it
        idle = [c for c in channels if not c.requests]
        if idle:
            min(idle, key=lambda c: c.last_activity).will_close = True
            self.overload("connection limit reached: closed the longest-idle connection")
        else:
            self.overload("connection limit reached: every connection has a request in work, new ones wait")

    def _someone_waiting(self) -> bool:
        poller = select.poll()
        poller.register(self.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # idle connections
        cutoff = now - self.adj.channel_timeout
        for channel in list(self.active_channels.values()):
            if not channel.will_close and isinstance(channel, _TimedChannel) and channel.receiving_since(cutoff):
                channel.will_close = True
                self.overload(f"closed a request still arriving after {self.adj.channel_timeout} s")
        self.overload.flush()
        _QUEUE_LOG.flush()


def _quiet_waitress_queue_warnings() -> None:
    """Send waitress's 'Task queue depth is N' (one line per queued request) through a RateLimitedLog."""
    queue_log = logging.getLogger("waitress.queue")
    if not any(isinstance(f, _RateLimitFilter) for f in queue_log.filters):
        queue_log.addFilter(_RateLimitFilter(_QUEUE_LOG, "requests queued behind busy threads"))


class _RateLimitFilter(logging.Filter):
    """Counts a logger's records in a RateLimitedLog instead of letting each one through."""

    def __init__(self, limited: "RateLimitedLog", reason: str):
        super().__init__()
        self.limited, self.reason = limited, reason

    def filter(self, record: logging.LogRecord) -> bool:
        self.limited(self.reason)
        return False


class RateLimitedLog:
    """Counts events by reason and logs a bounded number of lines per `interval` seconds.

    The first event of each reason in an interval is logged at once, with its `detail` (say, the peer),
    so a single refusal is visible when it happens; the rest are counted, and one summary line reports
    them once the interval has passed (at the next event or `flush()`, which a housekeeping loop calls).
    Reasons must come from a small fixed set (the detail varies, never the reason): a line per interval
    per reason plus one summary is then the most anyone can make this write.
    """

    MAX_REASONS_SHOWN = 6  # in a summary line; the rest are counted in its total

    def __init__(self, logger: logging.Logger, what: str, interval: float = 10.0, level: int = logging.WARNING):
        self.logger, self.what, self.interval, self.level = logger, what, interval, level
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._counting_since = 0.0  # when the first of the events now counted happened
        self._logged: dict[str, float] = {}  # reason -> when an event of it was last logged at once

    def __call__(self, reason: str, now: float | None = None, *, detail: str = "") -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            at_once = now - self._logged.get(reason, float("-inf")) >= self.interval
            if at_once:
                self._logged[reason] = now
            else:
                if not self._counts:
                    self._counting_since = now
                self._counts[reason] += 1
            summary = self._take_summary(now)
        if summary:
            self.logger.log(self.level, "%s", summary)
        if at_once:
            self.logger.log(self.level, "%s: %s%s", self.what, reason, f" {detail}" if detail else "")

    def flush(self, now: float | None = None) -> None:
        """Log the summary of the counted events if the interval since the last one has passed."""
        with self._lock:
            summary = self._take_summary(time.monotonic() if now is None else now)
        if summary:
            self.logger.log(self.level, "%s", summary)

    def _take_summary(self, now: float) -> str | None:
        # An interval after the first counted event: so one summary per interval at most, each covering
        # at least an interval's worth of events.
        if not self._counts or now - self._counting_since < self.interval:
            return None
        counts, self._counts = self._counts, Counter()
        shown = ", ".join(f"{n} x {reason}" for reason, n in counts.most_common(self.MAX_REASONS_SHOWN))
        return f"{self.what}: {sum(counts.values())} more in the last {now - self._counting_since:.0f} s ({shown})"


_QUEUE_LOG = RateLimitedLog(log, "HTTP overload")  # one for the process: waitress's queue logger is global


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (many connections need many descriptors).

    Returns the (soft, hard) limits in force afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # a hard limit of RLIM_INFINITY, or a sandbox that forbids it
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft, hard
