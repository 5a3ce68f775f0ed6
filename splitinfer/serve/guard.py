"""Who may use the local API: the Host and Origin a request names, and an optional API key.

The API runs generations and shows conversations, so a web page the user happens to
visit must not be able to drive it:

* `Host` must name this server: `localhost`, a loopback address, the address it is
  bound to, or a name given with --allowed-host.  When it is bound to every address
  (0.0.0.0 or ::) any IP address is accepted too: a client names the address it
  dialled, and an IP address cannot be re-pointed by DNS.  Anything else is a 421, which
  defeats DNS rebinding (a page on evil.example whose name is re-pointed at 127.0.0.1
  still sends `Host: evil.example`).  A request without `Host` (HTTP/1.0) passes: a
  browser always sends one.
* `Origin`, which a browser adds to every cross-origin request and every POST, must be
  absent (curl, the openai package, mac_client.py send none), one given with
  --allowed-origin, or this server itself: http or https, a host name from the first
  list above (never "any IP address") and the port it serves.  Anything else, `null`
  included, is a 403.  An allowed cross-origin page gets the CORS headers it needs.
* With --api-key-file, every request must carry `Authorization: Bearer <key>` (what
  OpenAI clients send); otherwise a 401.  A CORS preflight carries no key and needs none.

Refusals are OpenAI-shaped JSON errors; `app.py` logs them through a RateLimitedLog.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .api import Refused

WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})
DEFAULT_PORTS = {"http": 80, "https": 443}
SHOWN = 100  # characters of a refused header value quoted back to the client

# What a CORS preflight from an allowed origin may go on to send.
CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}


def host_name(host: str) -> str:
    """A host as compared here: lower case, no IPv6 brackets, no trailing dot ("LocalHost." -> "localhost")."""
    name = host.strip().lower().rstrip(".")
    return name[1:-1] if name.startswith("[") and name.endswith("]") else name


def ip_literal(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """Whether an address to bind reaches this machine only: `localhost` or a loopback IP."""
    name = host_name(host)
    ip = ip_literal(name)
    return name == "localhost" or (ip is not None and ip.is_loopback)


def split_host_header(value: str) -> tuple[str, int | None] | None:
    """`Host` as (name, port or None); None when it is malformed ("a:b:c", a port that is no number)."""
    value = value.strip()
    if value.startswith("["):  # [v6]:port
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, _, port_text = value.partition(":")
        if ":" in port_text:  # a bare IPv6 address is not a valid Host
            return None
        port_text = port_text if _ else None
    if port_text is not None and not (port_text.isascii() and port_text.isdigit() and int(port_text) < 65536):
        return None
    name = host_name(name)
    return (name, int(port_text) if port_text else None) if name else None


def origin(text: str) -> str | None:
    """An origin in its compared form, "scheme://host:port" (default port spelled out); None if it is not one."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or parts.query:
        return None
    name = host_name(parts.hostname)
    shown = f"[{name}]" if ":" in name else name
    return f"{scheme}://{shown}:{port or DEFAULT_PORTS[scheme]}"


@dataclass(frozen=True)
class AccessPolicy:
    """The Host names, Origins and API key this server accepts (see the module docstring).

    The defaults suit a server on loopback with no key; `port` None accepts no Origin of
    this server's own (only `allowed_origins`).
    """

    bind_host: str = "127.0.0.1"
    port: int | None = None
    allowed_hosts: frozenset[str] = frozenset()  # extra names, as given to --allowed-host
    allowed_origins: frozenset[str] = frozenset()  # as given to --allowed-origin
    api_key: str | None = None
    _names: frozenset[str] = field(init=False, repr=False)
    _origins: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = {"localhost", *(host_name(h) for h in self.allowed_hosts)}
        if not self.wildcard:
            names.add(host_name(self.bind_host))
        origins = set()
        for text in self.allowed_origins:
            if (normal := origin(text)) is None:
                raise ValueError(f"{text!r} is not an origin (scheme://host[:port])")
            origins.add(normal)
        object.__setattr__(self, "_names", frozenset(names))
        object.__setattr__(self, "_origins", frozenset(origins))

    @property
    def wildcard(self) -> bool:
        """Bound to every address: clients may name any of this machine's addresses."""
        return host_name(self.bind_host) in WILDCARDS or self.bind_host in WILDCARDS

    def own_name(self, name: str) -> bool:
        """A name that means this server to any browser: never one an attacker can point elsewhere."""
        ip = ip_literal(name)
        return name in self._names or (ip is not None and ip.is_loopback)

    def host_ok(self, header: str | None) -> bool:
        if header is None:
            return True
        parsed = split_host_header(header)
        if parsed is None:
            return False
        name = parsed[0]
        return self.own_name(name) or (self.wildcard and ip_literal(name) is not None)

    def origin_ok(self, header: str | None) -> bool:
        if header is None:
            return True
        normal = origin(header)  # "null" (a sandboxed frame, a file: page) is no origin: refused
        if normal is None:
            return False
        if normal in self._origins:
            return True
        parts = urlsplit(normal)
        return self.port is not None and parts.port == self.port and self.own_name(host_name(parts.hostname or ""))

    def key_ok(self, authorization: str | None) -> bool:
        if self.api_key is None:
            return True
        if authorization is None:
            return False
        # compare_digest: the time taken does not depend on where a guess first differs from the key.
        given = authorization.encode("utf-8", "surrogateescape")
        return hmac.compare_digest(given, f"Bearer {self.api_key}".encode())


def _shown(value: str) -> str:
    return value if len(value) <= SHOWN else value[:SHOWN] + "..."


def check(
    policy: AccessPolicy, host: str | None, origin_header: str | None, authorization: str | None, preflight: bool
) -> None:
    """Raise the Refused error that turns this request away; return when it may go on.

    `preflight`: a CORS preflight (OPTIONS), which browsers send without the API key.
    """
    if not policy.host_ok(host):
        raise Refused(
            f"This server does not answer to the host {_shown(host or '')!r}; start jacobi_server.py with "
            "--allowed-host NAME to serve a name other than localhost or its address.",
            "host_not_allowed",
            421,
            "unknown Host",
            detail=f", Host {_shown(host or '')!r}",
        )
    if not policy.origin_ok(origin_header):
        raise Refused(
            f"Requests from web pages at {_shown(origin_header or '')!r} are not allowed; start jacobi_server.py "
            "with --allowed-origin ORIGIN to allow one.",
            "origin_not_allowed",
            403,
            "foreign Origin",
            detail=f", Origin {_shown(origin_header or '')!r}",
        )
    if not preflight and not policy.key_ok(authorization):
        what = "no API key" if authorization is None else "a wrong API key"
        raise Refused(
            f"This server requires an API key and the request carried {what}: send 'Authorization: Bearer KEY' "
            "(the openai package's api_key) with the key in the server's --api-key-file.",
            "invalid_api_key",
            401,
            "missing or wrong API key",
        )
