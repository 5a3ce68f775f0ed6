"""/health: this server's split and the cloud behind it, checked against each other.

The cloud is asked over HTTP (its /health) when its HTTP address is known, else by a
WebSocket handshake; any disagreement (layers, protocol version, identity) or an
unreachable cloud makes the answer "degraded" (503) with the problems named.
"""

from __future__ import annotations

import re
from typing import Any

import requests

from .. import protocol
from ..identity import Identity
from ..local import LocalSide
from ..remote import CloudConnection, CloudError


class Health:
    """What /health reports; `report` asks the cloud each time (bounded by `timeout`)."""

    def __init__(
        self,
        local: LocalSide,
        model_name: str,
        cloud_ws_url: str,
        cloud_http_url: str | None,
        token: str | None,
        timeout: float,
    ):
        self.local, self.model_name, self.token, self.timeout = local, model_name, token, timeout
        self.cloud_ws_url, self.cloud_http_url = cloud_ws_url, cloud_http_url
        self._http = requests.Session()
        self._http.trust_env = False  # the tunnel is the route to the cloud; never a proxy from the environment

    def report(self, mode: str, modes: list[str], counts: dict[str, int]) -> tuple[dict[str, Any], int]:
        """The /health body and its HTTP status: 200, or 503 with "problems" when degraded."""
        split = self.local.split
        body: dict[str, Any] = {
            "status": "ok",
            "model": self.model_name,
            "model_dir": str(self.local.model_dir),
            "mode": mode,
            "modes": modes,
            "split": {
                "local_head": list(split.head_layers),
                "cloud": list(split.cloud_layers),
                "local_tail": list(split.tail_layers),
            },
            "cloud": self._cloud_health(),
            "requests": dict(counts),
            # What lookahead drafts with and whether what it learns outlives the process (no paths: this
            # endpoint answers without an API key).
            "drafter": self.local.drafter_path.name if self.local.drafter_path else None,
            "memory": {"kept": self.local.memory_file is not None, "recycling_entries": len(self.local.memory.recycle)},
        }
        cloud = body["cloud"]
        problems = []
        if not cloud["reachable"]:
            problems.append(f"cloud unreachable: {cloud.get('error', '')}")
        else:
            if "layers" in cloud and cloud["layers"] != body["split"]["cloud"]:
                problems.append(f"the cloud holds layers {cloud['layers']}, this split needs {body['split']['cloud']}")
            if "protocol_version" in cloud and cloud["protocol_version"] != protocol.VERSION:
                problems.append(f"the cloud speaks protocol {cloud['protocol_version']}, this side {protocol.VERSION}")
            problems += self._identity_problems(cloud.get("identity"))
        if problems:
            body["status"] = "degraded"
            body["problems"] = problems
        return body, 503 if problems else 200

    def _identity_problems(self, stated: Any) -> list[str]:
        """The identity the cloud's /health states against this side's, worded as a session's check words it."""
        if stated is None:
            return []  # an older cloud states none; the protocol version check speaks for it
        try:
            differences = Identity.from_json(stated).differences(self.local.identity)
        except ValueError as exc:
            return [f"the cloud states a malformed identity: {exc}"]
        return [f"the cloud computes something else: {'; '.join(differences)}"] if differences else []

    def _cloud_health(self) -> dict[str, Any]:
        info: dict[str, Any] = {"url": self.cloud_http_url, "ws_url": self.cloud_ws_url}
        if self.cloud_http_url is None:  # no HTTP address known: try the WebSocket handshake itself
            try:
                CloudConnection(self.cloud_ws_url, self.token, open_timeout=self.timeout).close()
                info["reachable"] = True
            except CloudError as exc:
                info.update(reachable=False, error=str(exc))
            return info
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            r = self._http.get(f"{self.cloud_http_url}/health", headers=headers, timeout=self.timeout)
            r.raise_for_status()
            remote = r.json()
        except requests.Timeout:
            error = f"{self.cloud_http_url}/health did not answer within {self.timeout:g} s"
            info.update(reachable=False, error=error)
            return info
        except (requests.RequestException, ValueError) as exc:
            m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
            info.update(reachable=False, error=f"{self.cloud_http_url}/health: {m.group(1).strip() if m else exc}")
            return info
        info["reachable"] = True
        keys = (
            "status", "model", "layers", "identity", "protocol_version", "device", "dtype", "sessions_open",
            "auth_required",
        )
        info.update({key: remote[key] for key in keys if key in remote})
        return info
