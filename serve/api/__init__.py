"""The OpenAI-compatible HTTP layer: wire format (protocol), app factory (server), Prometheus metrics."""

from serve.api.server import build_app

__all__ = ["build_app"]
