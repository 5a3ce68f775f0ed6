"""The local server for clients: an OpenAI-compatible HTTP API over the split model (see docs/local_server.md)."""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
