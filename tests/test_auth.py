"""The shared secret on the WebSocket handshake, /health without it, and sessions bound to their connection.

A real cloud_server_kv.py process (tiny model) started with --auth-token-file:
no token or a wrong one is refused at the handshake with HTTP 401 (CloudError
code "auth") and logged; the right one works; a session id is useless on any
connection but the one that opened it.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import ssl
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from splitinfer import cli, protocol
from splitinfer.cloud.server import _token_ok, is_loopback
from splitinfer.commands import cloud as cloud_command
from splitinfer.procs import cloud_process
from splitinfer.remote import CloudConnection, CloudError, cloud_session, ws_url

from conftest import cloud_identity

TOKEN = secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def cloud(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("auth")
    token_file = d / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    log = d / "cloud.log"
    with cloud_process(tiny_llama, threads=1, extra=["--auth-token-file", str(token_file)], log_file=log) as (url, proc):
        yield SimpleNamespace(
            url=url, ws=ws_url(url), proc=proc, log=log, token_file=token_file, identity=cloud_identity(tiny_llama)
        )


def forward(span, q: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, q, 64, generator=g)
    out, _timing = span.forward(hidden, torch.ones(1, q, 16), torch.zeros(1, q, 16), None)
    return out


def handshake_status(url: str, authorization: str | None) -> int:
    headers = {"Authorization": authorization} if authorization is not None else None
    try:
        with connect(url, additional_headers=headers, proxy=None, open_timeout=10):
            return 101
    except InvalidStatus as exc:
        assert "WWW-Authenticate" in exc.response.headers
        return exc.response.status_code


@pytest.mark.slow
def test_no_token_is_refused_at_the_handshake(cloud):
    assert handshake_status(cloud.ws, None) == 401
    with pytest.raises(CloudError) as e:
        CloudConnection(cloud.ws)
    assert e.value.code == "auth" and "401" in str(e.value)
    with pytest.raises(CloudError) as e:
        with cloud_session(cloud.ws, expected=cloud.identity):
            pass
    assert e.value.code == "auth"


@pytest.mark.slow
@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer wrong",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"bearer {TOKEN}",
        f"Bearer  {TOKEN}",
        TOKEN,
        "Bearer ",
        f"Basic {TOKEN}",
    ],
)
def test_wrong_tokens_are_refused_at_the_handshake(cloud, authorization):
    assert handshake_status(cloud.ws, authorization) == 401


@pytest.mark.slow
def test_wrong_token_is_a_clear_cloud_error(cloud):
    with pytest.raises(CloudError) as e:
        with cloud_session(cloud.ws, "not-the-token", expected=cloud.identity):
            pass
    assert e.value.code == "auth" and "missing or wrong token" in str(e.value)


@pytest.mark.slow
def test_right_token_works(cloud):
    assert handshake_status(cloud.ws, f"Bearer {TOKEN}") == 101
    with cloud_session(cloud.ws, cli.read_token(cloud.token_file), expected=cloud.identity) as span:
        assert forward(span).shape == (1, 2, 64)
        assert forward(span, 1).shape == (1, 1, 64)


@pytest.mark.slow
def test_refusals_are_logged_and_the_token_never_is(cloud):
    handshake_status(cloud.ws, "Bearer wrong")
    log = cloud.log.read_text()
    assert "refused a WebSocket handshake" in log and "a wrong token (HTTP 401)" in log and "no token" in log
    assert TOKEN not in log and "wrong" not in log.replace("a wrong token", "")


@pytest.mark.slow
def test_another_connections_session_is_unknown(cloud):
    with cloud_session(cloud.ws, TOKEN, expected=cloud.identity) as mine:
        forward(mine)
        thief = CloudConnection(cloud.ws, TOKEN)  # authenticated, but not the session's connection
        try:
            stolen, unknown = [], []
            for header in (
                {"op": "forward"},
                {"op": "crop", "length": 0},
                {"op": "relocate", "start": 0, "indices": [1]},
                {"op": "close"},
            ):
                for sid, answers in ((mine.session, stolen), ("0" * 32, unknown)):
                    tensors = None
                    if header["op"] == "forward":
                        tensors = {"hidden": np.zeros((1, 1, 64), np.float16), "cos": np.ones((1, 1, 16), np.float16),
                                   "sin": np.zeros((1, 1, 16), np.float16)}
                    with pytest.raises(CloudError) as e:
                        thief.request({**header, "session": sid, "step": 99}, tensors)
                    answers.append((e.value.code, e.value.message))
            # Exactly the answers a made-up id gets: a session id cannot even be probed.
            assert stolen == unknown and {code for code, _ in stolen} == {"unknown_session"}
        finally:
            thief.close()
        assert forward(mine, 1).shape == (1, 1, 64)  # untouched by all that


@pytest.mark.slow
def test_health_hides_sessions_without_the_token(cloud):
    with cloud_session(cloud.ws, TOKEN, expected=cloud.identity):
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            body = requests.get(f"{cloud.url}/health", headers=headers, timeout=5).json()
            assert body["status"] == "ok" and body["auth_required"] is True
            assert "sessions_open" not in body and "names" not in body["held"]
        body = requests.get(f"{cloud.url}/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).json()
        assert body["sessions_open"] == 1 and body["held"]["names"]


def listening_addresses(pid: int) -> set[str]:
    """Local addresses of the process's listening IPv4 TCP sockets (hex, as /proc/net/tcp writes them)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            found.add(fields[1])
    return found


