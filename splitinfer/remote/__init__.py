"""The local side's view of the cloud: the wire (transport.py) and a session that survives losses (recovery.py).

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
    "RemoteSpan",
    "WireTiming",
    "check_identity",
    "cloud_session",
    "to_wire",
    "ws_url",
]
