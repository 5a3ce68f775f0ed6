"""Which ports to forward where: `Forward`, parsed from ssh -L syntax."""

from __future__ import annotations

import re
from dataclasses import dataclass

# [LISTEN_HOST:]LISTEN_PORT:HOST:PORT, where a host may be an [IPv6] literal in brackets.
_HOST = r"\[[^\]]*\]|[^:\[\]]*"
_FORWARD_RE = re.compile(rf"(?:(?P<lhost>{_HOST}):)?(?P<lport>\d+):(?P<host>{_HOST}):(?P<port>\d+)")


@dataclass(frozen=True)
class Forward:
    """One forwarded port: connections to listen_host:listen_port go to target_host:target_port."""

    # Port 0 picks a free port; read the real one from WanEmulator.addresses after start.
    listen_port: int
    target_host: str
    target_port: int
    # Loopback by default, like ssh -L, so an emulator never exposes a server by accident.
    listen_host: str = "127.0.0.1"

    @classmethod
    def parse(cls, spec: str) -> Forward:
        """Parse ssh -L syntax: "6000:127.0.0.1:5000" or "LISTEN_HOST:6000:127.0.0.1:5000"."""
        m = _FORWARD_RE.fullmatch(spec.strip())
        if m is None:
            raise ValueError(f"bad forward {spec!r}: expected [LISTEN_HOST:]LISTEN_PORT:HOST:PORT, "
                             "e.g. 6000:127.0.0.1:5000")
        listen_port, target_port = int(m["lport"]), int(m["port"])
        target_host = m["host"].strip("[]")
        if not target_host:
            raise ValueError(f"bad forward {spec!r}: empty target host")
        if not 0 <= listen_port <= 65535 or not 1 <= target_port <= 65535:
            raise ValueError(f"bad forward {spec!r}: ports must be 0-65535 (target 1-65535)")
        listen_host = m["lhost"]
        if listen_host is None:
            listen_host = "127.0.0.1"
        elif listen_host.strip("[]") in ("", "*"):
            listen_host = "0.0.0.0"  # ssh: an empty address or "*" means every interface
        return cls(listen_port, target_host, target_port, listen_host.strip("[]"))

    def __str__(self) -> str:
        return f"{self.listen_host}:{self.listen_port} -> {self.target_host}:{self.target_port}"
