"""A user-space WAN emulator: TCP port forwarding (like `ssh -L`) with added latency.

The split-inference experiments need to know how the local/cloud split behaves when the
cloud is tens of milliseconds away, but on a test machine both halves run on loopback and
this kernel has no `tc netem`. So we put a small proxy between them:

    client --> 127.0.0.1:6000 [WanEmulator] --> 127.0.0.1:5000 server

Every chunk read from one side is delivered to the other side one-way delay (rtt_ms / 2)
later, independently in each direction, never reordered. Optional jitter adds a random
non-negative extra delay per chunk; an optional bandwidth cap adds serialisation delay,
with chunks serialised one after another on a link shared by all connections. Zero delay
is a near-pure passthrough.

    link.py     the link model as arithmetic: Link, arrival times, ordering, bandwidth
    forward.py  Forward: which port goes where (ssh -L syntax)
    proxy.py    WanEmulator: the asyncio proxy that delivers chunks at those times
    cli.py      `python -m splitinfer wan` (add_subparser) and `python -m splitinfer.wan`

From the command line:

    python -m splitinfer wan --rtt-ms 80 -L 6000:127.0.0.1:5000 -L 6001:127.0.0.1:5001

or as a library, with the event loop in a background thread:

    with WanEmulator(Link(rtt_ms=80), [Forward(6000, "127.0.0.1", 5000)]).running() as wan:
        ...                          # talk to 127.0.0.1:6000
        wan.set_link(Link(rtt_ms=20))  # sweep the RTT without restarting
        wan.cut()                    # drop every live connection (fault tests)

or inside your own event loop with `await wan.start()` / `await wan.stop()`.
"""

from .cli import add_subparser, main
from .forward import Forward
from .link import DOWN, UP, Link, LinkClock
from .proxy import Observer, WanEmulator

__all__ = ["DOWN", "UP", "Forward", "Link", "LinkClock", "Observer", "WanEmulator", "add_subparser", "main"]
