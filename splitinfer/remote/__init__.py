"""The local side's view of the cloud: the wire (transport.py), a session that survives losses (recovery.py),
and the cloud's span run in this process instead (inprocess.py).

Nothing here knows about tokens.  The names other modules use are re-exported here.
"""

from ..config import RECONNECT_TIMEOUT_S
from .recovery import RETRY_WHILE_RECONNECTING, SESSION_LOST, RemoteSpan, cloud_session
from .transport import CloudConnection, CloudError, WireTiming, check_identity, to_wire, ws_url

__all__ = [
    "RECONNECT_TIMEOUT_S",
    "RETRY_WHILE_RECONNECTING",
    "SESSION_LOST",
    "CloudConnection",
    "CloudError",
    "InProcessSpan",
    "RemoteSpan",
    "WireTiming",
    "check_identity",
    "cloud_session",
    "to_wire",
    "ws_url",
]


def __getattr__(name: str):
    """`InProcessSpan` on first use: it needs transformers (through hf.py), which the wire alone does not."""
    if name == "InProcessSpan":
        from .inprocess import InProcessSpan

        return InProcessSpan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
