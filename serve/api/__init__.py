"""The OpenAI-compatible HTTP layer: wire format (protocol), app factory (server), one module per
endpoint family (chat, completions, embeddings, tokenize, status), Prometheus metrics."""

from serve.api.server import build_app

__all__ = ["build_app"]