@pytest.mark.slow
def test_the_server_binds_loopback_unless_told(cloud):
    assert cloud_command.parse_args([]).host == "127.0.0.1"
    addresses = listening_addresses(cloud.proc.pid)
    port = int(cloud.url.rsplit(":", 1)[1])
    assert {f"0100007F:{port:04X}", f"0100007F:{port + 1:04X}"} <= addresses  # HTTP and WebSocket
    assert all(a.startswith("0100007F:") for a in addresses)


@pytest.mark.slow
def test_server_and_client_take_the_token_from_the_environment(tiny_llama, monkeypatch):
    monkeypatch.setenv(cli.TOKEN_ENV, "from-the-environment")
    with cloud_process(tiny_llama, threads=1) as (url, _):
        with pytest.raises(CloudError) as e:
            CloudConnection(ws_url(url))
        assert e.value.code == "auth"
        with cloud_session(ws_url(url), cli.read_token(None), expected=cloud_identity(tiny_llama)) as span:
            assert forward(span).shape == (1, 2, 64)


class TlsProxy:
    """TLS termination in front of the cloud's WebSocket port, like a reverse proxy would do it."""

    def __init__(self, cert: Path, key: Path, target_port: int):
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _pipe(self, reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _client(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def __enter__(self) -> int:
        self.thread.start()
        start = asyncio.start_server(self._client, "127.0.0.1", 0, ssl=self.ctx)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(10)
        return self.server.sockets[0].getsockname()[1]

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_the_client_speaks_wss_through_a_tls_proxy(cloud, tmp_path, monkeypatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    with TlsProxy(cert, key, int(cloud.ws.rsplit(":", 1)[1])) as port:
        url = f"wss://localhost:{port}/splitinfer"
        with pytest.raises(CloudError) as e:  # the certificate is checked: unknown issuer
            CloudConnection(url, TOKEN)
        assert e.value.code == "unreachable" and "CERTIFICATE_VERIFY_FAILED" in str(e.value)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # a private CA, as docs/security.md says
        with pytest.raises(CloudError) as e:
            CloudConnection(url, "wrong")
        assert e.value.code == "auth"
        with cloud_session(url, TOKEN, expected=cloud.identity) as span:
            assert forward(span).shape == (1, 2, 64)


def test_read_token(tmp_path, monkeypatch):
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    assert cli.read_token(None) is None
    for blank in ("", "  ", "\t\n"):  # set but blank: refused, never a silent "no authentication"
        monkeypatch.setenv(cli.TOKEN_ENV, blank)
        with pytest.raises(SystemExit, match="set but blank"):
            cli.read_token(None)
    monkeypatch.setenv(cli.TOKEN_ENV, "env-token")
    assert cli.read_token(None) == "env-token"
    f = tmp_path / "token"
    f.write_text("file-token\nsecond line\n")
    assert cli.read_token(f) == "file-token"  # a file wins over the variable
    for bad in ("", "  \n", "two words\n", "caf\u00e9\n"):
        f.write_text(bad)
        with pytest.raises(SystemExit):
            cli.read_token(f)
    with pytest.raises(SystemExit):
        cli.read_token(tmp_path / "missing")


def test_loopback_addresses():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")


def test_token_comparison():
    assert _token_ok(None, None) and _token_ok("anything", None)  # no token configured: open
    assert _token_ok("Bearer s3cret", "s3cret")
    for header in (None, "", "Bearer", "Bearer s3cre", "Bearer s3cret ", "s3cret", "Bearer s3cr\udcff", "Bearer \u00e9"):
        assert not _token_ok(header, "s3cret"), header


@pytest.mark.slow
def test_opened_reply_states_the_limits(cloud):
    conn = CloudConnection(cloud.ws, TOKEN)
    try:
        frame, _ = conn.request({"op": "open", "session": None, "step": 0})
        assert protocol.SESSION_RE.match(frame.session)
        assert set(frame.header["limits"]) >= {"max_context", "max_step_tokens", "max_frame_bytes", "idle_seconds"}
    finally:
        conn.close()


@pytest.mark.slow
def test_cloud_refuses_to_start_with_a_blank_token_variable(tiny_llama):
    """The real process: a set-but-blank $SPLITINFER_AUTH_TOKEN stops start-up instead of serving without auth."""
    import os
    import sys

    env = {**os.environ, cli.TOKEN_ENV: "   "}
    cmd = [sys.executable, "-m", "splitinfer", "cloud", "--model", str(tiny_llama), "--port", "1", "--ws-port", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "set but blank" in done.stderr
    assert "Traceback" not in done.stderr
