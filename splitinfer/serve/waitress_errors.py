"""waitress's own refusals (a body over the size cap, broken framing) in a JSON body of the API's choosing.

waitress answers these before the app sees the request, with a plain-text page; an API's
clients parse errors as JSON, so `json_errors` swaps in an error task that writes what
`ErrorBody` returns.  The listeners keep their own channel class (the lead's guarded
channel, say): only its error task changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer
from waitress.task import ErrorTask

# (status code, reason phrase, waitress's detail) -> the JSON body of the response.
ErrorBody = Callable[[int, str, str], bytes]


def json_errors(server: Any, error_body: ErrorBody) -> None:
    """Make every listener of `server` (one, or a MultiSocketServer's several) answer refusals in JSON."""

    class JsonErrorTask(ErrorTask):
        def execute(self) -> None:
            error = self.request.error
            body = error_body(error.code, error.reason, error.body)
            self.status = f"{error.code} {error.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    for listener in _listeners(server):
        base: type[HTTPChannel] = listener.channel_class
        listener.channel_class = type(f"Json{base.__name__}", (base,), {"error_task_class": JsonErrorTask})


def _listeners(server: Any) -> list[BaseWSGIServer]:
    if isinstance(server, BaseWSGIServer):
        return [server]
    return [d for d in server.map.values() if isinstance(d, BaseWSGIServer)]  # a MultiSocketServer
